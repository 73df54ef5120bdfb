"""`kernels/pallas/bench_dense.py`'s own logic on the CPU: its causal FLOP count, and that its error column
flags an implementation whose causal diagonal is misplaced (top-left instead of bottom-right after a prefix)
while the same inputs through the right mask pass. The GPU-only rows (cuDNN, attention_mgpu, tokamax) run
with `python -m kernels.pallas.bench --dense` on a GPU."""

from __future__ import annotations

import functools

import pytest

from kernels.pallas import bench, bench_dense


@pytest.mark.parametrize("rows,new,cached", [(1, 7, 0), (3, 5, 11)])
def test_prefill_flops_counts_visible_keys(rows, new, cached):
    visible = rows * sum(cached + i + 1 for i in range(new))
    assert bench_dense.prefill_flops(rows, new, cached, 4, 64) == 4 * visible * 4 * 64


def test_error_column_flags_a_misplaced_diagonal(capsys):
    case = bench_dense.Case("dense test 1×24 after 40", 1, 24, 40, heads=4, kv_heads=2, head_dim=64)
    inputs = bench_dense.dense_inputs(case, seed=3)
    scale = case.head_dim**-0.5
    expected = bench_dense.reference(*inputs, scale)
    rows = bench.Bench(bandwidth=1e12, flops=1e12, interpret=True)
    timed = functools.partial(bench.timed, repeats=1, trials=1)
    for label, explicit in (("top-left", False), ("bottom-right", True)):
        build = functools.partial(bench_dense.jax_nn, implementation="xla", explicit_mask=explicit)
        bench_dense.measure(rows, timed, case, label, build, inputs, expected, scale)
    configs = {row[1]: row[2] for row in rows.rows}
    assert configs["top-left"].startswith("MISMATCH")
    assert "MISMATCH" not in configs["bottom-right"] and "err" in configs["bottom-right"]
