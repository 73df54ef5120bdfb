"""vLLM's serving-benchmark metric definitions: throughput, TTFT, TPOT (first token excluded), ITL, E2E latency."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class RequestTiming:
    """What one request measured, in seconds since its send time."""

    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = dataclasses.field(default_factory=list)
    error: str = ""


def _summary(values: list[float], scale: float) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "median": 0.0, "p99": 0.0}
    arr = np.asarray(values) * scale
    return {"mean": float(arr.mean()), "median": float(np.median(arr)), "p99": float(np.percentile(arr, 99))}


def summarize(timings: list[RequestTiming], duration_s: float) -> dict:
    """Aggregate per-request timings of a run that lasted `duration_s` (latencies in ms)."""
    done = [t for t in timings if t.ok]
    tpot = [(t.latency - t.ttft) / (t.output_tokens - 1) for t in done if t.output_tokens > 1]
    total_in = sum(t.prompt_tokens for t in done)
    total_out = sum(t.output_tokens for t in done)
    return {
        "completed": len(done),
        "failed": len(timings) - len(done),
        "duration_s": duration_s,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(done) / duration_s,
        "input_throughput": total_in / duration_s,
        "output_throughput": total_out / duration_s,
        "total_token_throughput": (total_in + total_out) / duration_s,
        "ttft_ms": _summary([t.ttft for t in done], 1e3),
        "tpot_ms": _summary(tpot, 1e3),
        "itl_ms": _summary([gap for t in done for gap in t.itl], 1e3),
        "e2el_ms": _summary([t.latency for t in done], 1e3),
        "errors": sorted({t.error for t in timings if not t.ok})[:5],
    }


def format_table(result: dict) -> str:
    """The summary as an aligned text table."""
    rows = [
        ("completed / failed", f"{result['completed']} / {result['failed']}"),
        ("duration (s)", f"{result['duration_s']:.2f}"),
        ("request throughput (req/s)", f"{result['request_throughput']:.2f}"),
        ("input throughput (tok/s)", f"{result['input_throughput']:.1f}"),
        ("output throughput (tok/s)", f"{result['output_throughput']:.1f}"),
    ]
    for key, label in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2el_ms", "E2E latency")):
        if key in result:
            s = result[key]
            rows.append((f"{label} mean / median / p99 (ms)", f"{s['mean']:.2f} / {s['median']:.2f} / {s['p99']:.2f}"))
    return format_rows(rows)


def format_rows(rows: list[tuple[str, str]]) -> str:
    """(label, value) rows as a two-column text table, labels left-aligned."""
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)
