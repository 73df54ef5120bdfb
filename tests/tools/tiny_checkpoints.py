"""Tiny checkpoints built inside the tests: a random HF Llama (transformers) and a llama.cpp-style GGUF of it
with a small byte-level BPE tokenizer, plus jaxllm's logits for a model directory."""

from __future__ import annotations

from pathlib import Path

import numpy as np

VOCAB_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB_MERGES = ["h e", "l l", "he ll"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PROMPT = [1, 120, 118, 104, 117, 13, 261, 2, 13, 1, 100, 118, 118, 108, 118, 119]  # 16 ids < vocab


def _byte_alphabet() -> list[str]:
    """GPT-2's byte-level alphabet: printable bytes stand for themselves, the rest map past U+0100."""
    printable = {*range(33, 127), *range(161, 173), *range(174, 256)}
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


VOCAB = VOCAB_SPECIALS + _byte_alphabet() + ["he", "ll", "hell"]  # 262 tokens


def tiny_llama_config(tie: bool):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=tie,
        initializer_range=0.15,  # logits of order one, so a 1e-4 tolerance means something
        bos_token_id=1,
        eos_token_id=2,
    )


def save_tiny_llama(dst: Path, tie: bool = False, seed: int = 0):
    """A random LlamaForCausalLM saved as safetensors in `dst`; returns the torch model (float32, eval)."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(tie)).eval()
    model.save_pretrained(dst, safe_serialization=True)
    return model


def transformers_logits(model, tokens: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float().numpy()  # [n, vocab]


def jaxllm_logits(model_dir: Path, tokens: list[int], tp: int = 1, load_format: str = "auto") -> np.ndarray:
    """Float32 logits of every position of one sequence, through jaxllm's loader and model."""
    import jax.numpy as jnp

    from jaxllm.config import ModelConfig
    from jaxllm.models import build_model, init_kv_cache
    from jaxllm.models.attention import AttentionMetadata
    from jaxllm.parallel import make_mesh
    from jaxllm.weights import load_params

    config = ModelConfig.from_model_dir(model_dir)
    model = build_model(config, jnp.float32)
    params = load_params(model, model_dir, make_mesh(tp), tp, load_format=load_format)
    n = len(tokens)
    meta = AttentionMetadata.for_sequences([(0, n)], [list(range(n))], scratch_slot=n, width=n)
    cache = init_kv_cache(model, n)
    logits, _ = model.apply({"params": params}, jnp.asarray(tokens, jnp.int32), meta, cache, all_logits=True)
    return np.asarray(logits)


def llama_cpp_permute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """The row order llama.cpp's converter gives q/k: each head's two rotary halves interleaved."""
    half = weight.shape[0] // n_heads // 2
    return weight.reshape(n_heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


_GGUF_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def write_tiny_gguf(path: Path, model, architecture: str = "llama", quantize_mlp: bool = True) -> None:
    """`model` (a tiny transformers Llama) as llama.cpp would store it: permuted q/k rows, Q8_0 MLP
    weights, F32 for the rest, no output.weight when embeddings are tied, and the tiny tokenizer."""
    import gguf
    from gguf.quants import quantize

    c = model.config
    writer = gguf.GGUFWriter(path, architecture)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    writer.add_vocab_size(c.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(VOCAB)
    writer.add_token_types([3] * len(VOCAB_SPECIALS) + [1] * (len(VOCAB) - len(VOCAB_SPECIALS)))
    writer.add_token_merges(VOCAB_MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    for name, value in model.state_dict().items():
        array = value.float().numpy()
        if name == "model.embed_tokens.weight":
            gguf_name = "token_embd.weight"
        elif name == "model.norm.weight":
            gguf_name = "output_norm.weight"
        elif name == "lm_head.weight":
            if c.tie_word_embeddings:
                continue
            gguf_name = "output.weight"
        else:
            layer, rest = name.removeprefix("model.layers.").split(".", 1)
            gguf_name = f"blk.{layer}.{_GGUF_LAYER_NAMES[rest.removesuffix('.weight')]}.weight"
        if gguf_name.endswith("attn_q.weight"):
            array = llama_cpp_permute(array, c.num_attention_heads)
        elif gguf_name.endswith("attn_k.weight"):
            array = llama_cpp_permute(array, c.num_key_value_heads)
        if quantize_mlp and ".ffn_" in gguf_name and not gguf_name.endswith("norm.weight"):
            q8 = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(gguf_name, quantize(array, q8), raw_dtype=q8)
        else:
            writer.add_tensor(gguf_name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
