"""The splitfuse policy (--splitfuse_mode), driven without a device: prompts prefilled by blocks beside one
decode token of every running request, shared block budgets, only the completing chunk samples."""

from jaxllm.engine.request import RequestStatus
from jaxllm.engine.splitfuse import SplitFuseScheduler
from sched_helpers import dispatch, make_scheduler, request, run_step


def splitfuse(capacity=5000, block=256, **overrides):
    return make_scheduler(capacity=capacity, policy=SplitFuseScheduler, splitfuse_block_size=block, **overrides)


def step(sched, inflight=None):
    """Schedule and dispatch one step, then read the previous one; returns the new step's output."""
    out = sched.schedule()
    dispatch(sched, out)
    if inflight is not None:
        run_step(sched, inflight, lambda r: 9)
    return out


def test_a_long_prompt_is_prefilled_by_blocks_while_every_stream_decodes_each_step():
    sched = splitfuse()
    streams = [request(i, 10 + i, max_new=100) for i in range(3)]
    for r in streams:
        sched.add(r)
    out = step(sched)
    assert out.kind == "prefill" and [c.num_tokens for c in out.chunks] == [10, 11, 12]
    out = step(sched, out)
    long = request(3, 2000, max_new=5)
    sched.add(long)
    prefill_chunks = []
    while not long.decoding:
        out = step(sched, out)
        decoded = [c.request for c in out.chunks if c.decode]
        assert decoded == streams  # no stream waits for the long prefill
        assert all(c.num_tokens == 1 for c in out.chunks if c.decode)
        prefill_chunks += [(c.start, c.num_tokens, c.samples) for c in out.chunks if not c.decode]
    starts = list(range(0, 2000, 256))
    assert prefill_chunks == [(s, min(256, 2000 - s), s + 256 >= 2000) for s in starts]
    out = step(sched, out)
    assert [c.request for c in out.chunks] == streams + [long] and all(c.decode for c in out.chunks)


def test_several_prompts_share_one_step_budget_in_arrival_order():
    sched = splitfuse()
    reqs = [request(i, 100, max_new=3) for i in range(4)]
    for r in reqs:
        sched.add(r)
    seen = []
    out = None
    for _ in range(4):
        out = step(sched, out)
        seen.append([(c.request.request_id, c.start, c.num_tokens) for c in out.chunks if not c.decode])
    assert seen[0] == [("r0", 0, 100), ("r1", 0, 100), ("r2", 0, 56)]
    # The next step continues r2 first, then admits r3; r0 and r1 decode beside them.
    assert seen[1] == [("r2", 56, 44), ("r3", 0, 100)]
    assert seen[2] == seen[3] == []


def test_prompt_logprobs_come_from_every_chunk_of_the_prompt():
    sched = splitfuse(block=40)
    req = request(0, 100, max_new=2, prompt_logprobs=True)
    sched.add(req)
    out, chunks = None, []
    while not req.decoding:
        out = step(sched, out)
        chunks += [(c.start, c.num_tokens, c.prompt_logprobs, c.samples) for c in out.chunks]
    assert chunks == [(0, 40, True, False), (40, 40, True, False), (80, 20, True, True)]


def test_a_short_cache_pauses_the_youngest_and_every_request_still_completes():
    """Optimistic admission (ratio 1.0, one expected new token) admits three 30-token prompts into a 100-slot
    cache; their decodes outgrow it, so the youngest (decoding or still prefilling) are paused and resumed."""
    sched = splitfuse(capacity=100, block=16, router_token_ratio=1.0, router_max_new_token_len=1)
    reqs = [request(i, 30, max_new=30) for i in range(3)]
    for r in reqs:
        sched.add(r)
    out, preempted = None, []
    for _ in range(300):
        if not sched.has_work():
            break
        results_coming = out is not None and bool(out.chunks)
        out = step(sched, out)
        preempted += out.preempted
        assert out.chunks or results_coming, "nothing runs and nothing may free KV"
        sched.kv.check(sched.running)
    run_step(sched, out, lambda r: 9)
    assert preempted and all(r.status is RequestStatus.FINISHED and r.output_ids == [9] * 30 for r in reqs)
    assert sched.kv.num_free == 100
