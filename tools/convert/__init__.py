"""Model conversion: a Hugging Face directory or a llama.cpp GGUF file → a model directory jaxllm serves
(HF safetensors or orbax). CLI: `python -m tools.convert --help`; the default model: `tools.convert.default_model`."""

from tools.convert.checkpoint import ConvertError
from tools.convert.convert import convert

__all__ = ["ConvertError", "convert"]
