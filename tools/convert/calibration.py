"""Calibration for `tools.convert --quant ... --calibration`: the text, and what the 16-bit model's products
see on it.

The default text ships with every Python: CPython's `pydoc_data.topics` (the English reference text that
`help()` prints), so calibration needs no download and differs from `jaxllm.bench quality`'s evaluation text
(pyjokes). `--calibration FILE` takes any UTF-8 text file instead.

`collect` runs the 16-bit model over windows of that text and records, for every weight the scheme
stores quantised (by its param path), the statistics of its input rows x [n, K] (K: the flattened input
axes): the Gram matrix Σ xᵀx (GPTQ's Hessian, up to a factor 2), the largest |x| per input (SmoothQuant)
and a sample of rows (to measure a candidate's output error).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

PYDOC = "pydoc"  # --calibration's default: CPython's pydoc_data.topics
# With keep_first, each window's first row (the attention sink) enters the sample this many times. SmolLM2's
# AWQ w4a16 (docs/perf.md, "Calibrated conversion"): ×1 +14.0 % perplexity, ×8 +12.45 %, ×4 +11.24 %
# (×16 worse again in the dev harness).
FIRST_ROW_WEIGHT = 4


def calibration_text(source: str) -> str:
    """`pydoc` (the stdlib's pydoc_data.topics, topics in sorted order) or the contents of a text file."""
    if source == PYDOC:
        from pydoc_data import topics

        return "\n\n".join(topics.topics[name] for name in sorted(topics.topics))
    return Path(source).read_text(encoding="utf-8")


def token_windows(ids: list[int], tokens: int, window: int) -> list[list[int]]:
    """The first `tokens` ids in windows of `window` (a shorter last one dropped below 16 tokens)."""
    ids = ids[:tokens]
    return [ids[i : i + window] for i in range(0, len(ids), window) if len(ids[i : i + window]) >= 16]


@dataclasses.dataclass
class InputStats:
    """One weight's inputs over the calibration text (float64 sums; K = flattened input size)."""

    gram: np.ndarray | None  # [K, K] Σ xᵀx (None: not asked for)
    absmax: np.ndarray  # [K] max |x|
    sample: np.ndarray  # [≤ sample_rows, K] float32 rows, spread over the text
    rows: int = 0

    def add(self, x: np.ndarray, sample_rows: int, per_window: int, rng: np.random.Generator,
            keep_first: bool = False) -> None:
        if self.gram is not None:
            x64 = x.astype(np.float64)
            self.gram += x64.T @ x64
        self.absmax = np.maximum(self.absmax, np.abs(x).max(axis=0))
        self.rows += x.shape[0]
        if sample_rows:
            if keep_first:
                rest = rng.choice(np.arange(1, x.shape[0]), min(x.shape[0], per_window) - 1, replace=False)
                picked = x[np.concatenate([[0] * FIRST_ROW_WEIGHT, rest])].astype(np.float32)
            else:
                picked = x[rng.choice(x.shape[0], min(x.shape[0], per_window), replace=False)].astype(np.float32)
            self.sample = np.concatenate([self.sample, picked])[:sample_rows]


def collect(model, params, windows: list[list[int]], paths: list[tuple[str, ...]], gram: bool = True,
            sample_rows: int = 0, seed: int = 0, keep_first: bool = False) -> dict[tuple[str, ...], InputStats]:
    """InputStats of each param path in `paths` (16-bit matmul weights of `params`) over the token `windows`
    (each run as one sequence): Gram matrices if `gram`, `sample_rows` rows drawn evenly from the windows
    (with `keep_first`, each window's first row always among them, FIRST_ROW_WEIGHT times)."""
    import jax
    import jax.numpy as jnp

    from jaxllm.models import one_sequence
    from jaxllm.models.layers import tap_dense_inputs
    from jaxllm.weights import tree_get

    def inputs(params, ids, meta, cache):
        # Each weight's traced value is the object the model receives, so its id names the product.
        by_id = {id(tree_get(params, path)): path for path in paths}
        seen = {}

        def record(x, w):
            if id(w) in by_id:
                seen[by_id[id(w)]] = x.reshape(x.shape[0], -1).astype(jnp.float32)

        with tap_dense_inputs(record):
            model.apply({"params": params}, ids, meta, cache)
        return seen

    inputs = jax.jit(inputs)
    stats: dict[tuple[str, ...], InputStats] = {}
    rng = np.random.default_rng(seed)
    per_window = -(-sample_rows // max(1, len(windows)))
    for ids in windows:
        meta, cache = one_sequence(model, len(ids))
        for path, rows in inputs(params, jnp.asarray(ids, jnp.int32), meta, cache).items():
            rows = np.asarray(rows)
            if path not in stats:
                k = rows.shape[1]
                stats[path] = InputStats(np.zeros((k, k)) if gram else None, np.zeros(k, np.float32),
                                         np.zeros((0, k), np.float32))
            stats[path].add(rows, sample_rows, per_window, rng, keep_first)
    missing = [p for p in paths if p not in stats]
    if missing:
        raise RuntimeError(f"calibration saw no input for {len(missing)} weights, e.g. {'/'.join(missing[0])}")
    return stats

