"""GPTQ (Frantar et al., 2022) for jaxllm's int4 layout: a weight's inputs quantised one at a time, in
order, each one's rounding error spread over the inputs not yet quantised, weighted by the calibration
inputs' inverse Gram matrix, so the layer's output on those inputs moves as little as it can.

Groups follow `jaxllm.models.quant.quantize_int4` exactly (asymmetric, zero point, `group` consecutive inputs
of the last input axis): a group's scale and zero come from its columns as they stand when the group starts,
after the compensation of the groups before it. The scales are rounded to the dtype they will be stored in
before any value is rounded, so the compensation sees the stored weights. No act-order.
"""

from __future__ import annotations

import numpy as np

from tools.convert.int4 import range_params

# Added to the Gram matrix's diagonal, as a fraction of its mean: it keeps the matrix invertible and pulls the
# compensation towards round to nearest. GPTQ's usual 0.01 over-fitted SmolLM2's MLP down-projections (input
# 1536 wide) to 8192 calibration tokens: on held-out text their output error rose above round to nearest's,
# while 0.3 lowered every product's held-out error (docs/perf.md, "Calibrated conversion").
DAMP = 0.3


def _group_params(w: np.ndarray, scale_dtype) -> tuple[np.ndarray, np.ndarray]:
    """w [N, g] → (scale [N], zero [N]) as quantize_int4 computes them."""
    return range_params(np.minimum(w.min(axis=1), 0.0), np.maximum(w.max(axis=1), 0.0), scale_dtype)


def gptq_int4(w: np.ndarray, gram: np.ndarray, group: int, scale_dtype=np.float32, block: int = 128, damp: float = DAMP):
    """w [K, N] (inputs flattened, groups of `group` consecutive inputs), gram [K, K] = Σ xᵀx of its inputs →
    (q [K, N] int32 values 0..15, scale [K / group, N], zero [K / group, N]) with w ≈ (q - zero) * scale."""
    k, n = w.shape
    block = group * max(1, block // group)
    W = w.T.astype(np.float64).copy()  # [N, K]: a column per input
    H = gram.astype(np.float64).copy()
    dead = np.diag(H) == 0  # inputs that were always zero: any value does; quantise them as zero
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H[np.diag_indices(k)] += damp * np.mean(np.diag(H))
    U = np.linalg.cholesky(np.linalg.inv(H)).T  # upper: H⁻¹ = Uᵀ U
    Q = np.zeros((n, k), np.int32)
    scales = np.zeros((k // group, n))
    zeros = np.zeros((k // group, n))
    for start in range(0, k, block):
        stop = min(start + block, k)
        W1 = W[:, start:stop].copy()
        E1 = np.zeros_like(W1)
        for i in range(stop - start):
            col = start + i
            if col % group == 0:
                scale, zero = _group_params(W1[:, i : i + group], scale_dtype)
                scales[col // group], zeros[col // group] = scale, zero
                safe = np.where(scale > 0, scale, 1.0)
            q = np.clip(np.round(W1[:, i] / safe) + zero, 0, 15)
            Q[:, col] = q
            err = (W1[:, i] - (q - zero) * scale) / U[col, col]
            W1[:, i:] -= np.outer(err, U[col, col : stop])
            E1[:, i] = err
        W[:, stop:] -= E1 @ U[start:stop, stop:]
    return Q.T, scales, zeros
