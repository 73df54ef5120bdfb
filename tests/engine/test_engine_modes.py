"""Splitfuse and the prompt cache in the running engine (tiny random model, CPU): exact greedy outputs (float32
under preemption, eviction and aborts; int8 KV with --tp 2), no stream stalled by a 2,000-token prefill, a
shared 1,000-token system prompt computed once, aborts that release their prefix locks."""

import numpy as np
import pytest

from engine_helpers import GreedyReference, make_engine, random_prompts
from jaxllm.engine.request import SamplingParams

LONG_LIMITS = {"max_req_input_len": 2100, "max_req_total_len": 2200, "max_total_token_num": 4400,
               "batch_max_tokens": 2200, "running_max_req_size": 4}


def shared_prefix_prompts(seed: int, count: int) -> list[list[int]]:
    """Prompts of up to 40 tokens, most starting with one of two 12–24-token prefixes."""
    rng = np.random.default_rng(seed)
    prefixes = random_prompts(seed + 1, 2, max_len=24)
    prompts = []
    for i, tail in enumerate(random_prompts(seed + 2, count, max_len=14)):
        head = prefixes[i % 2][: int(rng.integers(12, 25))] if i % 3 else []
        prompts.append(head + tail)
    return prompts


def run_all(engine, prompts, params):
    streams = engine.submit_many([(p, sp, None) for p, sp in zip(prompts, params)])
    return [[e.token_id for e in s] for s in streams]


def assert_idle_with_nothing_leaked(engine):
    engine.kv.check([])
    assert engine.kv.num_locked == 0
    assert engine.kv.num_free + engine.kv.num_cached == engine.kv.num_slots


def test_splitfuse_with_the_prompt_cache_gives_exact_greedy_outputs_with_int8_kv_and_tp(tiny_model_dir):
    """Prompts of up to 40 tokens in blocks of 8, beside up to 4 decodes (every step fits one token bucket),
    int8 KV, two devices; the reference runs the same int8 model on whole sequences."""
    engine = make_engine(tiny_model_dir, splitfuse_mode=True, splitfuse_block_size=8, use_dynamic_prompt_cache=True,
                         running_max_req_size=4, mode=["triton_int8kv"], tp=2)
    assert len(engine.runner.mesh.devices.ravel()) == 2
    reference = GreedyReference(engine.runner.model, engine.runner.params)
    prompts = shared_prefix_prompts(seed=20, count=12)
    lengths = [int(n) for n in np.random.default_rng(21).integers(1, 13, size=12)]
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in lengths]
    with engine:
        first = run_all(engine, prompts[:6], params[:6])
        second = run_all(engine, prompts[6:], params[6:])  # admitted onto the prefixes the first ones cached
        stats = engine.stats()
        assert_idle_with_nothing_leaked(engine)
    assert stats["prompt_cache_hit_tokens"] >= 50
    assert stats["prefill_tokens"] == sum(map(len, prompts)) - stats["prompt_cache_hit_tokens"]
    for prompt, n, got in zip(prompts, lengths, first + second):
        assert got == reference.generate(prompt, n)


def test_preemption_eviction_and_aborts_in_a_tiny_cache_keep_outputs_exact(tiny_model_dir):
    """48 requests sharing prefixes in a 90-slot cache, admitted optimistically: requests are paused (their
    tokens cached), cached prefixes evicted and reused, a few aborted; the others' tokens stay exact."""
    engine = make_engine(tiny_model_dir, splitfuse_mode=True, splitfuse_block_size=8, use_dynamic_prompt_cache=True,
                         max_total_token_num=90, router_token_ratio=1.0, router_max_new_token_len=1)
    reference = GreedyReference(engine.runner.model, engine.runner.params)
    prompts = shared_prefix_prompts(seed=26, count=48)
    lengths = [int(n) for n in np.random.default_rng(27).integers(1, 20, size=48)]
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in lengths]
    aborted = {3, 17, 30}
    with engine:
        streams = engine.submit_many([(p, sp, f"q{i}") for i, (p, sp) in enumerate(zip(prompts, params))])
        for i in aborted:
            engine.abort(f"q{i}")
        results = [[e.token_id for e in s] for s in streams]
        stats = engine.stats()
        assert_idle_with_nothing_leaked(engine)
    assert stats["preemptions"] > 0 and stats["prompt_cache_hit_tokens"] > 100
    for i, (prompt, n, got) in enumerate(zip(prompts, lengths, results)):
        if i in aborted:
            assert got[-1] == -1
        else:
            assert got == reference.generate(prompt, n)


@pytest.fixture(scope="module")
def long_engine(tiny_model_dir):
    """Room for a 2,100-token prompt; splitfuse by blocks of 256, prompt cache on."""
    engine = make_engine(tiny_model_dir, splitfuse_mode=True, splitfuse_block_size=256,
                         use_dynamic_prompt_cache=True, **LONG_LIMITS)
    with engine:
        yield engine


def test_a_2000_token_prefill_never_stalls_the_running_streams(long_engine):
    steps = []
    long_engine.add_step_listener(steps.append)
    streams = [long_engine.submit(p, SamplingParams(max_new_tokens=40, ignore_eos=True))
               for p in random_prompts(seed=22, count=3)]
    for s in streams:
        next(s)  # all three are decoding
    del steps[:]
    long = long_engine.submit(random_prompts(seed=23, count=1, max_len=1)[0] * 2000,
                                   SamplingParams(max_new_tokens=2, ignore_eos=True))
    assert len(list(long)) == 2
    long_engine.remove_step_listener(steps.append)
    while_prefilling = [s for s in steps if s.prefill_tokens]
    assert [s.prefill_tokens for s in while_prefilling] == [256] * 7 + [2000 - 7 * 256]
    assert all(s.decode_requests == 3 and s.method == "prefill" for s in while_prefilling)
    assert all(len(list(s)) > 0 for s in streams)
    assert long_engine.stats()["kv_used"] == 0


def test_a_shared_1000_token_system_prompt_is_computed_once(long_engine):
    rng = np.random.default_rng(24)
    system = [int(t) for t in rng.integers(3, 256, size=1000)]
    questions = [[int(t) for t in rng.integers(3, 256, size=n)] for n in (7, 12)]
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    cold, warm = [], []
    for question in questions:
        long_engine.kv.clear_prefix_cache()  # idle: nothing locked
        before = long_engine.stats()["prefill_tokens"]
        cold.append([e.token_id for e in long_engine.submit(system + question, params)])
        assert long_engine.stats()["prefill_tokens"] - before == 1000 + len(question)
    for question in questions:  # each finds the other's system prompt cached (and its own question too)
        before = long_engine.stats()["prefill_tokens"]
        warm.append([e.token_id for e in long_engine.submit(system + question, params)])
        assert long_engine.stats()["prefill_tokens"] - before <= len(question)
    assert warm == cold
    assert_idle_with_nothing_leaked(long_engine)


def test_an_aborted_stream_releases_its_prefix_lock(long_engine):
    prompt = random_prompts(seed=25, count=1, max_len=40)[0] * 10
    stream = long_engine.submit(prompt, SamplingParams(max_new_tokens=100, ignore_eos=True), request_id="gone")
    first = next(stream)
    assert first.cached_tokens == 0 and first.queue_s >= 0
    assert long_engine.kv.num_locked >= len(prompt)
    long_engine.abort("gone")
    assert list(stream)[-1].finish_reason == "abort"
    assert_idle_with_nothing_leaked(long_engine)
    again = long_engine.submit(prompt, SamplingParams(max_new_tokens=1))
    assert next(again).cached_tokens == len(prompt) - 1
