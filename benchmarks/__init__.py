"""Benchmarks against the real services (run as scripts: python -m benchmarks.NAME)."""
