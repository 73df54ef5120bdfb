"""jaxllm: an LLM inference server in JAX, a drop-in for LightLLM's api_server.

`from jaxllm import LLM, SamplingParams` is the offline API (loaded on first use, so that importing a
submodule such as jaxllm.args stays light).
"""

__all__ = ["LLM", "SamplingParams", "GenerationOutput"]


def __getattr__(name):
    if name in ("LLM", "GenerationOutput"):
        from jaxllm import offline

        return getattr(offline, name)
    if name == "SamplingParams":
        from jaxllm.engine.request import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'jaxllm' has no attribute {name!r}")
