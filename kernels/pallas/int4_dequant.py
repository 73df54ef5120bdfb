"""How the int4 weight kernels (`quant_matmul.int4_matmul`, `quant_gemv.int4_gemv`) turn packed nibbles into
numbers (their launches' `dequant`).

Why it matters: at one row the int4 kernels read only 0.9-1.1 TB/s against bf16's 4.1 (docs/perf.md, "One-row
products"): per weight they shift, mask, convert the integer to a float (I2F: 16 per clock per multiprocessor
on sm_90 by the CUDA guide's throughput table, against 128 float32 adds; the likely bound, not measured),
subtract the zero point and multiply by the scale. The tricks below never convert an integer: they place the
nibble under a float's exponent, which makes the float (bias + q) exactly, and subtract (bias + zero).

Modes:
- "cast": the plain ops above (the old kernels).
- "magic": two 16-bit values per 32-bit instruction, by inline PTX (`nibbles16`): for two neighbouring packed
  words, one byte permute gathers nibble j's byte of each into the two halves, one lop3 masks the nibbles and
  ORs them under the exponent of bias = 128 (bf16: 7 mantissa bits) or 1024 (fp16), one packed subtract of
  (bias + zero) gives q - zero exactly, and, where the caller asks for it, one packed multiply by the scale
  rounds (q - zero) · scale once to the 16-bit type, as `astype` of the exact product does. Odd nibbles come
  from the words shifted right by 4 (one shift per word for all four).
- "magicops": the same numbers by plain integer and 16-bit float ops, one value at a time (shift, mask and OR
  under the exponent, a 16-bit subtract and multiply): in case the compiler does as well, or the assembly does
  not build. Interpret mode runs it as written.
- "fma16" (matrix-vector kernel only, bf16 activations): "magic"'s conversion and the multiply-add by the
  activation in one piece of inline PTX (`dot_nibbles16`): per pair of words and nibble, the byte permute, the
  lop3, the packed subtract and one packed bf16 multiply-add into a bf16 partial sum over the word's 8 inputs
  (with several rows, each nibble's tile converted once and one packed multiply-add per row, `fma_bf16x2`),
  widened to float32 once per word. Four instructions per two weights where "magic" then widens each weight to
  float32 and multiplies-adds it there (about twice the instructions): 1.2–1.5× faster at one row on the H200
  (docs/perf.md, session 23), so the instructions were the bound. The partial sum of 8 products is rounded to
  bf16 after each product (a relative error of about 2^-9 × √8 on each word's part, the size of the reference's
  own rounding of the dequantised weights to bf16); fp16 activations could overflow it (|x| · 15 · 8 > 65,504),
  so they take "magic".
- "magic32" (matrix-vector kernel only): float32 by the same trick without inline assembly (`nibbles32`): the
  word's nibble j (j < 4; the word shifted right by 16 for j ≥ 4) masked in place under the exponent of 2^23
  is 2^23 + q·16^j, minus 2^23 + zero·16^j: (q - zero)·16^j exactly, one lop3 and one subtract per weight; the
  caller multiplies the activation by 16^-j instead (exact, once per activation).

All three leave the scale to the caller where it can: a kernel whose loop step lies within one group sums
x·(q - zero) over the step and multiplies by the group's scale once. In interpret mode (the CPU) the PTX runs as
the plain ops, which give the same numbers (`tests/kernels/test_int4_dequant.py` checks it on the GPU).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import triton as pltriton

# (float bits of bias + 0 in both halves, the bias) per 16-bit type: the nibble fills the lowest mantissa bits.
_BIAS16 = {jnp.dtype(jnp.bfloat16): (0x43004300, 128), jnp.dtype(jnp.float16): (0x64006400, 1024)}
_PTX_TYPE = {jnp.dtype(jnp.bfloat16): "bf16x2", jnp.dtype(jnp.float16): "f16x2"}

# Two words in $1, $2 → nibble at bits 0-3 of byte {byte} of each, as (q - zero)[ · scale] in $0's halves;
# $3: (bias + zero) pair; $4: scale pair ("mul" variant only). lop3 0xEA: (a & b) | c.
_NIBBLES = """{{
.reg .b32 t;
prmt.b32 t, $1, $2, {selector};
lop3.b32 t, t, 0x000F000F, {bias}, 0xEA;
sub.rn.{type} {out}, t, $3;
{mul}}}"""


def _selector(j: int) -> str:
    """prmt's selector taking byte j // 2 of each of the two words into the result's two halves."""
    byte = j // 2
    return hex(((4 + byte) * 0x11 << 8) | byte * 0x11)


def nibbles16(packed, zero, scale, dtype, interpret: bool, ptx: bool = True):
    """int32 [r, n] words (input 8i + j at bits 4j of row i) → yields the 8 tiles [r, n] of `dtype` (bf16 or
    fp16), tile j from nibble j: (q - zero) exactly, or (q - zero) · scale rounded once where `scale` is given
    (scale rounded to `dtype` first: the same numbers as the plain ops where it is stored in `dtype`, as the
    model's are). `zero`, `scale`: broadcastable to [r, n]. A generator, so that a kernel uses each tile
    before the next is made (eight live tiles would spill registers). `ptx`: "magic", else "magicops"."""
    dtype = jnp.dtype(dtype)
    scale = None if scale is None else scale.astype(dtype)
    bits, bias = _BIAS16[dtype]
    if not ptx:
        zero = zero.astype(dtype) + jnp.asarray(bias, dtype)  # exact: small integers
        for j in range(8):
            q = (lax.shift_right_logical(packed, jnp.int32(4 * j)) & 0xF) | jnp.int32(bits & 0xFFFF)
            w = lax.bitcast_convert_type(q.astype(jnp.int16), dtype) - zero
            yield w if scale is None else w * scale
        return
    if interpret:  # inline PTX runs only on the GPU
        for j in range(8):
            q = (lax.shift_right_logical(packed, jnp.int32(4 * j)) & 0xF).astype(jnp.float32)
            w = q - zero.astype(jnp.float32)
            yield (w if scale is None else w * scale.astype(jnp.float32)).astype(dtype)
        return
    zero = jnp.broadcast_to(zero.astype(dtype) + jnp.asarray(bias, dtype), packed.shape)  # exact: small integers
    scale = None if scale is None else jnp.broadcast_to(scale, packed.shape)
    odd = lax.shift_right_logical(packed, jnp.int32(4))
    args = [zero] if scale is None else [zero, scale]
    mul = "" if scale is None else f"mul.rn.{_PTX_TYPE[dtype]} $0, t, $4;\n"
    for j in range(8):
        asm = _NIBBLES.format(selector=_selector(j), bias=hex(bits),
                              type=_PTX_TYPE[dtype], out="t" if mul else "$0", mul=mul)
        words = odd if j % 2 else packed
        [tile] = pltriton.elementwise_inline_asm(
            asm, args=[words, *args], constraints="=r" + ",r" * (2 + len(args)), pack=2,
            result_shape_dtypes=[jax.ShapeDtypeStruct(packed.shape, dtype)],
        )
        yield tile


_DOT_NIBBLES = """{{
.reg .b32 t;
prmt.b32 t, $1, $2, {selector};
lop3.b32 t, t, 0x000F000F, {bias}, 0xEA;
sub.rn.bf16x2 t, t, $3;
fma.rn.bf16x2 $0, t, $4, $5;
}}"""


def dot_nibbles16(packed, zero, xs, interpret: bool):
    """int32 [r, n] words (input 8i + j at bits 4j of row i) and the 8 bf16 activation columns xs[j] [r] →
    Σ_j xs[j][i] · (q_j - zero) as bf16 [r, n], each multiply-add rounded to bf16 ("fma16"). `zero`:
    broadcastable to [r, n]."""
    bf16 = jnp.dtype(jnp.bfloat16)
    part = jnp.zeros(packed.shape, bf16)
    if interpret:  # the same roundings as the PTX: each nibble's exact tile, then one rounded multiply-add
        for x, w in zip(xs, nibbles16(packed, zero, None, bf16, interpret)):
            part = fma_bf16x2(w, x[:, None], part, interpret)
        return part
    bits, bias = _BIAS16[bf16]
    zero = jnp.broadcast_to(zero.astype(bf16) + jnp.asarray(bias, bf16), packed.shape)  # exact: small integers
    odd = lax.shift_right_logical(packed, jnp.int32(4))
    for j, x in enumerate(xs):
        asm = _DOT_NIBBLES.format(selector=_selector(j), bias=hex(bits))
        [part] = pltriton.elementwise_inline_asm(
            asm, args=[odd if j % 2 else packed, zero, jnp.broadcast_to(x.astype(bf16)[:, None], packed.shape),
                       part],
            constraints="=r,r,r,r,r,r", pack=2, result_shape_dtypes=[jax.ShapeDtypeStruct(packed.shape, bf16)],
        )
    return part


def fma_bf16x2(w, x, part, interpret: bool):
    """part + x · w, rounded once to bf16 (bf16 [r, n] each; x broadcast to it): one packed bf16 multiply-add per two
    values (inline PTX), or its plain-ops stand-in in interpret mode (the product is exact in float32)."""
    bf16 = jnp.dtype(jnp.bfloat16)
    if interpret:
        return (part.astype(jnp.float32) + x.astype(jnp.float32) * w.astype(jnp.float32)).astype(bf16)
    [out] = pltriton.elementwise_inline_asm(
        "fma.rn.bf16x2 $0, $1, $2, $3;", args=[w, jnp.broadcast_to(x, w.shape).astype(bf16), part],
        constraints="=r,r,r,r", pack=2, result_shape_dtypes=[jax.ShapeDtypeStruct(w.shape, bf16)])
    return out


def nibbles32(packed, zero):
    """int32 [r, n] words → yields 8 float32 tiles [r, n] (a generator, as `nibbles16`): tile j is
    (q_j - zero) · 16^(j % 4), exact (see "magic32"); `zero` broadcastable to [r, n]. Plain ops, which
    interpret mode runs as written."""
    zero = zero.astype(jnp.float32)
    high = lax.shift_right_logical(packed, jnp.int32(16))
    for j in range(8):
        words, shift = (packed, 4 * j) if j < 4 else (high, 4 * (j - 4))
        bits = (words & jnp.int32(0xF << shift)) | jnp.int32(0x4B000000)
        yield lax.bitcast_convert_type(bits, jnp.float32) - (2.0**23 + zero * float(16**(j % 4)))


def nibble_weight(j: int) -> float:
    """What the activations meeting `nibbles32`'s tile j are multiplied by (exact: a power of two)."""
    return 16.0 ** -(j % 4)
