"""Quantised weights as pytree types, the schemes that make them, and quantise / dequantise.

A quantised weight is declared with its 16-bit twin's logical axes (the twin has input axes first, `in_axes`
of them, then output axes, after `lead_axes` leading axes of independent matrices: a MoE layer's experts, kept
first in every field and quantised each on its own), so it shards the same way under `--tp`:
- `Int8Weight`: int8 data stored output-major [*out, *in] (the integer tensor-core GEMMs want the inputs
  contiguous in both operands; XLA transposed [in, out] int8 weights every step), float32 scale per output
  channel [*out] (absmax / 127, round to nearest); `int8_activations` makes it w8a8 (activations quantised
  per token at run time).
- `Int4Weight`: unsigned int4 with a zero point in groups along the last input axis (w = (q - zero) * scale),
  8 consecutive inputs of that axis packed per int32 (input 8r + j in bits 4j of row r), input-major.
- `Fp8Weight`: float8 e4m3 data, output-major like int8, float32 scale per output channel (absmax / 448);
  activations e4m3 per token.
`jaxllm/models/qdot.py` multiplies activations by any of these or by a plain array.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from kernels.pallas import plan, reference

# LightLLM's weight modes (and our fp8 addition) → scheme name.
WEIGHT_MODES = {
    "triton_w8a16": "w8a16",
    "triton_w4a16": "w4a16",
    "lmdeploy_w4a16": "w4a16",
    "ppl_w4a16": "w4a16",
    "triton_w8a8": "w8a8",
    "ppl_w8a8": "w8a8",
    "ppl_w8a8_mixdown": "w8a8_mixdown",
    "fp8_w8a8": "fp8_w8a8",
}
SCHEMES = ("w8a16", "w4a16", "w8a8", "fp8_w8a8")
GROUP_SIZE = 128  # int4 inputs per scale / zero point (smaller where the input axis is not a multiple of it)


@dataclasses.dataclass(frozen=True)
class WeightQuant:
    """How a model's matmul weights are stored. `scheme`: one of SCHEMES; `group_size`: int4's group;
    `keep_16bit_down`: layers whose MLP down-projection stays 16-bit (ppl_w8a8_mixdown)."""

    scheme: str
    group_size: int = GROUP_SIZE
    keep_16bit_down: frozenset[int] = frozenset()
    checkpoint_format: str | None = None  # "awq" | "gptq" | "gptq_v2" | "fp8": read by jaxllm/prequant.py

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise ValueError(f"unknown weight quantisation {self.scheme!r} (choose {', '.join(SCHEMES)})")

    def quantises(self, layer: int | None, name: str) -> bool:
        """Whether the weight `name` of decoder layer `layer` is stored quantised."""
        return not (name == "down_proj" and layer in self.keep_16bit_down)

    @classmethod
    def from_mode(cls, mode: str, num_layers: int, mixdown: list[int] | None = None) -> "WeightQuant":
        """The scheme of a LightLLM `--mode`; `mixdown`: config.json's list for ppl_w8a8_mixdown (all
        layers when None)."""
        scheme = WEIGHT_MODES[mode]
        if scheme != "w8a8_mixdown":
            return cls(scheme)
        layers = range(num_layers) if mixdown is None else mixdown
        return cls("w8a8", keep_16bit_down=frozenset(int(i) for i in layers))


QUANT_METHOD = "jaxllm"  # config.json's quantization_config.quant_method of `tools.convert --quant` output


def checkpoint_quant(raw: dict) -> WeightQuant | None:
    """The weight quantisation a config.json's `quantization_config` says its checkpoint holds (None: 16-bit
    weights). ValueError for a quantisation method that cannot be loaded."""
    qc = raw.get("quantization_config")
    if not qc:
        return None
    method = qc.get("quant_method")
    if method == QUANT_METHOD:
        return WeightQuant(qc["scheme"], int(qc.get("group_size", GROUP_SIZE)),
                           frozenset(int(i) for i in qc.get("keep_16bit_down", ())))
    if method in ("awq", "gptq"):
        if qc.get("bits") != 4:
            raise ValueError(f"{method} checkpoints of {qc.get('bits')} bits are not supported (4 bits only)")
        if method == "awq" and (str(qc.get("version", "gemm")).lower() != "gemm" or not qc.get("zero_point", True)):
            raise ValueError("AWQ checkpoints other than version 'gemm' with zero points are not supported")
        if method == "gptq" and qc.get("desc_act"):
            raise ValueError("GPTQ act-order (desc_act) checkpoints are not supported")
        fmt = "gptq_v2" if qc.get("checkpoint_format") == "gptq_v2" else method
        return WeightQuant("w4a16", int(qc.get("group_size", GROUP_SIZE)), checkpoint_format=fmt)
    if method == "fp8":
        if qc.get("weight_block_size"):
            raise ValueError("FP8 checkpoints with block-wise weight scales are not supported")
        return WeightQuant("fp8_w8a8", checkpoint_format="fp8")
    raise ValueError(f"quantization_config.quant_method {method!r} is not supported yet")


def quantization_config(quant: WeightQuant) -> dict:
    """config.json's `quantization_config` for a checkpoint written with `quant` (read by checkpoint_quant)."""
    return {"quant_method": QUANT_METHOD, "scheme": quant.scheme, "group_size": quant.group_size,
            "keep_16bit_down": sorted(quant.keep_16bit_down)}


def with_weight_mode(config, weight_mode: str | None, raw: dict):
    """`config` (a ModelConfig) with the weights a `--mode` asks for (quantised at load). A checkpoint that
    is already quantised keeps its own layout, if it is the scheme asked for; ValueError otherwise."""
    if weight_mode is None:
        return config
    wanted = WeightQuant.from_mode(weight_mode, config.num_layers, raw.get("mixdown"))
    held = config.weight_quant
    if held is not None:
        if (held.scheme, held.keep_16bit_down) != (wanted.scheme, wanted.keep_16bit_down):
            raise ValueError(f"--mode {weight_mode} asks for {wanted.scheme} weights, but the checkpoint holds "
                             f"{held.scheme} weights")
        return config
    return dataclasses.replace(config, weight_quant=wanted)


class _OutputMajor:
    """Data stored [*lead, *out, *in] with a scale per output channel [*lead, *out] (Int8Weight, Fp8Weight)."""

    @property
    def shape(self) -> tuple[int, ...]:
        """The 16-bit twin's shape [*lead, *in, *out]."""
        lead, n_out = self.lead_axes, self.data.ndim - self.lead_axes - self.in_axes
        dims = self.data.shape
        return tuple(dims[:lead]) + tuple(dims[lead + n_out:]) + tuple(dims[lead:lead + n_out])

    def field_axes(self, axes):
        """Logical axes of each field, from the twin's."""
        lead, ins, outs = (tuple(a) for a in _split_axes(axes, self.lead_axes, self.in_axes))
        return {"data": lead + outs + ins, "scale": lead + outs}


def _split_axes(seq, lead_axes: int, in_axes: int):
    """A twin's axes (or dims) → (lead, inputs, outputs)."""
    return seq[:lead_axes], seq[lead_axes:lead_axes + in_axes], seq[lead_axes + in_axes:]


def _output_major(w, in_axes: int, lead_axes: int = 0):
    """[*lead, *in, *out] → [*lead, *out, *in]."""
    lead, ins, outs = _split_axes(tuple(range(w.ndim)), lead_axes, in_axes)
    return jnp.transpose(w, lead + outs + ins)


def _input_major(data, in_axes: int, lead_axes: int = 0):
    """[*lead, *out, *in] → [*lead, *in, *out]."""
    axes = tuple(range(data.ndim))
    n_out = data.ndim - lead_axes - in_axes
    return jnp.transpose(data, axes[:lead_axes] + axes[lead_axes + n_out:] + axes[lead_axes:lead_axes + n_out])


@struct.dataclass
class Int8Weight(_OutputMajor):
    data: jax.Array  # int8 [*lead, *out, *in]
    scale: jax.Array  # float32 [*lead, *out]
    in_axes: int = struct.field(pytree_node=False, default=1)
    int8_activations: bool = struct.field(pytree_node=False, default=False)
    lead_axes: int = struct.field(pytree_node=False, default=0)


@struct.dataclass
class Int4Weight:
    packed: jax.Array  # int32 [*lead, *in[:-1], last_in / 8, *out]
    scale: jax.Array  # model dtype [*lead, *in[:-1], last_in / group, *out]
    zero: jax.Array  # model dtype, like scale (integers 0..15)
    in_axes: int = struct.field(pytree_node=False, default=1)
    lead_axes: int = struct.field(pytree_node=False, default=0)

    @property
    def group_axis(self) -> int:
        """The last input axis, along which the groups run."""
        return self.lead_axes + self.in_axes - 1

    @property
    def group_size(self) -> int:
        return self.packed.shape[self.group_axis] * 8 // self.scale.shape[self.group_axis]

    @property
    def shape(self) -> tuple[int, ...]:
        shape = list(self.packed.shape)
        shape[self.group_axis] *= 8
        return tuple(shape)

    def field_axes(self, axes):
        return {"packed": axes, "scale": axes, "zero": axes}


@struct.dataclass
class Fp8Weight(_OutputMajor):
    data: jax.Array  # float8_e4m3fn [*lead, *out, *in]
    scale: jax.Array  # float32 [*lead, *out]
    in_axes: int = struct.field(pytree_node=False, default=1)
    lead_axes: int = struct.field(pytree_node=False, default=0)


QUANTISED_TYPES = (Int8Weight, Int4Weight, Fp8Weight)


def is_quantised(w) -> bool:
    return isinstance(w, QUANTISED_TYPES)


def group_size_for(last_in: int, wanted: int = GROUP_SIZE) -> int:
    """`wanted` if it divides the input axis, else the largest power of two (≥ 8) below it that does."""
    group = plan.pow2_divisor(last_in, wanted, 8)
    if group is None:
        raise ValueError(f"an int4 weight's input axis ({last_in}) must be a multiple of 8")
    return group


def _in_axes_tuple(in_axes: int, lead_axes: int = 0) -> tuple[int, ...]:
    return tuple(range(lead_axes, lead_axes + in_axes))


def quantize_int8(w, in_axes: int = 1, int8_activations: bool = False, lead_axes: int = 0) -> Int8Weight:
    """int8 per output channel: scale = absmax over the inputs / 127, round to nearest."""
    w32 = w.astype(jnp.float32)
    scale = jnp.max(jnp.abs(w32), axis=_in_axes_tuple(in_axes, lead_axes)) / 127.0  # [*lead, *out]
    safe = jnp.expand_dims(jnp.where(scale > 0, scale, 1.0), _in_axes_tuple(in_axes, lead_axes))
    data = jnp.clip(jnp.round(w32 / safe), -127, 127).astype(jnp.int8)
    return Int8Weight(_output_major(data, in_axes, lead_axes), scale, in_axes, int8_activations, lead_axes)


def quantize_fp8(w, in_axes: int = 1, lead_axes: int = 0) -> Fp8Weight:
    """float8 e4m3 per output channel: scale = absmax / 448."""
    w32 = w.astype(jnp.float32)
    scale = jnp.max(jnp.abs(w32), axis=_in_axes_tuple(in_axes, lead_axes)) / reference.FP8_MAX
    safe = jnp.expand_dims(jnp.where(scale > 0, scale, 1.0), _in_axes_tuple(in_axes, lead_axes))
    data = (w32 / safe).astype(jnp.float8_e4m3fn)
    return Fp8Weight(_output_major(data, in_axes, lead_axes), scale, in_axes, lead_axes)


def quantize_int4(w, in_axes: int = 1, group_size: int = GROUP_SIZE, scale_dtype=None,
                  lead_axes: int = 0) -> Int4Weight:
    """Asymmetric int4 in groups of `group_size` along the last input axis: scale = (max - min) / 15,
    zero = round(-min / scale), q = clip(round(w / scale) + zero, 0, 15)."""
    axis = lead_axes + in_axes - 1
    length = w.shape[axis]
    group = group_size_for(length, group_size)
    w32 = jnp.moveaxis(w.astype(jnp.float32), axis, 0)  # [L, ...]
    grouped = w32.reshape(length // group, group, *w32.shape[1:])
    lo = jnp.minimum(grouped.min(axis=1), 0.0)
    hi = jnp.maximum(grouped.max(axis=1), 0.0)
    scale = (hi - lo) / 15.0
    safe = jnp.where(scale > 0, scale, 1.0)
    zero = jnp.clip(jnp.round(-lo / safe), 0, 15)
    q = jnp.clip(jnp.round(grouped / safe[:, None]) + zero[:, None], 0, 15).astype(jnp.int32)
    packed = pack_int4(q.reshape(w32.shape), axis=0)
    dtype = scale_dtype or w.dtype
    move = lambda a: jnp.moveaxis(a, 0, axis)  # noqa: E731
    return Int4Weight(move(packed), move(scale).astype(dtype), move(zero).astype(dtype), in_axes, lead_axes)


def pack_int4(q, axis: int = 0):
    """Values 0..15 → int32, 8 consecutive along `axis` per word (value j of a word in bits 4j)."""
    q = jnp.moveaxis(q.astype(jnp.uint32), axis, 0)
    eights = q.reshape(q.shape[0] // 8, 8, *q.shape[1:])
    shifts = (jnp.arange(8, dtype=jnp.uint32) * 4).reshape(1, 8, *([1] * (q.ndim - 1)))
    words = jnp.sum(eights << shifts, axis=1, dtype=jnp.uint32)  # disjoint bits: the sum is an OR
    return jnp.moveaxis(jax.lax.bitcast_convert_type(words, jnp.int32), 0, axis)


def dequantize(w, dtype=jnp.float32):
    """Any weight → a plain array of its twin's layout in `dtype`."""
    if isinstance(w, (Int8Weight, Fp8Weight)):
        scale = jnp.expand_dims(w.scale, _in_axes_tuple(w.in_axes, w.lead_axes))
        return (_input_major(w.data, w.in_axes, w.lead_axes).astype(jnp.float32) * scale).astype(dtype)
    if isinstance(w, Int4Weight):
        axis = w.group_axis
        first = lambda a: jnp.moveaxis(a, axis, 0)  # noqa: E731
        packed, scale, zero = first(w.packed), first(w.scale), first(w.zero)
        flat = lambda a: a.reshape(a.shape[0], -1)  # noqa: E731
        full = reference.dequantize_int4(flat(packed), flat(scale), flat(zero))
        return jnp.moveaxis(full.reshape(packed.shape[0] * 8, *packed.shape[1:]), 0, axis).astype(dtype)
    return w.astype(dtype)


def quantize(w, quant: WeightQuant, in_axes: int = 1, lead_axes: int = 0):
    """A 16-bit weight → its quantised form under `quant`'s scheme."""
    if quant.scheme == "w8a16":
        return quantize_int8(w, in_axes, lead_axes=lead_axes)
    if quant.scheme == "w8a8":
        return quantize_int8(w, in_axes, int8_activations=True, lead_axes=lead_axes)
    if quant.scheme == "fp8_w8a8":
        return quantize_fp8(w, in_axes, lead_axes)
    return quantize_int4(w, in_axes, quant.group_size, lead_axes=lead_axes)


def quantize_like(w, like):
    """Quantise the 16-bit `w` into the type and shapes of `like` (a quantised weight or its abstract form):
    how loaders fill a param whose type the model declared."""
    if isinstance(like, Int8Weight):
        return quantize_int8(w, like.in_axes, like.int8_activations, like.lead_axes)
    if isinstance(like, Fp8Weight):
        return quantize_fp8(w, like.in_axes, like.lead_axes)
    if isinstance(like, Int4Weight):
        return quantize_int4(w, like.in_axes, like.group_size, like.scale.dtype, like.lead_axes)
    raise TypeError(f"{type(like).__name__} is not a quantised weight")


# Matmul weights stored quantised, by param name → how many leading axes are inputs. Embeddings and the
# LM head stay 16-bit (as in LightLLM's weight-only modes): a gather, and the logits' precision.
QUANTISED_WEIGHTS = {"qkv_proj": 1, "o_proj": 2, "gate_up_proj": 1, "up_proj": 1, "down_proj": 1}
# A MoE layer's stacked experts [experts, in, *out]: each expert quantised as its dense twin would be. The
# router stays 16-/32-bit (its family's dtype): it picks the experts, and it is small.
EXPERT_WEIGHTS = {"experts_gate_up_proj": 1, "experts_down_proj": 1}


def declared_quant(module, name: str) -> tuple[WeightQuant, int, int] | None:
    """(scheme, input axes, leading expert axes) when the Flax `module`'s weight `name` is declared quantised,
    else None: its config's `weight_quant` says the scheme, the param's path says which layer it belongs to."""
    quant = getattr(module.config, "weight_quant", None)
    if quant is None:
        return None
    if name in EXPERT_WEIGHTS:
        return quant, EXPERT_WEIGHTS[name], 1
    layer = next((int(p.split("_")[1]) for p in module.path if p.startswith("layers_")), None)
    return (quant, QUANTISED_WEIGHTS[name], 0) if name in QUANTISED_WEIGHTS and quant.quantises(layer, name) else None


def quantised_param(module, name, shape, axes, dtype, init, quant: WeightQuant, in_axes: int, lead_axes: int = 0):
    """Declare a quantised weight: random init is the 16-bit twin's init quantised; each field carries the
    logical axes that follow from the twin's `axes` (so it shards like the twin)."""
    from flax import linen as nn

    def init_quantised(key, shape, dtype):
        q = quantize(init(key, shape, jnp.float32).astype(dtype), quant, in_axes, lead_axes)
        return q.replace(**{f: nn.Partitioned(getattr(q, f), names) for f, names in q.field_axes(axes).items()})

    return module.param(name, init_quantised, shape, dtype)


def nbytes(params) -> int:
    """Bytes of every array in a params tree (quantised leaves counted as stored)."""
    return int(sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(params)))
