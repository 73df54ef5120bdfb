"""The cyclic garbage collector in a long-running engine or frontend: its start-up heap frozen out of collections.

After start-up a process holds hundreds of thousands of long-lived objects that the collector would scan in every
full (oldest-generation) collection: the models' modules, JAX's traces and caches, the compiled steps, the
tokenizer, the web app (SmolLM2's engine process: ~600,000 tracked objects, whose full collections took 126 ms at
the median on the 2-core CPU box; docs/perf.md, session 23). Such a pause on the engine's thread outlasts a decode
step, so the device idles and every stream's inter-token gap takes it. `freeze_startup_heap` moves all of them
into the permanent generation once start-up is done (after one last collection), so that later collections
scan only what serving allocates (a server's background compiles freeze again when they end: their traces and
executables are start-up's too); `thaw` undoes it when the engine stops, so that a process that goes on (tests,
an embedding program) can collect the stopped engine's cycles. Reference counting frees objects as before:
freezing only keeps frozen cycles from being collected.
"""

from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger(__name__)


def freeze_startup_heap() -> None:
    """Collect once, then move every tracked object to the permanent generation."""
    started = time.perf_counter()
    gc.collect()
    gc.freeze()
    log.debug("froze %d objects out of the collector's scans (%.0f ms)", gc.get_freeze_count(),
              1e3 * (time.perf_counter() - started))


def thaw() -> None:
    """Return the frozen objects to the collector (the oldest generation)."""
    gc.unfreeze()
