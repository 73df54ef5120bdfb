"""One HTTP request's generation on the engine: prompt checks, one engine sequence group of best_of members per
prompt (one request when best_of is 1), their events collected or merged into one stream, and every unfinished
engine request aborted on exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import uuid
from typing import AsyncIterator

from jaxllm.engine.client import EngineUnavailable
from jaxllm.engine.group import SEED_LIMIT, member_params
from jaxllm.engine.request import SamplingParams, TokenEvent
from jaxllm.server.errors import ApiError, invalid

__all__ = ["SEED_LIMIT", "Generation", "Sequence", "check_prompt", "failure"]

_PARAMETERS = frozenset(f.name for f in dataclasses.fields(SamplingParams))


def check_prompt(engine, prompt_ids: list[int], params: SamplingParams, param: str = "inputs") -> list[int]:
    """The engine's checks (empty, lengths, vocabulary) and --long_truncation_mode (400 with the reason)."""
    try:
        return engine.check_prompt(prompt_ids, params)
    except ValueError as exc:
        raise invalid(f"{param}: {exc}", param) from None


@dataclasses.dataclass
class Sequence:
    """Everything one engine request produced."""

    params: SamplingParams  # this sample's own (its seed among them)
    events: list[TokenEvent]

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events)

    @property
    def last(self) -> TokenEvent:
        return self.events[-1]

    @property
    def finish_reason(self) -> str | None:
        return self.last.finish_reason

    @property
    def cumulative_logprob(self) -> float:
        return sum(e.logprob for e in self.events)

    @property
    def prompt_logprobs(self) -> list | None:
        return self.events[0].prompt_logprobs


def failure(event: TokenEvent) -> ApiError | None:
    """The error to answer for an engine request that ended without finishing normally."""
    if event.finish_reason == "error":
        return ApiError(500, f"generation failed: {event.error or 'engine error'}")
    if event.finish_reason == "abort":
        return ApiError(503, "generation aborted by the server")
    return None


class Generation:
    """The engine requests of one HTTP request: best_of members of each prompt, indexed prompt-major.
    Use once, through collect() or events(). It notes when it was submitted, its first and last token, how
    many tokens came, its queue time and prompt-cache hits as the engine reports them (for the metrics)."""

    def __init__(self, engine, prompts: list[list[int]], params: SamplingParams, *, scoring: bool = False,
                 images: tuple = ()) -> None:
        """scoring: each prompt is scored by a reward model (Engine.submit_score; params is SCORE_PARAMS);
        images: the one prompt's images (ImageInputs, one per placeholder)."""
        self.engine = engine
        self.images = images
        self.scoring = scoring
        self.prompts = prompts
        self.params = params
        self.samples = [(ids, member_params(params, i)) for ids in prompts for i in range(params.best_of)]
        self.group_id = uuid.uuid4().hex
        self.request_ids = [f"{self.group_id}-{i}" for i in range(len(self.samples))]
        self.submitted_at: float | None = None
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.generated_tokens = 0
        self.queue_s: float | None = None  # the first sample's submit → first scheduled, per the engine
        self.prompt_cache_lookups: list[tuple[int, int]] = []  # (cached tokens, prompt tokens) per sample
        self._open: set[str] = set()

    @property
    def input_len(self) -> int:
        """Prompt tokens, each image's placeholder counted as the image's tokens."""
        return sum(len(ids) for ids in self.prompts) + sum(image.num_tokens - 1 for image in self.images)

    def _submit(self) -> list:
        self.submitted_at = time.monotonic()
        streams = []
        best_of = self.params.best_of
        for p, ids in enumerate(self.prompts):
            request_ids = self.request_ids[p * best_of:(p + 1) * best_of]
            try:
                if self.scoring:
                    streams.append(self.engine.submit_score(ids, request_ids[0]))
                else:
                    streams += self.engine.submit_group(ids, self.params, request_ids, images=self.images)
            except ValueError as exc:
                self._abort_open()
                field = str(exc).split(":", 1)[0]  # "<parameter>: reason" names the parameter
                raise invalid(str(exc), field if field in _PARAMETERS else None) from None
            except EngineUnavailable as exc:
                self._abort_open()
                raise ApiError(503, f"the engine is not running: {exc}") from None
            self._open.update(request_ids)
        return streams

    def _note(self, event: TokenEvent, index: int) -> None:
        now = time.monotonic()
        if self.first_token_at is None:
            self.first_token_at = now
        if event.queue_s is not None and self.queue_s is None:
            self.queue_s = event.queue_s
        if event.cached_tokens is not None:
            self.prompt_cache_lookups.append((event.cached_tokens, event.prompt_tokens))
        self.generated_tokens += event.score is None  # a score is no generated token
        if event.finished:
            self._open.discard(self.request_ids[index])
            if not self._open:
                self.finished_at = now

    def _abort_open(self) -> None:
        for request_id in self.request_ids:
            if request_id in self._open:
                self.engine.abort(request_id)
        self._open.clear()

    async def collect(self) -> list[Sequence]:
        """Every sample to its end; a failed sample fails the whole request (the others are aborted)."""
        events: list[list[TokenEvent]] = [[] for _ in self.samples]
        async with contextlib.aclosing(self.events()) as stream:
            async for index, event in stream:
                events[index].append(event)
        sequences = [Sequence(sample, evs) for (_, sample), evs in zip(self.samples, events)]
        for seq in sequences:
            err = failure(seq.last) if seq.events else ApiError(500, "generation ended without a token")
            if err is not None:
                raise err
        return sequences

    async def events(self) -> AsyncIterator[tuple[int, TokenEvent]]:
        """(sample index, event) as they come, samples interleaved; closing it aborts what is unfinished."""
        async with contextlib.aclosing(self.batches()) as batches:
            async for batch in batches:
                for item in batch:
                    yield item

    async def batches(self) -> AsyncIterator[list[tuple[int, TokenEvent]]]:
        """The events as events() gives them, in lists of those already here when the reader wakes: a stream
        read a step late is written out in one piece, not one write per token. Closing it aborts what is
        unfinished."""
        streams = self._submit()
        try:
            if len(streams) == 1:
                stream = streams[0]
                take_ready = getattr(stream, "take_ready", None)  # engines' streams have it; others give one
                async for event in stream:
                    batch = [event] if take_ready is None or event.finished else [event, *take_ready()]
                    for e in batch:
                        self._note(e, 0)
                    yield [(0, e) for e in batch]
                    if batch[-1].finished:
                        break
            else:
                async with contextlib.aclosing(_merged(streams)) as merged:
                    async for batch in merged:
                        for index, event in batch:
                            self._note(event, index)
                        yield batch
        finally:
            self._abort_open()


async def _merged(streams: list) -> AsyncIterator[list[tuple[int, TokenEvent]]]:
    """The events of several streams as they arrive, each stream read up to its finished event, in lists of
    those that arrived together."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream) -> None:
        try:
            async for event in stream:
                queue.put_nowait((index, event))
                if event.finished:
                    break
        except Exception as exc:  # handed to the consumer, which raises it
            queue.put_nowait((index, exc))
        finally:
            queue.put_nowait((index, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            arrived = [await queue.get()]
            while not queue.empty():
                arrived.append(queue.get_nowait())
            batch = []
            for index, event in arrived:
                if event is None:
                    running -= 1
                elif isinstance(event, Exception):
                    if batch:
                        yield batch
                    raise event
                else:
                    batch.append((index, event))
            if batch:
                yield batch
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
