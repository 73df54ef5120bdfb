"""The engine core's process, `python -m jaxllm.engine.core FD` (started by the frontend's EngineClient, with FD
its end of a socket pair): the Engine (weights, compiled steps, its loop) in a process of its own, driven over a
Channel. In: the flags ("start"), then submissions, aborts, grammar checks, stop. Out:
"ready" (or why the start failed), then one "step" message per loop iteration that has news: every request's new
events (jaxllm.engine.wire), the step reports (metrics) and the stats snapshot (/token_load, /metrics).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import sys
import threading

from jaxllm.engine.channel import QueuedChannel
from jaxllm.engine.request import TokenEvent
from jaxllm.engine.wire import EventColumns

log = logging.getLogger(__name__)


class CoreStream:
    """A request's event stream inside the core: its events join the sink's next message."""

    def __init__(self, events: EventColumns, handle: int):
        self._events, self.handle = events, handle  # handle: the frontend's integer for the request

    def put(self, event: TokenEvent, wakes=None) -> bool:
        self._events.add(self.handle, event)
        return True


class CoreSink:
    """Where the engine's events go in the core (Engine's `sink`): gathered per loop iteration, sent by flush().
    Events, step reports and flushes come from the engine thread alone (no lock on the per-event path);
    stream(), expect(), forget() and refuse() from the core's reader thread, which submits."""

    def __init__(self, channel: QueuedChannel):
        self._channel = channel
        self._handles: dict[str, int] = {}  # request id → the frontend's handle, while it is being submitted
        self._events = EventColumns()
        self._reports: list[tuple] = []
        self._sent_stats: dict | None = None

    def expect(self, request_id: str, handle: int) -> None:
        """The frontend's handle of the request about to be submitted as `request_id` (until forget())."""
        self._handles[request_id] = handle

    def forget(self, request_id: str) -> None:
        self._handles.pop(request_id, None)

    def stream(self, request_id: str) -> CoreStream:
        return CoreStream(self._events, self._handles[request_id])

    def refuse(self, request_id: str, reason: str, stats: dict) -> None:
        """A submission the engine refused (checked in the frontend, so rare): its stream ends with an error, in
        a message of its own (no other event concerns it)."""
        refused = EventColumns()
        refused.add(self._handles[request_id], TokenEvent(-1, "", 0.0, False, 0, 0, True, "error", error=reason))
        self._channel.send(("step", refused.take(), [], stats))

    def add_plain(self, handles: list[int], token_ids: list[int], logprobs: list[float], counts: list[int],
                  prompt_tokens: list[int]) -> None:
        """Plain events (EventMaker.plain_tokens) of the requests whose CoreStreams have `handles`, one each."""
        self._events.add_plain(handles, token_ids, logprobs, counts, prompt_tokens)

    def report(self, report) -> None:
        """A step listener (Engine.add_step_listener): the StepReport crosses as a tuple."""
        self._reports.append(dataclasses.astuple(report))

    def flush(self, stats: dict) -> None:
        """Send what this iteration produced, with the stats snapshot; nothing when nothing changed."""
        if not self._events and not self._reports and stats == self._sent_stats:
            return
        events, reports, self._reports = self._events.take(), self._reports, []
        self._sent_stats = stats
        self._channel.send(("step", events, reports, stats))


def _ready_info(engine) -> dict:
    return {"config": engine.config, "vocab_size": engine.config.vocab_size, "scoring": engine.scoring,
            "has_tokenizer": engine.tokenizer is not None, "stats": engine.stats(), "pid": os.getpid()}


def main(argv: list[str]) -> int:
    """Read the flags from the frontend, build the engine, say ready, serve the frontend until it says stop or
    goes away (its end of the socket closes)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the frontend stops us
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    channel = QueuedChannel(socket.socket(fileno=int(argv[0])), "jaxllm-core")
    try:
        (kind, args), = channel.receive()
    except (EOFError, OSError, ValueError):
        return 1
    assert kind == "start", kind
    run_core(args, channel)
    # Everything is sent and the engine stopped: skip the interpreter's teardown of JAX's runtime (seconds).
    logging.shutdown()
    os._exit(0)


def run_core(args, channel: QueuedChannel) -> None:
    from jaxllm.engine.startup import phase

    sink = CoreSink(channel)
    try:
        with phase("import"):  # JAX, Flax, the models: in this process only
            from jaxllm import xla_options

            xla_options.for_weights(xla_options.weights_of(args))  # before the devices start, just below
            if args.processes == 1:  # (several: JAX's distributed start must come before the devices')
                _start_devices_behind()
            from jaxllm.engine.engine import Engine
        with phase("engine-total"):  # the phases below, together
            engine = Engine.from_args(args, sink=sink, compile_later=True)
    except (ValueError, FileNotFoundError) as err:  # bad flags or model directory: exit code 2
        channel.send(("failed", str(err), 2))
        channel.close()
        return
    except Exception as err:  # noqa: BLE001 - reported to the frontend, which exits with it
        log.exception("the engine failed to start")
        channel.send(("failed", f"{type(err).__name__}: {err}", 1))
        channel.close()
        return
    engine.add_step_listener(sink.report)
    channel.send(("ready", _ready_info(engine)))
    engine.start()
    try:
        _serve(engine, sink, channel)
    finally:
        engine.stop()  # requests still running end with "abort", sent before the channel closes
        channel.close()


def _start_devices_behind() -> None:
    """Start JAX's devices (seconds on a GPU) in a thread while this one imports the rest (transformers, torch,
    the models); the first jax.devices() of the load then finds them started, or waits for them."""
    import jax

    threading.Thread(target=jax.devices, name="jaxllm-devices", daemon=True).start()


def _serve(engine, sink: CoreSink, channel: QueuedChannel) -> None:
    while True:
        try:
            messages = channel.receive()
        except (EOFError, OSError):
            log.info("the frontend closed the channel: stopping the engine")
            return
        for kind, *body in messages:
            if kind == "submit":
                _submit(engine, sink, body[0])
            elif kind == "abort":
                engine.abort(body[0])
            elif kind == "check_guided":
                call_id, guided = body
                try:
                    engine.check_guided(guided)
                    channel.send(("reply", call_id, None))
                except ValueError as err:
                    channel.send(("reply", call_id, str(err)))
                except Exception as err:  # noqa: BLE001 - e.g. the grammar worker could not start: a 503
                    log.exception("grammar check failed")
                    channel.send(("reply", call_id, f"{type(err).__name__}: {err}", True))
            elif kind == "stop":
                return
            else:
                log.error("unknown message %r from the frontend", kind)


def _submit(engine, sink: CoreSink, specs: list[dict]) -> None:
    """Each spec: {"request_ids", "handles", "prompt_ids", "params"} (a best_of group, or one sequence), with
    "images" (ImageInputs) when the prompt has some, or with "score": True one prompt to score; more optional
    fields may come (the request message is a dict)."""
    for spec in specs:
        request_ids = spec["request_ids"]
        for request_id, handle in zip(request_ids, spec["handles"]):
            sink.expect(request_id, handle)
        try:
            if spec.get("score"):
                engine.submit_score(spec["prompt_ids"], request_ids[0])
            else:
                engine.submit_group(spec["prompt_ids"], spec["params"], request_ids, images=spec.get("images", ()))
        except Exception as err:  # noqa: BLE001 - this request fails, the others go on
            log.warning("submission %s refused: %s", request_ids[0], err)
            for request_id in request_ids:
                sink.refuse(request_id, f"{type(err).__name__}: {err}", engine.stats())
        finally:
            for request_id in request_ids:
                sink.forget(request_id)


if __name__ == "__main__":
    from jaxllm.without_torch import hide_torch

    hide_torch()
    sys.exit(main(sys.argv[1:]))
