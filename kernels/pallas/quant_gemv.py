"""Products of a few 16-bit rows with quantised weights as matrix-vector kernels (Pallas, Triton lowering).

At decode's row counts a quantised product is memory-bound: what matters is streaming the weight bytes at the
bandwidth, not the tensor cores (whose 16-row minimum `quant_matmul.py` pads one row up to). Here each
program owns `block_n` outputs, loads [block_n, block_k] int8 weights (or [block_k / 8, block_n] packed int4
words) per step in wide coalesced loads, dequantises them in registers and multiplies-adds them into float32
accumulators of the same shape, one per row (no reduction in the loop); the sums along the inputs and the
scale happen once, at the end. Row counts are padded to a power of two (a handful: each row is one more
accumulator). With more than one input split (too few column blocks for the multiprocessors) the float32
partial sums are added outside. Same definitions as `quant_matmul.py` (`reference.py`).

`GemvLaunch.dequant` for int4: "cast", the plain shift, mask, convert, subtract, multiply per weight;
"magic", `int4_dequant.py`'s 16-bit conversion of q - zero (exact) then widened to float32; "magic32", its float32
one (q - zero times a power of two, exact; the activations take the inverse power); "fma16" (bf16 activations;
fp16 ones take "magic"), the conversion and the multiply-add by the activation in packed bf16 over each word's
8 inputs, widened to float32 once per word (`int4_dequant.dot_nibbles16`). These modes sum x·(q - zero) over a
loop step (within one group) and multiply by the group's scale once per step. Float32 activations always cast.
A norm before the product folds in as for int8 below (the normalised rows rounded to x's dtype, as the norm's
own output is, before the conversion's multiply-adds).

int8 (one row): "cast" converts each weight to float32 and multiplies-adds there; "f16" runs the products in
packed fp16 (`int8_dequant.fma_f16`: about 2 instructions a weight where the cast takes 4 or more): each
program first scales its slice of x by a power of two 2^-e (max |x| of the slice in [1, 2): exact, and every
product below 256 in magnitude), accumulates x·w in fp16 tiles for up to F16_FLUSH_STEPS loop steps (below
65,504 whatever the data), adds those into float32 tiles, and multiplies its sums by 2^e at the end. A norm
before the product (an RMS norm's weight and epsilon) folds in: x ⊙ weight is what is scaled and multiplied,
and each program computes the row's 1 / rms itself (one more pass over x, which is small) and applies it with
2^e.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kernels.pallas import int4_dequant, int8_dequant, plan

# Up to this many rows the model uses the int4 kernel: "fma16" against the tensor-core kernel on the H200
# (docs/perf.md, session 24) at 2 rows 17.0 / 38.9 / 19.8 µs against 18.3 / 59.4 / 28.3 (qkv / gate_up / down),
# at 4 rows 22.9 / 71.0 / 37.1 against 19.7 / 57.6 / 28.1: its work grows with the rows (a packed multiply-add per
# row and nibble), the tensor cores' does not.
MAX_ROWS = 2


@dataclasses.dataclass(frozen=True)
class GemvLaunch:
    """`block_n` outputs per program; `block_k` inputs per loop step (int4: 8 × the packed rows per step);
    split the inputs until the grid has about `target_programs` programs."""

    block_n: int = 16
    block_k: int = 512
    num_warps: int = 4
    num_stages: int = 3
    target_programs: int = 528  # four per multiprocessor of an H100 / H200
    dequant: str = "cast"  # int4: "cast", "magic", "magic32" or "fma16"; int8: "cast" or "f16" (module docstring)


INT8 = GemvLaunch(block_n=32, block_k=256, dequant="f16")
INT8_MODES = ("cast", "f16")
F16_FLUSH_STEPS = 16  # fp16 partial sums: < 2 · 128 a step, < 65,504 after 16 (and 2^-11 relative each)
# "fma16" at one row on the H200 (docs/perf.md, session 23): 31.9 against "magic"'s 48.2 µs (gate_up), 18.8
# against 23.9 (down), 11.5 against 14.3 (qkv); "magic" itself beat the cast and "magic32" (session 12).
INT4 = GemvLaunch(block_n=128, block_k=256, num_warps=4, num_stages=3, dequant="fma16")
# With the default launch, programs that loop over this many steps or more run 8 warps: gate_up (16 steps of one
# 128-input group) 27.6 against 31.9 µs, down (7) 17.0 against 18.8, where qkv (4 steps) took 17.0 against 11.5
# (session 23; o has 2): a short loop is bound by each program's fixed work (its row of x, the final sum across
# warps), a long one by the loads in flight.
LONG_LOOP_STEPS, LONG_LOOP_WARPS = 5, 8


INT4_MODES = ("cast", "magic", "magic32", "fma16")


def supports(k: int, n: int, m: int, group: int | None = None) -> bool:
    """Whether these kernels take an [m, k] × [k, n] product (else the caller uses quant_matmul / XLA)."""
    if m > MAX_ROWS or plan.pow2_divisor(n, 16, 8) is None or plan.pow2_divisor(k, 128, 64) is None:
        return False
    return group is None or (group % 8 == 0 and k % group == 0)


def _rows_pad(m: int) -> int:
    return 1 << (m - 1).bit_length()


def _splits(programs: int, steps: int, target: int) -> int:
    splits = 1
    while programs * splits * 2 <= target and steps % (splits * 2) == 0:
        splits *= 2
    return splits


def _finish(o_ref, rows, scale, splits):
    """Write each row's [bn] sum into the [rows, bn] (or [1, rows, bn] float32 partial) output block."""
    row_id = jnp.arange(len(rows), dtype=jnp.int32)[:, None]
    out = jnp.zeros((len(rows), rows[0].shape[0]), jnp.float32)
    for i, r in enumerate(rows):
        out = jnp.where(row_id == i, r[None, :], out)
    if splits == 1:
        o_ref[...] = (out * scale).astype(o_ref.dtype)
    else:
        o_ref[...] = out[None]


def _int8_kernel(x_ref, w_ref, s_ref, o_ref, *, rows, block_k, steps, splits):
    # x_ref [rows, k]; w_ref [bn, k] int8; s_ref [bn] float32; o_ref [rows, bn] (or [1, rows, bn] partials)
    first = pl.program_id(1) * steps

    def body(step, accs):
        cols = pl.ds((first + step) * block_k, block_k)
        w = w_ref[:, cols].astype(jnp.float32)  # [bn, bk]
        return tuple(acc + w * x_ref[i, cols].astype(jnp.float32)[None, :] for i, acc in enumerate(accs))

    zeros = jnp.zeros((w_ref.shape[0], block_k), jnp.float32)
    accs = lax.fori_loop(0, steps, body, (zeros,) * rows)
    _finish(o_ref, [jnp.sum(acc, axis=1) for acc in accs], s_ref[...][None, :], splits)


def _pow2_exponent(v):
    """The float32 `v`'s binary exponent e (v in [2^e, 2^(e+1)); v ≥ 0, normal or zero) as int32."""
    return (lax.bitcast_convert_type(v, jnp.int32) >> 23) - 127


def _pow2(e):
    """2.0^e exactly for int32 e in [-126, 127]."""
    return lax.bitcast_convert_type((e + 127) << 23, jnp.float32)


def _row_inv_rms(x_ref, i: int, span: int, eps: float):
    """Row i of x_ref [rows, k]: 1 / rms over its k inputs (squares summed elementwise over `span`-long slices,
    reduced once after the loop: a reduction a slice would cost a barrier each)."""
    k = x_ref.shape[1]
    squares = lax.fori_loop(0, k // span, lambda s, t: t + jnp.square(
        x_ref[pl.ds(i, 1), pl.ds(s * span, span)][0].astype(jnp.float32)), jnp.zeros((span,), jnp.float32))
    return lax.rsqrt(jnp.sum(squares) / k + eps)


def _with_norm(inputs: tuple, specs: list, norm_weight, k: int):
    """The kernel's inputs and block specs with a folded norm's weight [k] (whole in every program) appended."""
    if norm_weight is None:
        return inputs, specs
    return inputs + (norm_weight.astype(jnp.float32),), specs + [pl.BlockSpec((k,), lambda j, s: (0,))]


def _int8_f16_kernel(x_ref, w_ref, s_ref, *rest, block_k, steps, splits, flush, eps, interpret):
    # x_ref [1, k]; w_ref [bn, k] int8; s_ref [bn] float32; [g_ref [k] float32: the norm's weight]; o_ref [1, bn]
    # (or [1, 1, bn] partials). One row: the module docstring's "f16".
    g_ref, o_ref = rest if len(rest) == 2 else (None, rest[0])
    first = pl.program_id(1) * steps

    def x_at(step):
        cols = pl.ds(step * block_k, block_k)
        x = x_ref[0, cols].astype(jnp.float32)
        return x if g_ref is None else x * g_ref[cols]

    # (elementwise over the loop, one reduction after it: a reduction a step would cost a barrier each)
    top = lax.fori_loop(first, first + steps, lambda s, m: jnp.maximum(m, jnp.abs(x_at(s))),
                        jnp.zeros((block_k,), jnp.float32))
    e = jnp.clip(_pow2_exponent(jnp.max(top)), -100, 100)  # [1, 2) · 2^e holds max |x| (zero rows: any e)
    down = _pow2(-e)

    def step(s, acc16):
        w = w_ref[:, pl.ds(s * block_k, block_k)]  # [bn, bk] int8
        return int8_dequant.fma_f16(w, (x_at(s) * down).astype(jnp.float16)[None, :], acc16, interpret)

    def chunk(c, acc):
        start = first + c * flush
        acc16 = lax.fori_loop(start, start + flush, step, jnp.zeros(acc.shape, jnp.float16))
        return acc + acc16.astype(jnp.float32)

    acc = lax.fori_loop(0, steps // flush, chunk, jnp.zeros((w_ref.shape[0], block_k), jnp.float32))
    factor = _pow2(e) if g_ref is None else _pow2(e) * _row_inv_rms(x_ref, 0, block_k, eps)
    _finish(o_ref, [jnp.sum(acc, axis=1) * factor], s_ref[...][None, :], splits)


def _int4_kernel(x_ref, w_ref, s_ref, z_ref, *rest, rows, block_r, steps, rows_per_group, k8, splits, dequant,
                 eps, interpret):
    # x_ref [rows, k]; w_ref [k / 8, bn] int32 (input 8r + j at nibble j of row r); s_ref, z_ref [k / group, bn];
    # [g_ref [k] float32: a norm's weight]; o_ref. A step covers block_r packed rows within one group (block_r
    # divides rows_per_group); nibble j of them meets x's inputs 8r + j: without a norm x comes permuted (input
    # 8r + j at column j * k8 + r: contiguous reads), with one as it is (read with a stride of 8), as the norm's
    # sum of squares is over the row in place.
    g_ref, o_ref = rest if len(rest) == 2 else (None, rest[0])
    first = pl.program_id(1) * steps
    # each row's 1 / rms over all its k inputs, in every program (x is small)
    inv_rms = [None if g_ref is None else _row_inv_rms(x_ref, i, 8 * block_r, eps) for i in range(rows)]

    def x_cols(i, j, r0):
        """Row i's activations meeting nibble j of packed rows r0 ... r0 + block_r (normalised, if folded)."""
        if g_ref is None:
            return x_ref[pl.ds(i, 1), pl.ds(j * k8 + r0, block_r)][0]
        cols = pl.ds(8 * r0 + j, block_r, stride=8)
        x = x_ref[pl.ds(i, 1), cols][0].astype(jnp.float32)
        return (x * inv_rms[i] * g_ref[cols]).astype(x_ref.dtype)

    def fma_body(step, accs):
        r0 = (first + step) * block_r
        packed = w_ref[pl.ds(r0, block_r), :]  # [block_r, bn]
        g = r0 // rows_per_group
        scale = s_ref[g, :].astype(jnp.float32)[None, :]
        zero = z_ref[g, :][None, :]
        xs = [[x_cols(i, j, r0) for j in range(8)] for i in range(rows)]
        if rows == 1:  # conversion and multiply-add in one piece of PTX
            parts = [int4_dequant.dot_nibbles16(packed, zero, xs[0], interpret)]
        else:  # each nibble's tile converted once, for every row
            parts = [jnp.zeros(packed.shape, jnp.bfloat16)] * rows
            for j, w in enumerate(int4_dequant.nibbles16(packed, zero, None, jnp.bfloat16, interpret)):
                parts = [int4_dequant.fma_bf16x2(w, xs[i][j][:, None], parts[i], interpret) for i in range(rows)]
        return tuple(acc + part.astype(jnp.float32) * scale for acc, part in zip(accs, parts))

    def magic_body(step, accs):
        r0 = (first + step) * block_r
        packed = w_ref[pl.ds(r0, block_r), :]  # [block_r, bn]
        g = r0 // rows_per_group
        zero = z_ref[g, :][None, :]
        if dequant == "magic":
            tiles = (w.astype(jnp.float32) for w in int4_dequant.nibbles16(packed, zero, None, x_ref.dtype,
                                                                          interpret))
        else:
            tiles = int4_dequant.nibbles32(packed, zero)
        parts = [None] * rows
        for j, w in enumerate(tiles):  # w = q - zero ("magic32": times 16^(j % 4), undone on x)
            for i in range(rows):
                x = x_cols(i, j, r0).astype(jnp.float32)
                if dequant == "magic32":
                    x = x * int4_dequant.nibble_weight(j)
                term = x[:, None] * w
                parts[i] = term if parts[i] is None else parts[i] + term
        scale = s_ref[g, :].astype(jnp.float32)[None, :]
        return tuple(acc + part * scale for acc, part in zip(accs, parts))

    def body(step, accs):
        r0 = (first + step) * block_r
        packed = w_ref[pl.ds(r0, block_r), :]  # [block_r, bn]
        g = r0 // rows_per_group
        scale = s_ref[g, :].astype(jnp.float32)[None, :]
        zero = z_ref[g, :].astype(jnp.float32)[None, :]
        accs = list(accs)
        for j in range(8):  # nibble j of packed row r is input 8r + j
            q = (lax.shift_right_logical(packed, jnp.int32(4 * j)) & 0xF).astype(jnp.float32)
            w = (q - zero) * scale
            for i in range(rows):
                x = x_cols(i, j, r0).astype(jnp.float32)
                accs[i] = accs[i] + x[:, None] * w
        return tuple(accs)

    zeros = jnp.zeros((block_r, w_ref.shape[1]), jnp.float32)
    bodies = {"cast": body, "fma16": fma_body}
    accs = lax.fori_loop(0, steps, bodies.get(dequant, magic_body), (zeros,) * rows)
    _finish(o_ref, [jnp.sum(acc, axis=0) for acc in accs], 1.0, splits)


def _call(kernel, inputs, in_specs, rows, n, block_n, splits, out_dtype, launch, interpret, name):
    grid = (n // block_n, splits)
    if splits == 1:
        out_shape = jax.ShapeDtypeStruct((rows, n), out_dtype)
        out_spec = pl.BlockSpec((rows, block_n), lambda j, s: (0, j))
    else:
        out_shape = jax.ShapeDtypeStruct((splits, rows, n), jnp.float32)
        out_spec = pl.BlockSpec((1, rows, block_n), lambda j, s: (s, 0, j))
    return pl.pallas_call(
        kernel, out_shape=out_shape, grid=grid, in_specs=in_specs, out_specs=out_spec,
        compiler_params=pltriton.CompilerParams(num_warps=launch.num_warps, num_stages=launch.num_stages),
        interpret=interpret, name=name,
    )(*inputs)


def _pad_rows(x, rows):
    return x if x.shape[0] == rows else jnp.pad(x, ((0, rows - x.shape[0]), (0, 0)))


@functools.partial(jax.jit, static_argnames=("eps", "launch", "interpret"))
def int8_gemv(x, w, scale, norm_weight=None, eps: float = 0.0, *, launch: GemvLaunch | None = None,
              interpret: bool = False):
    """x [m, k] @ (int8 w [n, k] * float32 scale [n])ᵀ → [m, n] in x's dtype, m ≤ a few rows. With `norm_weight`
    [k] (one row, "f16" only), x's RMS norm (that weight, `eps`) is applied first, folded into the product."""
    launch = launch or INT8
    if launch.dequant not in INT8_MODES:
        raise ValueError(f"dequant {launch.dequant!r} not one of {', '.join(INT8_MODES)}")
    (m, k), n = x.shape, w.shape[0]
    rows = _rows_pad(m)
    f16 = launch.dequant == "f16" and rows == 1 and x.dtype != jnp.float32
    if norm_weight is not None and not f16:
        raise ValueError("a folded norm needs one 16-bit row and the \"f16\" launch")
    block_n = plan.pow2_divisor(n, launch.block_n, 1)
    block_k = plan.pow2_divisor(k, launch.block_k, 16)
    if block_n is None or block_k is None:
        raise ValueError(f"no block sizes fit a [{n}, {k}] weight")
    splits = _splits(n // block_n, k // block_k, launch.target_programs)
    steps = k // block_k // splits
    scale = scale.astype(jnp.float32)
    specs = [pl.BlockSpec((rows, k), lambda j, s: (0, 0)), pl.BlockSpec((block_n, k), lambda j, s: (j, 0)),
             pl.BlockSpec((block_n,), lambda j, s: (j,))]
    inputs, specs = _with_norm((_pad_rows(x, rows), w, scale), specs, norm_weight, k)
    if f16:
        flush = max(d for d in range(1, F16_FLUSH_STEPS + 1) if steps % d == 0)
        kernel = functools.partial(_int8_f16_kernel, block_k=block_k, steps=steps, splits=splits, flush=flush,
                                   eps=eps, interpret=interpret)
    else:
        kernel = functools.partial(_int8_kernel, rows=rows, block_k=block_k, steps=steps, splits=splits)
    out = _call(kernel, inputs, specs, rows, n, block_n, splits, x.dtype, launch, interpret, "int8_gemv")
    if splits > 1:
        out = (out.sum(0) * scale[None, :]).astype(x.dtype)
    return out[:m]


@functools.partial(jax.jit, static_argnames=("eps", "launch", "interpret"))
def int4_gemv(x, packed, scale, zero, norm_weight=None, eps: float = 0.0, *, launch: GemvLaunch | None = None,
              interpret: bool = False):
    """x [m, k] @ int4 weights (packed int32 [k / 8, n], scale and zero [k / group, n]) → [m, n], m ≤ a few. With
    `norm_weight` [k], x's RMS norm (that weight, `eps`) is applied first, in the kernel: the normalised rows
    rounded to x's dtype, as the norm's own output is."""
    default, launch = launch is None, launch or INT4
    (m, k), n = x.shape, packed.shape[1]
    k8, rows_per_group = k // 8, k // 8 // scale.shape[0]
    rows = _rows_pad(m)
    block_n = plan.pow2_divisor(n, launch.block_n, 1)
    block_r = plan.pow2_divisor(rows_per_group, max(1, launch.block_k // 8), 1)  # within one group
    if block_n is None or block_r is None:
        raise ValueError(f"no block sizes fit a [{k}, {n}] int4 weight")
    splits = _splits(n // block_n, k8 // block_r, launch.target_programs)
    steps = k8 // block_r // splits
    if default and steps >= LONG_LOOP_STEPS:
        launch = dataclasses.replace(launch, num_warps=LONG_LOOP_WARPS)
    if launch.dequant not in INT4_MODES:
        raise ValueError(f"dequant {launch.dequant!r} not one of {', '.join(INT4_MODES)}")
    dequant = "cast" if x.dtype == jnp.float32 else launch.dequant
    if dequant == "fma16" and x.dtype != jnp.bfloat16:
        dequant = "magic"  # a 16-bit partial sum of fp16 products could overflow (int4_dequant.py)
    kernel = functools.partial(_int4_kernel, rows=rows, block_r=block_r, steps=steps,
                               rows_per_group=rows_per_group, k8=k8, splits=splits, dequant=dequant, eps=eps,
                               interpret=interpret)
    groups = scale.shape[0]
    col = lambda r: pl.BlockSpec((r, block_n), lambda j, s: (0, j))  # noqa: E731
    specs = [pl.BlockSpec((rows, k), lambda j, s: (0, 0)), col(k8), col(groups), col(groups)]
    x = _pad_rows(x, rows)
    if norm_weight is None:
        x = x.reshape(rows, k8, 8).swapaxes(1, 2).reshape(rows, k)
    inputs, specs = _with_norm((x, packed, scale, zero), specs, norm_weight, k)
    out = _call(kernel, inputs, specs, rows, n, block_n, splits, x.dtype, launch, interpret, "int4_gemv")
    if splits > 1:
        out = out.sum(0).astype(x.dtype)
    return out[:m]
