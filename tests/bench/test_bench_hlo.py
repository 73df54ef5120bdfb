"""`python -m jaxllm.bench.hlo`: the engine's tp-2 step, read from its optimised HLO, has one all-reduce after
attention and one after the MLP per layer, one for the vocabulary-split embedding lookup, and three [rows]-sized
ones in the greedy sampler (it works on vocabulary-split logits: nothing gathers them); no copy of a KV buffer or
of a weight. Both attention paths: the CPU's plain-JAX attention and the GPU's (the Pallas kernels per device under
shard_map, compiled here in interpret mode)."""

import pytest

from jaxllm.bench.hlo import hlo_ops, kv_buffer_elements, step_hlo, summary
from jaxllm.config import ModelConfig
from jaxllm.models.quant import with_weight_mode

TINY = {"model_type": "llama", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}


@pytest.mark.parametrize("interpret, decode, tokens, rows", [
    (False, True, 4, 4),  # the CPU's attention, a decode of 4 rows
    (True, True, 4, 4),  # the GPU's attention path: a decode of 4 rows
    (True, False, 32, 32),  # ... and a prefill of 32 tokens (a row per token)
], ids=["reference-decode", "pallas-decode", "pallas-prefill"])
def test_tp2_step_has_two_all_reduces_per_layer_and_nothing_gathered_or_copied(interpret, decode, tokens, rows):
    config = ModelConfig.from_hf_dict(TINY)
    text = step_hlo(config, tp=2, rows=tokens, dtype="float32", mode=[], decode=decode, interpret=interpret)
    hidden = [op for op in hlo_ops(text, ("all-reduce",)) if op.types[0][1] == (tokens, 64)]
    assert len(hidden) == 2 * config.num_layers + 1  # attention and MLP per layer; the embedding lookup
    # The greedy sampler over the vocabulary-split logits: their maximum, the softmax's sum and the argmax's
    # first index, each [rows]; nothing gathers the logits.
    small = [op for op in hlo_ops(text, ("all-reduce",)) if op not in hidden]
    assert sorted(str(op) for op in small) == [f"all-reduce f32[{rows}]"] * 2 + [f"all-reduce s32[{rows}]"], small
    assert not hlo_ops(text, ("all-gather", "all-to-all", "collective-permute", "reduce-scatter"))
    report = summary(text, config)
    assert report["total_collectives"] == len(hidden) + len(small)
    assert report["entry_ops"]["all-reduce"] == report["total_collectives"]
    rows_of_kv = kv_buffer_elements(text) // 16  # a layer's K buffer on one device: [rows, 1 of 2 KV heads, 16]
    assert rows_of_kv == (264 if interpret else 257)  # 256 slots + scratch (the Pallas caches: to a multiple of 8)
    assert not [op for op in hlo_ops(text, ("copy", "transpose")) if op.types[0][1] == (rows_of_kv, 1, 16)]
    if interpret:  # nothing as large as a KV buffer (the reference attention gathers each row's K/V: [rows, heads,
        # width, head_dim] copies, the CPU's path only)
        large = [op for op in hlo_ops(text, ("copy", "transpose")) if op.elements >= rows_of_kv * 16]
        assert not large, large


def test_tp2_step_with_int8_weights_gathers_no_weight():
    """w8a16 under --tp 2: the int8 products split like their 16-bit twins' (the MLP's [2, intermediate] output
    axes were once merged, which made the partitioner gather the whole gate/up weight every step)."""
    config = with_weight_mode(ModelConfig.from_hf_dict(TINY), "triton_w8a16", TINY)
    text = step_hlo(config, tp=2, rows=4, dtype="float32", mode=["triton_w8a16"], interpret=True)
    hidden = [op for op in hlo_ops(text, ("all-reduce",)) if op.types[0][1] == (4, 64)]
    assert len(hidden) == 2 * config.num_layers + 1
    assert not hlo_ops(text, ("all-gather",))
    assert not [op for op in hlo_ops(text, ("copy", "transpose")) if op.elements >= 64 * 128], "a weight is copied"
