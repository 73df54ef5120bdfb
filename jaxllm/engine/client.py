"""The frontend's side of the engine: `EngineClient` has the Engine's API as the HTTP server uses it (submit,
submit_group, submit_score, abort, check_prompt, check_guided, token_load, stats, add_step_listener, tokenizer)
and runs the engine core in a process of its own (`python -m jaxllm.engine.core`, a fresh interpreter: JAX is
never initialised in a forked child), so the engine loop does not share a GIL with HTTP, tokenisation and response
encoding. Requests are checked here (jaxllm.engine.submission) before they cross; each step's events come back in
one message and wake each event loop once. The text of the rows whose text the core does not need (no stop
strings, healing or images: token_text.text_needed_in_engine) is made here, on the receiving thread. When the core's process dies, its requests end with an error and every
later call raises EngineUnavailable (the server answers 503).
"""

from __future__ import annotations

import itertools
import logging
import os
import subprocess
import threading
import uuid
from collections import OrderedDict
from pathlib import Path

from jaxllm.child import spawn
from jaxllm.engine.channel import QueuedChannel
from jaxllm.engine.request import SCORE_PARAMS, SamplingParams, TokenEvent
from jaxllm.engine.step_report import StepReport
from jaxllm.engine.stream import RequestStream, WakeBatch
from jaxllm.engine.submission import SubmitRules
from jaxllm.engine.token_text import TokenText
from jaxllm.engine.wire import events_of
from jaxllm.thread_names import os_named

log = logging.getLogger(__name__)

_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
GRAMMARS_REMEMBERED = 256  # valid grammars the frontend remembers (the core's compiled-grammar cache is as big)
CALL_TIMEOUT_S = 300.0  # a grammar check (compiled in the core) answered within this


class EngineUnavailable(RuntimeError):
    """The engine core's process is not running (it died or was stopped)."""


class EngineClient:
    """The engine core's process, started by start() (which returns once its weights are loaded and its steps
    compiled, or raises: ValueError for bad flags or a bad model directory), stopped by stop()."""

    def __init__(self, args):
        self.args = args
        self.tokenizer = None
        self.config = None  # the core's ModelConfig
        self.image_processor = None  # a vision-language model's (--enable_multimodal): images preprocess here
        self.rules: SubmitRules | None = None
        self.scoring = False
        self.pid: int | None = None  # the core's process id
        self._process = None
        self._channel: QueuedChannel | None = None
        self._receiver: threading.Thread | None = None
        self._lock = threading.Lock()  # guards what follows (the event loop's thread and the receiver share it)
        self._next_handle = itertools.count()
        self._streams: dict[int, tuple[str, RequestStream]] = {}  # handle → (request id, stream), until finished
        self._handles: dict[str, int] = {}  # request id → handle
        # Text state of generating requests, by handle: (prompt ids, params) until their first event whose text
        # the core left to us (TokenEvent.text None), then their TokenText; the receiving thread alone reads them.
        self._text_prompts: dict[int, tuple[list[int], SamplingParams]] = {}
        self._texts: dict[int, TokenText] = {}
        self._eos, self._special = frozenset(), frozenset()
        self._calls: dict[int, list] = {}  # call id → [threading.Event, the core's answer]
        # Grammars the core compiled without error ((kind, value), most recent last): a repeated one needs no
        # round trip, which would hold the event loop while the core is busy.
        self._valid_grammars: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._listeners: list = []
        self._stats: dict = {}
        self._down: str | None = None  # why the core is not running, once it is not
        self._stopping = False

    # --- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        """Start the core's process and wait until it is ready; nothing when started already."""
        if self._process is not None:
            return
        env = dict(os.environ)  # the core imports this jaxllm, wherever it was found
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
        self._process, sock = spawn("jaxllm.engine.core", env=env)
        self._channel = QueuedChannel(sock, "jaxllm-frontend")
        self._channel.send(("start", self.args))
        # transformers (seconds to import) only now: the core's process starts first, and loads meanwhile.
        from jaxllm.engine.detokenizer import model_tokenizer, special_ids

        self.tokenizer = model_tokenizer(self.args)  # while the core loads its weights
        if self.tokenizer is not None:
            self._eos = frozenset(self.args.eos_id)
            self._special = special_ids(self.tokenizer)
        info = self._wait_ready()
        self.rules = SubmitRules(self.args, info["vocab_size"], info["scoring"], info["has_tokenizer"])
        self.scoring, self.pid, self._stats = info["scoring"], info["pid"], info["stats"]
        self.config = info["config"]
        if self.config.vision is not None and self.args.enable_multimodal:
            from jaxllm.engine.loading import image_processor  # imports JAX: only for vision-language models

            self.image_processor = image_processor(self.args, self.config)
        log.info("engine core ready (pid %d)", self.pid)
        self._receiver = threading.Thread(target=os_named(self._receive), name="jaxllm-frontend-receive",
                                          daemon=True)
        self._receiver.start()

    def _wait_ready(self) -> dict:
        while True:
            try:
                messages = self._channel.receive()
            except (EOFError, OSError):
                code = self._process.wait(30)
                raise RuntimeError(f"the engine core's process exited while starting (exit code {code})") from None
            for kind, *body in messages:
                if kind == "ready":
                    return body[0]
                if kind == "failed":
                    message, code = body
                    self._process.wait(30)
                    raise (ValueError if code == 2 else RuntimeError)(message)

    def stop(self) -> None:
        """Stop the core (its unfinished requests end with "abort") and wait for its process."""
        if self._process is None:
            return
        self._stopping = True
        self._channel.send(("stop",))
        try:
            self._process.wait(60)
        except subprocess.TimeoutExpired:
            log.warning("the engine core did not stop within 60 s: terminating it")
            self._process.terminate()
            self._process.wait(10)
        if self._receiver is not None:
            self._receiver.join(10)
        self._channel.close()
        self._process = None

    # --- API (any thread) ----------------------------------------------------------------------
    def check_prompt(self, prompt_ids: list[int], params: SamplingParams) -> list[int]:
        """The prompt to run (truncated per --long_truncation_mode) or ValueError with the reason."""
        return self.rules.prompt(prompt_ids, params)

    def check_guided(self, guided) -> None:
        """Compile a request's grammar in the core now (kept there for its submit); ValueError when invalid."""
        key = (guided.kind, guided.value)
        with self._lock:
            if key in self._valid_grammars:
                self._valid_grammars.move_to_end(key)
                return
        done = threading.Event()
        with self._lock:
            self._raise_if_down()
            call_id = next(self._next_handle)
            self._calls[call_id] = call = [done, None]
        self._channel.send(("check_guided", call_id, guided))
        if not done.wait(CALL_TIMEOUT_S):
            with self._lock:
                self._calls.pop(call_id, None)
            raise EngineUnavailable(f"the engine core did not answer a grammar check within {CALL_TIMEOUT_S:.0f} s")
        kind, message = call[1]
        if kind == "down":
            raise EngineUnavailable(message)
        if message is not None:
            raise ValueError(message)
        with self._lock:
            self._valid_grammars[key] = None
            if len(self._valid_grammars) > GRAMMARS_REMEMBERED:
                self._valid_grammars.popitem(last=False)

    def submit(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None) -> RequestStream:
        """Queue one sequence (best_of 1); raises ValueError for invalid parameters or lengths."""
        return self.submit_many([(prompt_ids, params, request_id)])[0]

    def submit_many(self, requests: list[tuple[list[int], SamplingParams, str | None]]) -> list[RequestStream]:
        """Queue several sequences in one message; all are checked before any is queued."""
        self.rules.singles(requests)
        specs = [self._spec(ids, params, [request_id]) for ids, params, request_id in requests]
        return self._send(specs)

    def submit_group(self, prompt_ids: list[int], params: SamplingParams,
                     request_ids: list[str] | None = None, images: tuple = ()) -> list[RequestStream]:
        """Queue the params.best_of sequences of one prompt as a group (see Engine.submit_group); `images`: the
        prompt's ImageInputs (checked against the prompt in the core: an error there ends the streams)."""
        request_ids = self.rules.group(params, request_ids)
        spec = self._spec(prompt_ids, params, request_ids)
        if images:  # checked here too, so that what the core would refuse is a 400, not a failed stream
            self.rules.images(spec["prompt_ids"], spec["params"], list(images), self.config.vision)
            spec["images"] = tuple(images)
        return self._send([spec])

    def submit_images(self, prompt_ids: list[int], params: SamplingParams, images: tuple,
                      request_id: str | None = None) -> RequestStream:
        """Queue one sequence with images (see Engine.submit_images)."""
        return self.submit_group(prompt_ids, params, [request_id], images)[0]

    def submit_score(self, prompt_ids: list[int], request_id: str | None = None) -> RequestStream:
        """Queue one prompt to score (a reward model; see Engine.submit_score)."""
        spec = self._spec(prompt_ids, SCORE_PARAMS, [request_id], scoring=True)
        spec["score"] = True
        return self._send([spec])[0]

    def abort(self, request_id: str) -> None:
        """End a request: the core frees its KV within one step and its stream ends with "abort"."""
        with self._lock:
            if request_id not in self._handles or self._down is not None:
                return
        self._channel.send(("abort", request_id))

    def token_load(self) -> dict:
        return dict(self.stats()["token_load"])

    def stats(self) -> dict:
        """The core's stats as of its last message (sent with every loop iteration that changed them)."""
        with self._lock:
            self._raise_if_down()
            return dict(self._stats)

    def add_step_listener(self, listener) -> None:
        """Call `listener(StepReport)` for every step the core reports (on the receiving thread)."""
        self._listeners.append(listener)

    def remove_step_listener(self, listener) -> None:
        self._listeners.remove(listener)

    # --- submission ----------------------------------------------------------------------------
    def _spec(self, prompt_ids: list[int], params: SamplingParams, request_ids: list, *, scoring: bool = False) -> dict:
        prompt_ids, _ = self.rules.sequence(prompt_ids, params, scoring)
        return {"request_ids": [rid or uuid.uuid4().hex for rid in request_ids], "prompt_ids": list(prompt_ids),
                "params": params}

    def _send(self, specs: list[dict]) -> list[RequestStream]:
        streams = []
        with self._lock:
            self._raise_if_down()
            taken = [rid for spec in specs for rid in spec["request_ids"] if rid in self._handles]
            if taken:
                raise ValueError(f"request id {taken[0]} is in use")
            for spec in specs:
                spec["handles"] = []
                for request_id in spec["request_ids"]:
                    handle = next(self._next_handle)
                    stream = RequestStream(request_id)
                    self._streams[handle] = (request_id, stream)
                    self._handles[request_id] = handle
                    spec["handles"].append(handle)
                    streams.append(stream)
                    if self.tokenizer is not None and not spec.get("score"):
                        self._text_prompts[handle] = (spec["prompt_ids"], spec["params"])
        self._channel.send(("submit", specs))
        return streams

    def _raise_if_down(self) -> None:
        if self._down is not None:
            raise EngineUnavailable(self._down)

    # --- receiving (its own thread) ------------------------------------------------------------
    def _receive(self) -> None:
        while True:  # until the core's end of the socket closes: it stopped or died
            try:
                messages = self._channel.receive()
            except (EOFError, OSError):
                break
            for kind, *body in messages:
                if kind == "step":
                    events, reports, stats = body
                    self._deliver(events, stats)
                    for report in reports:
                        self._report(StepReport(*report))
                elif kind == "reply":
                    self._answer(*body)
        try:
            code = self._process.wait(30)
        except subprocess.TimeoutExpired:
            code = "none yet: it closed the channel"
        self._go_down("the engine was stopped" if self._stopping else
                      f"the engine core's process exited (exit code {code}); the server needs a restart")

    def _deliver(self, events: tuple, stats: dict) -> None:
        events = list(events_of(events))
        for handle, event in events:  # outside the lock: submissions go on meanwhile
            if event.text is None:
                event.text = self._text(handle).add(event.token_id)
            if event.finished:
                self._texts.pop(handle, None)
                self._text_prompts.pop(handle, None)
        wakes = WakeBatch()
        with self._lock:
            self._stats = stats
            for handle, event in events:
                entry = self._streams.get(handle)
                if entry is None:
                    continue
                request_id, stream = entry
                if event.finished:
                    del self._streams[handle]
                    self._handles.pop(request_id, None)
                stream.put(event, wakes)
        for request_id in wakes.send():  # their consumers' event loops are gone
            self.abort(request_id)

    def _text(self, handle: int) -> TokenText:
        text = self._texts.get(handle)
        if text is None:
            prompt_ids, params = self._text_prompts.pop(handle)
            text = self._texts[handle] = TokenText(self.tokenizer, prompt_ids, params, self._eos, self._special)
        return text

    def _report(self, report) -> None:
        for listener in self._listeners:
            try:
                listener(report)
            except Exception:  # noqa: BLE001 - a listener must not stop the receiver
                log.exception("step listener %r failed", listener)

    def _answer(self, call_id: int, error: str | None, unavailable: bool = False) -> None:
        """A call's answer: None, or why the request is invalid (or, `unavailable`, why the core could not
        answer it: a 503)."""
        with self._lock:
            call = self._calls.pop(call_id, None)
        if call is not None:
            call[1] = ("down" if unavailable else "answer", error)
            call[0].set()

    def _go_down(self, reason: str) -> None:
        """The core is gone: fail every open request and pending call with `reason`; later calls raise."""
        if not self._stopping:
            log.error("%s: failing %d open requests", reason, len(self._streams))
        wakes = WakeBatch()
        with self._lock:
            self._down = reason
            streams, self._streams, self._handles = list(self._streams.values()), {}, {}
            self._text_prompts, self._texts = {}, {}
            calls, self._calls = list(self._calls.values()), {}
        for _, stream in streams:
            stream.put(TokenEvent(-1, "", 0.0, False, 0, 0, True, "error", error=reason), wakes)
        wakes.send()
        for call in calls:
            call[1] = ("down", reason)
            call[0].set()
