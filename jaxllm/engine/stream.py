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

    def put(self, event: TokenEvent) -> bool:
        """Engine side. False when the async reader's event loop is closed (nobody will read)."""
        with self._lock:
            self._events.append(event)
            if self._sleepers:
                self._ready.notify_all()
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            loop, future = waiter
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
