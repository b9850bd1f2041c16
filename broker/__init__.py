"""psi-broker: an OSX-style PTP transport broker (HTTP and gRPC queue API, routing, relay)."""
