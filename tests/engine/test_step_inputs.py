"""`pack` / `unpack`: a step's host arrays travel to each device as one int32 buffer (one transfer per device
per step, whatever --tp) and come back out of it inside the step bit for bit (floats as float32, unsigned seeds
as uint32)."""

import jax
import numpy as np

from jaxllm.engine.kv_cache import KVCache
from jaxllm.engine.step_inputs import StepInputBuilder, pack, unpack
from jaxllm.engine.step_shapes import StepShape


def _random_like(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if a.dtype.kind == "f":
        return rng.standard_normal(a.shape).astype(a.dtype)
    info = np.iinfo(a.dtype)
    return rng.integers(info.min, info.max, a.shape, dtype=a.dtype, endpoint=True)


def test_pack_makes_one_int32_buffer_that_unpacks_bit_for_bit():
    rng = np.random.default_rng(0)
    builder = StepInputBuilder(KVCache(64, 4), vocab_size=300)
    padding = builder.padding(StepShape(24, 5, 64, False))  # a prefill step's arrays: [24] tokens, [5] rows
    host = jax.tree.map(lambda a: _random_like(np.asarray(a), rng), padding)
    words, layout = pack(host)
    assert isinstance(words, np.ndarray) and words.dtype == np.int32 and words.ndim == 1
    assert words.nbytes == sum(a.nbytes for a in jax.tree.leaves(host))
    inside = jax.jit(lambda w: unpack(w, layout))(words)
    for want, got in zip(jax.tree.leaves(host), jax.tree.leaves(inside), strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype
        assert np.array_equal(np.asarray(got).view(np.uint8), want.view(np.uint8))
    assert {a.dtype.kind for a in jax.tree.leaves(host)} >= {"f", "i", "u"}  # every kind of leaf was exercised
