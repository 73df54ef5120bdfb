"""Shared Flax layers every family is assembled from: norms, attention over the KV cache (rotary, ALiBi or
learned positions, q/k norms, biases, soft-capping, sliding windows) and MLPs (gated or plain).

Each weight is declared once, with its logical axes; `jaxllm/parallel.py` maps those axes onto the mesh.
Every product with a weight goes through `dense`.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import ModelConfig
from jaxllm.models import qdot, quant, rope
from jaxllm.models.attention import AttentionBackend, AttentionMetadata, AttentionSpec
from jaxllm.models.normed import GatedRows, NormedRows, rms_normalise

_INIT = nn.initializers.normal(stddev=0.02)
_ZEROS = nn.initializers.zeros


def param(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str, ...], dtype, init=_INIT):
    """Declare one weight with its logical axes (for sharding, loading and random init alike); a matmul weight
    of a model whose config says `weight_quant` is declared in its quantised type (`jaxllm/models/quant.py`)."""
    declared = quant.declared_quant(module, name)
    if declared is not None:
        return quant.quantised_param(module, name, shape, axes, dtype, init, *declared)
    if module.has_variable("params", name):
        # Applying given weights: Flax's `param` would trace the initialiser (eval_shape) just to check the
        # shape, ~1/4 of a step's trace time; the same check, without the trace.
        value = nn.meta.unbox(module.get_variable("params", name))
        if value.shape != tuple(shape):
            raise ValueError(f"weight {'/'.join(module.path)}/{name} has shape {value.shape}, the model declares "
                             f"{tuple(shape)}")
        return value
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


_DENSE_TAP: contextvars.ContextVar = contextvars.ContextVar("dense_tap", default=None)


def dense_tap_active() -> bool:
    """Whether a `tap_dense_inputs` callback is watching this trace."""
    return _DENSE_TAP.get() is not None


@contextlib.contextmanager
def tap_dense_inputs(callback):
    """While active (at trace time), `callback(x, w)` sees every product's input and weight: what the offline
    calibration (`tools/convert/calibration.py`) measures."""
    token = _DENSE_TAP.set(callback)
    try:
        yield
    finally:
        _DENSE_TAP.reset(token)


def dense(x, w, equation: str, split_sum: bool = False):
    """The one product of activations with a weight (`einsum` spelled by the caller). A quantised weight's
    product contracts x's trailing axes with its leading ones, which every equation given one spells.
    `split_sum`: the contracted axis is the one --tp splits (a row-parallel product: attention's output, the MLP's
    down-projection), so the devices' partial sums are all-reduced; on several devices they stay float32 through
    the all-reduce and are rounded once after it, as one device rounds its float32 accumulator once, so that tp N
    gives tp 1's numbers (16-bit partial sums each rounded before the sum changed greedy answers within a few
    tokens). A quantised product's partial sums are float32 already. x may be `NormedRows` (a norm's rows before
    it is applied: `Norm(..., into_products=True)`) or `GatedRows` (a gated MLP's rows before act(gate) · up)."""
    tap = _DENSE_TAP.get()
    if isinstance(x, (NormedRows, GatedRows)) and (tap is not None or not quant.is_quantised(w)):
        x = x.value()  # only a quantised product may fold the step (qdot.dot)
    if tap is not None:
        tap(x, w)
    if quant.is_quantised(w):
        return qdot.dot(x, w)
    if split_sum and x.dtype.itemsize < 4 and not qdot.single_device():
        return jnp.einsum(equation, x, w, preferred_element_type=jnp.float32).astype(x.dtype)
    return jnp.einsum(equation, x, w)


def grouped_dense(x, w, group_sizes):
    """The product of rows grouped by expert with their expert's weight: x [m, in] (group g's rows
    contiguous, in group order), w [groups, in, out], group_sizes [groups] → [m, out]."""
    return jax.lax.ragged_dot(x, w, group_sizes)


_ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # CLIP's
}


def activation(name: str):
    if name not in _ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not supported ({', '.join(_ACTIVATIONS)})")
    return _ACTIVATIONS[name]


class Norm(nn.Module):
    """RMSNorm or LayerNorm over the last axis (with or without a bias; Gemma's weight stored as w - 1).
    `weight_shape` / `axes` default to the last axis (per-head q/k norms pass [heads, head_dim]); `bias`
    defaults to the config's."""

    config: ModelConfig
    dtype: Any
    weight_shape: tuple[int, ...] | None = None
    axes: tuple[str, ...] = ("norm",)
    bias: bool | None = None

    @nn.compact
    def __call__(self, x, into_products: bool = False):
        """The normalised x; `into_products`: the caller hands the result to products only (`dense`), so an RMS
        norm without a bias returns `NormedRows` (`jaxllm/models/normed.py`) for them to apply."""
        c = self.config
        shape = self.weight_shape or (x.shape[-1],)
        init = _ZEROS if c.norm_plus_one else nn.initializers.ones
        weight = param(self, "weight", shape, self.axes, self.dtype, init).astype(jnp.float32)
        if c.norm_plus_one:
            weight = 1.0 + weight
        if c.norm not in ("rms", "layer"):
            raise ValueError(f"norm {c.norm!r} is not supported")
        has_bias = c.norm_bias if self.bias is None else self.bias
        if into_products and c.norm == "rms" and not has_bias and x.ndim == 2:
            return NormedRows(x, weight, c.norm_eps, self.dtype)
        x32 = x.astype(jnp.float32)
        if c.norm == "layer":
            x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
        normed = rms_normalise(x32, weight, c.norm_eps)
        if has_bias:
            normed = normed + param(self, "bias", shape, self.axes, self.dtype, _ZEROS).astype(jnp.float32)
        return normed.astype(self.dtype)


def alibi_slopes(num_heads: int) -> np.ndarray:
    """ALiBi's per-head slopes [heads] (Press et al.; the non-power-of-two rule of Bloom and Baichuan)."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
    slopes = [base ** i for i in range(1, closest + 1)]
    if closest != num_heads:
        extra = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
        slopes += [extra ** i for i in range(1, 2 * (num_heads - closest), 2)]
    return np.asarray(slopes, np.float32)


def soft_cap(x, cap: float | None):
    return x if cap is None else cap * jnp.tanh(x / cap)


class Attention(nn.Module):
    config: ModelConfig
    layer: int
    dtype: Any
    backend: AttentionBackend

    @nn.compact
    def __call__(self, x, meta: AttentionMetadata, layer_cache):  # x [n, hidden]
        c = self.config
        n = x.shape[0]
        kv_heads, group, d = c.num_kv_heads, c.group_size, c.head_dim
        # q, k and v in one product (at batch 1 three small products cost twice one fused one). Heads are
        # grouped per KV head, [kv_heads, group + 2, head_dim], so splitting on KV heads keeps each
        # device's query heads with their own keys and values.
        wqkv = param(self, "qkv_proj", (c.hidden_size, kv_heads, group + 2, d),
                     ("embed", "kv_heads", "qkv", "head_dim"), self.dtype)
        qkv = dense(x, wqkv, "nd,dkjh->nkjh")  # [n, kv_heads, group + 2, head_dim]
        if c.qkv_bias:
            qkv = qkv + param(self, "qkv_bias", (kv_heads, group + 2, d), ("kv_heads", "qkv", "head_dim"),
                              self.dtype, _ZEROS)
        q = qkv[:, :, :group].reshape(n, c.num_heads, d)  # head h = kv * group + g, as in HF
        k, v = qkv[:, :, group], qkv[:, :, group + 1]  # [n, kv_heads, head_dim]
        q, k = self._qk_norm(q, k)
        if c.position == "rope":
            r = c.layer_rope(self.layer)
            positions = meta.positions if meta.rope_positions is None else meta.rope_positions
            cos, sin = rope.cos_sin(r, d, positions)
            q = rope.apply_rope(q, cos, sin, r.interleaved)
            k = rope.apply_rope(k, cos, sin, r.interleaved)
        spec = AttentionSpec(
            scale=c.attn_scale if c.attn_scale is not None else 1.0 / math.sqrt(d),
            window=c.layer_window(self.layer),
            softcap=c.attn_softcap,
        )
        slopes = jnp.asarray(alibi_slopes(c.num_heads)) if c.position == "alibi" else None
        layer_cache = self.backend.write(layer_cache, k, v, meta)
        out = self.backend.attend(q, layer_cache, meta, spec, slopes, fresh_kv=(k, v))  # [n, heads, d]
        wo = param(self, "o_proj", (c.num_heads, d, c.hidden_size), ("heads", "head_dim", "embed"), self.dtype)
        out = dense(out, wo, "nhk,hkd->nd", split_sum=True)
        if c.o_bias:
            out = out + param(self, "o_bias", (c.hidden_size,), ("norm",), self.dtype, _ZEROS)
        return out, layer_cache

    def _qk_norm(self, q, k):
        c = self.config
        if c.qk_norm is None:
            return q, k
        if c.qk_norm == "all":  # one norm over all heads' features (OLMo-2)
            n = q.shape[0]
            q = Norm(c, self.dtype, bias=False, name="q_norm")(q.reshape(n, -1)).reshape(q.shape)
            k = Norm(c, self.dtype, bias=False, name="k_norm")(k.reshape(n, -1)).reshape(k.shape)
            return q, k
        if c.qk_norm_per_head_weights:
            q_norm = Norm(c, self.dtype, (c.num_heads, c.head_dim), ("heads", "head_dim"), False, name="q_norm")
            k_norm = Norm(c, self.dtype, (c.num_kv_heads, c.head_dim), ("kv_heads", "head_dim"), False, name="k_norm")
        else:
            q_norm = Norm(c, self.dtype, axes=("head_dim",), bias=False, name="q_norm")
            k_norm = Norm(c, self.dtype, axes=("head_dim",), bias=False, name="k_norm")
        return q_norm(q), k_norm(k)


class MLP(nn.Module):
    """The dense MLP; `intermediate_size` overrides the config's (MoE shared experts)."""

    config: ModelConfig
    dtype: Any
    intermediate_size: int | None = None

    @nn.compact
    def __call__(self, x):  # x [n, hidden]
        c = self.config
        f = self.intermediate_size or c.intermediate_size
        act = activation(c.activation)
        if c.mlp_gated:
            # gate and up in one product: [hidden, 2, intermediate], split on the intermediate axis under --tp.
            gate_up = param(self, "gate_up_proj", (c.hidden_size, 2, f), ("embed", "stack", "mlp"),
                            self.dtype)
            h = dense(x, gate_up, "nd,dsf->nsf")  # [n, 2, intermediate]
            if c.mlp_bias:
                h = h + param(self, "gate_up_bias", (2, f), ("stack", "mlp"), self.dtype, _ZEROS)
            h = GatedRows(h, act)  # act(gate) · up: a per-token quantised product forms it itself
        else:
            up = param(self, "up_proj", (c.hidden_size, f), ("embed", "mlp"), self.dtype)
            h = dense(x, up, "nd,df->nf")
            if c.mlp_bias:
                h = h + param(self, "up_bias", (f,), ("mlp",), self.dtype, _ZEROS)
            h = act(h)
        down = param(self, "down_proj", (f, c.hidden_size), ("mlp", "embed"), self.dtype)
        out = dense(h, down, "nf,fd->nd", split_sum=True)
        if c.mlp_bias:
            out = out + param(self, "down_bias", (c.hidden_size,), ("norm",), self.dtype, _ZEROS)
        return out
