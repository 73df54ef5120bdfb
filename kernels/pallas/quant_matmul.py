"""Matmuls of 16-bit (or int8) activations with quantised weights, as Pallas kernels lowered through Triton.

x [m, k] @ w [k, n] for any row count m (rows are padded to the row block); the weights stay quantised in
memory and are dequantised in registers, block by block:
- `int8_matmul`: int8 weights [n, k] (output-major), one scale per output (w8a16).
- `int4_matmul`: unsigned int4 weights packed 8 per int32 along the input (GPTQ's order), scale and zero
  point per group of inputs (w4a16).
- `int8_int8_matmul`: int8 activations (one scale per row) × int8 weights [n, k], int32 accumulation on
  the integer tensor cores, both scales applied in the epilogue (w8a8). The model runs XLA's int8 GEMM
  (cuBLAS): in the H200's batch-256 step of Llama-3-8B, with `int8_int8_launch`'s blocks, this kernel took
  4.27 ms a step (with its split inputs' sum) against cuBLAS's 3.74 (docs/perf.md, session 30); it stays for
  the side-by-side.
The definitions are in `reference.py`. A program owns (row block, column block, input split); with more than
one split (small m, where few column blocks would leave most multiprocessors idle) the float32 partial sums
are added outside. The Triton lowering (not Mosaic GPU) because it runs in interpret mode on the CPU, which is
how CI tests these kernels, and because its per-element int → float conversion is one line; the speed of
both is compared in `python -m kernels.pallas.bench --quant`.

`Launch.dequant` picks how weights become 16-bit operands: "cast" (`astype`), or "magic", bit tricks in inline
PTX (int8: `int8_dequant.py`'s "magic"; int4: `int4_dequant.py`'s, whose loop steps within one group take
x·(q - zero) exactly and the group's scale once, after the dot); int4 also takes "magicops" (the same tricks
as plain ops), int8 "f16" (dots in fp16, the cheapest int8 conversion, x rounded to fp16). Float32
activations always cast.
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

MIN_DOT = 16  # smallest row / column / input block the tensor-core dot takes


@dataclasses.dataclass(frozen=True)
class Launch:
    """Block sizes and launch settings. `block_k`: inputs per loop step (int4: a multiple of 128 or of the
    group); `target_programs`: split the inputs until the grid has about this many programs."""

    block_n: int = 64
    block_k: int = 256  # the H200 sweep (docs/perf.md): 20.5 against 24.9 µs for 128 on down at one row
    num_warps: int = 4
    num_stages: int = 3
    target_programs: int = 264  # two per multiprocessor of an H100 / H200
    dequant: str = "cast"  # "cast", "magic" (int4 also "magicops", int8 "f16"): see the module docstring
    block_m: int | None = None  # rows per program (None: the rows rounded up to a power of two, at most 128)


SMALL = Launch()  # decode-sized row counts: memory-bound, split the inputs
# int4 at those row counts converts by bit tricks: 58.9 against 63.9 µs (gate_up) and 28.8 against 34.3 (down) at
# one row on the H200 (docs/perf.md, session 12); int8's "magic" measured no faster than the cast there.
SMALL_INT4 = dataclasses.replace(SMALL, dequant="magic")
LARGE = Launch(block_n=128, block_k=64, num_warps=8, num_stages=3, target_programs=1)
# int8 x int8 above 64 rows, from the H200 sweep at 256 rows (docs/perf.md, session 30; LARGE took 1.4-3x these):
# 128 x 128 blocks on 8 warps where the grid fills two programs a multiprocessor (gate_up: 66.3 µs against LARGE's
# 93.2), the same splitting the inputs up to that many programs for a deep product (down, 14,336 inputs: 41.2
# against 124.1), and 64-row blocks on 4 warps, 4 stages otherwise (q/k/v: 23.3 against 41.6; o: 20.3 against 40.2).
INT8_WIDE = Launch(block_n=128, block_k=128, num_warps=8, num_stages=3, target_programs=1, block_m=128)
INT8_DEEP = dataclasses.replace(INT8_WIDE, target_programs=264)
INT8_NARROW = Launch(block_n=128, block_k=128, num_warps=4, num_stages=4, target_programs=1, block_m=64)
DEEP_STEPS = 64  # block_k steps over the inputs from which splitting them pays (down: 112; the others: 32)


INT8_MODES, INT4_MODES = ("cast", "magic", "f16"), ("cast", "magic", "magicops")


def _dequant(launch: Launch, modes, x_dtype) -> str:
    if launch.dequant not in modes:
        raise ValueError(f"dequant {launch.dequant!r} not one of {', '.join(modes)}")
    return "cast" if jnp.dtype(x_dtype) == jnp.float32 else launch.dequant


def _block_m(m: int, limit: int | None = None) -> int:
    return min(limit or 128, max(MIN_DOT, 1 << (m - 1).bit_length()))


def _largest_block(size: int, limit: int, floor: int = MIN_DOT) -> int | None:
    """The largest power of two in [floor, limit] dividing `size`, or None."""
    return plan.pow2_divisor(size, limit, floor)


def supports(k: int, n: int, group: int | None = None, int8_inputs: bool = False) -> bool:
    """Whether the kernels take a [k, n] weight (else the caller uses XLA): blocks of ≥ 16 (32 for int8
    inputs) must divide k and n, and an int4 group must be a multiple of 8 inputs."""
    floor = 32 if int8_inputs else MIN_DOT
    if _largest_block(n, 128) is None or _largest_block(k, 128, floor) is None:
        return False
    if group is not None:
        return group % 8 == 0 and k % group == 0 and (k // 8) % MIN_DOT == 0
    return True


def _plan(m: int, k: int, n: int, launch: Launch, block_k_limit: int, k_floor: int = MIN_DOT):
    """Row block, column block, input block and number of input splits for an [m, k] × [k, n] product."""
    block_m = _block_m(m, launch.block_m)
    block_n = _largest_block(n, launch.block_n)
    block_k = _largest_block(k, min(launch.block_k, block_k_limit), k_floor)
    if block_n is None or block_k is None:
        raise ValueError(f"no block sizes fit a [{k}, {n}] weight (need multiples of {MIN_DOT})")
    programs = -(-m // block_m) * (n // block_n)
    steps = k // block_k
    splits = 1
    while programs * splits * 2 <= launch.target_programs and steps % (splits * 2) == 0:
        splits *= 2
    return block_m, block_n, block_k, splits


def _store(o_ref, acc, scale_row, splits):
    if splits == 1:
        o_ref[...] = (acc * scale_row).astype(o_ref.dtype)
    else:
        o_ref[...] = acc[None]  # float32 partial sum; scales applied after the splits are added


def _int8_kernel(x_ref, w_ref, s_ref, o_ref, *, block_k, steps, splits, dequant, interpret):
    # x_ref [bm, k]; w_ref [bn, k] int8; s_ref [bn] f32; o_ref [bm, bn] (or [1, bm, bn] f32 partials)
    first = pl.program_id(2) * steps
    dtype = int8_dequant.operand_dtype(dequant, x_ref.dtype)

    def body(step, acc):
        cols = pl.ds((first + step) * block_k, block_k)
        x = x_ref[:, cols].astype(dtype)
        w = int8_dequant.convert(w_ref[:, cols], dtype, dequant, interpret)  # int8 → 16-bit is exact
        return acc + pltriton.dot(x, w, trans_b=True, allow_tf32=False if x.dtype == jnp.float32 else None)

    acc = lax.fori_loop(0, steps, body, jnp.zeros((x_ref.shape[0], w_ref.shape[0]), jnp.float32))
    _store(o_ref, acc, s_ref[...][None, :], splits)


def _int4_kernel(x_ref, w_ref, s_ref, z_ref, o_ref, *, block_r, steps, rows_per_group, k8, splits, dequant,
                 interpret):
    # x_ref [bm, k] with input 8r + j at column j * k8 + r; w_ref [k / 8, bn] int32;
    # s_ref, z_ref [k / group, bn]; o_ref as in _int8_kernel.
    first = pl.program_id(2) * steps
    local = jnp.arange(block_r, dtype=jnp.int32)

    def group_rows(ref, r0):
        # [block_r, bn]: each packed row's scale (or zero); a block holds one group or several whole ones.
        if block_r <= rows_per_group:
            return jnp.broadcast_to(ref[r0 // rows_per_group, :][None, :], (block_r, ref.shape[1]))
        g0 = r0 // rows_per_group
        out = jnp.zeros((block_r, ref.shape[1]), ref.dtype)
        for t in range(block_r // rows_per_group):
            out = jnp.where((local // rows_per_group == t)[:, None], ref[g0 + t, :][None, :], out)
        return out

    def magic_body(step, acc):
        r0 = (first + step) * block_r
        packed = w_ref[pl.ds(r0, block_r), :]  # [block_r, bn] int32
        xs = [x_ref[:, pl.ds(j * k8 + r0, block_r)] for j in range(8)]
        nibbles = functools.partial(int4_dequant.nibbles16, dtype=x_ref.dtype, interpret=interpret,
                                    ptx=dequant == "magic")
        if block_r > rows_per_group:  # several groups: the scale per packed row, inside the conversion
            tiles = nibbles(packed, group_rows(z_ref, r0), group_rows(s_ref, r0))
            for x, w in zip(xs, tiles):
                acc = acc + pltriton.dot(x, w)
            return acc
        g = r0 // rows_per_group
        part = jnp.zeros_like(acc)
        for x, w in zip(xs, nibbles(packed, z_ref[g, :][None, :], None)):
            part = part + pltriton.dot(x, w)  # w = q - zero, exact
        return acc + part * s_ref[g, :].astype(jnp.float32)[None, :]

    def body(step, acc):
        r0 = (first + step) * block_r
        packed = w_ref[pl.ds(r0, block_r), :]  # [block_r, bn] int32
        scale = group_rows(s_ref, r0).astype(jnp.float32)
        zero = group_rows(z_ref, r0).astype(jnp.float32)
        for j in range(8):  # nibble j of row r is input 8r + j
            x = x_ref[:, pl.ds(j * k8 + r0, block_r)]
            q = (lax.shift_right_logical(packed, jnp.int32(4 * j)) & 0xF).astype(jnp.float32)
            acc = acc + pltriton.dot(x, ((q - zero) * scale).astype(x.dtype),
                                    allow_tf32=False if x.dtype == jnp.float32 else None)
        return acc

    acc = lax.fori_loop(0, steps, body if dequant == "cast" else magic_body,
                        jnp.zeros((x_ref.shape[0], w_ref.shape[1]), jnp.float32))
    _store(o_ref, acc, 1.0, splits)


def _int8_int8_kernel(x_ref, xs_ref, w_ref, s_ref, o_ref, *, block_k, steps, splits):
    # x_ref [bm, k] int8; xs_ref [bm] f32; w_ref [bn, k] int8; s_ref [bn] f32
    first = pl.program_id(2) * steps

    def body(step, acc):
        cols = pl.ds((first + step) * block_k, block_k)
        return acc + pltriton.dot(x_ref[:, cols], w_ref[:, cols], trans_b=True)  # int32 accumulation

    acc = lax.fori_loop(0, steps, body, jnp.zeros((x_ref.shape[0], w_ref.shape[0]), jnp.int32))
    scales = xs_ref[...][:, None] * s_ref[...][None, :]
    _store(o_ref, acc.astype(jnp.float32), scales, splits)


def _call(kernel, inputs, in_specs, m, n, block_m, block_n, splits, out_dtype, launch, interpret, name):
    """Run `kernel` over (row blocks, column blocks, splits); add split partials outside."""
    m_pad = -(-m // block_m) * block_m
    grid = (m_pad // block_m, n // block_n, splits)
    if splits == 1:
        out_shape = jax.ShapeDtypeStruct((m_pad, n), out_dtype)
        out_spec = pl.BlockSpec((block_m, block_n), lambda i, j, s: (i, j))
    else:
        out_shape = jax.ShapeDtypeStruct((splits, m_pad, n), jnp.float32)
        out_spec = pl.BlockSpec((1, block_m, block_n), lambda i, j, s: (s, i, j))
    out = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_spec,
        compiler_params=pltriton.CompilerParams(num_warps=launch.num_warps, num_stages=launch.num_stages),
        interpret=interpret,
        name=name,
    )(*inputs)
    return out, m_pad


def _pad_rows(a, m_pad):
    return a if a.shape[0] == m_pad else jnp.pad(a, [(0, m_pad - a.shape[0])] + [(0, 0)] * (a.ndim - 1))


def _row_spec(block_m, k):
    return pl.BlockSpec((block_m, k), lambda i, j, s: (i, 0))


def _col_spec(rows, block_n):
    return pl.BlockSpec((rows, block_n), lambda i, j, s: (0, j))


def _nk_spec(block_n, k):
    return pl.BlockSpec((block_n, k), lambda i, j, s: (j, 0))


def _vec_spec(block_n):
    return pl.BlockSpec((block_n,), lambda i, j, s: (j,))


def pick_launch(m: int, int4: bool = False) -> Launch:
    if m > 64:
        return LARGE
    return SMALL_INT4 if int4 else SMALL


def int8_int8_launch(m: int, k: int, n: int) -> Launch:
    """The int8 x int8 kernel's launch for an [m, k] × [k, n] product (see INT8_WIDE)."""
    if m <= 64:
        return pick_launch(m)
    programs = -(-m // INT8_WIDE.block_m) * (n // (_largest_block(n, INT8_WIDE.block_n) or MIN_DOT))
    if programs >= INT8_DEEP.target_programs:  # two a multiprocessor without splitting
        return INT8_WIDE
    return INT8_DEEP if k // INT8_WIDE.block_k >= DEEP_STEPS else INT8_NARROW


@functools.partial(jax.jit, static_argnames=("launch", "interpret"))
def int8_matmul(x, w, scale, *, launch: Launch | None = None, interpret: bool = False):
    """x [m, k] (16-bit or float32) @ (int8 w [n, k] * float32 scale [n])ᵀ → [m, n] in x's dtype."""
    (m, k), n = x.shape, w.shape[0]
    launch = launch or pick_launch(m)
    block_m, block_n, block_k, splits = _plan(m, k, n, launch, launch.block_k)
    steps = k // block_k // splits
    m_pad = -(-m // block_m) * block_m
    kernel = functools.partial(_int8_kernel, block_k=block_k, steps=steps, splits=splits,
                               dequant=_dequant(launch, INT8_MODES, x.dtype), interpret=interpret)
    specs = [_row_spec(block_m, k), _nk_spec(block_n, k), _vec_spec(block_n)]
    out, _ = _call(kernel, (_pad_rows(x, m_pad), w, scale.astype(jnp.float32)), specs, m, n, block_m, block_n,
                   splits, x.dtype, launch, interpret, "int8_matmul")
    if splits > 1:
        out = (out.sum(0) * scale.astype(jnp.float32)[None, :]).astype(x.dtype)
    return out[:m]


@functools.partial(jax.jit, static_argnames=("launch", "interpret"))
def int4_matmul(x, packed, scale, zero, *, launch: Launch | None = None, interpret: bool = False):
    """x [m, k] @ int4 weights (packed int32 [k / 8, n], scale and zero [k / group, n]) → [m, n]."""
    (m, k), n = x.shape, packed.shape[1]
    k8, rows_per_group = k // 8, k // 8 // scale.shape[0]
    launch = launch or pick_launch(m, int4=True)
    # A loop step covers block_r packed rows (8 × block_r inputs): whole groups, or a part of one group.
    block_m, block_n, block_k, splits = _plan(m, k8, n, launch, max(MIN_DOT, launch.block_k // 8))
    block_r = block_k
    if block_r > rows_per_group and block_r % rows_per_group:
        raise ValueError(f"group of {8 * rows_per_group} inputs does not tile a block of {8 * block_r}")
    steps = k8 // block_r // splits
    m_pad = -(-m // block_m) * block_m
    # Column j * k8 + r holds input 8r + j: nibble j of a packed block meets one contiguous run of x.
    x_perm = _pad_rows(x, m_pad).reshape(m_pad, k8, 8).swapaxes(1, 2).reshape(m_pad, k)
    kernel = functools.partial(_int4_kernel, block_r=block_r, steps=steps, rows_per_group=rows_per_group,
                               k8=k8, splits=splits, dequant=_dequant(launch, INT4_MODES, x.dtype),
                               interpret=interpret)
    groups = scale.shape[0]
    specs = [_row_spec(block_m, k), _col_spec(k8, block_n), _col_spec(groups, block_n), _col_spec(groups, block_n)]
    out, _ = _call(kernel, (x_perm, packed, scale, zero), specs, m, n, block_m, block_n, splits, x.dtype, launch,
                   interpret, "int4_matmul")
    if splits > 1:
        out = out.sum(0).astype(x.dtype)
    return out[:m]


@functools.partial(jax.jit, static_argnames=("out_dtype", "launch", "interpret"))
def int8_int8_matmul(x_q, x_scale, w, w_scale, *, out_dtype, launch: Launch | None = None, interpret=False):
    """int8 x [m, k] with scale [m] @ int8 w [n, k]ᵀ with scale [n] → [m, n] in `out_dtype`."""
    (m, k), n = x_q.shape, w.shape[0]
    launch = launch or int8_int8_launch(m, k, n)
    block_m, block_n, block_k, splits = _plan(m, k, n, launch, max(32, launch.block_k), k_floor=32)
    steps = k // block_k // splits
    m_pad = -(-m // block_m) * block_m
    kernel = functools.partial(_int8_int8_kernel, block_k=block_k, steps=steps, splits=splits)
    specs = [_row_spec(block_m, k), pl.BlockSpec((block_m,), lambda i, j, s: (i,)), _nk_spec(block_n, k),
             _vec_spec(block_n)]
    inputs = (_pad_rows(x_q, m_pad), _pad_rows(x_scale.astype(jnp.float32), m_pad), w, w_scale.astype(jnp.float32))
    out, _ = _call(kernel, inputs, specs, m, n, block_m, block_n, splits, out_dtype, launch, interpret,
                   "int8_int8_matmul")
    if splits > 1:
        scales = _pad_rows(x_scale.astype(jnp.float32), m_pad)[:, None] * w_scale.astype(jnp.float32)[None, :]
        out = (out.sum(0) * scales).astype(out_dtype)
    return out[:m]
