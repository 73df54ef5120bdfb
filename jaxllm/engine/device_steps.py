"""The jitted device functions of a step: table updates + model + sampler (`step`), the sampler alone with
allowed-token masks (`sample_masked`, a constrained step's second call), table fills (`fill_tables`) and a
vision-language model's image encoding into its embedding buffer (`encode_images`).
They read only arrays: a step's inputs arrive packed (jaxllm.engine.step_inputs)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxllm.engine.request import MAX_TOP_LOGPROBS
from jaxllm.engine.sampler import sample
from jaxllm.engine.step_inputs import unpack
from jaxllm.models.attention import AttentionMetadata


def step(model, eos_ids, params, kv, last_tokens, words, image_slab, *, layout, width, decode_only,
         all_logits, penalties, sampling, top_logprobs, typical):
    """The jitted step: table updates, model, sampler. kv and last_tokens are donated. Returns (kv, last tokens,
    sampled, logprobs, prompt logprobs, top, logits) with top = (ids, logprobs) [R, K] (K = 1, zeros, unless
    asked), prompt logprobs = (logprob of each position's next prompt token [T],) and, with `all_logits` and
    `top_logprobs` both, each position's (ids, logprobs) [T, MAX_TOP_LOGPROBS] too, and the sampled rows' logits
    [R, V]: a step with constrained rows runs as the greedy step of its
    shape (compiled at start-up) and samples again from those logits with the rows' masks (`sample_masked`),
    so constrained decoding never meets a step it must compile.
    A reward model's step samples nothing: its scores [R, labels] come in place of the sampled ids.
    image_slab [rows + 1, hidden] (a vision-language model's image embeddings; None otherwise) replaces the
    embeddings of the tokens with an image row."""
    inp = unpack(words, layout)
    from_device = inp.token_src >= 0
    tokens = jnp.where(from_device, last_tokens[jnp.maximum(inp.token_src, 0)], inp.tokens)  # [T]
    token_kv_rows = inp.kv_rows[inp.token_row]  # [T]
    slot_table = kv.slot_table.at[token_kv_rows, inp.positions].set(inp.write_slots)
    token_table = kv.token_table.at[token_kv_rows, inp.positions].set(tokens)
    meta = AttentionMetadata(
        positions=inp.positions,
        token_req=inp.token_row,
        write_slots=inp.write_slots,
        slot_table=slot_table[inp.kv_rows, :width],  # [R, width]
        context_lens=inp.context_lens,
        query_start=inp.query_start,
        query_lens=inp.query_lens,
        logits_index=inp.logits_index,
        rope_positions=inp.rope_positions,
        decode_only=decode_only,
    )
    images = {}
    if image_slab is not None:
        images = dict(image_embeds=image_slab[jnp.maximum(inp.image_rows, 0)], image_mask=inp.image_rows >= 0)
    logits, layers = model.apply({"params": params}, tokens, meta, kv.layers, all_logits=all_logits, **images)
    if model.config.score_head is not None:  # a reward model: the rows' scores [R, labels], nothing sampled
        new_kv = kv.replace(layers=layers, slot_table=slot_table, token_table=token_table)
        return (new_kv, last_tokens, logits, jnp.zeros(logits.shape[:1], jnp.float32), jnp.zeros(tokens.shape), None,
                jnp.zeros((1, 1), jnp.float32))
    if all_logits:  # logits [T, V]: every position's next-token logprob, then the sampled rows
        all_lp = jax.nn.log_softmax(logits, axis=-1)
        prompt_lp = (jnp.take_along_axis(all_lp, inp.target_ids[:, None], axis=-1)[:, 0],)
        if top_logprobs:  # and each position's most likely next tokens (OpenAI's echo with logprobs)
            top_lp, top_ids = jax.lax.top_k(all_lp, MAX_TOP_LOGPROBS)
            prompt_lp += (top_ids, top_lp)
        logits = logits[inp.logits_index]
    else:
        prompt_lp = (jnp.zeros(tokens.shape, jnp.float32),)
    history = token_table[inp.kv_rows, :width]  # [R, width]
    new_kv = kv.replace(layers=layers, slot_table=slot_table, token_table=token_table)
    last, sampled, logprobs, top = sample_rows(eos_ids, last_tokens, logits, history, inp, None, penalties=penalties,
                                                sampling=sampling, top_logprobs=top_logprobs, typical=typical)
    return new_kv, last, sampled, logprobs, prompt_lp, top, logits


def sample_rows(eos_ids, last_tokens, logits, history, inp, mask, *, penalties, sampling, top_logprobs, typical):
    """The sampler over the rows' logits [R, V]: (last tokens, sampled [R], logprobs [R], top), top = (ids,
    logprobs) [R, MAX_TOP_LOGPROBS] when `top_logprobs`, else [R, 1] zeros."""
    sampled, logprobs, *top = sample(
        logits, inp.sampling, history, inp.context_lens, eos_ids, penalties=penalties, sampling=sampling,
        typical=typical, mask=mask, top_logprobs=MAX_TOP_LOGPROBS if top_logprobs else 0,
    )
    rows = sampled.shape[0]
    top_lp, top_ids = top[0] if top else (jnp.zeros((rows, 1), jnp.float32), jnp.zeros((rows, 1), jnp.int32))
    # Rows from last_base on: a prefill admitted while other requests decode keeps their tokens (below it) for
    # the decode after it, which is prepared before it launches (StepInputBuilder.carry_base).
    last = last_tokens.at[inp.last_base[0] + jnp.arange(rows)].set(sampled, mode="drop")
    return last, sampled, logprobs, (top_ids, top_lp)


def sample_masked(eos_ids, last_tokens, logits, token_table, words, mask, *, layout, width, penalties, sampling,
                  top_logprobs, typical):
    """The second call of a constrained step: the sampler over the model's logits [R, V] with each row's
    allowed-token mask [R, ceil(V / 32)] (token_table: the step's updated one, for penalties). last_tokens is
    donated."""
    inp = unpack(words, layout)
    history = token_table[inp.kv_rows, :width] if penalties else jnp.zeros((1,), jnp.int32)
    return sample_rows(eos_ids, last_tokens, logits, history, inp, mask, penalties=penalties, sampling=sampling,
                       top_logprobs=top_logprobs, typical=typical)


def encode_images(model, params, slab, inputs, rows, *, grid):
    """Run the vision encoder on an `EncodeBatch`'s inputs and write its embeddings [B, T, hidden] into the
    image buffer's rows [B, T] (padding outputs write the scratch row). slab is donated."""
    from jaxllm.models.transformer import CausalLM

    features = model.apply({"params": params}, *inputs, grid=grid, method=CausalLM.encode_images)
    return slab.at[rows.reshape(-1)].set(features.reshape(-1, slab.shape[-1]).astype(slab.dtype))


def fill_tables(kv, rows, positions, slots, tokens):
    """Point table rows at KV computed by earlier requests (prompt-cache prefixes). All args [F] i32."""
    return kv.replace(
        slot_table=kv.slot_table.at[rows, positions].set(slots),
        token_table=kv.token_table.at[rows, positions].set(tokens),
    )
