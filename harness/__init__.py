"""Test, demo and benchmark harness: local brokers, parties and Ray heads (not installed)."""
