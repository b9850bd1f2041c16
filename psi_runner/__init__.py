"""psi-run: two-party PSI jobs from one shared spec, through OSX-style brokers."""

__version__ = "0.1.0"
