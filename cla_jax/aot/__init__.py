"""Ahead-of-time compilation for accelerators this host does not have."""
