"""Scheduler: LightLLM's router semantics, preemption and prompt checks, driven without a device."""

from types import SimpleNamespace

import numpy as np
import pytest

from jaxllm.engine.request import RequestStatus, SamplingParams
from jaxllm.engine.scheduler import _PeakEstimate, _peak_tokens_of, check_prompt
from sched_helpers import EOS, dispatch, make_scheduler, request, run_step


# --- prompt checks -----------------------------------------------------------------------------------
def limits(mode=None):
    return SimpleNamespace(max_req_input_len=10, max_req_total_len=20, max_total_token_num=30,
                           long_truncation_mode=mode)


def test_long_prompts_are_rejected_or_truncated():
    prompt = list(range(15))
    params = SamplingParams(max_new_tokens=5)
    with pytest.raises(ValueError, match="max_req_input_len"):
        check_prompt(prompt, params, limits(None))
    assert check_prompt(prompt, params, limits("head")) == list(range(5, 15))
    assert check_prompt(prompt, params, limits("center")) == [0, 1, 2, 3, 4, 10, 11, 12, 13, 14]
    odd = SimpleNamespace(**{**vars(limits("center")), "max_req_input_len": 7})
    assert check_prompt(prompt, params, odd) == [0, 1, 2, 11, 12, 13, 14]


def test_total_length_checks():
    with pytest.raises(ValueError, match="max_req_total_len"):
        check_prompt(list(range(10)), SamplingParams(max_new_tokens=11), limits())
    tight = SimpleNamespace(**{**vars(limits()), "max_total_token_num": 20})
    with pytest.raises(ValueError, match="max_total_token_num"):
        check_prompt(list(range(10)), SamplingParams(max_new_tokens=10), tight)
    with pytest.raises(ValueError, match="empty"):
        check_prompt([], SamplingParams(), limits())


# --- admission ---------------------------------------------------------------------------------------
def _peak_tokens(estimates):
    held, left = np.array(estimates, np.int64).reshape(-1, 2).T
    return _peak_tokens_of(held, left)


def _lightllm_estimate(sched, req, busy):
    """LightLLM's get_tuple_tokens for one request, written out plainly."""
    out, max_new = req.num_output, req.params.max_new_tokens
    if not (busy or req.params.ignore_eos):
        max_new = min(max_new, max(int(1.1 * out), sched.config.router_max_new_token_len))
    held = req.num_tokens - req.num_cached
    if req.status is RequestStatus.RUNNING:
        return held, max(0, max_new - out - 1)
    return held + 1, max(0, max_new - out - 2)


def test_peak_estimate_matches_lightllm_formula():
    # Sorted by tokens left: (10 held, 5 left), (20 held, 1 left): max(5·1 + 10, 1·2 + 30) = 32.
    assert _peak_tokens([(20, 1), (10, 5)]) == 32
    assert _peak_tokens([]) == 0


@pytest.mark.parametrize("ratio", [0.0, 0.9])
def test_peak_estimate_equals_the_per_request_formula(ratio):
    rng = np.random.default_rng(1)
    sched = make_scheduler(capacity=2000, router_token_ratio=ratio, router_max_new_token_len=8)
    for i in range(12):
        sched.add(request(i, int(rng.integers(1, 60)), max_new=int(rng.integers(1, 90)),
                          ignore_eos=bool(i % 3 == 0)))
    inflight, checked = None, 0
    while sched.has_work() or inflight is not None:
        out = sched.schedule() if sched.has_work() else None
        if out is not None:
            dispatch(sched, out)
        if sched.running:
            busy = sched._busy()
            expected = _peak_tokens([_lightllm_estimate(sched, r, busy) for r in sched.running]) + sched.kv.num_locked
            assert sched.estimated_peak() == expected
            checked += 1
        if inflight is not None:
            run_step(sched, inflight, lambda r: EOS if rng.random() < 0.05 else 9)
        inflight = out if out is not None and out.chunks else None
    assert checked > 20


def test_prefill_batch_is_capped_by_batch_max_tokens():
    sched = make_scheduler(batch_max_tokens=64)
    for i in range(5):
        sched.add(request(i, 30))
    out = sched.schedule()
    assert out.kind == "prefill"
    assert [(c.request.request_id, c.start, c.num_tokens) for c in out.chunks] == [("r0", 0, 30), ("r1", 0, 30)]
    assert sched.kv.num_used == 60


def test_a_step_says_whether_it_decodes_every_request_that_can():
    """decodes_all (the engine's looking ahead): a decode step always; a prefill step only while no running
    request waits to decode (the router's prefill steps leave the decodes out)."""
    sched = make_scheduler(batch_max_tokens=64, router_max_wait_tokens=0)  # new requests tried every step
    sched.add(request(0, 30))
    first = sched.schedule()
    assert first.kind == "prefill" and first.decodes_all  # nothing else runs
    dispatch(sched, first)
    sched.add(request(1, 20))
    second = sched.schedule()  # r0's first token is on its way: it waits out this prefill
    assert second.kind == "prefill" and [c.request.request_id for c in second.chunks] == ["r1"]
    assert not second.decodes_all
    dispatch(sched, second)
    run_step(sched, first, lambda r: 9)
    third = sched.schedule()
    assert third.kind == "decode" and third.decodes_all and len(third.chunks) == 2


def test_conservative_admission_reserves_max_new_tokens():
    # Busy (ratio 0.0): each request is counted at prompt + max_new_tokens; 3 × (10 + 100) > 300.
    sched = make_scheduler(capacity=300)
    for i in range(3):
        sched.add(request(i, 10, max_new=100))
    assert len(sched.schedule().chunks) == 2
    # Not busy: future use is estimated with router_max_new_token_len instead.
    relaxed = make_scheduler(capacity=300, router_token_ratio=0.9, router_max_new_token_len=20)
    for i in range(3):
        relaxed.add(request(i, 10, max_new=100))
    assert len(relaxed.schedule().chunks) == 3


def test_running_max_req_size_caps_running_requests():
    sched = make_scheduler(running_max_req_size=3)
    for i in range(5):
        sched.add(request(i, 4))
    assert len(sched.schedule().chunks) == 3
    assert len(sched.waiting) == 2


def test_new_requests_wait_router_max_wait_tokens_decode_steps():
    sched = make_scheduler(router_max_wait_tokens=3)
    sched.add(request(0, 4, max_new=50))
    out = sched.schedule()
    dispatch(sched, out)
    sched.add(request(1, 4, max_new=50))
    kinds = []
    for _ in range(5):
        out = sched.schedule()
        kinds.append(out.kind)
        dispatch(sched, out)
        run_step(sched, out, lambda r: 9)
    assert kinds == ["decode", "decode", "decode", "prefill", "decode"]


# --- preemption --------------------------------------------------------------------------------------
def test_cache_shortage_pauses_the_youngest_and_resumes_it_by_recomputation():
    sched = make_scheduler(capacity=40, router_token_ratio=1.0, router_max_new_token_len=1)
    for i in range(3):
        sched.add(request(i, 10, max_new=20))
    out = sched.schedule()
    assert len(out.chunks) == 3
    paused = None
    for _ in range(12):
        dispatch(sched, out)
        run_step(sched, out, lambda r: 9)
        out = sched.schedule()
        if out.preempted:
            paused = out.preempted
            break
    assert [r.request_id for r in paused] == ["r2"]
    victim = paused[0]
    assert victim.status is RequestStatus.PAUSED and victim.slots == [] and victim.kv_row == -1
    assert sched.waiting[0] is victim
    generated = victim.num_output
    # Run the others to completion; the victim comes back with prompt + generated tokens recomputed.
    resumed = None
    while resumed is None:
        dispatch(sched, out)
        run_step(sched, out, lambda r: 9)
        out = sched.schedule()
        resumed = next((c for c in out.chunks if c.request is victim), None)
    assert out.kind == "prefill"
    assert (resumed.start, resumed.num_tokens) == (0, 10 + generated)
    assert victim.output_ids == [9] * generated


def test_thousands_of_random_requests_finish_without_leaking():
    """Random lengths, eos, aborts and preemptions through the engine's one-step-behind protocol."""
    rng = np.random.default_rng(0)
    sched = make_scheduler(capacity=600, running_max_req_size=16, batch_max_tokens=200,
                           router_token_ratio=0.5, router_max_new_token_len=8, router_max_wait_tokens=4)
    submitted, preempted, finished = 0, 0, 0
    all_requests = []
    inflight = None
    step = 0
    while submitted < 3000 or sched.has_work() or inflight is not None:
        step += 1
        for _ in range(int(rng.poisson(0.8))):
            if submitted < 3000:
                req = request(submitted, int(rng.integers(1, 120)), max_new=int(rng.integers(1, 60)),
                              ignore_eos=bool(rng.random() < 0.3))
                sched.add(req)
                all_requests.append(req)
                submitted += 1
        if rng.random() < 0.02 and sched.running:  # a client goes away
            victim = sched.running[int(rng.integers(len(sched.running)))]
            sched.finish(victim, "abort")
        out = sched.schedule() if sched.has_work() else None
        if out is not None:
            preempted += len(out.preempted)
            dispatch(sched, out)
            for req in sched.running:
                assert len(req.slots) == req.num_computed
        if inflight is not None:
            run_step(sched, inflight, lambda r: EOS if rng.random() < 0.05 else 9)
        inflight = out if out is not None and out.chunks else None
        if step % 500 == 0:
            sched.kv.check(sched.running)
    finished = sum(r.finished for r in all_requests)
    assert finished == 3000
    assert preempted > 0
    sched.kv.check([])
    assert sched.kv.num_free == 600


def _peak_by_hand(held, left) -> int:
    """LightLLM's peak, written out: requests by tokens left, longest first; at each rank the tokens held by
    those so far plus the longest one's remaining tokens times the rank."""
    ranked = sorted(zip(left.tolist(), held.tolist()), key=lambda p: -p[0])
    total, best = 0, 0
    for rank, (l, h) in enumerate(ranked, start=1):
        total += h
        best = max(best, l * rank + total)
    return best


def test_the_growing_peak_estimate_equals_the_estimate_written_out():
    """Admission's _PeakEstimate, grown one request or group at a time (ties in tokens left included), and
    _peak_tokens_of over the whole set, against the estimate computed by hand."""
    rng = np.random.default_rng(3)
    for trial in range(50):
        n = int(rng.integers(0, 40))
        held, left = rng.integers(0, 300, n), rng.integers(0, 20 if trial % 2 else 500, n)
        peak = _PeakEstimate(held, left)
        assert peak.tokens() == _peak_tokens_of(held, left) == _peak_by_hand(held, left) and peak.count == n
        for _ in range(int(rng.integers(1, 6))):
            k = int(rng.integers(1, 4))
            more_held, more_left = rng.integers(0, 300, k), rng.integers(0, 20 if trial % 2 else 500, k)
            peak.add(more_held, more_left)
            held, left = np.concatenate([held, more_held]), np.concatenate([left, more_left])
            assert peak.tokens() == _peak_by_hand(held, left) and peak.count == len(held)
