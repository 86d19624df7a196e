"""Validation harness, benchmarks and reports for basel-edge."""
