"""EngineClient: the engine core in its own process answers as the in-process engine does (the same greedy
tokens and text), an abort crosses at once and frees the KV, a grammar is checked in the core, and stop() ends the
core's process."""

from __future__ import annotations

import os
import time

import pytest

from jaxllm.args import ServerArgs
from jaxllm.engine.client import EngineClient, EngineUnavailable
from jaxllm.engine.request import Guided, SamplingParams

PROMPTS = ["Hello there", "The capital of France is", "1, 2, 3,"]


@pytest.fixture(scope="module")
def args(tiny_served_model):
    return ServerArgs.from_argv(["--model_dir", str(tiny_served_model.path), *tiny_served_model.flags])


@pytest.fixture(scope="module")
def client(args):
    client = EngineClient(args)
    client.start()
    yield client
    client.stop()


def run(engine, prompts: list[list[int]], params: SamplingParams) -> list[list]:
    """Each request's events as (token id, text, count, finish reason, logprob, prompt tokens, special, finished)."""
    streams = engine.submit_many([(ids, params, None) for ids in prompts])
    return [[(e.token_id, e.text, e.count_output_tokens, e.finish_reason, e.logprob, e.prompt_tokens,
              e.special, e.finished) for e in stream] for stream in streams]


def assert_same_events(remote: list[list], local: list[list]) -> None:
    """The same events, field by field; logprobs to float32's rounding (a tolerance, not a rounding to N decimals:
    two values a hair apart round apart when they straddle a boundary)."""
    assert len(remote) == len(local)
    for i, (r_events, l_events) in enumerate(zip(remote, local)):
        assert len(r_events) == len(l_events), f"prompt {i}: {len(r_events)} events against {len(l_events)}"
        for j, (r, l) in enumerate(zip(r_events, l_events)):
            same = r[:4] + r[5:] == l[:4] + l[5:] and r[4] == pytest.approx(l[4], rel=1e-5, abs=1e-5)
            assert same, f"prompt {i}, event {j}: core {r} against in-process {l}"


def test_the_core_answers_as_the_in_process_engine(client, args):
    from jaxllm.engine.engine import Engine

    prompts = [client.tokenizer.encode(p) for p in PROMPTS]
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    remote = run(client, prompts, params)
    with Engine.from_args(args, warmup=0) as engine:
        local = run(engine, prompts, params)
    assert_same_events(remote, local)
    assert all(len(events) == 10 and events[-1][3] == "length" for events in remote)


def test_an_abort_crosses_at_once_and_frees_the_kv(client):
    ids = client.tokenizer.encode("Count on")
    stream = client.submit(ids, SamplingParams(max_new_tokens=50, ignore_eos=True), "long-one")
    first = next(stream)
    assert first.count_output_tokens == 1 and client.token_load()["current_load"] > 0
    client.abort("long-one")
    rest = list(stream)
    assert rest[-1].finish_reason == "abort" and len(rest) < 45
    deadline = time.monotonic() + 5
    while client.token_load()["current_load"] > 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert client.token_load() == {"current_load": 0.0, "logical_max_load": 0.0, "dynamic_max_load": 0.0}


def test_requests_are_checked_before_they_cross(client):
    with pytest.raises(ValueError, match="max_req_input_len"):
        client.submit(list(range(40)), SamplingParams())
    with pytest.raises(ValueError, match="guided_regex"):
        client.check_guided(Guided("regex", "(unclosed", "guided_regex"))
    client.check_guided(Guided("regex", "[ab]+", "guided_regex"))
    sent = client._channel.send
    client._channel.send = None  # a grammar checked once is not sent to the core again (no round trip)
    try:
        client.check_guided(Guided("regex", "[ab]+", "other_field"))
    finally:
        client._channel.send = sent
    with pytest.raises(ValueError, match="guided_regex"):  # an invalid one is asked again, and refused again
        client.check_guided(Guided("regex", "(unclosed", "guided_regex"))
    (event,) = list(client.submit(client.tokenizer.encode("x"), SamplingParams(
        max_new_tokens=1, guided=Guided("regex", "[ab]+", "guided_regex"))))
    assert event.text and set(event.text) <= {"a", "b"} and event.finish_reason == "length"


def test_stop_ends_the_core(client):
    pid = client.pid
    client.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(EngineUnavailable, match="stopped"):
        client.stats()
