"""Child processes of jaxllm (the engine core, the per-device followers of --nccl_port, the grammar mask
worker): a fresh interpreter running `python -m MODULE FD ...`, FD its end of a socket pair, that dies with its
parent (Linux); and `Channel`, length-prefixed pickles over such a socket."""

from __future__ import annotations

import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
from typing import Any

_LENGTH = struct.Struct("<Q")  # each message: its pickled length, then the pickle


def die_with_parent() -> None:
    """In a child before it starts: SIGTERM when its parent dies, even killed outright (Linux; the parent is the
    thread that started it, so start children from a thread that lives as long as they should)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def spawn(module: str, *argv: str, env: dict | None = None) -> tuple[subprocess.Popen, socket.socket]:
    """Start `python -m module FD *argv`; returns the process and our end of its socket pair."""
    proc, (ours,) = spawn_with(module, list(argv), env=env)
    return proc, ours


def spawn_with(module: str, argv: list[str], *, sockets: int = 1, pass_fds: tuple[int, ...] = (),
               tied_to_thread: bool = True, env: dict | None = None) -> tuple[subprocess.Popen, list[socket.socket]]:
    """Start `python -m module FD1 .. FDn *argv` with n socket pairs (and `pass_fds` open in the child, named
    in argv by the caller); returns the process and our ends of the pairs. tied_to_thread: the child dies with
    the calling thread (die_with_parent); a child started from a short-lived thread says False, and ends when
    its sockets close instead (its parent process exiting closes them)."""
    pairs = [socket.socketpair() for _ in range(sockets)]
    theirs = [t.fileno() for _, t in pairs]
    command = [sys.executable, "-m", module, *map(str, theirs), *argv]
    proc = subprocess.Popen(command, pass_fds=(*theirs, *pass_fds),
                            preexec_fn=die_with_parent if tied_to_thread else None,
                            env=env if env is not None else dict(os.environ))
    for _, t in pairs:
        t.close()
    return proc, [ours for ours, _ in pairs]


def wait_or_kill(proc: subprocess.Popen, timeout_s: float) -> bool:
    """Wait up to `timeout_s` for `proc` to exit, else kill and reap it; True when it had to be killed."""
    try:
        proc.wait(timeout_s)
        return False
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return True


class Channel:
    """Length-prefixed pickles over a connected stream socket (a socketpair shared with one child)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock

    def send(self, message: Any) -> int:
        """Send `message`; returns its size in bytes on the wire."""
        payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        self.sock.sendall(_LENGTH.pack(len(payload)) + payload)
        return _LENGTH.size + len(payload)

    def receive(self) -> Any:
        """The next message; EOFError once the other end has closed."""
        (size,) = _LENGTH.unpack(self._exactly(_LENGTH.size))
        return pickle.loads(self._exactly(size))

    def _exactly(self, n: int) -> bytes:
        data = bytearray()
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise EOFError("the other process closed the channel")
            data += chunk
        return bytes(data)

    def close(self) -> None:
        self.sock.close()
