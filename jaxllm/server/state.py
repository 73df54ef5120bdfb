"""What every route shares: the engine, the flags, the metrics, and the per-request tracker that feeds them."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import time
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

from quart import has_request_context, request

from jaxllm.args import ServerArgs
from jaxllm.engine.client import EngineUnavailable
from jaxllm.engine.detokenizer import special_ids
from jaxllm.engine.request import TokenEvent
from jaxllm.server.generation import Generation, Sequence, failure

T = TypeVar("T")

log = logging.getLogger("jaxllm.server")


@dataclasses.dataclass
class ServerState:
    engine: Any  # jaxllm.engine.engine.Engine
    args: ServerArgs
    metrics: Any = None  # jaxllm.metrics.Metrics, or None

    def __post_init__(self) -> None:
        # Every engine step feeds the batch metrics (engines without step reports, like the server tests'
        # scripted one, have no add_step_listener).
        listen = getattr(self.engine, "add_step_listener", None)
        if self.metrics is not None and listen is not None:
            metrics = self.metrics
            listen(lambda step: metrics.batch_step(step.method, step.duration_s, step.batch_size))

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def model_name(self) -> str:
        """The name /v1/models lists: the model directory's base name."""
        return os.path.basename(os.path.normpath(self.args.model_dir or "model"))

    def is_eos(self, token_id: int) -> bool:
        return token_id in self.args.eos_id

    def is_special(self, token_id: int) -> bool:
        """As the engine marks a generated token's `special` (the tokenizer's special tokens)."""
        return token_id in self._special_ids

    @functools.cached_property
    def _special_ids(self) -> frozenset[int]:
        return special_ids(self.tokenizer)

    def refresh_load(self) -> None:
        """Copy the engine's load (waiting, running, paused requests; estimated peak tokens) into the gauges."""
        try:
            s = self.engine.stats()
        except EngineUnavailable:  # the health route says so; the gauges keep their last values
            return
        peak = s["token_load"]["dynamic_max_load"] * self.args.max_total_token_num
        self.metrics.set_load(queue_size=s["waiting"], running=s["running"], paused=s["paused"],
                              max_tokens=round(peak))

    def track(self) -> "Tracker":
        """Start the clock of one generation request (counted as received in the metrics)."""
        if self.metrics is not None:
            self.metrics.request_received()
        headers = request.headers if has_request_context() else {}
        label = " ".join(f"{h}:{headers[h]}" for h in ("X-Request-Id", "X-Session-Id") if h in headers)
        return Tracker(self.metrics, label)

    def track_parsed(self, parse: Callable[..., T], *args, **kwargs) -> tuple["Tracker", T]:
        """Start the clock, then validate the request with `parse(*args, **kwargs)`; a request that fails
        validation is ended (counted, logged) before its error propagates."""
        track = self.track()
        try:
            return track, parse(*args, **kwargs)
        except BaseException:
            track.end()
            raise


class Tracker:
    """One generation request from arrival to answer, run through collect() or batches() once it is valid (or
    end()ed when it is not): it feeds the metrics and logs one line per request, with the client's
    X-Request-Id / X-Session-Id."""

    def __init__(self, metrics: Any, label: str = "") -> None:
        self.metrics = metrics
        self.label = label
        self.received_at = time.monotonic()
        self.generation: Generation | None = None
        self.ok = False
        self._ended = False

    async def collect(self, generation: Generation) -> list[Sequence]:
        """Every sequence of a valid request (see Generation.collect), then end()."""
        self.generation = generation
        try:
            sequences = await generation.collect()
            self.ok = True
            return sequences
        finally:
            self.end()

    async def batches(self, generation: Generation) -> AsyncIterator[list[tuple[int, TokenEvent]]]:
        """The events of a valid request in lists (see Generation.batches); an engine request that ends in an
        error or an abort raises its ApiError after the events before it; end() when the stream is over or
        closed."""
        self.generation = generation
        try:
            async with contextlib.aclosing(generation.batches()) as batches:
                async for batch in batches:
                    for k, (_, event) in enumerate(batch):
                        err = failure(event)
                        if err is not None:
                            if k:
                                yield batch[:k]
                            raise err
                    yield batch
            self.ok = True
        finally:
            self.end()

    async def guard(self, validation: Awaitable[T]) -> T:
        """Await validation that runs after parsing (a request's images); a failure ends the request."""
        try:
            return await validation
        except BaseException:
            self.end()
            raise

    def end(self) -> None:
        if self._ended:
            return
        self._ended = True
        now = time.monotonic()
        g = self.generation
        submitted = g.submitted_at if g is not None and g.submitted_at is not None else now
        first = g.first_token_at if g is not None and g.first_token_at is not None else now
        last = g.finished_at if g is not None and g.finished_at is not None else now
        if g is not None:
            log.info("%s%s: %d prompt tokens, %d generated, first token %.1f ms, total %.1f ms%s",
                     f"{self.label} " if self.label else "", g.group_id, g.input_len,
                     g.generated_tokens, 1000 * (first - self.received_at), 1000 * (now - self.received_at),
                     "" if self.ok else " (failed or aborted)")
        if self.metrics is None:
            return
        # Queue time: submission → first scheduled, as the engine reports it with the first token (from an engine
        # that reports none, or with no token: submission → first token or now).
        queue_s = g.queue_s if g is not None and g.queue_s is not None else first - submitted
        for hit_tokens, prompt_tokens in g.prompt_cache_lookups if g is not None else ():
            self.metrics.prompt_cache(hit_tokens, prompt_tokens)
        self.metrics.request_finished(
            success=self.ok,
            duration_s=now - self.received_at,
            validation_s=submitted - self.received_at,
            inference_s=last - submitted,
            queue_s=queue_s,
            first_token_s=first - self.received_at,
            input_len=g.input_len if g is not None else 0,
            generated_tokens=g.generated_tokens if g is not None else 0,
            max_new_tokens=g.params.max_new_tokens if g is not None else 0,
        )
