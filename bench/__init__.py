"""Benchmarks: they print figures, they do not assert them (these machines are noisy)."""
