"""Sequence groups on the tiny model (float32, CPU): best_of members sharing one prefill sample exactly like
separate requests (member i with seed + i), greedy members equal the plain loop, groups paused and resumed
give the same tokens, an abort ends and frees the whole group, top-k logprobs come only where asked, and
--diverse_mode with the prompt cache."""

import numpy as np
import pytest

from engine_helpers import GreedyReference, make_engine, random_prompts
from jaxllm.engine.request import SamplingParams

SAMPLED = dict(do_sample=True, temperature=0.9, top_k=40, ignore_eos=True)


@pytest.fixture(scope="module")
def reference(tiny_engine):
    return GreedyReference(tiny_engine.runner.model, tiny_engine.runner.params)


def tokens(stream):
    return [e.token_id for e in stream]


def run_groups(engine, prompts, params):
    """Submit one group per prompt together; each group's members' token lists."""
    streams = [engine.submit_group(p, params) for p in prompts]
    return [[tokens(s) for s in group] for group in streams]


def assert_idle_and_empty(engine):
    assert engine.wait_idle(30)
    engine.kv.check([])
    assert engine.kv.num_free + engine.kv.num_cached == engine.kv.num_slots


def test_seeded_members_sample_like_separate_requests_with_seed_plus_i(tiny_engine):
    prompts = random_prompts(seed=20, count=2, max_len=14)
    params = SamplingParams(best_of=3, n=3, max_new_tokens=10, seed=41, **SAMPLED)
    groups = run_groups(tiny_engine, prompts, params)
    alone = [(p, SamplingParams(max_new_tokens=10, seed=41 + i, **SAMPLED), None) for p in prompts for i in range(3)]
    singles = [tokens(s) for s in tiny_engine.submit_many(alone)]
    assert [m for members in groups for m in members] == singles
    assert all(len({tuple(m) for m in members}) == 3 for members in groups)
    assert_idle_and_empty(tiny_engine)


def test_unseeded_members_differ_and_greedy_members_equal_the_plain_loop(tiny_engine, reference):
    prompt = random_prompts(seed=21, count=1, max_len=14)[0]
    sampled = run_groups(tiny_engine, [prompt], SamplingParams(best_of=4, n=4, max_new_tokens=12, **SAMPLED))[0]
    assert len({tuple(m) for m in sampled}) == 4
    greedy = run_groups(tiny_engine, [prompt], SamplingParams(best_of=2, n=2, max_new_tokens=12, ignore_eos=True))[0]
    assert greedy == [reference.generate(prompt, 12)] * 2


def test_groups_paused_and_resumed_give_the_same_tokens(tiny_model_dir, tiny_engine):
    prompts = [(p * 8)[:8] for p in random_prompts(seed=22, count=4, max_len=8)]  # two groups need 76 slots
    # Without ignore_eos the router expects few new tokens (router_max_new_token_len=1): it overcommits the KV.
    params = SamplingParams(best_of=3, n=3, max_new_tokens=14, seed=7, **{**SAMPLED, "ignore_eos": False})
    expected = run_groups(tiny_engine, prompts, params)
    tight = make_engine(tiny_model_dir, max_total_token_num=64, router_token_ratio=1.0, router_max_new_token_len=1,
                        router_max_wait_tokens=2)
    with tight:
        assert run_groups(tight, prompts, params) == expected
        assert tight.stats()["preemptions"] > 0
        assert_idle_and_empty(tight)


def test_aborting_a_member_ends_and_frees_the_whole_group(tiny_engine):
    prompt = random_prompts(seed=23, count=1, max_len=14)[0]
    streams = tiny_engine.submit_group(prompt, SamplingParams(best_of=3, n=3, max_new_tokens=40, **SAMPLED))
    next(iter(streams[0]))
    tiny_engine.abort(streams[1].request_id)
    reasons = [list(s)[-1].finish_reason for s in streams]
    assert reasons == ["abort"] * 3
    assert_idle_and_empty(tiny_engine)


def test_top_logprobs_are_the_most_likely_tokens_of_the_same_distribution(tiny_engine, reference):
    prompt = random_prompts(seed=24, count=1, max_len=14)[0]
    events = list(tiny_engine.submit(prompt, SamplingParams(max_new_tokens=4, ignore_eos=True, top_logprobs=5)))
    seq = list(prompt)
    for e in events:
        logits = reference.logits(seq)[-1].astype(np.float64)
        logp = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
        best = np.argsort(-logp)[:5]
        assert [t for t, _ in e.top_logprobs] == best.tolist()
        assert [lp for _, lp in e.top_logprobs] == pytest.approx(logp[best].tolist(), abs=1e-4)
        assert e.top_logprobs[0] == (e.token_id, pytest.approx(e.logprob))
        seq.append(e.token_id)
    plain = list(tiny_engine.submit(prompt, SamplingParams(max_new_tokens=2, ignore_eos=True)))
    assert all(e.top_logprobs is None for e in plain)


@pytest.fixture(scope="module")
def diverse_engine(tiny_model_dir):
    engine = make_engine(tiny_model_dir, diverse_mode=True, use_dynamic_prompt_cache=True)
    with engine:
        yield engine


def test_diverse_mode_with_the_prompt_cache(diverse_engine, tiny_engine):
    prompt = random_prompts(seed=25, count=1, max_len=6)[0] + [5] * 8
    params = SamplingParams(best_of=4, n=4, max_new_tokens=8, seed=3, **SAMPLED)
    first = [list(s) for s in diverse_engine.submit_group(prompt, params)]
    again = [list(s) for s in diverse_engine.submit_group(prompt, params)]
    expected = run_groups(tiny_engine, [prompt], params)[0]
    assert [tokens(m) for m in first] == [tokens(m) for m in again] == expected  # reproducible with seeds
    assert again[0][0].cached_tokens == len(prompt) - 1  # the first group's prompt was cached when it ended
    for member in first:  # per-token cumulative logprobs (LightLLM's diverse details)
        assert [e.cumlogprob for e in member] == pytest.approx(np.cumsum([e.logprob for e in member]).tolist())
    unseeded = [tokens(s) for s in diverse_engine.submit_group(prompt, SamplingParams(best_of=4, n=4, max_new_tokens=8, **SAMPLED))]
    assert len({tuple(m) for m in unseeded}) == 4
    assert_idle_and_empty(diverse_engine)
