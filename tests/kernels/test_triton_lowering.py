"""Every Pallas kernel we lower through Triton, lowered for CUDA on the CPU (`jax.export` with platforms=["cuda"])
with MLIR's verifier run on each Triton module Pallas builds: what interpret mode never sees and XLA's Triton
parser rejects on the GPU (session 6's grouped matmul: "'scf.for' op failed to verify that all of {lowerBound,
upperBound, step} have same type"). One representative launch per entry point, as the engine launches it."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export, lax
from jax._src.pallas.triton import lowering as triton_lowering
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from jaxllm.models import quant
from jaxllm.models.attention import AttentionMetadata, AttentionSpec
from jaxllm.models.backends import KernelConfig, PallasAttention
from kernels.pallas import (
    attention_triton, grouped_matmul, int8_dequant, quant_gemv, quant_matmul, row_quant, two_digit_matmul,
)

# The custom call a Triton kernel lowers to (its name across JAX versions): exporting it is refused by default.
_TRITON_CALLS = ("__gpu$xla.gpu.triton", "triton_kernel_call")


@pytest.fixture
def verified(monkeypatch):
    """While active, every Triton module Pallas lowers is verified (MLIRError names the failing op); the list
    holds one entry per module lowered."""
    modules = []
    original = triton_lowering.lower_jaxpr_to_triton_module

    def lower_and_verify(*args, **kwargs):
        result = original(*args, **kwargs)
        result.module.operation.verify()
        modules.append(result.module)
        return result

    monkeypatch.setattr(triton_lowering, "lower_jaxpr_to_triton_module", lower_and_verify)
    return modules


def lower_for_cuda(fn, *args):
    return export.export(jax.jit(fn), platforms=["cuda"],
                         disabled_checks=[export.DisabledSafetyCheck.custom_call(c) for c in _TRITON_CALLS])(*args)


def _traced_loop_bound_kernel(count_ref, x_ref, o_ref):
    # The old grouped matmul's K loop: a bound chosen on the device (jnp.where) beside a constant lower bound.
    steps = jnp.where(count_ref[0] > 0, 4, 0)
    o_ref[...] = lax.fori_loop(0, steps, lambda i, acc: acc + x_ref[...], jnp.zeros((16, 16), jnp.float32))


def _traced_loop_bound(count, x):
    return pl.pallas_call(_traced_loop_bound_kernel, out_shape=jax.ShapeDtypeStruct((16, 16), jnp.float32),
                          compiler_params=pltriton.CompilerParams())(count, x)


def test_the_verifier_rejects_what_the_gpu_rejected(verified):
    args = (jax.ShapeDtypeStruct((1,), jnp.int32), jax.ShapeDtypeStruct((16, 16), jnp.float32))
    try:
        lower_for_cuda(_traced_loop_bound, *args)
    except Exception as e:  # noqa: BLE001  the verifier's MLIRError is the expected failure, checked below
        if not verified and "failed to verify" not in str(e):
            pytest.skip(f"this JAX cannot lower Pallas Triton kernels for cuda without a GPU: {type(e).__name__}: "
                        f"{str(e)[:300]}")
        assert "'scf.for' op failed to verify" in str(e)
    else:
        pytest.fail("the verifier passed a Triton loop whose bounds differ in type")


# --- the kernels, each at one small shape of a served launch ---------------------------------------------

def _rng():
    return np.random.default_rng(0)


def _grouped(rows: int):
    rng = _rng()
    x = jnp.asarray(rng.standard_normal((rows, 256)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((8, 256, 512)), jnp.bfloat16)
    sizes = np.bincount(rng.integers(0, 8, rows), minlength=8)
    return grouped_matmul.grouped_matmul, (x, w, jnp.asarray(sizes, jnp.int32))


def _grouped_int8(rows: int):
    """w8a16 experts: int8 [groups, N, K] with a scale per output channel."""
    x, w, sizes = _grouped(rows)[1]
    w8 = jnp.asarray(_rng().integers(-127, 128, size=(8, 512, 256)), jnp.int8)
    return (lambda x, w, sizes, scale: grouped_matmul.grouped_matmul(x, w, sizes, scale=scale),
            (x, w8, sizes, jnp.ones((8, 512), jnp.float32)))


def _attention(decode: bool, int8: bool = False, split: str = "never", head_dim: int = 128, options=False,
               dequant: str | None = None, diagonal: bool = False, decode_launch=None):
    """PallasAttention's launch (decode or prefill) over 3 ragged rows, GQA 8 query heads on 2 KV heads;
    `options`: a window, soft-capping and ALiBi slopes; `dequant`: the int8 launches' mode (else the default);
    `diagonal`: the prefill launches' causal mask on the diagonal key blocks only; `decode_launch`: the 16-bit
    decode's launch, or with `int8` the int8 decode's (else the ones attention_triton.decode_launch picks)."""
    rng = _rng()
    lengths = (70, 5, 33)
    chunks = [(n - 1, 1) for n in lengths] if decode else [(0, n) for n in lengths]
    slots = rng.permutation(128)
    rows, start = [], 0
    for n in lengths:
        rows.append([int(s) for s in slots[start:start + n]])
        start += n
    meta = AttentionMetadata.for_sequences(chunks, rows, scratch_slot=128, width=128)
    config = KernelConfig(decode=decode_launch)
    if diagonal:  # prefill's causal mask on the diagonal key blocks only
        config = dataclasses.replace(config, prefill=dataclasses.replace(config.prefill, diagonal_mask=True),
                                     prefill_int8=dataclasses.replace(config.prefill_int8, diagonal_mask=True))
    if int8 and decode_launch is not None:
        config = dataclasses.replace(config, decode_int8=decode_launch)
    if dequant:
        config = dataclasses.replace(config, decode_int8=dataclasses.replace(config.decode_int8, dequant=dequant),
                                     prefill_int8=dataclasses.replace(config.prefill_int8, dequant=dequant))
    backend = PallasAttention(int8_kv=int8, split=split, config=config)
    heads, kv_heads = 8, 2
    q = jnp.asarray(rng.standard_normal((meta.positions.shape[0], heads, head_dim)), jnp.bfloat16)
    cache = backend.init_layer_cache(128, kv_heads, head_dim, jnp.bfloat16)
    spec = AttentionSpec(scale=0.1, window=16 if options else None, softcap=30.0 if options else None)
    slopes = jnp.linspace(0.1, 0.9, heads, dtype=jnp.float32) if options else None

    # An int8 prefill reads the step's own keys and values as computed (fresh_prefill.py): both of its passes lower.
    fresh = None
    if int8 and not decode:
        fresh = tuple(jnp.asarray(rng.standard_normal((q.shape[0], kv_heads, head_dim)), jnp.bfloat16) for _ in "kv")

    def attend(q, cache, meta, fresh):
        return backend._attend_local(q, cache, meta, spec, slopes, fresh)  # noqa: SLF001  one device's launch

    return attend, (q, cache, meta, fresh)


def _latent(decode: bool):
    """DeepSeek-V2-Lite's latent attention sizes (latent 512, rotary key 64, 16 heads) over 2 ragged rows."""
    rng = _rng()
    lengths = (40, 9)
    chunks = [(n - 1, 1) for n in lengths] if decode else [(0, n) for n in lengths]
    meta = AttentionMetadata.for_sequences(chunks, [list(range(40)), list(range(40, 49))], scratch_slot=64, width=64)
    q = jnp.asarray(rng.standard_normal((meta.positions.shape[0], 16, 576)), jnp.bfloat16)
    cache = jnp.asarray(rng.standard_normal((65, 1, 576)), jnp.bfloat16)
    backend = PallasAttention(split="always")
    return (lambda q, cache, meta: backend.attend_latent(q, cache, meta, 0.07, 512)), (q, cache, meta)


# Quantised weights by their shapes only (lowering reads no values): their fields as the quantisers make them.
def _int8_weight(n: int = 256, k: int = 512):
    return jax.eval_shape(lambda w: (lambda q: (q.data.reshape(n, k), q.scale.reshape(n)))(quant.quantize_int8(w)),
                          jax.ShapeDtypeStruct((k, n), jnp.float32))


def _int4_weight(n: int = 256, k: int = 512):
    def fields(w):
        q = quant.quantize_int4(w)
        return q.packed.reshape(-1, n), q.scale.reshape(-1, n), q.zero.reshape(-1, n)

    return jax.eval_shape(fields, jax.ShapeDtypeStruct((k, n), jnp.float32))


def _x(rows: int, k: int = 512):
    return jnp.asarray(_rng().standard_normal((rows, k)), jnp.bfloat16)


def _int8_int8(launch=None):
    x_q, x_scale = _int8_weight(n=128)  # int8 rows of x with a scale each
    return (lambda *a: quant_matmul.int8_int8_matmul(*a, out_dtype=jnp.bfloat16, launch=launch),
            (x_q, x_scale, *_int8_weight()))


CASES = {
    "grouped_matmul-decode": lambda: _grouped(2),
    "grouped_matmul-prefill": lambda: _grouped(512),
    "grouped_matmul-int8-decode": lambda: _grouped_int8(2),
    "grouped_matmul-int8-prefill": lambda: _grouped_int8(512),
    "paged_attention-decode": lambda: _attention(decode=True),
    "paged_attention-decode-short-context-launch": lambda: _attention(decode=True,
                                                                      decode_launch=attention_triton.DECODE_SHORT),
    "paged_attention-decode-splitk": lambda: _attention(decode=True, split="always"),
    "paged_attention-prefill": lambda: _attention(decode=False),
    "paged_attention-int8-decode": lambda: _attention(decode=True, int8=True),
    "paged_attention-int8-decode-short-context-launch": lambda: _attention(
        decode=True, int8=True,
        decode_launch=attention_triton.decode_launch(128, 1 << 20, attention_triton.DECODE_INT8)),
    "paged_attention-int8-prefill": lambda: _attention(decode=False, int8=True),
    "paged_attention-prefill-diagonal-mask": lambda: _attention(decode=False, diagonal=True),
    "paged_attention-int8-prefill-diagonal-mask": lambda: _attention(decode=False, int8=True, diagonal=True),
    **{f"paged_attention-int8-decode-{mode}": functools.partial(_attention, decode=True, int8=True, dequant=mode)
       for mode in int8_dequant.MODES},
    **{f"paged_attention-int8-prefill-{mode}": functools.partial(_attention, decode=False, int8=True, dequant=mode)
       for mode in ("pairs", "qk8")},
    "paged_attention-prefill-head96-window-softcap-alibi": lambda: _attention(False, head_dim=96, options=True),
    "latent_attention-decode-splitk": lambda: _latent(decode=True),
    "latent_attention-prefill": lambda: _latent(decode=False),
    "int8_matmul": lambda: (quant_matmul.int8_matmul, (_x(2), *_int8_weight())),
    "int4_matmul": lambda: (quant_matmul.int4_matmul, (_x(48), *_int4_weight())),
    "int8_int8_matmul": _int8_int8,
    **{f"int8_int8_matmul-{name}": functools.partial(_int8_int8, getattr(quant_matmul, name))
       for name in ("INT8_WIDE", "INT8_DEEP")},  # (128 rows' own launch: INT8_NARROW)
    "int8_gemv": lambda: (quant_gemv.int8_gemv, (_x(1), *_int8_weight())),
    "int8_gemv-normed": lambda: (lambda x, w, s, g: quant_gemv.int8_gemv(x, w, s, g, 1e-5),
                                 (_x(1), *_int8_weight(), jnp.ones((512,), jnp.float32))),
    "int8_gemv-cast": lambda: (functools.partial(quant_gemv.int8_gemv, launch=dataclasses.replace(
        quant_gemv.INT8, dequant="cast")), (_x(1), *_int8_weight())),
    "int4_gemv": lambda: (quant_gemv.int4_gemv, (_x(1), *_int4_weight())),
    "int4_gemv-normed": lambda: (lambda x, p, s, z, g: quant_gemv.int4_gemv(x, p, s, z, g, 1e-5),
                                 (_x(2), *_int4_weight(), jnp.ones((512,), jnp.float32))),
    "int4_gemv-fma16": lambda: (functools.partial(quant_gemv.int4_gemv, launch=dataclasses.replace(
        quant_gemv.INT4, dequant="fma16")), (_x(1), *_int4_weight())),
    "int4_gemv-fma16-4-rows": lambda: (functools.partial(quant_gemv.int4_gemv, launch=dataclasses.replace(
        quant_gemv.INT4, dequant="fma16")), (_x(4), *_int4_weight())),
    "int16_digits": lambda: (two_digit_matmul.int16_digits_kernel, (_x(1, 14336),)),
    "int16_digits-normed": lambda: (lambda x, w: two_digit_matmul.int16_digits_kernel(x, w, 1e-5),
                                    (_x(1, 4096), jnp.ones((4096,), jnp.float32))),
    "quantize_rows-int8": lambda: (lambda x: row_quant.quantize_rows(x, jnp.int8), (_x(256, 4096),)),
    "quantize_rows-int8-chunks": lambda: (lambda x: row_quant.quantize_rows(x, jnp.int8), (_x(8, 20480),)),
    "quantize_rows-fp8-normed": lambda: (lambda x, w: row_quant.quantize_rows(x, jnp.float8_e4m3fn, w, 1e-5),
                                         (_x(256, 4096), jnp.ones((4096,), jnp.float32))),
    "quantize_rows-fp8-gated": lambda: (lambda x: row_quant.quantize_rows(x, jnp.float8_e4m3fn, gated=True),
                                        (jnp.ones((256, 2, 14336), jnp.bfloat16),)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_kernel_lowers_to_valid_triton_for_cuda(verified, name):
    fn, args = CASES[name]()
    lower_for_cuda(fn, *args)
    assert verified, f"{name} lowered no Triton kernel"
