"""Where a step's device time goes: `python -m jaxllm.bench.profile --model_dir DIR [--prompts N] [jaxllm.serve
flags]` runs N prompts (128 in / `--output-len` out) through the in-process engine once untimed (compiling what
they meet), then again under `jax.profiler.trace`, and prints the device's kernels by total time per engine step:
calls per step, µs per step, share of the device's busy time, and the device's busy time against the wall time
of a step (below 1: the host or launch gaps bound the step); `--fusions` adds what each XLA fusion computes.

The trace is read from the Perfetto JSON that `jax.profiler` writes beside its XSpace (`create_perfetto_trace`):
complete events ("ph": "X") of every process whose name names a GPU (`/device:GPU:0`, streams as threads).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib
import re
import tempfile

_DEVICE_PROCESS = re.compile(r"/device:(GPU|TPU)", re.IGNORECASE)


def process_names(trace: dict) -> dict:
    """pid → the process's name, from the trace's metadata events."""
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    return {e["pid"]: e.get("args", {}).get("name", "") for e in events
            if e.get("ph") == "M" and e.get("name") == "process_name"}


def device_events(trace: dict) -> list[dict]:
    """The complete events of the trace's device processes (kernels, copies, collectives)."""
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    device_pids = {pid for pid, name in process_names(trace).items() if _DEVICE_PROCESS.search(name)}
    return [e for e in events if e.get("ph") == "X" and e.get("pid") in device_pids and "dur" in e]


def busy_us(events: list[dict]) -> float:
    """Microseconds during which at least one device event ran (overlapping streams counted once)."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted((e["ts"], e["ts"] + e["dur"]) for e in events):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def idle_gaps(events: list[dict], at_least_us: float = 50.0) -> list[float]:
    """The device's idle stretches (µs) of at least `at_least_us` between its first and last event."""
    gaps, end = [], None
    for start, stop in sorted((e["ts"], e["ts"] + e["dur"]) for e in events):
        if end is not None and start - end >= at_least_us:
            gaps.append(start - end)
        end = stop if end is None else max(end, stop)
    return gaps


def host_table(trace: dict, steps: int, top: int) -> list[tuple[str, str, float, float]]:
    """The host's traced events (jax's TraceMe: dispatch, transfers, executions), by total time: (thread, name,
    calls per step, µs per step), the `top` longest first."""
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    names = process_names(trace)
    host_pids = {pid for pid, name in names.items() if not _DEVICE_PROCESS.search(name)}
    threads = {(e["pid"], e["tid"]): e.get("args", {}).get("name", "") for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    calls, time_us = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in host_pids and "dur" in e:
            key = (threads.get((e["pid"], e.get("tid")), str(e.get("tid"))), e["name"])
            calls[key] += 1
            time_us[key] += e["dur"]
    return [(thread, name, calls[(thread, name)] / steps, us / steps)
            for (thread, name), us in time_us.most_common(top)]


def kernel_table(events: list[dict], steps: int, top: int) -> list[tuple[str, float, float, float]]:
    """(name, calls per step, µs per step, share of the summed event time), the `top` longest first."""
    calls, time_us = collections.Counter(), collections.Counter()
    for e in events:
        calls[e["name"]] += 1
        time_us[e["name"]] += e["dur"]
    total = sum(time_us.values()) or 1.0
    return [(name, calls[name] / steps, us / steps, us / total) for name, us in time_us.most_common(top)]


def kernel_lines(events: list[dict], steps: int, top: int, summaries: dict[str, str] | None = None) -> list[str]:
    """The kernel table as printed: a header, then per kernel calls per step, µs per step, share and name (with
    what its fusion computes, where `summaries` knows it)."""
    lines = [f"{'calls/step':>10} {'µs/step':>9} {'share':>6}  kernel"]
    for name, calls, us, share in kernel_table(events, steps, top):
        what = f"  [{summaries[name][:160]}]" if summaries and name in summaries else ""
        lines.append(f"{calls:10.1f} {us:9.1f} {share:6.1%}  {name[:140]}{what}")
    return lines


def idle_line(events: list[dict], steps: int) -> str:
    """The device's idle stretches of 50 µs or more, per step."""
    gaps = idle_gaps(events)
    return (f"device idle stretches of 50 µs or more: {len(gaps) / steps:.1f} per step, {sum(gaps) / steps:.0f} µs "
            f"per step; longest {max(gaps, default=0):.0f} µs, median "
            f"{sorted(gaps)[len(gaps) // 2] if gaps else 0:.0f} µs")


_HEADER = re.compile(r"^%?([\w.\-]+) \(.*\{\s*$")  # a computation's first line
_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (?:\([^=]*?\)|\S+) ([\w\-]+)\((.*)$")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]+)"')
_PLUMBING = {"parameter", "constant", "broadcast", "bitcast", "get-tuple-element", "tuple", "reshape", "copy"}


def fusion_summaries(hlo_text: str) -> dict[str, str]:
    """A compiled module's fusions by their kernels' names (the fusion instruction's name, "." as "_": how XLA
    names a fusion's kernel) → what they compute: the distinct operations of the fused computation (plumbing left
    out) and the JAX operations they came from (the last two parts of their op_name metadata)."""
    ops: dict[str, list[str]] = {}
    sources: dict[str, list[str]] = {}
    calls: dict[str, str] = {}
    current = None
    for line in hlo_text.splitlines():
        header = _HEADER.match(line)
        if header and " = " not in line:
            current = header.group(1)
            ops[current], sources[current] = [], []
            continue
        instr = _INSTR.match(line)
        if not instr:
            continue
        name, opcode, rest = instr.groups()
        if opcode == "fusion":
            called = _CALLS.search(rest)
            if called:
                calls[name.replace(".", "_")] = called.group(1)
        elif current is not None and opcode not in _PLUMBING:
            if opcode not in ops[current]:
                ops[current].append(opcode)
            op_name = _OP_NAME.search(rest)
            short = "/".join(op_name.group(1).split("/")[-2:]) if op_name else None
            if short and short not in sources[current]:
                sources[current].append(short)
    return {kernel: f"{' '.join(ops.get(c, []))}; from {', '.join(sources.get(c, [])[:3])}"
            for kernel, c in calls.items()}


def read_trace(directory: pathlib.Path) -> dict:
    found = sorted(directory.rglob("*.trace.json.gz")) + sorted(directory.rglob("perfetto_trace.json.gz"))
    if not found:
        raise SystemExit(f"no Perfetto trace was written under {directory}")
    with gzip.open(found[-1], "rt") as f:
        return json.load(f)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False)
    p.add_argument("--model_dir", required=True)
    p.add_argument("--prompts", type=int, default=1, help="prompts at once (1: batch-1 decode)")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--json-schema", default=None, metavar="FILE",
                   help="every answer follows the JSON schema in FILE (constrained decoding's steps)")
    p.add_argument("--host", action="store_true", help="also the host's traced events by thread, longest first")
    p.add_argument("--python-trace", action="store_true",
                   help="trace every Python call too (the host table then shows the engine's own functions; slows the host)")
    p.add_argument("--trace-dir", default=None, help="keep the trace here (default: a temporary folder)")
    p.add_argument("--fusions", action="store_true",
                   help="after each kernel, what its fusion computes (from the compiled steps' HLO)")
    ns, extra = p.parse_known_args(argv)

    import jax

    from jaxllm import LLM
    from jaxllm.bench.__main__ import _engine_overrides
    from jaxllm.bench.offline import run_offline, schema_grammar
    from jaxllm.bench.workload import WorkloadSpec, build_workload
    guided = schema_grammar(ns.json_schema)
    llm = LLM(ns.model_dir, warmup=0, **_engine_overrides(extra))
    requests = list(build_workload(WorkloadSpec(num_prompts=ns.prompts, input_len=ns.input_len,
                                                output_len=ns.output_len), None))
    run_offline(llm, requests, guided=guided)  # untimed: compiles every shape the workload meets
    directory = pathlib.Path(ns.trace_dir or tempfile.mkdtemp(prefix="jaxllm-profile-"))
    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 1 if ns.python_trace else 0
    with jax.profiler.trace(str(directory), create_perfetto_trace=True, profiler_options=options):
        r = run_offline(llm, requests, guided=guided)
    summaries = fusion_summaries(llm.engine.runner.compiled_text()) if ns.fusions else {}
    llm.close()
    print("host ms/step: " + ", ".join(f"{t} {r[f'{t}_ms_per_step']:.2f}" for t in
                                         ("schedule", "dispatch", "launch", "postprocess", "device_wait")))
    mask = r.get("mask_ms_per_step")
    if mask is not None:
        print(f"masks {mask:.2f} ms per constrained step, engine waited {r['mask_wait_ms_per_step']:.2f}")
    trace = read_trace(directory)
    events = device_events(trace)
    if not events:
        raise SystemExit(f"no device events in the trace under {directory}; its processes: {process_names(trace)}")
    steps = max(r["steps"], 1)
    wall_us = 1e6 * r["duration_s"] / steps
    busy = busy_us(events) / steps
    print(f"{ns.model_dir} {' '.join(extra)}: {ns.prompts} prompts, {steps} steps, wall {wall_us:.0f} µs/step, "
          f"device busy {busy:.0f} µs/step ({busy / wall_us:.2f}), host {r['host_ms_per_step']:.2f} ms/step, "
          f"{len(events)} device events")
    print(idle_line(events, steps))
    print("\n".join(kernel_lines(events, steps, ns.top, summaries)))
    if ns.host:
        print(f"{'calls/step':>10} {'µs/step':>9}  host thread: event")
        for thread, name, calls, us in host_table(trace, steps, ns.top):
            print(f"{calls:10.1f} {us:9.1f}  {thread[:24]}: {name[:110]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
