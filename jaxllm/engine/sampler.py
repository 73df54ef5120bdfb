"""Next-token sampling as a pure JAX function, jitted inside the step (no host sync), in LightLLM's order:
penalties → (OpenAI's logit_bias) → eos length penalty → min_new_tokens eos mask → allowed-token mask
(constrained rows) → temperature → softmax → top-p → top-k → (TGI's typical_p) → draw.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxllm.engine.request import Request

# float32 bit patterns of [0, 1] span fewer than 2**30 values: 30 halvings find the exact threshold.
_BISECTION_STEPS = 30
_EOS_MASK = -1000000.0  # LightLLM's value for an eos logit masked by min_new_tokens


@struct.dataclass
class SamplingBatch:
    """Per-row sampling parameters of one step, every field [rows]."""

    temperature: jax.Array  # f32
    top_p: jax.Array  # f32
    top_k: jax.Array  # i32, the vocabulary size for "no limit"
    repetition_penalty: jax.Array  # f32
    frequency_penalty: jax.Array  # f32
    presence_penalty: jax.Array  # f32
    decay_start: jax.Array  # i32: exponential_decay_length_penalty[0]
    decay_factor: jax.Array  # f32: exponential_decay_length_penalty[1]
    min_new_tokens: jax.Array  # i32
    prompt_len: jax.Array  # i32
    penalty_start: jax.Array  # i32: first position counted by the penalties (0 with input_penalty)
    typical_p: jax.Array  # f32: locally typical sampling's mass (1: off)
    seed: jax.Array  # u32 [rows, 2]: the request's 64-bit seed as two words
    # [rows, K] i32 and f32: each row's logit_bias (token ids, biases; padded with bias 0), None when no row has one
    bias_ids: jax.Array | None = None
    bias_values: jax.Array | None = None

    # Fields in order, for building the host arrays.
    FIELDS = (
        ("temperature", np.float32), ("top_p", np.float32), ("top_k", np.int32),
        ("repetition_penalty", np.float32), ("frequency_penalty", np.float32),
        ("presence_penalty", np.float32), ("decay_start", np.int32), ("decay_factor", np.float32),
        ("min_new_tokens", np.int32), ("prompt_len", np.int32), ("penalty_start", np.int32),
        ("typical_p", np.float32),
    )


def sampling_row(req: Request, vocab_size: int) -> tuple:
    """A request's values of SamplingBatch.FIELDS (without the seed)."""
    p = req.params
    start, factor = p.exponential_decay_length_penalty
    top_k = vocab_size if p.top_k == -1 else min(p.top_k, vocab_size)
    return (
        p.temperature, p.top_p, top_k, p.repetition_penalty, p.frequency_penalty, p.presence_penalty,
        start, factor, p.min_new_tokens, req.prompt_len, 0 if p.input_penalty else req.prompt_len, p.typical_p,
    )


# A padding row: greedy, no penalty, so it never turns on the costlier paths.
PADDING_ROW = (1.0, 1.0, 1, 1.0, 0.0, 0.0, 0, 1.0, 1, 0, 0, 1.0)


def seed_words(seed: int) -> tuple[int, int]:
    return seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF


def apply_penalties(logits, history, counted, repetition, frequency, presence):
    """LightLLM's penalties over each row's counted tokens.

    logits [R, V] f32; history [R, W] token ids; counted [R, W] bool (which history entries count);
    per-row penalties [R]. A token seen c > 0 times: logit → (logit > 0 ? logit / rep : logit × rep)
    − frequency × c − presence.
    """
    rows, vocab = logits.shape
    counts = jnp.zeros((rows, vocab), jnp.int32)
    counts = counts.at[jnp.arange(rows)[:, None], history].add(counted.astype(jnp.int32))
    rep = repetition[:, None]
    penalized = jnp.where(logits > 0, logits / rep, logits * rep)
    penalized = penalized - frequency[:, None] * counts - presence[:, None]
    return jnp.where(counts > 0, penalized, logits)


def apply_eos_rules(logits, out_len, decay_start, decay_factor, min_new_tokens, eos_ids):
    """Exponential decay length penalty on the eos logits, then eos masked before min_new_tokens.

    out_len [R]: tokens generated before the one being sampled.
    """
    eos = jnp.asarray(eos_ids, jnp.int32)
    eos_logits = logits[:, eos]  # [R, E]
    idx = jnp.maximum(out_len - decay_start, 0).astype(jnp.float32)
    scale = jnp.power(decay_factor, idx) - 1.0  # exactly 0 for the default factor 1.0
    eos_logits = eos_logits + jnp.abs(eos_logits) * scale[:, None]
    masked = (out_len < min_new_tokens - 1)[:, None]
    eos_logits = jnp.where(masked, _EOS_MASK, eos_logits)
    return logits.at[:, eos].set(eos_logits)


def apply_logit_bias(logits, ids, values):
    """Add each row's biases to its logits: ids and values [R, K] (padding: any id with bias 0)."""
    return logits.at[jnp.arange(logits.shape[0])[:, None], ids].add(values)


def apply_token_mask(logits, mask):
    """Disallowed tokens to -inf. mask [R, ceil(V / 32)] int32: bit (t % 32) of word t // 32 allows token t
    (llguidance's bitmask layout; an unconstrained row is all ones)."""
    ids = jnp.arange(logits.shape[-1], dtype=jnp.int32)
    words = mask[:, ids >> 5]  # [R, V]
    allowed = (jax.lax.shift_right_logical(words, jnp.broadcast_to(ids & 31, words.shape)) & 1).astype(bool)
    return jnp.where(allowed, logits, -jnp.inf)


def _mix32(x):
    """MurmurHash3's 32-bit finaliser: a bijection whose every output bit depends on every input bit."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def row_uniforms(seed, out_len):
    """One uniform in [0, 1) per row, a function of the request's seed [R, 2] (u32 words) and its output
    index [R] only: a seeded request draws the same numbers whatever batch it runs in."""
    h = _mix32(out_len.astype(jnp.uint32) + jnp.uint32(0x9E3779B9))
    h = _mix32(h ^ seed[:, 0])
    h = _mix32(h ^ _mix32(seed[:, 1] + jnp.uint32(0x7F4A7C15)))
    return (h >> 8).astype(jnp.float32) * (1.0 / (1 << 24))


def cut_mask(probs, top_p, top_k):
    """LightLLM's top-p then top-k cut as a mask [R, V], without sorting (no data-dependent control flow,
    so the step stays asynchronous on GPUs): a sorted token is kept while the mass of the more likely
    tokens is ≤ top_p and fewer than top_k are more likely. That holds exactly for the tokens whose
    probability is at least a per-row threshold, found by bisection on the float32 bit patterns of [0, 1].
    """

    def holds(tau):  # [R] → [R] bool: the condition for a token of probability tau
        above = probs > tau[:, None]
        mass = jnp.sum(jnp.where(above, probs, 0.0), axis=-1)
        return (mass <= top_p) & (jnp.sum(above, axis=-1) < top_k)

    rows = probs.shape[0]
    keep_all = holds(jnp.zeros(rows, jnp.float32))
    lo = jnp.zeros(rows, jnp.int32)  # holds(lo) is false (unless keep_all), holds(hi) is true
    hi = jnp.full(rows, jax.lax.bitcast_convert_type(jnp.float32(1.0), jnp.int32))
    threshold = jnp.where(keep_all, 0.0, _smallest_holding(holds, lo, hi, _BISECTION_STEPS))
    return probs >= threshold[:, None]


def _smallest_holding(holds, lo, hi, steps: int):
    """The smallest non-negative float32 [R] at which `holds` ([R] f32 → [R] bool, monotone) is true, between the
    bit patterns lo (false there) and hi (true there) [R] i32, after `steps` halvings: non-negative floats order
    as their bit patterns do."""
    for _ in range(steps):
        mid = lo + (hi - lo) // 2
        ok = holds(jax.lax.bitcast_convert_type(mid, jnp.float32))
        lo, hi = jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)
    return jax.lax.bitcast_convert_type(hi, jnp.float32)


def typical_mask(probs, mass):
    """Locally typical sampling's cut (transformers' TypicalLogitsWarper, TGI's typical_p) as a mask [R, V],
    without sorting: of probs [R, V] (any scale; zeros are cut tokens) renormalised, ordered by how far each
    token's surprisal is from the distribution's entropy, the fewest whose mass reaches `mass` [R], ties at the
    last distance kept; every token where that mass is not reached (mass 1). Those are the tokens whose distance
    is at most a per-row threshold: the smallest distance whose tokens reach the mass, found by bisection on the
    float32 bit patterns of the distances."""
    p = probs / jnp.sum(probs, axis=-1, keepdims=True)
    live = p > 0
    logp = jnp.log(jnp.where(live, p, 1.0))
    entropy = -jnp.sum(jnp.where(live, p * logp, 0.0), axis=-1, keepdims=True)
    distance = jnp.where(live, jnp.abs(-logp - entropy), jnp.inf)  # [R, V]

    def reaches(t):  # [R] → [R] bool: the tokens within that distance hold the mass
        return jnp.sum(jnp.where(distance <= t[:, None], p, 0.0), axis=-1) >= mass

    far = jnp.max(jnp.where(live, distance, 0.0), axis=-1)
    cut = (mass < 1.0) & reaches(far)
    hi = jax.lax.bitcast_convert_type(far, jnp.int32)
    lo = jnp.full_like(hi, -1)  # reaches(lo) is false, reaches(hi) true: 31 halvings span every pattern
    threshold = _smallest_holding(reaches, lo, hi, 31)
    return live & (~cut[:, None] | (distance <= threshold[:, None]))


def draw(probs, top_p, top_k, u, typical_p=None):
    """Token ids [R] drawn from probs [R, V] after the cuts (typical_p [R]: then the typical cut, when given), by
    inverse CDF in id order with the row's uniform u [R] (scaled by the kept mass, so no renormalisation)."""
    kept = jnp.where(cut_mask(probs, top_p, top_k), probs, 0.0)
    if typical_p is not None:
        kept = jnp.where(typical_mask(kept, typical_p), kept, 0.0)
    cum = jnp.cumsum(kept, axis=-1)
    choice = jnp.sum(cum <= (u * cum[:, -1])[:, None], axis=-1)
    return jnp.minimum(choice, probs.shape[-1] - 1).astype(jnp.int32)


def first_index_of(x, top):
    """x [R, V], top [R, 1] = each row's maximum → the first column holding it [R] int32: `jnp.argmax` reusing the
    maximum already reduced, so that over --tp's split vocabulary it costs one [R] all-reduce (argmax's partitioned
    form gathers (value, index) pairs: two collectives)."""
    cols = jnp.arange(x.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where(x == top, cols, x.shape[-1]), axis=-1)


def sample(logits, sb: SamplingBatch, history, context_lens, eos_ids: tuple[int, ...], *,
           penalties: bool = True, sampling: bool = True, typical: bool = False, mask=None, top_logprobs: int = 0):
    """Next tokens and their logprobs.

    logits [R, V] f32; history [R, W] token ids of each row's positions (W ≥ context_lens);
    context_lens [R]: positions already in the row (the sampled token goes at this position).
    Static switches, set by the caller from the rows' parameters: `penalties` (some row has one),
    `sampling` (some row is not greedy), `typical` (some sampled row has typical_p < 1); off, their work is left
    out of the compiled step.
    mask: None, or each row's allowed tokens (see apply_token_mask).
    Returns (token ids [R] int32, logprobs [R] f32): the log of the chosen token's probability after
    penalties and temperature, before the top-p / top-k cuts. With `top_logprobs` k > 0 (static), also
    (logprobs [R, k] f32, ids [R, k] i32) of each row's k most likely tokens in the same distribution, best
    first: the cost of a top-k is paid only by steps that ask.
    """
    out_len = context_lens - sb.prompt_len  # [R]
    if penalties:
        cols = jnp.arange(history.shape[-1])[None, :]
        counted = (cols >= sb.penalty_start[:, None]) & (cols < context_lens[:, None])  # [R, W]
        logits = apply_penalties(
            logits, history, counted, sb.repetition_penalty, sb.frequency_penalty, sb.presence_penalty
        )
    if sb.bias_ids is not None:
        logits = apply_logit_bias(logits, sb.bias_ids, sb.bias_values)
    if eos_ids:
        logits = apply_eos_rules(logits, out_len, sb.decay_start, sb.decay_factor, sb.min_new_tokens, eos_ids)
    if mask is not None:
        logits = apply_token_mask(logits, mask)
    scaled = logits / sb.temperature[:, None]  # [R, V]
    top = jnp.max(scaled, axis=-1, keepdims=True)  # [R, 1]
    log_total = jnp.log(jnp.sum(jnp.exp(scaled - top), axis=-1, keepdims=True))
    logprobs = scaled - top - log_total  # log-softmax
    tokens = first_index_of(scaled, top)  # the argmax
    if sampling:  # greedy rows (top_k 1) keep their argmax
        drawn = draw(jnp.exp(logprobs), sb.top_p, sb.top_k, row_uniforms(sb.seed, out_len),
                     sb.typical_p if typical else None)
        tokens = jnp.where(sb.top_k == 1, tokens, drawn)
        chosen = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    else:  # the argmax's logprob: (top - top) - log_total, without a lookup (over --tp's split vocabulary, a collective)
        chosen = -log_total[:, 0]
    if top_logprobs:
        return tokens, chosen, jax.lax.top_k(logprobs, top_logprobs)
    return tokens, chosen

