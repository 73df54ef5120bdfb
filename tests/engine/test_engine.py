"""The engine end to end on a tiny random model (float32, CPU): exact greedy outputs against a plain loop,
preemption, abort, step failures, asyncio streams, prompt logprobs, steady-state compilation, --tp."""

import asyncio

import jax
import jax.monitoring
import numpy as np
import pytest

from engine_helpers import GreedyReference, make_engine, random_prompts
from jaxllm.engine.request import SamplingParams
from jaxllm.engine.step_loop import MAX_UNREAD


@pytest.fixture(scope="module")
def reference(tiny_engine):
    return GreedyReference(tiny_engine.runner.model, tiny_engine.runner.params)


def run_all(engine, prompts, params):
    """Submit together, wait for every stream; returns the events of each request."""
    if isinstance(params, SamplingParams):
        params = [params] * len(prompts)
    streams = engine.submit_many([(p, sp, None) for p, sp in zip(prompts, params)])
    return [list(s) for s in streams]


def tokens_of(events):
    return [e.token_id for e in events]


def assert_idle_and_empty(engine):
    engine.kv.check([])
    assert engine.kv.num_free == engine.kv.num_slots
    assert not engine.scheduler.has_work()


def test_batched_ragged_greedy_matches_a_plain_loop(tiny_engine, reference):
    prompts = random_prompts(seed=0, count=12)
    lengths = [int(n) for n in np.random.default_rng(1).integers(1, 25, size=12)]
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in lengths]
    results = run_all(tiny_engine, prompts, params)
    for prompt, n, events in zip(prompts, lengths, results):
        assert tokens_of(events) == reference.generate(prompt, n)
        assert events[-1].finished and events[-1].finish_reason == "length"
        assert [e.count_output_tokens for e in events] == list(range(1, n + 1))
        assert all(e.prompt_tokens == len(prompt) for e in events)
    assert_idle_and_empty(tiny_engine)


def test_decode_steps_look_ahead_and_stay_exact_as_requests_end(tiny_engine, reference, monkeypatch):
    """Looking ahead (step_loop.py): while plain requests decode, the step after the one about to launch is
    scheduled and its inputs staged first, and two launched steps may wait unread, the host three steps behind
    the device. Outputs stay exact while requests end at different steps, by eos and by length, with tokens of
    theirs still on the device."""
    prompts = random_prompts(seed=21, count=6)
    lengths = [9, 14, 17, 20, 22, 25]
    expected = [reference.generate(p, n) for p, n in zip(prompts, lengths)]
    # The token in most greedy outputs: it ends those requests early, wherever it comes up.
    eos = max({t for e in expected for t in e[1:]}, key=lambda t: sum(t in e[1:] for e in expected))
    expected = [e[: e.index(eos) + 1] if eos in e else e for e in expected]
    order = record_stages_and_launches(tiny_engine, monkeypatch)
    engine_eos = tiny_engine._events.eos
    tiny_engine._events.eos = frozenset({eos})
    try:
        results = run_all(tiny_engine, prompts, [SamplingParams(max_new_tokens=n) for n in lengths])
    finally:
        tiny_engine._events.eos = engine_eos
    assert [tokens_of(events) for events in results] == expected
    assert sum(len(e) < n for e, n in zip(expected, lengths)) >= 2  # eos ended some before their length
    decodes = launches_of(order, "decode")
    ahead = looked_ahead(order, decodes)
    assert len(decodes) >= 20 and len(ahead) >= len(decodes) - 2, (len(ahead), len(decodes))
    # Two steps' results wait unread while the next launches (MAX_UNREAD), never more.
    unread = unread_at_launches(order, decodes)
    assert max(unread) == MAX_UNREAD and sum(u == MAX_UNREAD for u in unread) >= len(decodes) - 4, unread
    assert_idle_and_empty(tiny_engine)


def test_splitfuse_steps_look_ahead_and_stay_exact(tiny_model_dir, reference, monkeypatch):
    """With --splitfuse_mode and the prompt cache a step both decodes every running request and prefills chunks
    of others: the step after it is scheduled before it launches too, while prompts arrive mid-stream."""
    engine = make_engine(tiny_model_dir, splitfuse_mode=True, splitfuse_block_size=16, use_dynamic_prompt_cache=True)
    prompts = random_prompts(seed=23, count=8, max_len=36)
    prompts[5] = prompts[1][:20] + prompts[5][:10]  # a cached prefix of an earlier prompt
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    with engine:
        order = record_stages_and_launches(engine, monkeypatch)
        first = engine.submit_many([(p, params, None) for p in prompts[:4]])
        heads = [next(s) for s in first]  # streaming before the rest arrive
        rest = engine.submit_many([(p, params, None) for p in prompts[4:]])
        results = [[h.token_id] + tokens_of(s) for h, s in zip(heads, first)] + [tokens_of(s) for s in rest]
        engine.kv.check([])  # (the prompt cache keeps the finished requests' tokens)
        assert not engine.scheduler.has_work() and engine.stats()["prompt_cache_hit_tokens"] >= 20
    assert results == [reference.generate(p, 12) for p in prompts]
    mixed = launches_of(order, "prefill")
    assert len(mixed) >= 3 and looked_ahead(order, mixed), len(mixed)
    assert len(looked_ahead(order, launches_of(order, "decode"))) >= 5


def test_a_prefill_admitted_while_others_decode_is_looked_past_exactly(tiny_engine, reference, monkeypatch):
    """Requests admitted while others decode: their prefill keeps the others' tokens on the device
    (StepInputBuilder.carry_base), so the decode after it is scheduled and staged before it launches, taking
    tokens from both; outputs stay exact, and no request is left counting a token on its way."""
    prompts = random_prompts(seed=25, count=6)
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    order = record_stages_and_launches(tiny_engine, monkeypatch)
    first = tiny_engine.submit_many([(p, params, None) for p in prompts[:3]])
    heads = [next(s) for s in first]  # decoding before the rest arrive
    rest = tiny_engine.submit_many([(p, params, None) for p in prompts[3:]])
    results = [[h.token_id] + tokens_of(s) for h, s in zip(heads, first)] + [tokens_of(s) for s in rest]
    assert results == [reference.generate(p, 16) for p in prompts]
    carried = [i for i in launches_of(order, "prefill") if order[i][1].carried]
    assert carried and looked_ahead(order, carried) == carried, (carried, launches_of(order, "prefill"))
    assert_idle_and_empty(tiny_engine)


def record_stages_and_launches(engine, monkeypatch) -> list:
    """Spy on the engine thread: [("stage" | "launch", prepared step) | ("fetch", step handle)] in the order it
    stages a step's inputs, hands a step to the launch thread and reads a step's results."""
    order = []
    runner = engine.runner
    stage, start_dispatch, fetch = runner.stage, engine._start_dispatch, runner.fetch

    def staging(step):
        order.append(("stage", step))
        return stage(step)

    def launching(step, *args):
        order.append(("launch", step))
        return start_dispatch(step, *args)

    def fetching(handle):
        order.append(("fetch", handle))
        return fetch(handle)

    monkeypatch.setattr(runner, "stage", staging)
    monkeypatch.setattr(engine, "_start_dispatch", launching)
    monkeypatch.setattr(runner, "fetch", fetching)
    return order


def unread_at_launches(order: list, launches: list[int]) -> list[int]:
    """How many launched steps were not read yet when each of `launches` (indices into `order`) began."""
    return [sum(what == "launch" for what, _ in order[:i]) - sum(what == "fetch" for what, _ in order[:i])
            for i in launches]


def launches_of(order: list, kind: str) -> list[int]:
    return [i for i, (what, step) in enumerate(order) if what == "launch" and step.batch.kind == kind]


def looked_ahead(order: list, launches: list[int]) -> list[int]:
    """Those of `launches` (indices into `order`) that came right after the next step was staged."""
    return [i for i in launches if order[i - 1][0] == "stage" and order[i - 1][1] is not order[i][1]]


def test_logit_bias_steers_greedy_decoding_exactly(tiny_engine, reference):
    """A row's logit_bias is added to its logits at every step (here: its first plain choice banned, another token
    favoured); the request beside it decodes as without."""
    prompt, other = random_prompts(seed=31, count=2)
    plain = reference.generate(prompt, 8)
    bias = {plain[0]: -100.0, plain[3]: 4.0}
    expected, seq = [], list(prompt)
    for _ in range(8):
        logits = np.array(reference.logits(seq)[-1])
        for token, value in bias.items():
            logits[token] += value
        expected.append(int(np.argmax(logits)))
        seq.append(expected[-1])
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    biased = SamplingParams(max_new_tokens=8, ignore_eos=True, logit_bias=bias)
    results = run_all(tiny_engine, [prompt, other], [biased, params])
    assert tokens_of(results[0]) == expected and expected[0] != plain[0]
    assert tokens_of(results[1]) == reference.generate(other, 8)
    with pytest.raises(ValueError, match="logit_bias: token id 256 is outside the vocabulary"):
        tiny_engine.submit(prompt, SamplingParams(logit_bias={256: 1.0}))
    assert_idle_and_empty(tiny_engine)


def test_logprobs_are_those_of_the_chosen_tokens(tiny_engine, reference):
    prompt = random_prompts(seed=2, count=1)[0]
    events = run_all(tiny_engine, [prompt], SamplingParams(max_new_tokens=5, ignore_eos=True))[0]
    seq = list(prompt)
    for event in events:
        logits = reference.logits(seq)[-1]
        logp = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
        assert event.logprob == pytest.approx(float(logp[event.token_id]), abs=1e-4)
        seq.append(event.token_id)


def test_eos_stops_with_reason_stop(tiny_engine, reference):
    prompt = random_prompts(seed=3, count=1)[0]
    expected = reference.generate(prompt, 6)
    eos = expected[2]
    engine_eos = tiny_engine._events.eos
    tiny_engine._events.eos = frozenset({eos})
    try:
        events = run_all(tiny_engine, [prompt], SamplingParams(max_new_tokens=6))[0]
    finally:
        tiny_engine._events.eos = engine_eos
    assert tokens_of(events) == expected[: expected.index(eos) + 1]
    assert events[-1].finish_reason == "stop"


def test_prompt_logprobs_cover_every_prompt_position_but_the_last(tiny_engine, reference):
    prompt = random_prompts(seed=4, count=1, max_len=20)[0] + [9, 10]
    events = run_all(tiny_engine, [prompt], SamplingParams(max_new_tokens=2, prompt_logprobs=True))[0]
    entries = events[0].prompt_logprobs
    assert events[1].prompt_logprobs is None
    logits = reference.logits(prompt)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    assert len(entries) == len(prompt) - 1
    for pos, (token, nxt) in enumerate(entries):
        assert token == prompt[pos]
        ((key, value),) = nxt.items()
        assert key == str(prompt[pos + 1])
        assert value == pytest.approx(float(logp[pos, prompt[pos + 1]]), abs=1e-4)


def test_prompt_top_logprobs_are_each_positions_most_likely_tokens(tiny_engine, reference):
    """prompt_logprobs with top_logprobs (OpenAI's echo with logprobs): beside each prompt position's entry, its
    top_logprobs most likely next tokens, best first, as the reference's logits rank them."""
    prompt = random_prompts(seed=6, count=1, max_len=20)[0] + [9, 10]
    params = SamplingParams(max_new_tokens=2, prompt_logprobs=True, top_logprobs=3)
    events = run_all(tiny_engine, [prompt], params)[0]
    tops = events[0].prompt_top_logprobs
    assert events[1].prompt_top_logprobs is None and len(tops) == len(events[0].prompt_logprobs) == len(prompt) - 1
    logits = reference.logits(prompt)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    for pos, top in enumerate(tops):
        best = np.argsort(-logp[pos])[:3]
        assert [token for token, _ in top] == best.tolist()
        assert [value for _, value in top] == pytest.approx(logp[pos, best].tolist(), abs=1e-4)
    plain = run_all(tiny_engine, [prompt], SamplingParams(max_new_tokens=2, prompt_logprobs=True))[0]
    assert plain[0].prompt_top_logprobs is None  # none asked, none made


def test_streams_work_from_asyncio(tiny_engine, reference):
    prompts = random_prompts(seed=5, count=3)

    async def consume():
        streams = [tiny_engine.submit(p, SamplingParams(max_new_tokens=4, ignore_eos=True)) for p in prompts]

        async def read(stream):
            return [e.token_id async for e in stream]

        return await asyncio.gather(*(read(s) for s in streams))

    got = asyncio.run(consume())
    assert got == [reference.generate(p, 4) for p in prompts]


def test_a_seeded_sample_is_the_same_alone_or_in_a_batch(tiny_engine):
    prompt = random_prompts(seed=6, count=1)[0]
    params = SamplingParams(do_sample=True, temperature=1.5, top_p=0.9, max_new_tokens=8, ignore_eos=True, seed=7)
    alone = tokens_of(run_all(tiny_engine, [prompt], params)[0])
    others = random_prompts(seed=7, count=3)
    mixed = run_all(tiny_engine, others[:2] + [prompt] + others[2:],
                    [SamplingParams(do_sample=True, max_new_tokens=8)] * 2 + [params]
                    + [SamplingParams(do_sample=True, max_new_tokens=8)])
    assert tokens_of(mixed[2]) == alone
    assert len(set(tuple(tokens_of(m)) for m in mixed)) > 1


def test_a_failed_launch_while_looking_ahead_fails_the_staged_step_too(tiny_engine, reference, monkeypatch):
    """A decode step's launch fails while the step after it is already scheduled and staged: both steps'
    requests end with the error, none is left counting a token on its way, and the engine serves on."""
    prompts = random_prompts(seed=12, count=2)
    submitted = []
    launch = tiny_engine.runner.launch
    decodes = []

    def failing(step, *args):
        if step.batch.kind == "decode":
            decodes.append(step)
            if len(decodes) == 4:  # steady decoding: the step after it is staged (looking ahead)
                raise RuntimeError("injected failure")
        return launch(step, *args)

    add = tiny_engine.scheduler.add
    monkeypatch.setattr(tiny_engine.scheduler, "add", lambda req: (submitted.append(req), add(req))[1])
    monkeypatch.setattr(tiny_engine.runner, "launch", failing)
    results = run_all(tiny_engine, prompts, SamplingParams(max_new_tokens=20, ignore_eos=True))
    assert all(events[-1].finish_reason == "error" and "injected failure" in events[-1].error for events in results)
    tiny_engine.wait_idle(60)  # the streams end at the failure; the engine reads the steps before it after
    assert all(req.num_pending == 0 for req in submitted), [req.num_pending for req in submitted]
    monkeypatch.undo()
    again = run_all(tiny_engine, prompts[:1], SamplingParams(max_new_tokens=3, ignore_eos=True))[0]
    assert tokens_of(again) == reference.generate(prompts[0], 3)
    assert_idle_and_empty(tiny_engine)


def test_abort_frees_the_request_at_once(tiny_engine):
    prompt = random_prompts(seed=8, count=1)[0][:10]
    running = tiny_engine.submit(prompt, SamplingParams(max_new_tokens=50, ignore_eos=True), request_id="long")
    first = next(running)
    assert first.count_output_tokens == 1 and not first.finished
    tiny_engine.abort("long")
    rest = list(running)
    assert rest[-1].finished and rest[-1].finish_reason == "abort" and rest[-1].token_id == -1
    assert len(rest) < 50
    assert_idle_and_empty(tiny_engine)


@pytest.mark.parametrize("where", ["prepare", "launch"])  # the host half (engine thread), the launch thread
def test_a_failing_step_fails_its_requests_and_the_engine_keeps_serving(tiny_engine, reference, monkeypatch, where):
    prompts = random_prompts(seed=9, count=3)
    steady = [tiny_engine.submit(p, SamplingParams(max_new_tokens=20, ignore_eos=True)) for p in prompts[:2]]
    firsts = [next(s) for s in steady]  # both running before the bad request arrives
    failed_before = tiny_engine.stats()["failed_steps"]
    real = getattr(tiny_engine.runner, where)

    def failing(step, *args):  # prepare(batch) or launch(prepared step, unread step)
        batch = step if where == "prepare" else step.batch
        if any(c.request.request_id == "boom" for c in batch.chunks):
            raise RuntimeError("injected failure")
        return real(step, *args)

    monkeypatch.setattr(tiny_engine.runner, where, failing)
    bad = list(tiny_engine.submit(prompts[2], SamplingParams(max_new_tokens=5), request_id="boom"))
    assert len(bad) == 1 and bad[0].finish_reason == "error" and "injected failure" in bad[0].error
    for prompt, first, stream in zip(prompts, firsts, steady):
        assert [first.token_id] + tokens_of(stream) == reference.generate(prompt, 20)
    monkeypatch.undo()
    again = run_all(tiny_engine, [prompts[2]], SamplingParams(max_new_tokens=3, ignore_eos=True))[0]
    assert tokens_of(again) == reference.generate(prompts[2], 3)
    assert tiny_engine.stats()["failed_steps"] > failed_before
    assert_idle_and_empty(tiny_engine)


def test_invalid_requests_are_refused_with_a_reason(tiny_engine):
    with pytest.raises(ValueError, match="max_req_input_len"):
        tiny_engine.submit(list(range(3, 50)), SamplingParams())
    with pytest.raises(ValueError, match="max_req_total_len"):
        tiny_engine.submit([5] * 30, SamplingParams(max_new_tokens=40))
    with pytest.raises(ValueError, match="vocabulary"):
        tiny_engine.submit([5, 999], SamplingParams())
    with pytest.raises(ValueError, match="^top_p"):
        tiny_engine.submit([5], SamplingParams(do_sample=True, top_p=1.5))
    with pytest.raises(ValueError, match="stop_sequences"):
        tiny_engine.submit([5], SamplingParams(stop_sequences=("x",)))


def test_token_load_reports_use_while_running(tiny_engine):
    stream = tiny_engine.submit([5] * 20, SamplingParams(max_new_tokens=30, ignore_eos=True))
    next(stream)
    load = tiny_engine.token_load()
    assert 0 < load["current_load"] <= load["logical_max_load"] <= 1
    list(stream)
    assert tiny_engine.token_load()["current_load"] == 0


def test_no_compilation_in_steady_state(tiny_engine):
    compiles = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    prompts = random_prompts(seed=10, count=10)
    params = [SamplingParams(max_new_tokens=int(n), ignore_eos=True)
              for n in np.random.default_rng(11).integers(1, 20, size=10)]
    first = run_all(tiny_engine, prompts, params)  # may compile shapes not seen yet
    compiles.clear()
    second = run_all(tiny_engine, prompts, params)
    assert compiles == []
    assert [tokens_of(e) for e in first] == [tokens_of(e) for e in second]


def test_warmup_compiles_each_startup_shape_once_and_steps_then_reuse_them(tiny_model_dir):
    """The start-up shapes compile in parallel threads; a request within the start-up set (a one-row
    prefill, then one-row decodes) calls their compiled executables: nothing is traced or compiled again."""
    compiles = []  # executables built, or read from the persistent cache (that also records this event)
    traces = []  # functions traced to jaxprs (the step, and the start-up's small jits)

    def on_duration(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)
        elif event == "/jax/core/compile/jaxpr_trace_duration":
            traces.append(event)

    jax.monitoring.register_event_duration_secs_listener(on_duration)
    engine = make_engine(tiny_model_dir, warmup=0, max_total_token_num=512)
    compiles.clear()  # the start-up's small jits (weights, caches)
    step_shapes = engine.runner.warmup()
    assert step_shapes == engine.runner.warmup_shapes()[1] == len(engine.runner.shapes_seen)
    assert step_shapes == len(engine.runner.row_buckets) + len(engine.runner.token_buckets)
    assert len(compiles) == step_shapes  # each shape built (or read from the persistent cache) once
    compiles.clear()
    traces.clear()
    with engine:
        prompt = [int(t) for t in np.random.default_rng(12).integers(1, 200, size=9)]
        events = list(engine.submit(prompt, SamplingParams(max_new_tokens=5, ignore_eos=True)))
        assert events[-1].finish_reason == "length" and len(events) == 5
    assert compiles == [] and traces == []


def test_prefill_steps_with_more_chunks_than_the_row_cap_get_every_row(tiny_model_dir):
    """300 two-token prompts admitted together: the prefill step (600 tokens, bucket 1024) needs 301 rows
    (the cap is 256), and every request still gets the greedy tokens it gets alone."""
    engine = make_engine(tiny_model_dir, running_max_req_size=300, max_total_token_num=2048, batch_max_tokens=1024)
    runner = engine.runner
    assert (runner.prefill_rows(16), runner.prefill_rows(1024), runner.prefill_rows(1024, 300)) == (16, 256, 301)
    shapes, startup = runner.warmup_shapes()
    # Without mixed steps only many short prompts need every row: compiled after the start-up set.
    assert (1024, 256) in {(s.tokens, s.rows) for s in shapes[:startup] if not s.decode_only}
    assert (1024, 301) in {(s.tokens, s.rows) for s in shapes[startup:] if not s.decode_only}
    prompts = [[int(t) for t in pair] for pair in np.random.default_rng(13).integers(1, 200, size=(300, 2))]
    params = SamplingParams(max_new_tokens=2, ignore_eos=True)
    with engine:
        together = [[e.token_id for e in s] for s in engine.submit_many([(p, params, None) for p in prompts])]
        alone = [[e.token_id for e in engine.submit(p, params)] for p in prompts[:3]]
    assert (1024, 301) in {(s.tokens, s.rows) for s in runner.shapes_seen if not s.decode_only}
    assert together[:3] == alone and all(len(t) == 2 for t in together)


def test_preemption_under_a_tiny_cache_keeps_outputs_exact(tiny_model_dir, reference):
    """64 concurrent requests wanting ~1700 KV tokens in a 70-token cache: optimistic admission (not busy
    below 100% use, 1 expected new token) overfills it, so requests are paused and recomputed."""
    engine = make_engine(tiny_model_dir, max_total_token_num=70, router_token_ratio=1.0,
                         router_max_new_token_len=1, router_max_wait_tokens=2)
    prompts = random_prompts(seed=12, count=64, max_len=12)
    with engine:
        results = run_all(engine, prompts, SamplingParams(max_new_tokens=20, ignore_eos=True))
        assert engine.stats()["preemptions"] > 0
        assert_idle_and_empty(engine)
    for prompt, events in zip(prompts, results):
        assert tokens_of(events) == reference.generate(prompt, 20)


def test_tensor_parallel_engine_gives_the_same_tokens(tiny_model_dir, reference, tiny_engine):
    engine = make_engine(tiny_model_dir, tp=2)
    assert len(engine.runner.mesh.devices.ravel()) == 2
    prompts = random_prompts(seed=13, count=4)
    banned = reference.generate(prompts[0], 1)[0]  # a logit_bias over the split vocabulary
    biased = SamplingParams(max_new_tokens=6, ignore_eos=True, logit_bias={banned: -100.0})
    with engine:
        results = run_all(engine, prompts, SamplingParams(max_new_tokens=6, ignore_eos=True))
        steered = run_all(engine, prompts[:1], biased)[0]
    for prompt, events in zip(prompts, results):
        assert tokens_of(events) == reference.generate(prompt, 6)
    assert banned not in tokens_of(steered)
    assert tokens_of(steered) == tokens_of(run_all(tiny_engine, prompts[:1], biased)[0])  # as at tp 1
