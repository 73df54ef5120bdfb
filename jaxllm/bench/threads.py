"""CPU time of this process's threads, by name (Linux /proc): which host thread a step's time goes to. Beside the
engine's own counters (its thread, the launch thread) this sees the runtime's threads, which no counter of ours
does: XLA's dispatch thread, which updates and launches a step's command buffers after the jitted call returns
(docs/perf.md, session 18), and PJRT's workers. Python threads go by their Python names, the others by the name
the OS has for them (/proc/self/task/TID/comm).

Another process's threads (the server's frontend and engine core) go by their OS names (jaxllm's own threads
give theirs to the OS: jaxllm/thread_names.py), the process's main thread as "main":

    python -m jaxllm.bench.threads PID... --out before.json       (a snapshot)
    python -m jaxllm.bench.threads PID... --since before.json      (CPU seconds per thread since it, busiest first)
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import threading


def thread_cpu_s(native_id: int, pid: int | str = "self") -> float:
    """CPU seconds a thread of this process (or of `pid`) has used (user + system; clock-tick resolution), 0 once
    it is gone."""
    try:
        fields = open(f"/proc/{pid}/task/{native_id}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_by_name(pid: int | str, known: dict[int, str]) -> dict[str, float]:
    """CPU seconds so far of process `pid`'s threads, summed by name: `known` names some thread ids, the others go
    by their OS names. OSError where /proc has no such process (or there is no /proc)."""
    totals: collections.Counter = collections.Counter()
    for tid in map(int, os.listdir(f"/proc/{pid}/task")):
        name = known.get(tid)
        if name is None:
            try:
                name = open(f"/proc/{pid}/task/{tid}/comm").read().strip()
            except OSError:
                continue  # ended meanwhile
        totals[name] += thread_cpu_s(tid, pid)
    return dict(totals)


def process_cpu_by_thread_name(pid: int) -> dict[str, float]:
    """CPU seconds so far of each OS thread name of process `pid` (its main thread: "main"), summed by name."""
    return _cpu_by_name(pid, {pid: "main"})


def cpu_by_thread_name() -> dict[str, float]:
    """CPU seconds so far of each name's threads (those alive now), summed over the threads of one name."""
    python_names = {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}
    try:
        return _cpu_by_name("self", python_names)
    except OSError:  # not Linux: nothing to say
        return {}


def busiest_ms_per_step(before: dict[str, float], after: dict[str, float], steps: int,
                        top: int = 6) -> list[tuple[str, float]]:
    """The `top` thread names by CPU ms per step between two `cpu_by_thread_name` snapshots, most first."""
    used = {name: 1e3 * (after[name] - before.get(name, 0.0)) / max(steps, 1) for name in after}
    return sorted(((n, ms) for n, ms in used.items() if ms > 0), key=lambda item: -item[1])[:top]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jaxllm.bench.threads", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pids", type=int, nargs="+")
    p.add_argument("--out", help="write this snapshot (JSON) here")
    p.add_argument("--since", help="print each thread name's CPU seconds since the snapshot in this file")
    p.add_argument("--top", type=int, default=8)
    ns = p.parse_args(argv)
    now = {str(pid): process_cpu_by_thread_name(pid) for pid in ns.pids}
    if ns.out:
        with open(ns.out, "w") as f:
            json.dump(now, f)
    if ns.since:
        with open(ns.since) as f:
            before = json.load(f)
        for pid, threads in now.items():
            used = {name: s - before.get(pid, {}).get(name, 0.0) for name, s in threads.items()}
            top = sorted(((n, s) for n, s in used.items() if s > 0), key=lambda item: -item[1])[: ns.top]
            print(f"pid {pid}: " + (", ".join(f"{n} {s:.2f}" for n, s in top) or "no CPU") + " (CPU s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
