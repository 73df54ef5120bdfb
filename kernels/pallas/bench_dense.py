"""`python -m kernels.pallas.bench --dense`: prefill attention on dense shapes, ours beside cuDNN's, JAX's
Mosaic GPU flash attention (`jax.experimental.pallas.ops.gpu.attention_mgpu`) and tokamax's.

A case is `batch` sequences of `new` query tokens after `prefix` cached ones, causal with the diagonal at
the bottom right (token i of a sequence sees keys 0..prefix + i), Llama-3-8B heads by default. Every
implementation gets the same random bf16 numbers: the dense ones as q [B, T, N, H], k/v [B, S, K, H]; ours
as the token-level cache holds them (each sequence's keys in consecutive slots, one slot-table row per
sequence, the packed query tokens), as the engine calls them. Each row gives the median time, TFLOP/s of
the causal FLOPs (`prefill_flops`), its ratio to the run's matmul rate, and the largest |error| against a
float32 reference on the same inputs, so a fast row with the wrong mask shows as MISMATCH. An
implementation that cannot express a case is a SKIPPED row saying why; one that fails, a FAILED row.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from kernels.pallas import attention_mosaic, attention_triton, plan, prefill_split

# Largest |output - float32 reference| a row may show: bf16 outputs of magnitude ≤ 1 round by ≤ 2^-8; a
# misplaced causal diagonal changes early tokens' outputs by O(0.1–1).
TOLERANCE = 2e-2
# attention_mgpu's tuning (block_q, block_kv, max_concurrent_steps), as its own search picks: block_q 64 per
# compute warpgroup (two of them), the largest block_kv that fits shared memory (256 does not at head_dim 128).
# One config: each costs a compile per case, and the whole --dense run is to stay within two minutes.
MGPU_CONFIGS = ((64, 128, 2),)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    batch: int
    new: int  # query tokens per sequence
    prefix: int = 0  # cached keys before them
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128

    @property
    def keys(self) -> int:
        return self.prefix + self.new


CASES = (
    Case("dense 1×4096", 1, 4096),
    Case("dense 8×512", 8, 512),
    Case("dense 8×512 after 3584", 8, 512, 3584),
)
SMOKE_CASES = (Case("dense smoke 2×48 after 20", 2, 48, 20, heads=4, kv_heads=2, head_dim=64),)


class Skipped(Exception):
    """An implementation that cannot express a case (a row saying why, not a failure)."""


def prefill_flops(rows: int, new: int, cached: int, heads: int, head_dim: int) -> int:
    """Matmul FLOPs of causal prefill: QK^T and PV over the keys each query token sees (cached + i + 1)."""
    visible = rows * (new * cached + new * (new + 1) // 2)
    return 4 * visible * heads * head_dim


def bottom_right_mask(new: int, keys: int):
    """[new, keys] bool: query token i sees keys 0..keys - new + i."""
    return jnp.arange(keys)[None, :] <= jnp.arange(new)[:, None] + (keys - new)


def dense_inputs(case: Case, seed: int = 0):
    """Random bf16 q [B, T, N, H], k and v [B, S, K, H]."""
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(kq, (case.batch, case.new, case.heads, case.head_dim), jnp.bfloat16)
    kv_shape = (case.batch, case.keys, case.kv_heads, case.head_dim)
    return q, jax.random.normal(kk, kv_shape, jnp.bfloat16), jax.random.normal(kv, kv_shape, jnp.bfloat16)


@functools.partial(jax.jit, static_argnums=3)
def _reference(q, k, v, scale):
    mask = bottom_right_mask(q.shape[1], k.shape[1])[None, None]
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    return jax.nn.dot_product_attention(f32(q), f32(k), f32(v), mask=mask, scale=scale, implementation="xla")


def reference(q, k, v, scale: float):
    """Float32 attention with the bottom-right causal mask (full float32: the GPU's default is TF32)."""
    with jax.default_matmul_precision("highest"):
        return _reference(q, k, v, scale)


def jax_nn(case: Case, q, k, v, scale: float, *, implementation: str, explicit_mask: bool):
    """`jax.nn.dot_product_attention`: `is_causal` (its diagonal sits top left: right only without a prefix,
    the error column says), or the bottom-right mask passed explicitly (cuDNN then adds it as a bias)."""
    if explicit_mask:
        mask = bottom_right_mask(case.new, case.keys)[None, None]
        fn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, mask=mask, scale=scale, implementation=implementation))
        return fn, (q, k, v), "explicit bottom-right mask"
    fn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, scale=scale, is_causal=True, implementation=implementation))
    return fn, (q, k, v), "is_causal"


def mgpu(case: Case, q, k, v, scale: float, *, block_q: int, block_kv: int, steps: int):
    """JAX's Mosaic GPU flash attention (FA3-style: TMA, WGMMA, two compute warpgroups and a memory one).
    Its causal mask is the top-left one of equal query and key lengths, it has no softmax scale (q comes
    pre-scaled) and its shared-memory tiles are fp16 (q, k, v go in as fp16)."""
    from jax.experimental.pallas.ops.gpu import attention_mgpu

    if case.prefix:
        raise Skipped("attention_mgpu's causal mask needs as many keys as queries (no prefix)")
    config = attention_mgpu.TuningConfig(block_q=block_q, block_kv=block_kv, max_concurrent_steps=steps,
                                         causal=True)
    fn = jax.jit(functools.partial(attention_mgpu.attention, config=config))
    return fn, prefill_split.mgpu_operands(q, k, v, scale), f"block_q {block_q}, block_kv {block_kv}, {steps} stages, fp16"


def tokamax_mosaic(case: Case, q, k, v, scale: float):
    """tokamax's Mosaic GPU attention (its heuristic config); the prefix case as a causal mask shifted by
    the prefix (local window (S, prefix))."""
    try:
        import tokamax
    except ImportError as err:
        raise Skipped(f"tokamax is not importable here ({type(err).__name__}: {err})") from None
    if case.prefix:
        options = dict(local_window_size=(case.keys, case.prefix))
    else:
        options = dict(is_causal=True)
    fn = jax.jit(lambda q, k, v: tokamax.dot_product_attention(
        q, k, v, scale=scale, implementation="mosaic", **options))
    return fn, (q, k, v), f"tokamax {getattr(tokamax, '__version__', '?')}, heuristic config"


def cache_layout(case: Case, q, k, v):
    """The case's numbers as the token-level cache holds them: K/V [slots + 1 (rounded up to 8), K, H] with
    sequence b's keys at slots b·S.., a slot table [B, width], the packed queries [B·T, N, H], their
    positions and the rows' query starts and lengths."""
    slots = case.batch * case.keys
    rows = attention_mosaic.cache_rows(slots)
    pad = ((0, rows - slots), (0, 0), (0, 0))
    k_cache = jnp.pad(k.reshape(slots, case.kv_heads, case.head_dim), pad)
    v_cache = jnp.pad(v.reshape(slots, case.kv_heads, case.head_dim), pad)
    width = -(-case.keys // 64) * 64
    table = np.full((case.batch, width), slots, np.int32)  # past the keys: the scratch slot
    table[:, : case.keys] = np.arange(slots).reshape(case.batch, case.keys)
    n = case.batch * case.new
    positions = np.tile(np.arange(case.prefix, case.keys), case.batch).astype(np.int32)
    starts = np.arange(case.batch, dtype=np.int32) * case.new
    lens = np.full((case.batch,), case.new, np.int32)
    packed = q.reshape(n, case.heads, case.head_dim)
    return packed, k_cache, v_cache, jnp.asarray(positions), jnp.asarray(table), jnp.asarray(starts), jnp.asarray(lens)


def paged_prefill(impl: str, launch, interpret: bool, scale: float, q, k, v, positions, table, starts, lens,
                  scales: dict):
    """Our prefill kernel `impl` ("triton" or "mosaic") over the token-level cache: the jitted call (query
    blocks planned inside, as in a step) and its arguments."""
    n, heads, _ = q.shape
    group = heads // k.shape[1]
    if impl == "mosaic":
        block_q = attention_mosaic.ROWS // group
        fn = jax.jit(lambda q, k, v, p, t, st, ln: attention_mosaic.paged_attention(
            q, k, v, p, t, plan.ragged_blocks(st, ln, n, block_q), scale=scale))
        return fn, (q, k, v, positions, table, starts, lens)
    block_q = max(1, launch.rows // group)
    fn = jax.jit(lambda q, k, v, p, t, st, ln, s: attention_triton.paged_attention(
        q, k, v, p, t, plan.ragged_blocks(st, ln, n, block_q), scale=scale, block_q=block_q,
        block_k=launch.block_k, num_warps=launch.num_warps, num_stages=launch.num_stages,
        diagonal_mask=launch.diagonal_mask,
        interpret=interpret, dequant=launch.dequant, **s))
    return fn, (q, k, v, positions, table, starts, lens, scales)


def ours(case: Case, q, k, v, scale: float, *, impl: str, launch, interpret: bool, describe: Callable):
    """Our kernel through the cache (its output is the packed [B·T, N, H])."""
    packed, k_cache, v_cache, positions, table, starts, lens = cache_layout(case, q, k, v)
    launch = launch or attention_triton.PREFILL
    fn, args = paged_prefill(impl, launch, interpret, scale, packed, k_cache, v_cache, positions, table,
                             starts, lens, {})
    return fn, args, "through the cache" + ("" if impl == "mosaic" else ", " + describe(launch, decode=False))


def split(case: Case, q, k, v, scale: float, *, dense: Callable, label: str, gathered: bool, interpret: bool):
    """prefill_split.py: the chunk's own tokens through `dense`, the prefix through our Triton kernel over the
    cache (or, `gathered`, gathered from it into a dense array and through `dense` too), merged by
    log-sum-exp. The own K/V come as the step would hold them (sliced before the call)."""
    _, k_cache, v_cache, _, table, _, _ = cache_layout(case, q, k, v)
    prefix_lens = jnp.full((case.batch,), case.prefix, jnp.int32)
    fn = prefill_split.jitted(dense=dense, gathered_prefix=case.prefix if gathered else None, interpret=interpret)
    args = (q, k[:, case.prefix :], v[:, case.prefix :], k_cache, v_cache, prefix_lens, table)
    prefix = f"gathered, {label}" if gathered else "triton"
    return functools.partial(fn, scale=scale), args, f"own tokens: {label}, prefix: {prefix}"


def implementations(case: Case, smoke: bool, interpret: bool, describe: Callable) -> list[tuple[str, Callable]]:
    """(row label, builder(case, q, k, v, scale) → (fn, args, config)) for each implementation of a run;
    cuDNN with an explicit mask only where `is_causal` cannot say it (after a prefix)."""
    mine = functools.partial(ours, launch=None, interpret=interpret, describe=describe)
    found = [("triton", functools.partial(mine, impl="triton"))]
    if smoke:  # CPU stand-ins for cuDNN and attention_mgpu check the dense paths' plumbing (layout, mask, scale)
        found.append(("jax.nn xla", functools.partial(jax_nn, implementation="xla", explicit_mask=True)))
        return found + _splits(case, prefill_split.dense_reference, "plain JAX", interpret)
    found.append(("mosaic", functools.partial(mine, impl="mosaic")))
    found.append(("cudnn", functools.partial(jax_nn, implementation="cudnn", explicit_mask=False)))
    if case.prefix:
        found.append(("cudnn mask", functools.partial(jax_nn, implementation="cudnn", explicit_mask=True)))
    for block_q, block_kv, steps in MGPU_CONFIGS:
        found.append((f"attention_mgpu {block_kv}",
                      functools.partial(mgpu, block_q=block_q, block_kv=block_kv, steps=steps)))
    found.append(("tokamax mosaic", tokamax_mosaic))
    return found + _splits(case, prefill_split.dense_mgpu, "attention_mgpu 128", interpret)


def _splits(case: Case, dense: Callable, label: str, interpret: bool) -> list[tuple[str, Callable]]:
    """The `split` rows: prefix through our kernel; after a prefix also gathered through `dense`."""
    variants = (("split", False), ("split gathered", True)) if case.prefix else (("split", False),)
    return [(name, functools.partial(split, dense=dense, label=label, gathered=gathered, interpret=interpret))
            for name, gathered in variants]


def measure(bench, timed: Callable, case: Case, impl: str, build: Callable, inputs, expected, scale: float):
    """One row: build, check against the reference, time."""
    fn, args, config = build(case, *inputs, scale)
    out = jax.block_until_ready(fn(*args))
    err = float(jnp.max(jnp.abs(out.reshape(expected.shape).astype(jnp.float32) - expected)))
    config = f"{config}, err {err:.1e}" if err <= TOLERANCE else f"MISMATCH err {err:.1e}, {config}"
    seconds = timed(fn, args, repeats=5)
    flops = prefill_flops(case.batch, case.new, case.prefix, case.heads, case.head_dim)
    bench._row(case.name, impl, config, seconds, flops=flops)


def run(bench, timed: Callable, describe: Callable, smoke: bool = False):
    """Every case through every implementation, each guarded: a row per (case, implementation)."""
    for case in SMOKE_CASES if smoke else CASES:
        inputs = dense_inputs(case)
        scale = case.head_dim**-0.5
        expected = reference(*inputs, scale)
        for impl, build in implementations(case, smoke, bench.interpret, describe):
            try:
                measure(bench, timed, case, impl, build, inputs, expected, scale)
            except Skipped as why:
                bench.note(case.name, impl, "SKIPPED", str(why))
            except Exception as err:  # noqa: BLE001: report and go on to the next implementation
                bench.failed(case.name, impl, err)
    return bench
