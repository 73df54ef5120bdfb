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


def _expected_prefill(chunks, shape, last_rows, scratch_slot, scratch_row):
    """A prefill step's per-token and per-row arrays written out token by token, padding as `build` documents."""
    tokens, src, positions, token_row, slots, targets = [], [], [], [], [], []
    kv_rows, context, q_start, q_lens = [], [], [], []
    for i, c in enumerate(chunks):
        req, start, stop = c.request, c.start, c.start + c.num_tokens
        q_start.append(len(tokens))
        for pos in range(start, stop):
            known = pos < req.num_known
            tokens.append(req.token_ids(pos, pos + 1)[0] if known else 0)
            src.append(-1 if known else last_rows[req.request_id])
            positions.append(pos)
            token_row.append(i)
            slots.append(req.slots[pos])
            wants = c.prompt_logprobs and pos + 1 < req.prompt_len
            targets.append(req.prompt_ids[pos + 1] if wants else 0)
        kv_rows.append(req.kv_row)
        context.append(stop)
        q_lens.append(c.num_tokens)
    real_tokens, real_rows = len(tokens), len(chunks)
    pad_tokens, pad_rows = shape.tokens - real_tokens, shape.rows - real_rows
    for j in range(pad_tokens):
        tokens.append(0), src.append(-1), positions.append(0), slots.append(scratch_slot), targets.append(0)
        token_row.append(real_rows + min(j, pad_rows - 1))
    for r in range(pad_rows):
        kv_rows.append(scratch_row)
        context.append(1)
        q_start.append(real_tokens + r if r < pad_tokens else shape.tokens)
        q_lens.append((1 if r < pad_rows - 1 else pad_tokens - r) if r < pad_tokens else 0)
    return dict(tokens=tokens, token_src=src, positions=positions, token_row=token_row, write_slots=slots,
                target_ids=targets, kv_rows=kv_rows, context_lens=context, query_start=q_start, query_lens=q_lens)


def test_a_prefill_steps_arrays_follow_its_chunks():
    """StepInputBuilder.build on ragged prefill chunks (some after cached positions, some with prompt logprobs, some
    whose last position's token is still on the device), padded: every per-token and per-row array as written out
    token by token."""
    from jaxllm.engine.request import Request, SamplingParams
    from jaxllm.engine.scheduler import ScheduledChunk, SchedulerOutput

    rng = np.random.default_rng(5)
    for trial in range(30):
        kv = KVCache(4000, 16)
        chunks, last_rows = [], {}
        for i in range(int(rng.integers(1, 8))):
            logprobs = bool(rng.random() < 0.3)
            req = Request(f"r{i}", rng.integers(0, 300, int(rng.integers(2, 40))).tolist(),
                          SamplingParams(max_new_tokens=8, prompt_logprobs=1 if logprobs else None), seed=i, arrival=i)
            req.output_ids += rng.integers(0, 300, int(rng.integers(0, 3))).tolist()
            kv.allocate(req, req.num_tokens + 1)
            last_rows[req.request_id] = int(rng.integers(0, 16))
            if rng.random() < 0.3:  # its last sampled token is still on the device
                start, n = req.num_tokens, 1
            else:
                start = int(rng.integers(0, req.num_tokens))
                n = int(rng.integers(1, req.num_tokens - start + 1))
            chunks.append(ScheduledChunk(req, start, n, start + n >= req.num_tokens,
                                         logprobs and req.num_output == 0))
        real = sum(c.num_tokens for c in chunks)
        shape = StepShape(real + int(rng.integers(0, 9)), len(chunks) + int(rng.integers(1, 4)), 64, False)
        builder = StepInputBuilder(kv, vocab_size=300)
        builder._last_rows = dict(last_rows)  # noqa: SLF001  as the previous step's launch leaves it
        host, offsets, rows = builder.build(SchedulerOutput(chunks, [], "prefill"), shape)
        want = _expected_prefill(chunks, shape, last_rows, kv.scratch_slot, kv.scratch_row)
        for name, values in want.items():
            got = getattr(host, name)
            assert got.dtype == np.int32 and got.tolist() == values, name
        assert offsets == want["query_start"][: len(chunks)]
        assert rows == {c.request.request_id: i for i, c in enumerate(chunks) if c.samples}
