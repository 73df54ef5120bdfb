"""ServerState: requests are parsed (tokenised, validated) on parsing threads, off the event loop."""

import asyncio
import threading

import pytest

from jaxllm.server.errors import ApiError, invalid


def test_requests_are_parsed_on_parsing_threads_concurrently(make_state):
    state = make_state()
    both_parsing = threading.Barrier(2, timeout=10)  # passes only while two parses run at once

    def parse(prompt: str) -> tuple[str, list[int]]:
        both_parsing.wait()
        return threading.current_thread().name, state.tokenizer.encode(prompt)

    async def burst():
        return await asyncio.gather(state.track_parsed(parse, "Hello there"), state.track_parsed(parse, "Bye"))

    (track_a, (thread_a, ids_a)), (track_b, (thread_b, ids_b)) = asyncio.run(burst())
    assert thread_a.startswith("parse") and thread_b.startswith("parse") and thread_a != thread_b
    assert ids_a == state.tokenizer.encode("Hello there") and ids_b == state.tokenizer.encode("Bye")
    assert not track_a._ended and not track_b._ended  # still open: the generation is theirs to end
    for track in (track_a, track_b):
        track.end()


def test_a_request_that_fails_parsing_is_ended_and_its_error_reaches_the_route(make_state):
    state = make_state()

    def parse():
        raise invalid("inputs: empty", "inputs")

    async def parse_one():
        return await state.track_parsed(parse)

    with pytest.raises(ApiError, match="inputs: empty"):
        asyncio.run(parse_one())
    assert state.metrics.request_count._value.get() == 1
    assert state.metrics.request_failure._value.get() == 1  # ended as failed, on the spot
