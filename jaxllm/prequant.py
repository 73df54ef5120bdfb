"""Checkpoints quantised by other tools, read into our quantised weights without re-quantising: AWQ and GPTQ
int4 (`qweight` / `qzeros` / `scales`) into `Int4Weight`, FP8 (e4m3 `weight` + `weight_scale`) into
`Fp8Weight`.

`regroup` turns each quantised linear's tensors into one entry named like its 16-bit weight, whose value is
a dict of fields laid out as that 16-bit weight ([out, in], each scale repeated over its group), so that a
family's weight map (transposes, q/k/v fusion) applies to each field unchanged; `to_weight` then packs the
fields in our layout. Values are exact: int4 codes, zero points and scales, e4m3 bytes are carried over.
"""

from __future__ import annotations

from typing import Iterator

import ml_dtypes
import numpy as np

from jaxllm.models import quant

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ word holds output column 8c + AWQ_ORDER[i]
_INT4_SUFFIXES = (".qweight", ".qzeros", ".scales")


def regroup(tensors: Iterator[tuple[str, np.ndarray]], fmt: str, group_size: int) -> Iterator[tuple[str, object]]:
    """(name, array) → the same, except each quantised linear `X` comes out once as (`X.weight`, fields)."""
    parts: dict[str, dict[str, np.ndarray]] = {}
    needed = _INT4_SUFFIXES if fmt in ("awq", "gptq", "gptq_v2") else (".weight", ".weight_scale")
    for name, array in tensors:
        if fmt != "fp8" and name.endswith(".g_idx"):
            _check_trivial_g_idx(name, array, group_size)
            continue
        if fmt == "fp8" and name.endswith(".input_scale"):
            continue  # a static activation scale: we quantise activations per token at run time instead
        suffix = next((s for s in needed if name.endswith(s)), None)
        if suffix is None or (suffix == ".weight" and array.dtype != ml_dtypes.float8_e4m3fn):
            yield name, array
            continue
        prefix = name[: -len(suffix)]
        group = parts.setdefault(prefix, {})
        group[suffix] = array
        if len(group) == len(needed):
            del parts[prefix]
            yield prefix + ".weight", (_fp8_fields(group) if fmt == "fp8" else _int4_fields(group, fmt))
    if parts:
        prefix, group = next(iter(parts.items()))
        raise ValueError(f"quantised linear {prefix} lacks {sorted(set(needed) - set(group))}")


def unpack_rows(words: np.ndarray) -> np.ndarray:
    """int32 [r, c] → uint8 [8 r, c]: value j of each word (bits 4j..4j+3) becomes row 8 r + j (GPTQ qweight)."""
    shifts = (np.arange(8, dtype=np.uint32) * 4)[None, :, None]
    values = (words.astype(np.uint32)[:, None, :] >> shifts) & 0xF
    return values.reshape(-1, words.shape[1]).astype(np.uint8)


def unpack_columns(words: np.ndarray, order=tuple(range(8))) -> np.ndarray:
    """int32 [r, c] → uint8 [r, 8 c]: nibble i of word c becomes column 8 c + order[i] (GPTQ qzeros; AWQ's
    qweight and qzeros with AWQ_ORDER)."""
    shifts = (np.arange(8, dtype=np.uint32) * 4)[None, None, :]
    nibbles = (words.astype(np.uint32)[:, :, None] >> shifts) & 0xF  # [r, c, nibble]
    out = np.empty_like(nibbles)
    out[:, :, list(order)] = nibbles
    return out.reshape(words.shape[0], -1).astype(np.uint8)


def _int4_fields(group: dict[str, np.ndarray], fmt: str) -> dict[str, np.ndarray]:
    """AWQ / GPTQ tensors of one linear → codes, scales and zero points, each [out, in]."""
    qweight, qzeros, scales = group[".qweight"], group[".qzeros"], group[".scales"].astype(np.float32)
    if fmt == "awq":  # qweight [in, out / 8] packed along the output, in AWQ's nibble order
        codes = unpack_columns(qweight, AWQ_ORDER)
        zeros = unpack_columns(qzeros, AWQ_ORDER).astype(np.float32)
    else:  # GPTQ: qweight [in / 8, out] packed along the input; qzeros packed along the output
        codes = unpack_rows(qweight)
        zeros = unpack_columns(qzeros).astype(np.float32)
        if fmt == "gptq":  # the original GPTQ format stores each zero point minus one
            zeros = zeros + 1
    group_size = codes.shape[0] // scales.shape[0]
    expand = lambda a: np.repeat(a, group_size, axis=0).T  # noqa: E731  [in / g, out] → [out, in]
    return {"codes": codes.T, "scale": expand(scales), "zero": expand(zeros[:, : scales.shape[1]])}


def _fp8_fields(group: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """e4m3 weight [out, in] and its per-tensor or per-output-channel scale → data and scale, each [out, in]."""
    data = group[".weight"]
    scale = np.asarray(group[".weight_scale"], np.float32).reshape(-1)
    if scale.size not in (1, data.shape[0]):
        raise ValueError(f"an fp8 weight_scale of {scale.size} values for a [{data.shape[0]}, ...] weight "
                         "(block-wise scales are not supported)")
    return {"data": data, "scale": np.broadcast_to(np.resize(scale, data.shape[0])[:, None], data.shape)}


def _check_trivial_g_idx(name: str, g_idx: np.ndarray, group_size: int) -> None:
    if not np.array_equal(np.asarray(g_idx), np.arange(len(g_idx)) // group_size):
        raise ValueError(f"{name}: GPTQ act-order (desc_act) checkpoints are not supported")


def to_weight(fields: dict[str, np.ndarray], like):
    """Fields in the 16-bit weight's layout [*in, *out] (after the family's transform) → `like`'s quantised
    type, as host arrays."""
    axis = like.in_axes - 1  # int4 groups run along the last input axis
    if isinstance(like, quant.Int4Weight):
        group = like.group_size
        length = fields["codes"].shape[axis]
        firsts = np.arange(0, length, group)
        per_group = {k: np.take(fields[k], firsts, axis=axis) for k in ("scale", "zero")}
        for key, value in per_group.items():
            if not np.array_equal(np.repeat(value, group, axis=axis), fields[key]):
                raise ValueError(f"int4 {key}s vary within our groups of {group} inputs")
        return quant.Int4Weight(_pack_rows(fields["codes"], axis), per_group["scale"].astype(like.scale.dtype),
                                per_group["zero"].astype(like.zero.dtype), like.in_axes)
    if isinstance(like, quant.Fp8Weight):
        n_in = like.in_axes
        scale = fields["scale"][(0,) * n_in]  # [*out]: one per output channel
        data = np.transpose(fields["data"], tuple(range(n_in, fields["data"].ndim)) + tuple(range(n_in)))
        return quant.Fp8Weight(np.ascontiguousarray(data), np.asarray(scale, np.float32), like.in_axes)
    raise ValueError(f"a pre-quantised checkpoint cannot fill a {type(like).__name__}")


def _pack_rows(codes: np.ndarray, axis: int) -> np.ndarray:
    """Values 0..15 → int32, 8 consecutive along `axis` per word (value j in bits 4j)."""
    moved = np.moveaxis(codes.astype(np.uint32), axis, 0)
    eights = moved.reshape(moved.shape[0] // 8, 8, *moved.shape[1:])
    shifts = (np.arange(8, dtype=np.uint32) * 4).reshape(1, 8, *([1] * (moved.ndim - 1)))
    words = np.bitwise_or.reduce(eights << shifts, axis=1)
    return np.moveaxis(words.view(np.int32), 0, axis)
