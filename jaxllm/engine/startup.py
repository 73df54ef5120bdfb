"""Start-up phases timed: each phase's seconds logged at INFO as `start-up: NAME S s (...)`, with the XLA
compilations the phase asked for: how many were built and how many were read from the persistent compilation
cache. `python -m jaxllm.bench startup` reads these lines from the server's log."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import threading
import time

log = logging.getLogger("jaxllm.startup")

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # every executable asked for: built or read
_CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
LINE = re.compile(r"start-up: (?P<phase>[\w-]+) (?P<seconds>[\d.]+) s \((?P<built>\d+) compiled, (?P<read>\d+) from "
                  r"the cache\)")
WEIGHTS_LINE = re.compile(r"weights: (?P<gb>[\d.]+) GB on the devices, (?P<rate>[\d.]+) GB/s")


@dataclasses.dataclass
class CompileCount:
    """Executables asked for since the process started: `built` by XLA, `read` from the persistent cache."""

    asked: int = 0
    read: int = 0

    @property
    def built(self) -> int:
        return self.asked - self.read

    def since(self, earlier: "CompileCount") -> "CompileCount":
        return CompileCount(self.asked - earlier.asked, self.read - earlier.read)


class _Compiles:
    """The process's compile counter (JAX's monitoring listeners are process-wide and cannot be removed)."""

    def __init__(self):
        import jax.monitoring

        self._lock = threading.Lock()  # start-up compiles run in several threads
        self._count = CompileCount()
        jax.monitoring.register_event_duration_secs_listener(self._on_duration)
        jax.monitoring.register_event_listener(self._on_event)

    def _on_duration(self, event: str, duration: float, **kwargs) -> None:
        if event == _COMPILE_EVENT:
            with self._lock:
                self._count.asked += 1

    def _on_event(self, event: str, **kwargs) -> None:
        if event == _CACHE_HIT_EVENT:
            with self._lock:
                self._count.read += 1

    def now(self) -> CompileCount:
        with self._lock:
            return dataclasses.replace(self._count)


_compiles: _Compiles | None = None


def compiles() -> CompileCount:
    """Executables asked for so far in this process (counted from the first call of this or `phase`)."""
    global _compiles
    if _compiles is None:
        _compiles = _Compiles()
    return _compiles.now()


@dataclasses.dataclass
class PhaseTimer:
    seconds: float = 0.0  # the phase's, once it ended


@contextlib.contextmanager
def phase(name: str):
    """Time the block as start-up phase `name` and log it with the compilations it asked for; yields a
    PhaseTimer that holds its seconds after the block."""
    started = time.perf_counter()
    before = compiles()  # its first call imports JAX: part of the phase
    timer = PhaseTimer()
    yield timer
    timer.seconds = time.perf_counter() - started
    count = compiles().since(before)
    log.info("start-up: %s %.2f s (%d compiled, %d from the cache)", name, timer.seconds, count.built, count.read)


def log_weights(params, seconds: float) -> None:
    """Log the size of the weights placed in `seconds` and the rate (`WEIGHTS_LINE`)."""
    import jax

    size = sum(leaf.nbytes for leaf in jax.tree.leaves(params)) / 1e9
    log.info("weights: %.2f GB on the devices, %.2f GB/s", size, size / max(seconds, 1e-9))
