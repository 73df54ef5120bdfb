"""`python -m kernels.pallas.bench --smoke`: the benchmark script runs (tiny shapes, interpret mode) and
prints one row per case."""

from __future__ import annotations

from kernels.pallas import bench


def test_bench_smoke(capsys):
    bench.main(["--smoke"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "smoke" in line]
    # 4 attention, 11 quantised matmuls, 4 dense prefill (ours through the cache, jax.nn's XLA form, the splits)
    assert len(rows) == 4 + 11 + 4 and not any("FAILED" in row or "MISMATCH" in row for row in rows)
