"""The prompt cache (--use_dynamic_prompt_cache) in the KV accounting and the schedulers, without a device:
prefix reuse, slot ownership, eviction that spares slots in use, admission and load that count a shared
prefix once, and no leak under thousands of random requests."""

import numpy as np
import pytest

from jaxllm.engine.kv_cache import KVCache, KVCacheFull
from jaxllm.engine.prefix_cache import PrefixCache
from jaxllm.engine.request import RequestStatus
from jaxllm.engine.scheduler import Scheduler
from jaxllm.engine.splitfuse import SplitFuseScheduler
from sched_helpers import EOS, dispatch, make_scheduler, request, run_step

SYSTEM = [int(t) for t in np.random.default_rng(0).integers(3, 200, size=1000)]


def test_a_second_request_with_the_same_system_prompt_computes_only_its_new_tokens():
    sched = make_scheduler(capacity=4000, prompt_cache=True, router_max_wait_tokens=0)
    first = request(0, SYSTEM + [11, 12, 13], max_new=2)
    sched.add(first)
    out = sched.schedule()
    assert [(c.start, c.num_tokens, c.cached_prefix) for c in out.chunks] == [(0, 1003, 0)]
    dispatch(sched, out)  # on the device: its prompt is cached while it runs
    assert sched.kv.num_cached == 1003 and first.num_cached == 1003
    second = request(1, SYSTEM + [21, 22, 23, 24], max_new=2)
    sched.add(second)
    out = sched.schedule()
    assert [(c.request, c.start, c.num_tokens, c.cached_prefix) for c in out.chunks] == [(second, 1000, 4, 1000)]
    assert second.slots[:1000] == first.slots[:1000] and second.cache_hit == 1000
    # Used KV counts the shared prefix once: 1003 cached (locked) + 4 private slots.
    assert sched.kv.num_used == 1003 + 4
    sched.kv.check(sched.running)


def test_an_identical_prompt_still_computes_its_last_token():
    sched = make_scheduler(capacity=200, prompt_cache=True)
    sched.add(request(0, SYSTEM[:50], max_new=1))
    out = sched.schedule()
    dispatch(sched, out)
    run_step(sched, out, lambda r: 9)  # finished: all 50 tokens stay cached, unlocked
    assert sched.kv.num_cached == 50 and sched.kv.num_locked == 0 and sched.kv.num_used == 0
    sched.add(request(1, SYSTEM[:50], max_new=1))
    (chunk,) = sched.schedule().chunks
    assert (chunk.start, chunk.num_tokens, chunk.cached_prefix) == (49, 1, 49)


def test_eviction_under_pressure_frees_only_unlocked_cached_slots():
    kv = KVCache(100, 4, prefix_cache=PrefixCache())
    running, done = request(0, SYSTEM[:40]), request(1, SYSTEM[200:240])
    for req in (running, done):
        kv.allocate(req, 40)
        req.num_computed = 40
        kv.share_prefix(req)
    kv.release(done)  # 40 cached, unlocked: evictable
    assert (kv.num_free, kv.num_cached, kv.num_locked, kv.num_available) == (20, 80, 40, 60)
    newcomer = request(2, [5] * 50)
    kv.allocate(newcomer, 50)  # 20 free + 30 evicted, least recently used first
    assert kv.num_cached == 50 and kv.num_free == 0
    kv.check([running, newcomer])  # among others: none of their slots is free
    with pytest.raises(KVCacheFull):
        kv.allocate(request(3, [5]), 11)  # 10 more evictable, the locked 40 are not
    assert kv.num_locked == 40 and kv.num_cached == 50
    kv.check([running, newcomer])


def test_a_shared_prefix_is_counted_once_in_admission_and_load():
    """2050 slots: without the cache a request (1000 + 10 prompt tokens, 20 new) leaves no room for a second;
    with it, the prefix its prompt shares with the running one is counted once, in the locked tokens."""
    def admission_after_the_first(prompt_cache):
        sched = make_scheduler(capacity=2050, prompt_cache=prompt_cache, batch_max_tokens=4000,
                               router_max_wait_tokens=0)
        sched.add(request(0, SYSTEM + [1] * 10, max_new=20, ignore_eos=True))
        out = sched.schedule()
        dispatch(sched, out)
        for i in range(1, 21):
            sched.add(request(i, SYSTEM + [i + 1] * 10, max_new=20, ignore_eos=True))
        run_step(sched, out, lambda r: 9)
        return sched, sched.schedule()

    plain, out = admission_after_the_first(prompt_cache=False)
    assert out.kind == "decode" and len(plain.running) == 1
    cached, out = admission_after_the_first(prompt_cache=True)
    assert out.kind == "prefill" and len(out.chunks) == 20
    assert all((c.start, c.num_tokens, c.cached_prefix) == (1000, 10, 1000) for c in out.chunks)
    # In use: the first request's 1010 cached tokens (locked, shared) + 10 private tokens per newcomer.
    assert cached.kv.num_locked == 1010 and cached.kv.num_used == 1010 + 20 * 10
    # Peak: 20 requests × (10 held + 19 to come), the first one's single private token inside that bound.
    assert cached.estimated_peak() == 1010 + 20 * (10 + 19)
    cached.kv.check(cached.running)


@pytest.mark.parametrize("policy", [Scheduler, SplitFuseScheduler])
def test_thousands_of_random_requests_with_the_prompt_cache_leak_nothing(policy):
    """Shared prefixes, eos, aborts, preemption and eviction through the one-step-behind protocol: a slot in
    use is never freed, and when all is done every slot is free or cached."""
    rng = np.random.default_rng(1)
    sched = make_scheduler(capacity=600, policy=policy, prompt_cache=True, running_max_req_size=16,
                           batch_max_tokens=200, splitfuse_block_size=48, router_token_ratio=0.5,
                           router_max_new_token_len=8, router_max_wait_tokens=4)
    prefixes = [[int(t) for t in rng.integers(3, 40, size=int(rng.integers(10, 90)))] for _ in range(5)]
    requests, inflight, preempted = [], None, 0
    while len(requests) < 2000 or sched.has_work() or inflight is not None:
        for _ in range(int(rng.poisson(0.8))):
            if len(requests) < 2000:
                shared = prefixes[int(rng.integers(len(prefixes)))][: int(rng.integers(0, 90))]
                tail = [int(t) for t in rng.integers(3, 40, size=int(rng.integers(1, 30)))]
                req = request(len(requests), shared + tail, max_new=int(rng.integers(1, 40)),
                              ignore_eos=bool(rng.random() < 0.3))
                sched.add(req)
                requests.append(req)
        if rng.random() < 0.02 and sched.running:  # a client goes away
            sched.finish(sched.running[int(rng.integers(len(sched.running)))], "abort")
        out = sched.schedule() if sched.has_work() else None
        if out is not None:
            preempted += len(out.preempted)
            dispatch(sched, out)
            sched.kv.check(sched.running)  # among others: no slot of a running request is free
            assert all(len(r.slots) == r.num_computed for r in sched.running)
        if inflight is not None:
            run_step(sched, inflight, lambda r: EOS if rng.random() < 0.05 else int(rng.integers(3, 40)))
        inflight = out if out is not None and out.chunks else None
    assert all(r.status is RequestStatus.FINISHED for r in requests)
    assert sum(r.cache_hit or 0 for r in requests) > 10_000 and preempted > 0
    sched.kv.check([])
    assert sched.kv.num_locked == 0 and sched.kv.num_free + sched.kv.num_cached == 600
