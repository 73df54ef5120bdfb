"""jaxllm: an LLM inference server in JAX, a drop-in for LightLLM's api_server."""
