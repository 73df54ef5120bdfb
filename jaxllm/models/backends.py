"""LightLLM's `--mode` list → the attention backend and the weight quantisation, resolved once at start-up:
Pallas kernels on the GPU, the plain-JAX reference on the CPU (bf16/fp16 or int8 KV either way). Under `--tp`
the kernels run per device under `shard_map`, split on the KV-head axis like the cache
(`jaxllm/parallel.py: kv_cache_spec`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from jaxllm.models.attention import (
    AttentionBackend, AttentionMetadata, AttentionSpec, ReferenceAttention, attend_traced_once, reference_options,
)
from jaxllm.models.quant import WEIGHT_MODES
from jaxllm.parallel import TP_AXIS
from kernels.pallas import (
    attention_mosaic, attention_triton, fresh_prefill, int8_dequant, latent_attention, plan, reference,
)

# LightLLM mode → what runs here. GQA grouping is always on (with MHA it is a group of one).
INT8_MODES = frozenset({"triton_int8kv", "ppl_int8kv"})
SPLIT_MODES = {  # mode → split-K policy of decode
    "triton_flashdecoding": "always",
    "triton_gqa_flashdecoding": "always",
    "triton_gqa_attention": "never",
    "ppl_fp16": "auto",
}
GPU_PLATFORMS = frozenset({"gpu", "cuda"})


@dataclasses.dataclass(frozen=True)
class ModeChoice:
    """What the `--mode` list asks of attention, and of the weights (a key of quant.WEIGHT_MODES or None)."""

    int8_kv: bool = False
    split: str = "auto"  # split-K policy of decode: "auto" | "always" | "never"
    weight_mode: str | None = None


def resolve_modes(modes: Sequence[str]) -> ModeChoice:
    """Validate LightLLM's `--mode` values; ValueError names the first one that cannot run."""
    int8_kv, split, weight_mode = False, None, None
    for mode in modes:
        if mode in WEIGHT_MODES:
            if weight_mode is not None and WEIGHT_MODES[weight_mode] != WEIGHT_MODES[mode]:
                raise ValueError(f"--mode {mode} conflicts with --mode {weight_mode} (one weight quantisation)")
            weight_mode = mode
        elif mode in INT8_MODES:
            int8_kv = True
        elif mode in SPLIT_MODES:
            wanted = SPLIT_MODES[mode]
            if split is not None and split != wanted and "auto" not in (split, wanted):
                raise ValueError(f"--mode {mode} conflicts with another --mode's split-K choice")
            if split in (None, "auto"):
                split = wanted
        else:
            raise ValueError(f"--mode {mode} is not supported yet (unknown mode)")
    return ModeChoice(int8_kv=int8_kv, split=split or "auto", weight_mode=weight_mode)


@dataclasses.dataclass(frozen=True)  # no fields: every instance is equal, so all share one jit cache entry
class ReferenceInt8Attention:
    """Plain-JAX attention over an int8 KV cache: (k_i8, v_i8, k_scale, v_scale) per layer."""

    name = "reference_int8"
    cost_follows_width = True

    def init_layer_cache(self, num_slots, kv_heads, head_dim, dtype):
        return _int8_cache(num_slots, kv_heads, head_dim)

    def write(self, layer_cache, k, v, meta):
        return reference.write_kv_int8(*layer_cache, k, v, meta.write_slots)

    def attend(self, q, layer_cache, meta, spec, alibi_slopes=None, fresh_kv=None):
        # Every key is read from the cache, where the step's own are already written (`fresh_kv` adds nothing).
        return attend_traced_once(self, q, layer_cache, meta, spec, alibi_slopes, None)

    def _attend(self, q, layer_cache, meta, spec, alibi_slopes, fresh_kv):
        options = reference_options(spec, alibi_slopes)
        if meta.decode_only:
            return reference.decode_attention_int8(
                q, *layer_cache, meta.slot_table, meta.context_lens, spec.scale, **options
            )
        return reference.paged_attention_int8(
            q, *layer_cache, meta.token_req, meta.positions, meta.slot_table, spec.scale, **options
        )


def _int8_cache(num_slots, kv_heads, head_dim, paired: bool = False):
    # One extra scratch slot at the end for padded tokens; one float32 scale per token per head. `paired`: the
    # int8 rows stored as int16 pairs of columns (int8_dequant.py, "pairs"), the same bytes.
    data, dtype = ((num_slots + 1, kv_heads, head_dim // 2), jnp.int16) if paired else \
        ((num_slots + 1, kv_heads, head_dim), jnp.int8)
    scales = (num_slots + 1, kv_heads)
    return (jnp.zeros(data, dtype), jnp.zeros(data, dtype), jnp.zeros(scales, jnp.float32),
            jnp.zeros(scales, jnp.float32))


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Launch settings of the Triton-lowered kernel per step kind (defaults tuned on the H100, docs/perf.md).
    int8 caches: the decode launch's `dequant` picks the cache layout ("pairs": int16 pairs of columns, else
    int8), and every int8 launch runs `int8_dequant.for_cache` of its own mode over that layout."""

    decode: attention_triton.Launch | None = None  # None: attention_triton.decode_launch (table width, programs)
    # int8: the long-context launch (its dequant picks the cache layout); short tables as decode_launch says
    decode_int8: attention_triton.Launch = attention_triton.DECODE_INT8
    prefill: attention_triton.Launch = attention_triton.PREFILL
    prefill_int8: attention_triton.Launch = attention_triton.PREFILL_INT8
    # Latent attention (DeepSeek-V2), decode and prefill: not tuned on a GPU yet. rows: query rows per program
    # in prefill (tokens × the head block).
    latent: attention_triton.Launch = attention_triton.Launch(block_k=32, num_warps=4, num_stages=2, rows=32)


class PallasAttention:
    """The kernels (kernels/pallas) behind the AttentionBackend protocol; bf16/fp16 or int8 KV.

    `impl`: "triton" (kernels/pallas/attention_triton.py, any cache) or "mosaic"
    (attention_mosaic.py: bf16/fp16 caches only; int8 caches use the Triton kernel either way).
    Float caches get up to 7 extra rows past the scratch slot (a multiple of 8 rows, the Mosaic TMA tiling).
    """

    def __init__(
        self,
        int8_kv: bool = False,
        split: str = "auto",
        interpret: bool = False,
        mesh: Mesh | None = None,
        config: KernelConfig = KernelConfig(),
        impl: str = "triton",
    ):
        if impl not in ("triton", "mosaic"):
            raise ValueError(f"unknown kernel implementation {impl!r}")
        self.int8_kv, self.split, self.interpret, self.mesh, self.config = int8_kv, split, interpret, mesh, config
        self.impl = impl
        self.name = "pallas_int8" if int8_kv else f"pallas_{impl}"
        # The kernels loop over each row's own context; interpret mode visits the whole table.
        self.cost_follows_width = interpret

    def init_layer_cache(self, num_slots, kv_heads, head_dim, dtype):
        if self.int8_kv:
            return _int8_cache(num_slots, kv_heads, head_dim, self._paired(head_dim))
        shape = (attention_mosaic.cache_rows(num_slots), kv_heads, head_dim)
        return (jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    def write(self, layer_cache, k, v, meta):
        # An XLA scatter of n rows into the donated buffers: in place, fused with the quantisation.
        if self.int8_kv:
            pack = int8_dequant.as_pairs if int8_dequant.is_paired(layer_cache[0]) else None
            return reference.write_kv_int8(*layer_cache, k, v, meta.write_slots, pack=pack)
        return reference.write_kv(*layer_cache, k, v, meta.write_slots)

    def _paired(self, head_dim: int) -> bool:
        """Whether an int8 cache stores its rows as int16 pairs: when the decode launch runs "pairs"."""
        return self.config.decode_int8.dequant == "pairs" and int8_dequant.pairs_fit(head_dim)

    def attend(self, q, layer_cache, meta: AttentionMetadata, spec: AttentionSpec, alibi_slopes=None,
               fresh_kv=None):
        # Only an int8 cache's prefill reads them (fresh_prefill.py, rounded as the cache holds them).
        fresh_kv = fresh_kv if self.int8_kv and not meta.decode_only else None
        return attend_traced_once(self, q, layer_cache, meta, spec, alibi_slopes, fresh_kv)

    def _attend(self, q, layer_cache, meta: AttentionMetadata, spec: AttentionSpec, slopes, fresh_kv):
        mesh = self.mesh
        tp = mesh.shape[TP_AXIS] if mesh is not None and TP_AXIS in mesh.shape else 1
        if tp == 1:
            return self._attend_local(q, layer_cache, meta, spec, slopes, fresh_kv)
        kv_heads = layer_cache[0].shape[1]
        if kv_heads % tp:
            # KV heads replicated (fewer than devices): each device's query heads may straddle KV groups.
            return self._reference(q, layer_cache, meta, spec, slopes, fresh_kv)
        heads = PartitionSpec(None, TP_AXIS, None)
        cache_specs = tuple(cache_array_spec(a.ndim, TP_AXIS) for a in layer_cache)
        meta_specs = jax.tree.map(lambda _: PartitionSpec(), meta)
        slopes_spec = None if slopes is None else PartitionSpec(TP_AXIS)  # each device's heads' slopes
        fresh_spec = None if fresh_kv is None else (heads, heads)  # [n, kv_heads, head_dim], split as the cache
        local = jax.shard_map(
            lambda q, cache, meta, slopes, fresh: self._attend_local(q, cache, meta, spec, slopes, fresh),
            mesh=mesh,
            in_specs=(heads, cache_specs, meta_specs, slopes_spec, fresh_spec),
            out_specs=heads,
            check_vma=False,
        )
        return local(q, layer_cache, meta, slopes, fresh_kv)

    def attend_latent(self, q, cache, meta: AttentionMetadata, scale: float, kv_rank: int):
        """Latent attention (models/mla.py): the kernel (kernels/pallas/latent_attention.py) where its sizes
        fit, per device under --tp (query heads split, the one-row-per-token cache whole on every device)."""
        if not latent_attention.fits(kv_rank, q.shape[-1] - kv_rank):
            return ReferenceAttention.attend_latent(q, cache, meta, scale, kv_rank)
        return _jitted_latent(self, q, cache, meta, scale, kv_rank)

    def _latent(self, q, cache, meta: AttentionMetadata, scale: float, kv_rank: int):
        mesh = self.mesh
        if mesh is None or mesh.shape.get(TP_AXIS, 1) == 1:
            return self._latent_local(q, cache, meta, scale, kv_rank)
        heads = PartitionSpec(None, TP_AXIS, None)
        local = jax.shard_map(
            lambda q, cache, meta: self._latent_local(q, cache, meta, scale, kv_rank), mesh=mesh,
            in_specs=(heads, PartitionSpec(), jax.tree.map(lambda _: PartitionSpec(), meta)), out_specs=heads,
            check_vma=False,
        )
        return local(q, cache, meta)

    def _latent_local(self, q, cache, meta: AttentionMetadata, scale: float, kv_rank: int):
        n, heads, _ = q.shape
        rows, width = meta.slot_table.shape
        launch = self.config.latent
        head_block = plan.pow2_divisor(heads, latent_attention.HEAD_BLOCK, 1)
        if meta.decode_only:
            splits = plan.decode_splits(rows * (heads // head_block), width, launch.block_k, self.split)
            block_q, blocks = 1, plan.decode_blocks(rows)
        else:
            splits, block_q = 1, max(1, launch.rows // head_block)
            blocks = plan.ragged_blocks(meta.query_start, meta.query_lens, n, block_q)
        return latent_attention.latent_attention(
            q, cache, meta.positions, meta.slot_table, blocks, kv_rank=kv_rank, scale=scale, block_q=block_q,
            block_k=launch.block_k, splits=splits, head_block=head_block, num_warps=launch.num_warps,
            num_stages=launch.num_stages, interpret=self.interpret,
        )

    def _reference(self, q, layer_cache, meta, spec, slopes, fresh_kv):
        backend = ReferenceInt8Attention() if self.int8_kv else ReferenceAttention()
        if self.int8_kv and int8_dequant.is_paired(layer_cache[0]):  # a paired cache, unpacked (a copy)
            layer_cache = (*map(int8_dequant.from_pairs, layer_cache[:2]), *layer_cache[2:])
        return backend.attend(q, layer_cache, meta, spec, slopes, fresh_kv)

    def _attend_local(self, q, layer_cache, meta: AttentionMetadata, spec: AttentionSpec, slopes, fresh_kv):
        c = self.config
        scale = spec.scale
        n, heads, head_dim = q.shape
        kv_heads = layer_cache[0].shape[1]
        group = heads // kv_heads
        if self.int8_kv:
            k_cache, v_cache, k_scale, v_scale = layer_cache
        else:
            (k_cache, v_cache), k_scale, v_scale = layer_cache, None, None
        rows, width = meta.slot_table.shape
        if meta.decode_only and n != rows:
            raise ValueError(f"a decode-only step has one token per row: {n} tokens for {rows} rows")
        plain = spec.window is None and spec.softcap is None and slopes is None
        # The Mosaic kernel has no windows, soft-caps or ALiBi, and takes head dims of multiples of 64 only:
        # other layers run the Triton kernel.
        if self.impl == "mosaic" and not self.int8_kv and plain and head_dim % 64 == 0:
            block_k = attention_mosaic.BLOCK_K
            if meta.decode_only:
                splits = plan.decode_splits(rows * kv_heads, width, block_k, self.split)
                blocks = plan.decode_blocks(rows)
            else:
                splits = 1
                blocks = plan.ragged_blocks(meta.query_start, meta.query_lens, n, attention_mosaic.ROWS // group)
            return attention_mosaic.paged_attention(
                q, k_cache, v_cache, meta.positions, meta.slot_table, blocks, scale=scale, splits=splits
            )
        dequant = lambda launch: int8_dequant.for_cache(launch.dequant, int8_dequant.is_paired(k_cache))  # noqa: E731
        if fresh_kv is not None:  # an int8 cache's prefill: own tokens in 16 bits, the prefix int8
            return fresh_prefill.prefill_attention(
                q, *fresh_kv, k_cache, v_cache, k_scale, v_scale, meta.positions, meta.query_start,
                meta.query_lens, meta.slot_table, scale=scale, launch=c.prefill_int8, dequant=dequant(c.prefill_int8),
                window=spec.window, softcap=spec.softcap, alibi_slopes=slopes, interpret=self.interpret)
        if meta.decode_only:
            if self.int8_kv:
                launch = attention_triton.decode_launch(width, rows * kv_heads, c.decode_int8)
            else:
                launch = c.decode or attention_triton.decode_launch(width, rows * kv_heads)
            splits = plan.decode_splits(rows * kv_heads, width, launch.block_k, self.split)
            block_q, blocks, owns_all = 1, plan.decode_blocks(rows), True
        else:
            launch = c.prefill_int8 if self.int8_kv else c.prefill
            splits, block_q, owns_all = 1, max(1, launch.rows // group), False
            blocks = plan.ragged_blocks(meta.query_start, meta.query_lens, n, block_q)
        return attention_triton.paged_attention(
            q, k_cache, v_cache, meta.positions, meta.slot_table, blocks, scale=scale, block_q=block_q,
            k_scale=k_scale, v_scale=v_scale, block_k=launch.block_k, splits=splits, num_warps=launch.num_warps,
            num_stages=launch.num_stages, owns_all_tokens=owns_all, interpret=self.interpret,
            diagonal_mask=launch.diagonal_mask,
            window=spec.window, softcap=spec.softcap, alibi_slopes=slopes,
            dequant=dequant(launch),
        )


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _jitted_latent(backend: "PallasAttention", q, cache, meta: AttentionMetadata, scale: float, kv_rank: int):
    return backend._latent(q, cache, meta, scale, kv_rank)


def cache_array_spec(ndim: int, heads_axis: str | None) -> PartitionSpec:
    """How a per-layer cache array splits its KV heads over the mesh axis `heads_axis`: K/V rows [slots, kv_heads,
    ...] and an int8 cache's scales [slots, kv_heads] on axis 1; an array of fewer axes replicated. The one rule for
    the engine's placement (kv_cache.py) and the backend's shard_map."""
    if ndim < 2:
        return PartitionSpec()
    return PartitionSpec(None, heads_axis, *([None] * (ndim - 2)))


def cache_bytes_per_slot(backend: AttentionBackend, kv_heads: int, head_dim: int, dtype) -> float:
    """Bytes one KV slot costs per layer in `backend`'s cache (int8: data + scales), for sizing the cache."""
    size = lambda slots: sum(  # noqa: E731
        a.size * a.dtype.itemsize
        for a in jax.eval_shape(lambda: backend.init_layer_cache(slots, kv_heads, head_dim, dtype))
    )
    return (size(1024 + 1023) - size(1023)) / 1024


def attention_backend(
    modes: Sequence[str], platform: str, interpret: bool = False, mesh: Mesh | None = None
) -> AttentionBackend:
    """The backend for LightLLM's `--mode` list on `platform` ("gpu"/"cuda" → Pallas kernels; other
    platforms → the plain-JAX reference, or the kernels in Pallas interpret mode when `interpret`).
    `mesh`: the `--tp` mesh, so the kernels run per device under shard_map. Raises ValueError for a mode
    that cannot run."""
    choice = resolve_modes(modes)
    if platform in GPU_PLATFORMS or interpret:
        return PallasAttention(int8_kv=choice.int8_kv, split=choice.split, interpret=interpret, mesh=mesh)
    return ReferenceInt8Attention() if choice.int8_kv else ReferenceAttention()
