"""Benchmarks: `python -m jaxllm.bench serve` (load generator against a server) and `offline` (the engine)."""
