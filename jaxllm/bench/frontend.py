"""What the frontend / engine-core split costs per step, measured on the host: the engine thread's time per event
(in-process: a RequestStream per request; in the core: the event gathered into the step's columns, the message
pickled), and the channel to the frontend (a child process decoding every event into its TokenEvent): round-trip
latency of one step's message and steps/s streamed back to back, at 1 and 512 events per step; and, given a
tokenizer, what the frontend's threads can do with a step's events: make each row's text (TokenText) and encode
its LightLLM stream event (SSE), in tokens/s:

    python -m jaxllm.bench.frontend [--rows 1 512] [--steps 300] [--tokenizer MODEL_DIR]
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time

from jaxllm.child import spawn
from jaxllm.engine.channel import QueuedChannel
from jaxllm.engine.core import CoreSink
from jaxllm.engine.request import TokenEvent
from jaxllm.engine.stream import RequestStream, WakeBatch
from jaxllm.engine.wire import events_of


def step_events(rows: int, step: int) -> list[TokenEvent]:
    """One decode step's events: a token of typical text for each of `rows` requests."""
    return [TokenEvent(1000 + i, " word", -0.25 - i * 1e-3, False, step + 1, 128, False, None) for i in range(rows)]


class KeepLast:
    """A channel that keeps only the last message it is sent (the engine thread's share alone)."""

    message = None

    def send(self, message) -> None:
        self.message = message


def engine_thread_us(rows: int, steps: int) -> dict:
    """µs per event the engine thread spends handing events over: in process, and in the core (gathering only:
    the pickle runs on the channel's sender thread, measured by `pickle_us`)."""
    import pickle

    events = step_events(rows, 3)
    streams = [RequestStream(str(i)) for i in range(rows)]
    start = time.perf_counter()
    for _ in range(steps):
        wakes = WakeBatch()
        for stream, event in zip(streams, events):
            stream.put(event, wakes)
        wakes.send()
        for stream in streams:
            stream._events.clear()  # what the reader would take
    in_process = (time.perf_counter() - start) / (steps * rows) * 1e6
    latest = KeepLast()
    sink = CoreSink(latest)
    core_streams = [sink.stream(str(i)) for i in range(rows) if sink.expect(str(i), i) is None]
    start = time.perf_counter()
    for step in range(steps):
        for stream, event in zip(core_streams, events):
            stream.put(event)
        sink.flush({"step": step})
    in_core = (time.perf_counter() - start) / (steps * rows) * 1e6
    columns = latest.message[1]
    start = time.perf_counter()
    for _ in range(steps):
        pickle.dumps([("step", columns, [], {})], protocol=pickle.HIGHEST_PROTOCOL)
    pickled = (time.perf_counter() - start) / (steps * rows) * 1e6
    return {"in_process_us_per_event": in_process, "core_gather_us_per_event": in_core,
            "pickle_us_per_event": pickled}


def channel_timings(rows: int, steps: int) -> dict:
    """Round trip of one step's message to a child process that decodes it and answers, and steps/s sent back
    to back (the child answers once it has decoded them all)."""
    proc, sock = spawn("jaxllm.bench.frontend", "--echo")
    channel = QueuedChannel(sock, "bench")
    sink = CoreSink(channel)
    streams = [sink.stream(str(i)) for i in range(rows) if sink.expect(str(i), i) is None]
    events = step_events(rows, 3)

    def one_step(step: int) -> None:
        for stream, event in zip(streams, events):
            stream.put(event)
        sink.flush({"step": step})

    round_trips = []
    for step in range(steps // 3):
        start = time.perf_counter()
        one_step(step)
        channel.receive()
        round_trips.append(time.perf_counter() - start)
    start = time.perf_counter()
    for step in range(steps):
        one_step(step)
    channel.send(("count",))
    while ("counted",) not in channel.receive():  # the child answers in order: every step is decoded
        pass
    elapsed = time.perf_counter() - start
    channel.send(("stop",))
    channel.close()
    proc.wait(10)
    round_trips.sort()
    return {"round_trip_ms_median": 1e3 * round_trips[len(round_trips) // 2],
            "round_trip_ms_p99": 1e3 * round_trips[int(len(round_trips) * 0.99)],
            "steps_per_s": steps / elapsed, "events_per_s": steps * rows / elapsed}


def echo(fd: int) -> None:
    """The child: decode every step message into TokenEvents and answer it; answer "count" (in order, so once
    every step sent before it is decoded)."""
    channel = QueuedChannel(socket.socket(fileno=fd), "echo")
    while True:
        try:
            messages = channel.receive()
        except EOFError:
            return
        for kind, *body in messages:
            if kind == "step":
                for _ in events_of(body[0]):
                    pass
                channel.send(("decoded",))
            elif kind == "count":
                channel.send(("counted",))
            elif kind == "stop":
                channel.close()
                return


def text_capacity(tokenizer_dir: str, rows: int, steps: int) -> dict:
    """Tokens/s one thread turns into text (TokenText.add, the frontend's receiver) and into LightLLM stream events
    (the SSE bytes of /generate_stream): `rows` streams decoding a real text's tokens, one token each per step."""
    from jaxllm.engine.detokenizer import load_tokenizer
    from jaxllm.engine.request import SamplingParams
    from jaxllm.engine.token_text import TokenText
    from jaxllm.server.lightllm import stream_event
    from jaxllm.server.sse import event

    tokenizer = load_tokenizer(tokenizer_dir, "fast")
    import pydoc_data.topics

    corpus = tokenizer.encode(" ".join(list(pydoc_data.topics.topics.values())[:40]))
    prompt, params = corpus[:16], SamplingParams(max_new_tokens=steps)
    eos, special = frozenset([tokenizer.eos_token_id]), frozenset(tokenizer.all_special_ids)
    texts = [TokenText(tokenizer, prompt, params, eos, special) for _ in range(rows)]
    tokens = [[corpus[(16 + 97 * row + step) % len(corpus)] for row in range(rows)] for step in range(steps)]
    text_s = encode_s = 0.0
    for step, step_tokens in enumerate(tokens):
        start = time.perf_counter()
        events = [TokenEvent(token, text.add(token), -0.5, False, step + 1, 16, False, None)
                  for text, token in zip(texts, step_tokens)]
        made = time.perf_counter()
        for e in events:
            event(stream_event(e))
        text_s += made - start
        encode_s += time.perf_counter() - made
    count = rows * steps
    return {"text_tokens_per_s": count / text_s, "sse_events_per_s": count / encode_s,
            "text_and_sse_tokens_per_s": count / (text_s + encode_s),
            "text_us_per_token": 1e6 * text_s / count, "sse_us_per_token": 1e6 * encode_s / count}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxllm.bench.frontend", description=__doc__)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 512], help="events per step")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--tokenizer", help="a model directory: also measure the frontend's text + SSE capacity")
    parser.add_argument("--echo", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("fd", type=int, nargs="?", help=argparse.SUPPRESS)
    ns = parser.parse_args(argv)
    if ns.echo:
        echo(ns.fd)
        return 0
    results = {rows: {**engine_thread_us(rows, ns.steps), **channel_timings(rows, ns.steps)} for rows in ns.rows}
    if ns.tokenizer:
        for rows in ns.rows:
            results[rows].update(text_capacity(ns.tokenizer, rows, min(ns.steps, 128)))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
