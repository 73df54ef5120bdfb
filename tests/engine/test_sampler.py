"""Sampler: LightLLM's penalty order and formulas, eos rules, and the distributions of top-k/top-p/temperature;
TGI's typical_p against transformers' TypicalLogitsWarper."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.engine.request import Request, SamplingParams
from jaxllm.engine.sampler import (
    SamplingBatch,
    apply_eos_rules,
    apply_penalties,
    sample,
    sampling_row,
    seed_words,
    typical_mask,
)

VOCAB = 32
EOS = (2,)


def batch(rows: list[tuple[SamplingParams, int, int]]):
    """SamplingBatch for (params, prompt_len, seed) per row."""
    reqs = [Request(f"r{i}", [5] * n, p.normalized(), seed=s, arrival=i) for i, (p, n, s) in enumerate(rows)]
    columns = list(zip(*(sampling_row(r, VOCAB) for r in reqs)))
    fields = {name: jnp.asarray(np.asarray(col, dtype)) for (name, dtype), col in zip(SamplingBatch.FIELDS, columns)}
    return SamplingBatch(**fields, seed=jnp.asarray(np.asarray([seed_words(r.seed) for r in reqs], np.uint32)))


sample_jit = jax.jit(sample, static_argnums=4, static_argnames="typical")


def expected_penalties(logits, counts: dict[int, int], rep, freq, pres):
    out = logits.copy()
    for token, count in counts.items():
        x = out[token]
        x = x / rep if x > 0 else x * rep
        out[token] = x - freq * count - pres
    return out


def test_penalties_change_logits_exactly_as_lightllm():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(1, VOCAB)).astype(np.float32) * 3
    history = np.array([[3, 4, 7, 7, 9, 3, 11, 12]], np.int32)
    counted = np.array([[False, False, True, True, True, True, False, False]])  # outputs 7, 7, 9, 3
    got = apply_penalties(jnp.asarray(logits), jnp.asarray(history), jnp.asarray(counted),
                          jnp.asarray([1.3]), jnp.asarray([0.25]), jnp.asarray([0.5]))
    expected = expected_penalties(logits[0], {7: 2, 9: 1, 3: 1}, 1.3, 0.25, 0.5)
    np.testing.assert_allclose(np.asarray(got)[0], expected, rtol=1e-6)


def test_sample_counts_only_output_positions():
    # Prompt [3, 4]; outputs 7, 7, 9, 3 (context 6); stale table entries past the context are ignored.
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(1, VOCAB)).astype(np.float32) * 3
    history = np.array([[3, 4, 7, 7, 9, 3, 11, 12]], np.int32)
    params = SamplingParams(repetition_penalty=1.3, frequency_penalty=0.25, presence_penalty=0.5)
    tokens, logprobs = sample_jit(jnp.asarray(logits), batch([(params, 2, 0)]), jnp.asarray(history),
                                  jnp.asarray([6]), ())
    expected = expected_penalties(logits[0], {7: 2, 9: 1, 3: 1}, 1.3, 0.25, 0.5)
    assert int(tokens[0]) == int(np.argmax(expected))
    log_probs = expected - expected.max() - np.log(np.exp(expected - expected.max()).sum())
    np.testing.assert_allclose(float(logprobs[0]), log_probs[int(tokens[0])], rtol=1e-5)


def test_input_penalty_counts_the_prompt():
    logits = jnp.zeros((2, VOCAB)).at[:, 3].set(1.0).at[:, 4].set(1.02)
    history = jnp.asarray([[4, 4, 3, 0]] * 2, jnp.int32)  # prompt 4 4, output 3
    rows = [(SamplingParams(presence_penalty=1.0, input_penalty=flag), 2, 0) for flag in (False, True)]
    tokens, _ = sample_jit(logits, batch(rows), history, jnp.asarray([3, 3]), ())
    # Without input_penalty only token 3 is penalised, so 4 wins; with it both are, and 4 still leads.
    assert tokens.tolist() == [4, 4]
    logits = logits.at[:, 3].set(1.1)
    tokens, _ = sample_jit(logits, batch(rows), history, jnp.asarray([3, 3]), ())
    assert tokens.tolist() == [4, 3]


def test_eos_decay_and_min_new_tokens():
    logits = jnp.asarray(np.linspace(-2, 2, VOCAB, dtype=np.float32))[None].repeat(3, 0)
    logits = logits.at[:, 2].set(-0.5)
    out_len = jnp.asarray([0, 3, 5])
    got = apply_eos_rules(logits, out_len, jnp.asarray([1, 1, 1]), jnp.asarray([1.5, 1.5, 1.0]),
                          jnp.asarray([2, 1, 1]), EOS)
    # row 0: 0 < min_new_tokens - 1 → masked; row 1: -0.5 + 0.5 × (1.5² - 1); row 2: factor 1 → unchanged.
    np.testing.assert_allclose(np.asarray(got[:, 2]), [-1e6, -0.5 + 0.5 * (1.5**2 - 1), -0.5], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(got[:, 3:]), np.asarray(logits[:, 3:]))


def test_greedy_picks_argmax_and_reports_log_softmax():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(4, VOCAB)).astype(np.float32))
    rows = [(SamplingParams(), 3, i) for i in range(4)]
    tokens, logprobs = sample_jit(logits, batch(rows), jnp.zeros((4, 8), jnp.int32), jnp.full(4, 3), EOS)
    np.testing.assert_array_equal(np.asarray(tokens), np.argmax(np.asarray(logits), -1))
    expected = jax.nn.log_softmax(logits)[jnp.arange(4), tokens]
    np.testing.assert_allclose(np.asarray(logprobs), np.asarray(expected), rtol=1e-5)


def draw_many(logits_row, params: SamplingParams, draws: int):
    """`draws` samples of one distribution: every row a different seed."""
    logits = jnp.asarray(logits_row, jnp.float32)[None].repeat(draws, 0)
    rows = [(params, 1, seed) for seed in range(draws)]
    tokens, logprobs = sample_jit(logits, batch(rows), jnp.zeros((draws, 8), jnp.int32), jnp.ones(draws, jnp.int32), ())
    return np.asarray(tokens), np.asarray(logprobs)


def chi_square_ok(counts: np.ndarray, probs: np.ndarray) -> bool:
    """Pearson's chi-square at the 0.1% level (critical value by Wilson–Hilferty)."""
    support = probs > 0
    assert counts[~support].sum() == 0, "a token outside the allowed set was drawn"
    expected = probs[support] * counts.sum()
    stat = float(((counts[support] - expected) ** 2 / expected).sum())
    k = int(support.sum()) - 1
    z = 3.09
    critical = k * (1 - 2 / (9 * k) + z * np.sqrt(2 / (9 * k))) ** 3
    return stat < critical


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(do_sample=True, temperature=1.0),
        SamplingParams(do_sample=True, temperature=0.7, top_k=5),
        SamplingParams(do_sample=True, temperature=1.3, top_p=0.6),
        SamplingParams(do_sample=True, temperature=0.9, top_p=0.8, top_k=4),
    ],
    ids=["plain", "top_k", "top_p", "top_p_and_k"],
)
def test_sampled_frequencies_match_the_intended_distribution(params):
    logits = np.random.default_rng(2).normal(size=VOCAB).astype(np.float32) * 1.5
    probs = np.exp(logits / params.temperature - np.max(logits / params.temperature))
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    before = np.cumsum(probs[order]) - probs[order]
    keep = before <= params.top_p
    if params.top_k > 0:
        keep &= np.arange(VOCAB) < params.top_k
    target = np.zeros(VOCAB)
    target[order[keep]] = probs[order[keep]]
    target /= target.sum()
    tokens, logprobs = draw_many(logits, params, 20000)
    assert chi_square_ok(np.bincount(tokens, minlength=VOCAB), target)
    # The logprob is that of the softmax before the top-p / top-k cut.
    np.testing.assert_allclose(logprobs, np.log(probs[tokens]), rtol=1e-4, atol=1e-5)


def test_top_p_with_a_large_vocabulary_takes_the_exact_path():
    # 2048 near-equal logits: the top 128 tokens hold ~7% of the mass, so top_p 0.5 needs the full sort.
    vocab = 2048
    logits = np.random.default_rng(3).normal(size=vocab).astype(np.float32) * 0.1
    params = SamplingParams(do_sample=True, top_p=0.5)
    req = Request("r", [1], params, seed=0, arrival=0)
    draws = 1000
    row = sampling_row(req, vocab)
    fields = {name: jnp.asarray(np.full(draws, v, dtype)) for (name, dtype), v in zip(SamplingBatch.FIELDS, row)}
    seeds = jnp.asarray(np.stack([np.arange(draws), np.zeros(draws)], 1).astype(np.uint32))
    tokens, _ = sample_jit(jnp.asarray(logits)[None].repeat(draws, 0), SamplingBatch(**fields, seed=seeds),
                           jnp.zeros((draws, 8), jnp.int32), jnp.ones(draws, jnp.int32), ())
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    allowed = set(order[(np.cumsum(probs[order]) - probs[order]) <= 0.5].tolist())
    drawn = set(np.asarray(tokens).tolist())
    assert drawn <= allowed and len(drawn) > 0.5 * len(allowed)


def test_a_seeded_request_draws_the_same_tokens_in_any_batch():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(6, VOCAB)).astype(np.float32)
    params = SamplingParams(do_sample=True, temperature=1.0, seed=1234)
    others = [(SamplingParams(do_sample=True, top_k=3), 1, s) for s in range(5)]
    alone, _ = sample_jit(jnp.asarray(logits[:1]), batch([(params, 1, 1234)]), jnp.zeros((1, 8), jnp.int32),
                          jnp.ones(1, jnp.int32), ())
    mixed_rows = others[:3] + [(params, 1, 1234)] + others[3:]
    mixed_logits = np.concatenate([logits[1:4], logits[:1], logits[4:6]])
    mixed, _ = sample_jit(jnp.asarray(mixed_logits), batch(mixed_rows), jnp.zeros((6, 8), jnp.int32),
                          jnp.ones(6, jnp.int32), ())
    assert int(mixed[3]) == int(alone[0])


def transformers_typical_keep(logits: np.ndarray, mass: float) -> np.ndarray:
    """The tokens transformers' TypicalLogitsWarper keeps (not -inf) of one row of logits (-inf: already cut)."""
    import torch
    from transformers.generation.logits_process import TypicalLogitsWarper

    scores = TypicalLogitsWarper(mass=mass)(None, torch.tensor(logits[None], dtype=torch.float32))
    return np.isfinite(scores.numpy()[0])


@pytest.mark.parametrize("mass", [0.05, 0.3, 0.7, 0.95, 0.999])
def test_typical_cut_keeps_what_transformers_keeps(mass):
    rng = np.random.default_rng(int(mass * 1000))
    logits = (rng.normal(size=(6, 500)) * rng.uniform(0.3, 4.0, (6, 1))).astype(np.float32)
    logits[3, rng.choice(500, 200, replace=False)] = -np.inf  # a row already cut by top-p / top-k
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs[np.isinf(logits)] = 0.0
    got = np.asarray(jax.jit(typical_mask)(jnp.asarray(probs), jnp.full(6, mass, jnp.float32)))
    for row in range(6):
        want = transformers_typical_keep(logits[row], mass)
        assert np.array_equal(got[row], want), (row, got[row].sum(), want.sum())


def test_typical_p_one_keeps_every_live_token():
    probs = np.random.default_rng(1).dirichlet(np.ones(64), size=3).astype(np.float32)
    probs[1, :10] = 0.0
    got = np.asarray(typical_mask(jnp.asarray(probs), jnp.ones(3, jnp.float32)))
    assert np.array_equal(got, probs > 0)


def test_typical_p_draws_follow_the_cut_distribution():
    logits = np.random.default_rng(4).normal(size=VOCAB).astype(np.float32) * 1.5
    params = SamplingParams(do_sample=True, temperature=0.8, top_p=0.95, typical_p=0.6)
    draws = 20000
    rows = [(params, 1, seed) for seed in range(draws)]
    tokens, logprobs = sample_jit(jnp.asarray(logits)[None].repeat(draws, 0), batch(rows),
                                  jnp.zeros((draws, 8), jnp.int32), jnp.ones(draws, jnp.int32), (), typical=True)
    scaled = logits / params.temperature
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    top_p_kept = np.full(VOCAB, -np.inf, np.float32)
    keep = order[(np.cumsum(probs[order]) - probs[order]) <= params.top_p]
    top_p_kept[keep] = scaled[keep]
    target = np.where(transformers_typical_keep(top_p_kept, params.typical_p), probs, 0.0)
    target /= target.sum()
    assert chi_square_ok(np.bincount(np.asarray(tokens), minlength=VOCAB), target)
    # The logprob is that of the softmax before the cuts.
    np.testing.assert_allclose(np.asarray(logprobs), np.log(probs[np.asarray(tokens)]), rtol=1e-4, atol=1e-5)


def test_logit_bias_changes_the_logits_as_transformers_sequence_bias_does():
    """OpenAI's logit_bias through the step's own path (RowValues → SamplingBatch → sample): each row's biases
    added to its logits, as transformers' SequenceBiasLogitsProcessor adds one-token biases; rows without any
    and padding rows unchanged."""
    torch = pytest.importorskip("torch")
    from transformers import SequenceBiasLogitsProcessor

    from jaxllm.engine.row_values import RowValues
    from jaxllm.engine.scheduler import ScheduledChunk, SchedulerOutput

    rng = np.random.default_rng(8)
    logits = rng.normal(size=(4, VOCAB)).astype(np.float32) * 2
    biases = [{5: 10.0, 7: -100.0, 30: 0.5}, {}, {int(np.argmax(logits[2])): -100.0, 0: 2.5}]
    reqs = [Request(f"b{i}", [5] * 3, SamplingParams(logit_bias=b).normalized(), seed=i, arrival=i)
            for i, b in enumerate(biases)]
    for i, req in enumerate(reqs):
        req.kv_row = i
    values = RowValues(num_rows=3, vocab_size=VOCAB)
    rows = values.rows_of(SchedulerOutput([ScheduledChunk(r, 0, 3) for r in reqs], [], "prefill"))
    width = values.bias_width(rows)
    assert width == 8
    sb = jax.tree.map(jnp.asarray, values.sampling(rows, 1, width))  # one padding row
    tokens, logprobs = sample_jit(jnp.asarray(logits), sb, jnp.zeros((4, 8), jnp.int32), jnp.full(4, 3), ())
    expected = torch.from_numpy(logits.copy())
    for i, bias in enumerate(biases):
        if bias:
            processor = SequenceBiasLogitsProcessor([[[t], b] for t, b in bias.items()])
            expected[i : i + 1] = processor(torch.zeros((1, 3), dtype=torch.long), expected[i : i + 1])
    expected = torch.log_softmax(expected, -1).numpy()
    np.testing.assert_array_equal(np.asarray(tokens), expected.argmax(-1))
    np.testing.assert_allclose(np.asarray(logprobs), expected[np.arange(4), expected.argmax(-1)], rtol=1e-5, atol=1e-6)
    assert np.asarray(tokens)[0] == 5 and np.asarray(tokens)[2] != np.argmax(logits[2])


def test_logit_bias_is_validated():
    SamplingParams(logit_bias={3: 100, 4: -100.0}).validate()
    for bad in ({3: 101}, {-1: 1.0}, {"3": 1.0}, {3: True}, {i: 1.0 for i in range(1025)}):
        with pytest.raises(ValueError, match="logit_bias"):
            SamplingParams(logit_bias=bad).validate()
