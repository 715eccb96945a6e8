"""Benchmarks and reliability runs, run by hand (see BENCHMARKS.md and RELIABILITY.md)."""
