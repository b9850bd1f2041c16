"""PSI backends: each runs the identical call on both parties."""
