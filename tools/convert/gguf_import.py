"""A llama.cpp GGUF file → an HF-layout checkpoint: dequantised float32 tensors with HF names, config.json
from the GGUF metadata, and the tokenizer (built by transformers from the GGUF's tokenizer fields)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from tools.convert.checkpoint import Checkpoint, ConvertError, LazyTensor

SUPPORTED_ARCHITECTURES = ("llama",)

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.weight")
_MISSING = object()


def hf_name(gguf_name: str) -> str:
    """llama.cpp tensor name → Hugging Face Llama tensor name."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_TENSOR.fullmatch(gguf_name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}.weight"
    if gguf_name == "rope_freqs.weight":
        raise ConvertError("GGUF with rope_freqs (Llama-3.1 rope scaling) is not supported")
    raise ConvertError(f"unsupported GGUF tensor {gguf_name!r}")


def unpermute_rotary_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order. Per head, HF keeps the two rotary halves apart (row j·d/2 + i);
    llama.cpp interleaves them (row 2i + j). weight [n_heads·head_dim, in] → same shape, HF order."""
    rows = weight.shape[0]
    half = rows // n_heads // 2
    return weight.reshape(n_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _field(reader, key: str, default: Any = _MISSING) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is _MISSING:
            raise ConvertError(f"GGUF metadata lacks {key}")
        return default
    return field.contents()


def _shortest_float(value: float) -> float:
    """GGUF stores float32; 9.999999747e-06 → 1e-05 (the same float32, written as its author meant)."""
    return float(str(np.float32(value)))


def gguf_config(reader, has_output: bool) -> dict[str, Any]:
    """config.json of the Llama model described by the GGUF's `llama.*` and `tokenizer.ggml.*` metadata."""
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ConvertError(f"GGUF architecture {arch!r} is not supported (only {', '.join(SUPPORTED_ARCHITECTURES)})")
    p = arch + "."
    hidden = int(_field(reader, p + "embedding_length"))
    heads = int(_field(reader, p + "attention.head_count"))
    head_dim = int(_field(reader, p + "attention.key_length", hidden // heads))
    rotary_dim = int(_field(reader, p + "rope.dimension_count", head_dim))
    if rotary_dim != head_dim:
        raise ConvertError(f"partial rotary embedding ({rotary_dim} of {head_dim} dims) is not supported")
    scaling = _field(reader, p + "rope.scaling.type", "none")
    if scaling != "none":
        raise ConvertError(f"GGUF rope scaling {scaling!r} is not supported")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": len(_field(reader, "tokenizer.ggml.tokens")),
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, p + "feed_forward_length")),
        "num_hidden_layers": int(_field(reader, p + "block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, p + "attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _shortest_float(_field(reader, p + "attention.layer_norm_rms_epsilon")),
        "rope_theta": _shortest_float(_field(reader, p + "rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_field(reader, p + "context_length")),
        "tie_word_embeddings": not has_output,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }
    config.update(_special_token_ids(reader))
    return config


def _special_token_ids(reader) -> dict[str, int]:
    ids = {}
    keys = {"bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id", "pad_token_id": "padding_token_id"}
    for ours, theirs in keys.items():
        value = _field(reader, "tokenizer.ggml." + theirs, None)
        if value is not None:
            ids[ours] = int(value)
    return ids


def _lazy_tensor(tensor, hf: str, config: dict[str, Any]) -> LazyTensor:
    from gguf.quants import dequantize

    shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dims innermost first
    if hf.endswith("q_proj.weight"):
        heads = config["num_attention_heads"]
    elif hf.endswith("k_proj.weight"):
        heads = config["num_key_value_heads"]
    else:
        heads = None

    def read() -> np.ndarray:
        values = dequantize(tensor.data, tensor.tensor_type).astype(np.float32).reshape(shape)
        return unpermute_rotary_rows(values, heads) if heads else values

    return LazyTensor(shape, np.dtype(np.float32), read)


def _tokenizer_writer(path: Path):
    def write(dst: Path) -> None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        tokenizer.save_pretrained(dst)

    return write


def read_gguf(path: str | Path) -> Checkpoint:
    """The GGUF file as an HF-layout float32 checkpoint (tensors dequantised when read)."""
    from gguf import GGUFReader

    path = Path(path)
    try:
        reader = GGUFReader(path)
    except (ValueError, OSError) as err:
        raise ConvertError(f"{path} is not a readable GGUF file: {err}") from err
    names = [t.name for t in reader.tensors]
    config = gguf_config(reader, has_output="output.weight" in names)
    tensors = {}
    for tensor in reader.tensors:
        hf = hf_name(tensor.name)
        tensors[hf] = _lazy_tensor(tensor, hf, config)
    embed = tensors.get("model.embed_tokens.weight")
    if embed is None or embed.shape != (config["vocab_size"], config["hidden_size"]):
        raise ConvertError(f"token_embd.weight does not match the tokenizer's {config['vocab_size']} tokens")
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
    return Checkpoint(
        config=config,
        tensors=tensors,
        source_dtype="float32",
        write_tokenizer=_tokenizer_writer(path),
        generation_config=generation or None,
    )

