"""The quantised-weight matmul kernels against reference.py (Pallas interpret mode on the CPU, compiled on a
GPU): int8 × 16-bit, int4 (groups of 128 and 64) × 16-bit and int8 × int8, at decode and prefill row counts
that are not multiples of the row block, with one and several input splits; and each kernel's weight
conversions (`dequant`: the bit tricks of int4_dequant.py / int8_dequant.py) beside the plain one."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.models import quant
from jaxllm.models.normed import rms_normalise
from kernels.pallas import quant_gemv, quant_matmul, reference

INTERPRET = jax.default_backend() == "cpu"
SPLIT = quant_matmul.Launch(block_n=32, block_k=64, num_warps=4, num_stages=2, target_programs=64)
NO_SPLIT = quant_matmul.Launch(block_n=64, block_k=128, num_warps=4, num_stages=2, target_programs=1)


def rel_err(out, ref):
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert np.isfinite(out).all()
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def _inputs(rng, m, k, n, dtype):
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    w = jnp.asarray(rng.standard_normal((k, n)) * 0.05, jnp.float32)
    return x, w


TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


@pytest.mark.parametrize("m,k,n,dtype,launch", [
    (1, 256, 128, jnp.float32, SPLIT),
    (5, 192, 96, jnp.bfloat16, NO_SPLIT),
    (37, 128, 64, jnp.float32, None),
])
def test_int8_matmul(rng, m, k, n, dtype, launch):
    x, w = _inputs(rng, m, k, n, dtype)
    q = quant.quantize_int8(w)
    out = quant_matmul.int8_matmul(x, q.data, q.scale, launch=launch, interpret=INTERPRET)
    ref = reference.int8_matmul(x, q.data, q.scale)
    assert out.shape == (m, n) and out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]
    with jax.default_matmul_precision("highest"):  # the reference is the product with the dequantised weights
        assert rel_err(ref, x.astype(jnp.float32) @ quant.dequantize(q)) < TOL[dtype]


@pytest.mark.parametrize("m,k,n,group,dtype,launch", [
    (1, 512, 64, 128, jnp.float32, SPLIT),  # split along the inputs
    (3, 256, 64, 64, jnp.bfloat16, NO_SPLIT),  # two groups per loop step
    (20, 384, 32, 128, jnp.float32, None),
])
def test_int4_matmul(rng, m, k, n, group, dtype, launch):
    x, w = _inputs(rng, m, k, n, dtype)
    q = quant.quantize_int4(w, group_size=group)
    assert q.group_size == group
    out = quant_matmul.int4_matmul(x, q.packed, q.scale, q.zero, launch=launch, interpret=INTERPRET)
    ref = reference.int4_matmul(x, q.packed, q.scale, q.zero)
    assert out.shape == (m, n) and out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]


def _few_programs(launch):  # int8_int8_launch's blocks, splitting the inputs of the small products below too
    return dataclasses.replace(launch, target_programs=8)


@pytest.mark.parametrize("m,k,n,launch", [
    (1, 256, 64, SPLIT), (19, 128, 96, NO_SPLIT),
    # int8_int8_launch's (128-row, split, 64-row blocks) on row counts that leave a block part empty
    (130, 256, 256, _few_programs(quant_matmul.INT8_WIDE)), (70, 512, 128, _few_programs(quant_matmul.INT8_DEEP)),
    (129, 256, 192, _few_programs(quant_matmul.INT8_NARROW)),
])
def test_int8_int8_matmul(rng, m, k, n, launch):
    x, w = _inputs(rng, m, k, n, jnp.bfloat16)
    q = quant.quantize_int8(w)
    x_q, x_scale = reference.quantize_rows_int8(x)
    out = quant_matmul.int8_int8_matmul(x_q, x_scale, q.data, q.scale, out_dtype=jnp.bfloat16, launch=launch,
                                        interpret=INTERPRET)
    ref = reference.int8_int8_matmul(x_q, x_scale, q.data, q.scale, jnp.bfloat16)
    assert out.shape == (m, n) and out.dtype == jnp.bfloat16
    assert rel_err(out, ref) < 1e-2


def test_int8_int8_launch_follows_the_products_shape():
    """Above 64 rows: 128-row blocks where they alone give two programs a multiprocessor, the same splitting the
    inputs for a deep product, 64-row blocks otherwise (Llama-3-8B's products at 256 rows, docs/perf.md)."""
    launch = quant_matmul.int8_int8_launch
    assert launch(256, 4096, 28672) == quant_matmul.INT8_WIDE  # gate_up
    assert launch(256, 14336, 4096) == quant_matmul.INT8_DEEP  # down
    assert launch(256, 4096, 6144) == launch(256, 4096, 4096) == quant_matmul.INT8_NARROW  # q/k/v, o
    assert launch(2048, 4096, 4096) == quant_matmul.INT8_WIDE
    assert launch(64, 4096, 4096) == quant_matmul.pick_launch(64)
    m, k, n = 256, 14336, 4096
    *_, splits = quant_matmul._plan(m, k, n, quant_matmul.INT8_DEEP, 128, k_floor=32)
    assert splits == 4  # 64 programs → 256


def test_int4_packing_round_trips(rng):
    """pack_int4 / unpack_int4 are inverse; dequantised weights are within half a step of the originals."""
    q = jnp.asarray(rng.integers(0, 16, (64, 24)), jnp.int32)
    assert np.array_equal(reference.unpack_int4(quant.pack_int4(q)), q)
    w = jnp.asarray(rng.standard_normal((256, 24)), jnp.float32)
    q4 = quant.quantize_int4(w)
    step = np.repeat(np.asarray(q4.scale), 128, axis=0)
    assert np.all(np.abs(np.asarray(quant.dequantize(q4)) - np.asarray(w)) <= step / 2 + 1e-6)


GEMV_SPLIT = quant_gemv.GemvLaunch(block_n=16, block_k=64, num_warps=4, num_stages=2, target_programs=64)
GEMV_NO_SPLIT = quant_gemv.GemvLaunch(block_n=32, block_k=128, num_warps=4, num_stages=2, target_programs=1)


@pytest.mark.parametrize("m,k,n,group,dtype,launch", [
    (1, 512, 64, 128, jnp.float32, GEMV_SPLIT),  # split along the inputs
    (3, 256, 48, 64, jnp.bfloat16, GEMV_NO_SPLIT),  # rows padded to 4; 48 outputs: blocks of 16
    (4, 384, 32, 128, jnp.float32, None),
])
def test_gemv_kernels(rng, m, k, n, group, dtype, launch):
    """The matrix-vector kernels (a few rows) against the same references as the matmul kernels."""
    x, w = _inputs(rng, m, k, n, dtype)
    q8, q4 = quant.quantize_int8(w), quant.quantize_int4(w, group_size=group)
    out8 = quant_gemv.int8_gemv(x, q8.data, q8.scale, launch=launch, interpret=INTERPRET)
    out4 = quant_gemv.int4_gemv(x, q4.packed, q4.scale, q4.zero, launch=launch, interpret=INTERPRET)
    assert out8.shape == out4.shape == (m, n) and out8.dtype == out4.dtype == dtype
    assert rel_err(out8, reference.int8_matmul(x, q8.data, q8.scale)) < TOL[dtype]
    assert rel_err(out4, reference.int4_matmul(x, q4.packed, q4.scale, q4.zero)) < TOL[dtype]


@pytest.mark.parametrize("k,n,launch", [
    (512, 64, GEMV_SPLIT),  # split along the inputs: each split's own power of two
    (384, 48, GEMV_NO_SPLIT),  # 3 loop steps: fp16 sums flushed every step
    (4096, 64, None),  # the default launch: 16 steps, one flush
])
@pytest.mark.parametrize("normed", [False, True])
def test_int8_gemv_f16(rng, k, n, launch, normed):
    """The one-row int8 kernel in packed fp16 ("f16"), with and without an RMS norm folded in, against the
    float32 product of the (normalised) row and the dequantised weights, on a row with values up to ~10^4:
    without its power-of-two scaling fp16 products would overflow."""
    x, w = _inputs(rng, 1, k, n, jnp.bfloat16)
    x = (x * jnp.asarray(np.where(rng.random(k) < 0.02, 4000.0, 3.0), jnp.bfloat16)).astype(jnp.bfloat16)
    q = quant.quantize_int8(w)
    weight = jnp.asarray(rng.uniform(0.5, 1.5, k), jnp.float32) if normed else None
    out = quant_gemv.int8_gemv(x, q.data, q.scale, weight, 1e-5, launch=_with(launch, quant_gemv.INT8, "f16"),
                               interpret=INTERPRET)
    x32 = x.astype(jnp.float32)
    if normed:
        x32 = rms_normalise(x32, weight, 1e-5)
    with jax.default_matmul_precision("highest"):
        ref = x32 @ quant.dequantize(q)
    assert out.shape == (1, n) and out.dtype == jnp.bfloat16
    assert rel_err(out, ref) < 5e-3


@pytest.mark.parametrize("m,launch", [(1, GEMV_SPLIT), (2, None)])
@pytest.mark.parametrize("dequant", ["cast", "magic", "fma16"])
def test_int4_gemv_folds_a_norm(rng, m, launch, dequant):
    """An RMS norm folded into the int4 matrix-vector kernel gives the product of the norm's own output (its rows
    rounded to bf16) to within the kernel's rounding."""
    x, w = _inputs(rng, m, 512, 64, jnp.bfloat16)
    x = (x * 7.0).astype(jnp.bfloat16)
    q = quant.quantize_int4(w, group_size=128, scale_dtype=jnp.bfloat16)
    weight = jnp.asarray(rng.uniform(0.5, 1.5, 512), jnp.float32)
    out = quant_gemv.int4_gemv(x, q.packed, q.scale, q.zero, weight, 1e-5,
                               launch=_with(launch, quant_gemv.INT4, dequant), interpret=INTERPRET)
    normed = rms_normalise(x.astype(jnp.float32), weight, 1e-5).astype(jnp.bfloat16)
    assert out.shape == (m, 64) and out.dtype == jnp.bfloat16
    assert rel_err(out, reference.int4_matmul(normed, q.packed, q.scale, q.zero)) < TOL[jnp.bfloat16]


def test_int8_gemv_folded_norm_needs_f16(rng):
    x, w = _inputs(rng, 2, 256, 32, jnp.bfloat16)
    q = quant.quantize_int8(w)
    with pytest.raises(ValueError, match="folded norm"):
        quant_gemv.int8_gemv(x, q.data, q.scale, jnp.ones((256,)), 1e-5, interpret=INTERPRET)


def _with(launch, default, dequant):
    return dataclasses.replace(launch or default, dequant=dequant)


@pytest.mark.parametrize("m,k,n,group,dtype,launch", [
    (1, 512, 64, 128, jnp.bfloat16, SPLIT),  # a loop step within a group: the scale after the dot
    (3, 256, 64, 64, jnp.float16, NO_SPLIT),  # two groups per loop step: the scale inside the conversion
    (5, 384, 32, 128, jnp.bfloat16, None),
])
@pytest.mark.parametrize("dequant", ["magic", "magicops"])
def test_int4_matmul_magic(rng, m, k, n, group, dtype, launch, dequant):
    """The bit-trick conversions against the reference, and as close to it as the cast."""
    x, w = _inputs(rng, m, k, n, dtype)
    q = quant.quantize_int4(w, group_size=group, scale_dtype=dtype)
    ref = reference.int4_matmul(x, q.packed, q.scale, q.zero)
    outs = {mode: quant_matmul.int4_matmul(x, q.packed, q.scale, q.zero, interpret=INTERPRET,
                                           launch=_with(launch, quant_matmul.pick_launch(m), mode))
            for mode in ("cast", dequant)}
    assert outs[dequant].shape == (m, n) and outs[dequant].dtype == dtype
    assert rel_err(outs[dequant], ref) < TOL[jnp.bfloat16]
    assert rel_err(outs[dequant], ref) < 2 * rel_err(outs["cast"], ref) + 1e-3


@pytest.mark.parametrize("m,k,n,dtype,launch,dequant", [
    (1, 256, 64, jnp.bfloat16, SPLIT, "magic"),
    (6, 192, 96, jnp.float16, NO_SPLIT, "magic"),
    (2, 128, 32, jnp.bfloat16, None, "f16"),
])
def test_int8_matmul_conversions(rng, m, k, n, dtype, launch, dequant):
    """int8 weights converted by int8_dequant's bit tricks ("magic": exact, the cast's numbers; "f16": x rounded
    to fp16) against the reference."""
    x, w = _inputs(rng, m, k, n, dtype)
    q = quant.quantize_int8(w)
    out = quant_matmul.int8_matmul(x, q.data, q.scale, launch=_with(launch, quant_matmul.pick_launch(m), dequant),
                                   interpret=INTERPRET)
    assert out.shape == (m, n) and out.dtype == dtype
    assert rel_err(out, reference.int8_matmul(x, q.data, q.scale)) < TOL[jnp.bfloat16]
    if dequant == "magic":
        cast = quant_matmul.int8_matmul(x, q.data, q.scale, launch=_with(launch, quant_matmul.pick_launch(m), "cast"),
                                        interpret=INTERPRET)
        np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(cast, np.float32))


@pytest.mark.parametrize("m,k,n,group,dtype,launch", [
    (1, 512, 64, 128, jnp.bfloat16, GEMV_SPLIT),
    (3, 256, 48, 64, jnp.float16, GEMV_NO_SPLIT),  # "fma16" takes "magic" for fp16
    (2, 256, 48, 64, jnp.bfloat16, GEMV_NO_SPLIT),
    (1, 384, 32, 128, jnp.bfloat16, None),
])
@pytest.mark.parametrize("dequant", ["magic", "magic32", "fma16"])
def test_int4_gemv_magic(rng, m, k, n, group, dtype, launch, dequant):
    """The matrix-vector kernel's bit-trick conversions (scale once per loop step) against the reference."""
    x, w = _inputs(rng, m, k, n, dtype)
    q = quant.quantize_int4(w, group_size=group, scale_dtype=dtype)
    out = quant_gemv.int4_gemv(x, q.packed, q.scale, q.zero, launch=_with(launch, quant_gemv.INT4, dequant),
                               interpret=INTERPRET)
    assert out.shape == (m, n) and out.dtype == dtype
    assert rel_err(out, reference.int4_matmul(x, q.packed, q.scale, q.zero)) < TOL[jnp.bfloat16]


def test_int4_gemv_fma16_rows_together_are_each_row_alone(rng):
    """"fma16" with several rows (each nibble's tile converted once, a packed multiply-add per row) rounds as the
    one-row path does: every row's output is bit for bit its own one-row product."""
    x, w = _inputs(rng, 3, 256, 64, jnp.bfloat16)
    q = quant.quantize_int4(w, group_size=128, scale_dtype=jnp.bfloat16)
    launch = _with(GEMV_SPLIT, None, "fma16")
    together = quant_gemv.int4_gemv(x, q.packed, q.scale, q.zero, launch=launch, interpret=INTERPRET)
    alone = [quant_gemv.int4_gemv(x[i:i + 1], q.packed, q.scale, q.zero, launch=launch, interpret=INTERPRET)
             for i in range(3)]
    np.testing.assert_array_equal(np.asarray(together, np.float32), np.asarray(jnp.concatenate(alone), np.float32))


def test_float32_activations_cast_and_unknown_modes_fail(rng):
    """Float32 activations take the plain conversion whatever the launch says; a mode a kernel lacks is refused."""
    x, w = _inputs(rng, 2, 256, 32, jnp.float32)
    q = quant.quantize_int4(w)
    outs = [quant_gemv.int4_gemv(x, q.packed, q.scale, q.zero, launch=_with(GEMV_NO_SPLIT, None, mode),
                                 interpret=INTERPRET) for mode in ("cast", "magic32")]
    np.testing.assert_array_equal(np.asarray(outs[0]), np.asarray(outs[1]))
    with pytest.raises(ValueError, match="dequant"):
        quant_matmul.int4_matmul(x, q.packed, q.scale, q.zero, launch=_with(NO_SPLIT, None, "f16"),
                                 interpret=INTERPRET)
    with pytest.raises(ValueError, match="dequant"):
        quant_gemv.int8_gemv(x, quant.quantize_int8(w).data, quant.quantize_int8(w).scale,
                             launch=_with(GEMV_NO_SPLIT, None, "magic"), interpret=INTERPRET)
