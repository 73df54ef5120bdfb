"""jaxllm.bench.threads: a busy Python thread is found under its own name with about the CPU it burnt, an idle
one uses none, and the busiest names come most first, per step."""

import threading
import time

from jaxllm.bench.threads import busiest_ms_per_step, cpu_by_thread_name, thread_cpu_s


def _burn_then_wait(seconds: float, stop: threading.Event) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        sum(range(1000))
    stop.wait()  # alive, idle, until the test has read it


def test_a_busy_thread_is_named_and_timed():
    stop = threading.Event()
    idle = threading.Thread(target=stop.wait, name="bench-idle")
    busy = threading.Thread(target=_burn_then_wait, args=(0.3, stop), name="bench-busy")
    idle.start()
    before = cpu_by_thread_name()
    busy.start()
    deadline = time.monotonic() + 30
    while thread_cpu_s(busy.native_id) < 0.29 and time.monotonic() < deadline:
        time.sleep(0.01)
    after = cpu_by_thread_name()
    stop.set()
    busy.join()
    idle.join()
    assert 0.25 <= after["bench-busy"] - before.get("bench-busy", 0.0) <= 1.0
    assert after["bench-idle"] - before["bench-idle"] < 0.02
    ranked = busiest_ms_per_step(before, after, steps=10, top=3)
    assert ranked[0][0] == "bench-busy" and 25 <= ranked[0][1] <= 100  # ms per step over 10 steps
    assert [ms for _, ms in ranked] == sorted((ms for _, ms in ranked), reverse=True) and len(ranked) <= 3


def test_a_thread_that_is_gone_counts_nothing():
    done = threading.Thread(target=lambda: None)
    done.start()
    done.join()
    assert thread_cpu_s(done.native_id) == 0.0


def test_another_processes_threads_by_their_os_names(tmp_path, capsys):
    import subprocess
    import sys

    from jaxllm.bench.threads import main

    child = subprocess.Popen([sys.executable, "-c", """
import sys, threading, time
from jaxllm.thread_names import os_named
def burn():
    sys.stdin.readline()
    end = time.thread_time() + 0.4
    while time.thread_time() < end:
        sum(range(1000))
    print("done", flush=True)
    sys.stdin.readline()
t = threading.Thread(target=os_named(burn), name="jaxllm-burn")
t.start()
print("ready", flush=True)
t.join()
"""], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        snapshot = tmp_path / "before.json"
        main([str(child.pid), "--out", str(snapshot)])
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "done"
        capsys.readouterr()
        main([str(child.pid), "--since", str(snapshot)])
        line = capsys.readouterr().out.strip()
        burnt = float(line.split("jx-burn ")[1].split()[0].rstrip(","))
        assert line.startswith(f"pid {child.pid}: jx-burn ") and 0.3 <= burnt <= 1.5, line
    finally:
        child.stdin.write("end\n")
        child.stdin.flush()
        child.wait(timeout=30)
