"""`--mode` → attention backend, and the kernel backend inside the model: a tiny Llama step on the CPU
with the kernels in interpret mode (tp 1 and, under shard_map, tp 2) against the reference backend."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.config import ModelConfig
from jaxllm.models import build_model, init_kv_cache
from jaxllm.models.attention import AttentionMetadata, ReferenceAttention
from jaxllm.models.backends import (
    ModeChoice,
    PallasAttention,
    ReferenceInt8Attention,
    attention_backend,
    cache_bytes_per_slot,
    resolve_modes,
)
from jaxllm.parallel import make_mesh
from jaxllm.weights import random_params


@pytest.mark.parametrize(
    "modes,choice",
    [
        ([], ModeChoice()),
        (["triton_int8kv"], ModeChoice(int8_kv=True)),
        (["ppl_int8kv", "triton_flashdecoding"], ModeChoice(int8_kv=True, split="always")),
        (["triton_gqa_flashdecoding"], ModeChoice(split="always")),
        (["triton_gqa_attention"], ModeChoice(split="never")),
        (["ppl_fp16"], ModeChoice()),
        (["triton_w8a16", "triton_int8kv"], ModeChoice(int8_kv=True, weight_mode="triton_w8a16")),
        (["ppl_w8a8_mixdown"], ModeChoice(weight_mode="ppl_w8a8_mixdown")),
    ],
)
def test_mode_table(modes, choice):
    assert resolve_modes(modes) == choice
    backend = attention_backend(modes, "gpu")
    assert isinstance(backend, PallasAttention)
    assert (backend.int8_kv, backend.split) == (choice.int8_kv, choice.split)


@pytest.mark.parametrize("mode", ["triton_bogus", "w8a16"])
def test_unknown_modes_name_themselves(mode):
    with pytest.raises(ValueError, match=f"--mode {mode} is not supported yet"):
        attention_backend(["triton_int8kv", mode], "gpu")


def test_two_weight_quantisations_conflict():
    with pytest.raises(ValueError, match="triton_w4a16 conflicts with --mode triton_w8a16"):
        resolve_modes(["triton_w8a16", "triton_w4a16"])
    assert resolve_modes(["triton_w4a16", "ppl_w4a16"]).weight_mode == "ppl_w4a16"  # the same scheme twice


def test_conflicting_split_modes():
    with pytest.raises(ValueError, match="triton_flashdecoding"):
        resolve_modes(["triton_gqa_attention", "triton_flashdecoding"])


def test_cpu_uses_the_reference():
    assert isinstance(attention_backend([], "cpu"), ReferenceAttention)
    assert isinstance(attention_backend(["ppl_int8kv"], "cpu"), ReferenceInt8Attention)
    assert isinstance(attention_backend(["ppl_int8kv"], "cpu", interpret=True), PallasAttention)


def test_int8_cache_holds_twice_the_tokens():
    fp = cache_bytes_per_slot(attention_backend([], "gpu"), 8, 128, jnp.bfloat16)
    q8 = cache_bytes_per_slot(attention_backend(["triton_int8kv"], "gpu"), 8, 128, jnp.bfloat16)
    assert (fp, q8) == (8 * 128 * 2 * 2, 8 * (128 + 4) * 2)
    assert cache_bytes_per_slot(ReferenceInt8Attention(), 8, 128, jnp.bfloat16) == q8


CONFIG = dict(
    model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=256,
    rope_theta=10000.0,
)


def _run(backend, tp, prompts, steps=2, config=None):
    """Packed prefill of `prompts` then `steps` decode steps; logits of every step stacked [steps+1, rows, V]."""
    config = config or ModelConfig.from_hf_dict(CONFIG)
    mesh = make_mesh(tp)
    model = build_model(config, jnp.float32, backend=backend)
    params = random_params(model, mesh, tp, seed=3)
    width = 32
    capacity = [len(p) + steps for p in prompts]
    starts = np.cumsum([0] + capacity[:-1])
    slot_rows = [list(range(s, s + c))[::-1] for s, c in zip(starts, capacity)]  # descending: not contiguous
    scratch = sum(capacity)
    cache = init_kv_cache(model, scratch)
    step = jax.jit(lambda p, t, m, c: model.apply({"params": p}, t, m, c))
    meta = AttentionMetadata.for_sequences([(0, len(p)) for p in prompts], slot_rows, scratch, width)
    logits, cache = step(params, jnp.asarray(np.concatenate(prompts), jnp.int32), meta, cache)
    out = [logits]
    for t in range(steps):
        tokens = jnp.argmax(out[-1], axis=-1).astype(jnp.int32)
        meta = AttentionMetadata.for_sequences([(len(p) + t, 1) for p in prompts], slot_rows, scratch, width)
        logits, cache = step(params, tokens, meta, cache)
        out.append(logits)
    return np.stack([np.asarray(x) for x in out])


PROMPTS = [[5, 9, 2, 77, 31, 4, 8], [100, 3], [60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70]]


@pytest.fixture(autouse=True)
def full_float32_matmuls():
    """On a GPU, XLA's float32 dots default to TF32 (the model around the kernels: 2.7e-4 off on the H200); the
    comparisons here want float32, as on the CPU."""
    with jax.default_matmul_precision("highest"):
        yield


@pytest.mark.parametrize("tp,int8,head_dim", [(1, False, 16), (2, True, 16), (2, True, 32)])
def test_kernel_backend_in_model_matches_reference(tp, int8, head_dim):
    """Head dim 32 with int8: the cache stored as int16 pairs of columns ("pairs"), written and read per device."""
    mesh = make_mesh(tp)
    modes = ["triton_int8kv"] if int8 else []
    kernels = attention_backend(modes, "cpu", interpret=True, mesh=mesh)
    reference = attention_backend(modes, "cpu")
    config = ModelConfig.from_hf_dict(dict(CONFIG, hidden_size=4 * head_dim))
    if int8:
        assert (kernels.init_layer_cache(8, 2, head_dim, jnp.float32)[0].dtype == jnp.int16) == (head_dim >= 32)
    got = _run(kernels, tp, PROMPTS, config=config)
    want = _run(reference, tp, PROMPTS, config=config)
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=0)


def test_kernel_backend_takes_the_layers_attention_options():
    """Bloom's ALiBi (slopes split with the heads under --tp 2), with a window on layer 0 and soft-capped
    scores as Gemma-2 has them: every per-layer option passes through the backend to the kernel."""
    bloom = ModelConfig.from_hf_dict(dict(model_type="bloom", vocab_size=128, hidden_size=64, n_layer=2, n_head=4))
    config = dataclasses.replace(bloom, layer_windows=(4, None), attn_softcap=2.0)
    mesh = make_mesh(2)
    got = _run(attention_backend([], "cpu", interpret=True, mesh=mesh), 2, PROMPTS, config=config)
    want = _run(attention_backend([], "cpu"), 2, PROMPTS, config=config)
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=0)
