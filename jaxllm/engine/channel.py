"""A message channel between two processes (the frontend and the engine core): Python objects pickled over a local
socket pair (multiprocessing.connection). A sender thread writes, so `send` never blocks on a slow reader, and the
messages queued while one write is under way leave together in the next (one pickle, one write)."""

from __future__ import annotations

import pickle
import queue
import threading
from multiprocessing.connection import Connection

_CLOSE = object()  # queued by close(): the sender writes what came before it, then stops


class Channel:
    """One end of a socket pair. send() from any thread; recv() from one reader thread."""

    def __init__(self, connection: Connection, name: str):
        self.connection = connection  # for multiprocessing.connection.wait()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._send_loop, name=f"{name}-send", daemon=True)
        self._sender.start()

    def send(self, message) -> None:
        """Queue one message (never blocks); it is lost if the other side is gone."""
        self._queue.put(message)

    def recv(self) -> list:
        """The messages of the next write, in order (blocks); EOFError once the other side has closed."""
        return pickle.loads(self.connection.recv_bytes())

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued (within `timeout` seconds), then close the socket."""
        self._queue.put(_CLOSE)
        self._sender.join(timeout)
        self.connection.close()

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
                    self.connection.send_bytes(pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL))
                except (OSError, ValueError):  # the other side is gone (its reader reports that)
                    return
            if closing:
                return
