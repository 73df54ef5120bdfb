"""How the Triton attention kernel turns int8 keys and values into tensor-core operands (`Launch.dequant`).

Why it matters: int8 decode took the same time on the H100 and the H200 (250 vs 247 µs at batch 64 / 4k)
while bf16 decode sped up with the H200's bandwidth (367 → 265 µs): the int8 kernel is bound by the SMs, not
by HBM. Where its instructions go (Triton 3.9's sm_90 SASS, docs/perf.md "int8 KV decode: where the time
goes"): not the conversion (Triton turns int8 into bf16 with byte permutes and a subtract, no I2F), but the
value tile, which P·V needs transposed: ldmatrix does that for 16-bit data, while int8 is read from shared
memory one byte per instruction. "pairs" removes those reads; the other modes trim the conversion.

Modes (every one scales after the dots: q·(s_k k) = s_k (q·k) per key, Σ p s_v v = (p s_v)·v):
- "cast": `astype`, Triton's own conversion (the old kernel; byte permutes and a subtract in its SASS).
- "magic": exact conversion by bit tricks into q's 16-bit type: for bf16 each byte becomes the float32
  2^23 + 128 + x (one byte permute), minus 2^23 + 128 (one FP32 add), whose upper half is x as bf16 (one
  permute per two); for fp16 two bytes at a time become 1024 + 128 + x (one permute), minus 1152 (one
  packed fp16 add). Same numbers as "cast".
- "f16": the dots in fp16: q rounded to fp16 once per program (exact within fp16's range: bf16 has fewer
  mantissa bits; |q| must stay below 65504), p·s_v rounded to fp16 (finer than bf16), int8 → fp16 as in
  "magic" (per 4 elements: 1 xor, 2 permutes, 2 packed adds).
- "f16ops": as "f16", with the conversion written as plain integer/float ops instead of inline PTX (in case
  the compiler does as well, or the assembly does not build).
- "pairs": as "f16", but keys and values are stored and read as int16 pairs of head-dim columns (2j, 2j + 1):
  the cache is int16 [slots + 1, kv_heads, head_dim / 2] (`as_pairs`; XLA has no free bitcast from int8 to
  int16, it would copy the cache), and each dot is split in two (even and odd columns). Why: the other modes
  leave the int8 value tile in shared memory as bytes, and the P·V dot needs it transposed (its reduction runs
  over keys, the rows): Triton then reads it one byte per instruction (32 LDS.U8 per warp per 32-key block in
  Triton 3.9's SASS, with the address math and byte permutes around them, the largest cost of the loop);
  16-bit elements transpose with ldmatrix.
  Only for head dims that are powers of two ≥ 32 (`pairs_fit`).
- "qk8": q quantised per row (query head of a token) to int8 with its own scale, q·k on the int8 tensor cores
  (no conversion of keys at all, int32 accumulation); values as in "f16". Adds q's rounding error (≤ half a
  step of max|q|/127 per element) to the scores.

`fma_f16` does "f16"'s conversion and a packed multiply-add for the int8 matrix-vector kernel
(`quant_gemv.int8_gemv`'s "f16").

Float32 queries (the CPU tests' models) always cast int8 to float32. In interpret mode (the CPU) the PTX
conversions run as `astype`, which gives the same numbers (both are exact); "f16ops" runs as written.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as pltriton

MODES = ("cast", "magic", "f16", "f16ops", "pairs", "qk8")

# 4 int8 lanes in $2 → 4 fp16 in $0, $1: offset binary (x ^ 0x80 = x + 128), each byte under an fp16 exponent
# byte 0x64 (1024 + x + 128), minus 1152 in packed fp16 adds.
_I8_TO_F16 = """{
.reg .b32 u, c;
xor.b32 u, $2, 0x80808080;
prmt.b32 $0, u, 0x64646464, 0x4140;
prmt.b32 $1, u, 0x64646464, 0x4342;
mov.b32 c, 0x64806480;
sub.f16x2 $0, $0, c;
sub.f16x2 $1, $1, c;
}"""

# 4 int8 lanes in $2 → 4 bf16 in $0, $1: each byte under the float32 exponent of 2^23 (2^23 + x + 128), minus
# 2^23 + 128 (exact), then the upper halves of two float32 side by side (exact: |x| ≤ 128 has ≤ 8 bits).
_I8_TO_BF16 = """{
.reg .b32 u, f0, f1, f2, f3;
xor.b32 u, $2, 0x80808080;
prmt.b32 f0, u, 0x4B000000, 0x7650;
prmt.b32 f1, u, 0x4B000000, 0x7651;
prmt.b32 f2, u, 0x4B000000, 0x7652;
prmt.b32 f3, u, 0x4B000000, 0x7653;
sub.f32 f0, f0, 0f4B000080;
sub.f32 f1, f1, 0f4B000080;
sub.f32 f2, f2, 0f4B000080;
sub.f32 f3, f3, 0f4B000080;
prmt.b32 $0, f0, f1, 0x7632;
prmt.b32 $1, f2, f3, 0x7632;
}"""

# 2 int16 lanes in $1 (bytes lo0 hi0 lo1 hi1) → fp16 of their low bytes (selector 0x4240) or high bytes (0x4341)
# in $0, as above. (One asm per half: Pallas lowers inline assembly with one result only.)
_I16_PAIRS_TO_F16 = """{{
.reg .b32 u, c;
xor.b32 u, $1, 0x80808080;
prmt.b32 $0, u, 0x64646464, {selector};
mov.b32 c, 0x64806480;
sub.f16x2 $0, $0, c;
}}"""

_ASM = {jnp.dtype(jnp.float16): _I8_TO_F16, jnp.dtype(jnp.bfloat16): _I8_TO_BF16}

# "_I8_TO_F16" and a packed fp16 multiply-add: 4 int8 lanes in $2, 4 fp16 activations in $3, $4, 4 fp16 partial
# sums in $5, $6 → the 4 sums plus activation × weight, each rounded once to fp16, in $0, $1.
_FMA_I8_F16 = """{
.reg .b32 u, c, w0, w1;
xor.b32 u, $2, 0x80808080;
prmt.b32 w0, u, 0x64646464, 0x4140;
prmt.b32 w1, u, 0x64646464, 0x4342;
mov.b32 c, 0x64806480;
sub.f16x2 w0, w0, c;
sub.f16x2 w1, w1, c;
fma.rn.f16x2 $0, w0, $3, $5;
fma.rn.f16x2 $1, w1, $4, $6;
}"""


def check(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown int8 dequant mode {mode!r}: one of {', '.join(MODES)}")


def operand_dtype(mode: str, q_dtype):
    """The dtype of the dots' 16-bit (or float32) operands for queries of `q_dtype`."""
    if jnp.dtype(q_dtype) == jnp.float32:
        return jnp.dtype(jnp.float32)
    return jnp.dtype(q_dtype) if mode in ("cast", "magic") else jnp.dtype(jnp.float16)


def convert(x, dtype, mode: str, interpret: bool):
    """int8 tile → `dtype` (exact) the way `mode` says."""
    dtype = jnp.dtype(dtype)
    if mode == "cast" or dtype == jnp.float32:
        return x.astype(dtype)
    if mode == "f16ops":  # 1024 + 128 + x as fp16 bits, minus 1152
        bits = x.astype(jnp.int16) + jnp.int16(0x6480)
        return jax.lax.bitcast_convert_type(bits, jnp.float16) - jnp.float16(1152)
    if interpret:  # inline PTX runs only on the GPU; astype gives the same (exact) numbers
        return x.astype(dtype)
    [out] = pltriton.elementwise_inline_asm(
        _ASM[dtype], args=[x], constraints="=r,=r,r", pack=4,
        result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, dtype)],
    )
    return out


def fma_f16(w, x, acc, interpret: bool):
    """acc + x · w elementwise, each result rounded once to fp16: int8 tile `w`, fp16 tiles `x` (broadcast to w's
    shape) and `acc`. Per 4 weights one xor, two byte permutes, two packed subtracts and two packed multiply-adds
    (inline PTX; the matrix-vector kernel's "f16"); in interpret mode the plain ops, whose product of an int8 and
    an fp16 value is exact in float32."""
    f16 = jnp.dtype(jnp.float16)
    x = jnp.broadcast_to(x, w.shape).astype(f16)
    if interpret:
        return (acc.astype(jnp.float32) + x.astype(jnp.float32) * w.astype(jnp.float32)).astype(f16)
    [out] = pltriton.elementwise_inline_asm(
        _FMA_I8_F16, args=[w, x, acc], constraints="=r,=r,r,r,r,r,r", pack=4,
        result_shape_dtypes=[jax.ShapeDtypeStruct(w.shape, f16)],
    )
    return out


def split_pairs(x, dtype, interpret: bool):
    """int16 tile of int8 pairs (low byte: even head-dim column) → (even columns, odd columns) as `dtype`, exact."""
    if interpret or jnp.dtype(dtype) != jnp.float16:
        return ((x << 8) >> 8).astype(dtype), (x >> 8).astype(dtype)
    shape = jax.ShapeDtypeStruct(x.shape, jnp.float16)
    return tuple(
        pltriton.elementwise_inline_asm(_I16_PAIRS_TO_F16.format(selector=selector), args=[x], constraints="=r,r",
                                        pack=2, result_shape_dtypes=[shape])[0]
        for selector in ("0x4240", "0x4341")
    )


def as_pairs(x):
    """int8 [..., head_dim] → int16 [..., head_dim / 2], each element two neighbouring columns (low byte the
    even one). XLA computes it (shifts and ors): for the new tokens of a step, never a whole cache."""
    return jax.lax.bitcast_convert_type(x.reshape(*x.shape[:-1], x.shape[-1] // 2, 2), jnp.int16)


def from_pairs(x):
    """Inverse of `as_pairs`: int16 [..., head_dim / 2] → int8 [..., head_dim]."""
    return jax.lax.bitcast_convert_type(x, jnp.int8).reshape(*x.shape[:-1], 2 * x.shape[-1])


def is_paired(cache) -> bool:
    """Whether an int8 K or V cache is stored as int16 pairs ("pairs"), not int8."""
    return cache.dtype == jnp.int16


def for_cache(mode: str, paired: bool) -> str:
    """The mode a launch runs over a cache: a paired cache (int16) runs "pairs" whatever the launch says, an int8
    one runs "f16" where the launch says "pairs" (the cache layout is chosen once, by the decode launch)."""
    if paired:
        return "pairs"
    return "f16" if mode == "pairs" else mode


def pairs_fit(head_dim: int) -> bool:
    """Whether "pairs" takes this head dim: a power of two ≥ 32 (halves of ≥ 16 columns for the dots)."""
    return head_dim >= 32 and head_dim & (head_dim - 1) == 0


def quantize_rows(q):
    """q [M, D] → (int8 [M, D], float32 scale [M]): symmetric per row, round half up; a zero row gets scale 0."""
    q32 = q.astype(jnp.float32)
    scale = jnp.max(jnp.abs(q32), axis=1) / 127.0
    safe = jnp.where(scale > 0, scale, 1.0)
    return jnp.floor(q32 / safe[:, None] + 0.5).astype(jnp.int8), scale
