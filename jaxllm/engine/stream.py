"""A request's event stream: written by the engine thread, read by plain threads or by asyncio code."""

from __future__ import annotations

import asyncio
import threading
from collections import deque

from jaxllm.engine.request import TokenEvent


class RequestStream:
    """TokenEvents of one request, in order, ending with the one that has finished=True.

    Iterate it with `for` (blocking) or `async for` (any event loop): the engine thread wakes an async
    reader through `loop.call_soon_threadsafe` on the reader's own loop.
    """

    def __init__(self, request_id: str):
        self.request_id = request_id
        self._events: deque[TokenEvent] = deque()
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._waiter: tuple[asyncio.AbstractEventLoop, asyncio.Future] | None = None
        self._done = False  # the final event was taken by the reader
        self._sleepers = 0  # blocking readers waiting on _ready

    def put(self, event: TokenEvent, wakes: "WakeBatch | None" = None) -> bool:
        """Engine side. False when the async reader's event loop is closed (nobody will read). With `wakes`,
        an async reader's wake-up joins the batch (sent by `wakes.send()`) instead of being sent now."""
        with self._lock:
            self._events.append(event)
            if self._sleepers:
                self._ready.notify_all()
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            loop, future = waiter
            if wakes is not None:
                wakes.add(loop, future, self.request_id)
                return True
            try:
                loop.call_soon_threadsafe(_wake, future)
            except RuntimeError:
                return False
        return True

    def _take(self) -> TokenEvent:
        event = self._events.popleft()
        self._done = event.finished
        return event

    # --- blocking ------------------------------------------------------------------------------
    def __iter__(self):
        return self

    def __next__(self) -> TokenEvent:
        with self._lock:
            if self._done:
                raise StopIteration
            while not self._events:
                self._sleepers += 1
                try:
                    self._ready.wait()
                finally:
                    self._sleepers -= 1
            return self._take()

    def take_ready(self) -> list[TokenEvent]:
        """The events already here, without waiting (none after the finished one): a reader that has just
        woken takes a step's backlog at once, and writes it out in one piece."""
        with self._lock:
            ready = []
            while self._events and not self._done:
                ready.append(self._take())
            return ready

    # --- asyncio -------------------------------------------------------------------------------
    def __aiter__(self):
        return self

    async def __anext__(self) -> TokenEvent:
        while True:
            with self._lock:
                if self._done:
                    raise StopAsyncIteration
                if self._events:
                    return self._take()
                loop = asyncio.get_running_loop()
                future = loop.create_future()
                self._waiter = (loop, future)
            await future


def _wake(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


def _wake_all(futures: list[asyncio.Future]) -> None:
    for future in futures:
        _wake(future)


class WakeBatch:
    """Wake-ups of async readers gathered over one engine step, sent once per event loop: one
    `call_soon_threadsafe` (a self-pipe write and one wake of the loop's thread, which then competes for the
    GIL) per loop and step, instead of one per token."""

    def __init__(self):
        self._by_loop: dict[asyncio.AbstractEventLoop, tuple[list[asyncio.Future], list[str]]] = {}

    def add(self, loop: asyncio.AbstractEventLoop, future: asyncio.Future, request_id: str) -> None:
        futures, ids = self._by_loop.setdefault(loop, ([], []))
        futures.append(future)
        ids.append(request_id)

    def send(self) -> list[str]:
        """Wake every gathered reader; returns the request ids whose event loop is closed (nobody reads)."""
        orphaned = []
        for loop, (futures, ids) in self._by_loop.items():
            try:
                loop.call_soon_threadsafe(_wake_all, futures)
            except RuntimeError:
                orphaned += ids
        self._by_loop.clear()
        return orphaned
