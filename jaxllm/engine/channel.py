"""The frontend ↔ engine-core channel: jaxllm.child's length-prefixed pickles over a socket pair, written by a
sender thread so that `send` never blocks on a slow reader, and batched: the messages queued while one write is
under way leave together in the next (one pickle, one write)."""

from __future__ import annotations

import queue
import socket
import threading

from jaxllm.child import Channel
from jaxllm.thread_names import os_named

_CLOSE = object()  # queued by close(): the sender writes what came before it, then stops


class QueuedChannel:
    """One end of a socket pair. send() from any thread; receive() from one reader thread."""

    def __init__(self, sock: socket.socket, name: str):
        self._channel = Channel(sock)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._sender = threading.Thread(target=os_named(self._send_loop), name=f"{name}-send", daemon=True)
        self._sender.start()

    def send(self, message) -> None:
        """Queue one message (never blocks); it is lost if the other side is gone."""
        self._queue.put(message)

    def receive(self) -> list:
        """The messages of the next write, in order (blocks); EOFError once the other side has closed."""
        return self._channel.receive()

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued (within `timeout` seconds), then close the socket."""
        self._queue.put(_CLOSE)
        self._sender.join(timeout)
        self._channel.close()

    def _send_loop(self) -> None:
        while True:
            batch = [self._queue.get()]
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            closing = any(m is _CLOSE for m in batch)
            batch = [m for m in batch if m is not _CLOSE]
            if batch:
                try:
                    self._channel.send(batch)
                except OSError:  # the other side is gone (its reader reports that)
                    return
            if closing:
                return
