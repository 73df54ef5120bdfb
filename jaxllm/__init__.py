"""jaxllm: an LLM inference server in JAX, a drop-in for LightLLM's api_server.

`from jaxllm import LLM, SamplingParams` is the offline API (loaded on first use, so that importing a
submodule such as jaxllm.args stays light).

Importing it also picks PJRT's TFRT GPU client for the process (and the processes it starts), read when JAX
starts its GPU backend: on an H200 it launches a batch-1 Llama-3-8B step in 1.2 ms of host time against 4.3 ms
for the default StreamExecutor client (docs/perf.md, session 14). XLA_PYTHON_CLIENT_USE_TFRT_GPU_CLIENT=0 set
beforehand keeps the default client.
"""

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_USE_TFRT_GPU_CLIENT", "1")

__all__ = ["LLM", "SamplingParams", "GenerationOutput"]


def __getattr__(name):
    if name in ("LLM", "GenerationOutput"):
        from jaxllm import offline

        return getattr(offline, name)
    if name == "SamplingParams":
        from jaxllm.engine.request import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'jaxllm' has no attribute {name!r}")
