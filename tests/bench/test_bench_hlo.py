"""`python -m jaxllm.bench.hlo`: the engine's tp-2 step, read from its optimised HLO, has one all-reduce after
attention and one after the MLP per layer, one for the vocabulary-split embedding lookup, and only [rows]-sized
collectives in the sampler (it works on vocabulary-split logits: nothing gathers them)."""

from jaxllm.bench.hlo import hlo_ops, step_hlo, summary
from jaxllm.config import ModelConfig

TINY = {"model_type": "llama", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}


def test_tp2_decode_step_has_two_all_reduces_per_layer_and_no_gathered_logits():
    config = ModelConfig.from_hf_dict(TINY)
    text = step_hlo(config, tp=2, rows=4, dtype="float32", mode=[])
    hidden = [op for op in hlo_ops(text, ("all-reduce",)) if op.types[0][1] == (4, 64)]
    assert len(hidden) == 2 * config.num_layers + 1  # attention and MLP per layer; the embedding lookup
    small = [op for op in hlo_ops(text, ("all-reduce", "all-gather")) if op not in hidden]
    assert small and all(op.elements <= 4 * 2 for op in small), small  # (max, argmax)-sized, never [rows, vocab]
    assert not hlo_ops(text, ("all-to-all", "collective-permute", "reduce-scatter"))
    assert summary(text, config)["total_collectives"] == len(hidden) + len(small)
