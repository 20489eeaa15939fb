"""Benchmarks and the scenario suite (run as modules: ``python -m benchmarks.<name>``)."""
