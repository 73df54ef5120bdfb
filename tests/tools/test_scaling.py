"""tools/convert/scaling.py: per-input scales folded into a tiny random GQA Llama (4 query heads on 2 KV heads)
leave its 16-bit logits unchanged, including `o_proj`'s scales folded through v, which must be shared by the
query heads of one KV head."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from tiny_checkpoints import save_tiny_llama

from tools.convert.scaling import fold_scales


def test_folded_scales_keep_the_16_bit_logits_on_gqa(tmp_path):
    from jaxllm.config import ModelConfig
    from jaxllm.models import build_model, one_sequence
    from jaxllm.parallel import make_mesh
    from jaxllm.weights import load_hf

    save_tiny_llama(tmp_path, seed=5)
    model = build_model(ModelConfig.from_model_dir(tmp_path), jnp.float32)
    config = model.config
    assert config.num_kv_heads < config.num_heads
    params = jax.tree.map(lambda a: np.array(a, np.float32), load_hf(model, tmp_path, make_mesh(1), 1))
    rng = np.random.default_rng(11)
    ids = rng.integers(3, config.vocab_size, 24)
    step = jax.jit(lambda p: model.apply({"params": p}, jnp.asarray(ids, jnp.int32), *one_sequence(model, ids.size),
                                         all_logits=True)[0])
    with jax.default_matmul_precision("highest"):
        before = np.asarray(step(params))
    ties = {}

    def choose(stat, w, tie=None):  # random scales over 1/8 … 8, equal within a tie
        s = np.exp(rng.uniform(-2.0, 2.0, w.shape[0] if tie is None else tie.max() + 1))
        if tie is not None:
            ties[len(ties)] = tie
            s = s[tie]
        return s.astype(np.float32), None

    paths = [(f"layers_{i}", m, n) for i in range(config.num_layers)
             for m, n in (("self_attn", "qkv_proj"), ("self_attn", "o_proj"), ("mlp", "gate_up_proj"),
                          ("mlp", "down_proj"))]
    chosen = fold_scales(params, config, dict.fromkeys(paths), choose, through_v=True)
    assert sorted(chosen) == sorted(paths)
    # o_proj's input (h, c) shares its scale with the other query heads of h's KV head, and only with them
    assert len(ties) == config.num_layers
    group, d = config.group_size, config.head_dim
    heads = np.arange(config.num_heads * d) // d
    for tie in ties.values():
        same = tie[:, None] == tie[None, :]
        np.testing.assert_array_equal(same, (heads[:, None] // group == heads[None, :] // group)
                                      & (np.arange(tie.size)[:, None] % d == np.arange(tie.size)[None, :] % d))
    with jax.default_matmul_precision("highest"):
        after = np.asarray(step(params))
    assert np.abs(before).max() > 0.1
    np.testing.assert_allclose(after, before, rtol=0, atol=2e-4)
