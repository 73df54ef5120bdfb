"""Rotary position embedding: inverse frequencies of every scaling kind (linear, dynamic NTK, Llama-3, YaRN,
LongRoPE), partial rotary, M-RoPE (Qwen2-VL: sections of the frequencies rotate by a token's temporal, height
and width positions), the 2D rotary of vision towers, and the halves (Llama) or interleaved pairs (GPT-J,
Cohere) layouts.

Frequencies follow transformers' `modeling_rope_utils` in float32. Two kinds depend on the sequence length
there (dynamic NTK and LongRoPE pick their frequencies from the longest position of the whole batch); here a
token's frequencies depend on its own position only, so a key keeps the rotation it was cached with. Up to
the trained length both agree.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from jaxllm.config import Rope, RopeScaling


def _base_inv_freq(theta: float, dim: int) -> np.ndarray:
    return (1.0 / (np.float32(theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))).astype(np.float32)


def _llama3(inv_freq: np.ndarray, s: RopeScaling) -> np.ndarray:
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def _yarn(theta: float, dim: int, s: RopeScaling) -> tuple[np.ndarray, float]:
    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    factor = s.factor
    attention = s.attention_factor
    if attention is None:
        attention = mscale(factor, s.mscale) / mscale(factor, s.mscale_all_dim) if s.mscale and s.mscale_all_dim \
            else mscale(factor)

    def correction_dim(rotations):
        return dim * math.log(s.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    pos_freqs = np.float32(theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv.astype(np.float32), float(attention)


def _longrope_attention(s: RopeScaling) -> float:
    if s.attention_factor is not None:
        return float(s.attention_factor)
    factor = s.factor
    if factor <= 1.0:
        return 1.0
    return math.sqrt(1 + math.log(factor) / math.log(s.original_max_position_embeddings))


def cos_sin(rope: Rope, head_dim: int, positions):
    """cos, sin [n, rotary_dim // 2] float32 of each token's `positions` [n] (cos/sin already multiplied by
    the scaling's attention factor, as transformers does). An M-RoPE layer also takes `positions` [3, n]
    (temporal, height, width); given [n], every section rotates by the one position, as for text tokens."""
    dim = rope.rotary_dim or head_dim
    if positions.ndim == 2:
        return _mrope_cos_sin(rope, dim, positions)
    s = rope.scaling
    pos = positions.astype(jnp.float32)[:, None]  # [n, 1]
    attention = 1.0
    kind = s.kind if s is not None else "default"
    if kind == "dynamic":
        # The base grows with the token's own sequence length past the trained one.
        seq = jnp.maximum(pos + 1, s.original_max_position_embeddings)
        base = rope.theta * ((s.factor * seq / s.original_max_position_embeddings) - (s.factor - 1)) ** (dim / (dim - 2))
        exponents = jnp.asarray(np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
        angles = pos / base ** exponents[None, :]
    elif kind == "longrope":
        base = jnp.asarray(_base_inv_freq(rope.theta, dim))
        short = base / jnp.asarray(np.asarray(s.short_factor, np.float32))
        long = base / jnp.asarray(np.asarray(s.long_factor, np.float32))
        inv = jnp.where(pos + 1 > s.original_max_position_embeddings, long[None, :], short[None, :])
        angles = pos * inv
        attention = _longrope_attention(s)
    else:
        if kind == "yarn":
            inv, attention = _yarn(rope.theta, dim, s)
        else:
            inv = _base_inv_freq(rope.theta, dim)
            if kind == "linear":
                inv = inv / np.float32(s.factor)
            elif kind == "llama3":
                inv = _llama3(inv, s)
        angles = pos * jnp.asarray(inv)[None, :]
    return jnp.cos(angles) * attention, jnp.sin(angles) * attention


def _mrope_cos_sin(rope: Rope, dim: int, positions):
    """M-RoPE: frequency j rotates by the position row of its section (sections cycle through t, h, w)."""
    if not rope.mrope_section or rope.scaling is not None:
        raise ValueError("positions [3, n] need a rope with mrope_section and no rescaling")
    sections = np.asarray(rope.mrope_section)
    if sections.sum() != dim // 2:
        raise ValueError(f"mrope_section {rope.mrope_section} must sum to rotary_dim // 2 = {dim // 2}")
    row_of_freq = np.repeat(np.arange(len(sections)) % 3, sections)  # [dim // 2]
    pos = positions.astype(jnp.float32)[row_of_freq].T  # [n, dim // 2]
    angles = pos * jnp.asarray(_base_inv_freq(rope.theta, dim))[None, :]
    return jnp.cos(angles), jnp.sin(angles)


def axial_cos_sin(theta: float, head_dim: int, positions):
    """2D rotary of a vision tower (Qwen2-VL): cos, sin [n, head_dim // 2] of patch `positions` [n, 2] (row,
    column); the first half of the frequencies rotates by the row, the second by the column."""
    inv = jnp.asarray(_base_inv_freq(theta, head_dim // 2))  # [head_dim // 4]
    angles = positions.astype(jnp.float32)[:, :, None] * inv  # [n, 2, head_dim // 4]
    angles = angles.reshape(positions.shape[0], -1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x, cos, sin, interleaved: bool = False):
    """Rotate the first 2 * cos.shape[-1] dims of each head. x [n, heads, head_dim]; cos, sin [n, dim // 2].

    Written as elementwise products with the pair's other member (a reversal of the pair axis), not as a
    concatenation of the two halves: XLA fuses this into the ops around it, where a concatenation is a kernel of
    its own for q and one for k in every layer."""
    half = cos.shape[-1]
    rot = 2 * half
    x32 = x.astype(jnp.float32)
    x_rot = x32[..., :rot]
    # pairs (x1, x2) → (x1 c - x2 s, x2 c + x1 s): the pair axis is the last (interleaved) or the one before it
    pairs = x_rot.reshape(*x.shape[:-1], half, 2) if interleaved else x_rot.reshape(*x.shape[:-1], 2, half)
    c = cos[:, None, :, None] if interleaved else cos[:, None, None, :]
    s = sin[:, None, :, None] if interleaved else sin[:, None, None, :]
    sign = jnp.asarray([-1.0, 1.0], jnp.float32)  # the first member takes -x2 s, the second +x1 s
    sign = sign if interleaved else sign[:, None]
    swapped = jnp.flip(pairs, axis=-1 if interleaved else -2)
    rotated = (pairs * c + swapped * (s * sign)).reshape(x_rot.shape)
    if rot == x.shape[-1]:
        return rotated.astype(x.dtype)
    return jnp.concatenate([rotated, x32[..., rot:]], axis=-1).astype(x.dtype)
