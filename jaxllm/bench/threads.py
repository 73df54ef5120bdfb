"""CPU time of this process's threads, by name (Linux /proc): which host thread a step's time goes to. Beside the
engine's own counters (its thread, the launch thread) this sees the runtime's threads, which no counter of ours
does: XLA's dispatch thread, which updates and launches a step's command buffers after the jitted call returns
(docs/perf.md, session 18), and PJRT's workers. Python threads go by their Python names, the others by the name
the OS has for them (/proc/self/task/TID/comm)."""

from __future__ import annotations

import collections
import os
import threading


def thread_cpu_s(native_id: int) -> float:
    """CPU seconds a thread of this process has used (user + system; clock-tick resolution), 0 once it is gone."""
    try:
        fields = open(f"/proc/self/task/{native_id}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_by_thread_name() -> dict[str, float]:
    """CPU seconds so far of each name's threads (those alive now), summed over the threads of one name."""
    python_names = {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}
    totals: collections.Counter = collections.Counter()
    try:
        tids = [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:  # not Linux: nothing to say
        return {}
    for tid in tids:
        name = python_names.get(tid)
        if name is None:
            try:
                name = open(f"/proc/self/task/{tid}/comm").read().strip()
            except OSError:
                continue  # ended meanwhile
        totals[name] += thread_cpu_s(tid)
    return dict(totals)


def busiest_ms_per_step(before: dict[str, float], after: dict[str, float], steps: int,
                        top: int = 6) -> list[tuple[str, float]]:
    """The `top` thread names by CPU ms per step between two `cpu_by_thread_name` snapshots, most first."""
    used = {name: 1e3 * (after[name] - before.get(name, 0.0)) / max(steps, 1) for name in after}
    return sorted(((n, ms) for n, ms in used.items() if ms > 0), key=lambda item: -item[1])[:top]
