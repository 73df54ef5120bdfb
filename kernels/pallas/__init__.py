"""Pallas attention kernels over the engine's token-level KV cache, with plain-JAX references."""
