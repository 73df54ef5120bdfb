"""Hugging Face text-generation-inference's wire format (--use_tgi_api): TGI's `parameters` mapped onto ours,
/generate as a JSON list (best sequence first) with TGI's `details`, and TGI stream events.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
from typing import Any, AsyncIterator

from quart import Response

from jaxllm.engine.request import TokenEvent
from jaxllm.server.errors import invalid, tgi_error_body
from jaxllm.server.generation import SEED_LIMIT, Generation, Sequence
from jaxllm.server.jsonio import finite_logprob, json_response
from jaxllm.server.guided import GUIDED_CHECKS, check_guided, tgi_grammar
from jaxllm.server.images import load_images
from jaxllm.server.lightllm import GenerateRequest, prepare, token_dict
from jaxllm.server.sse import event, stream_response
from jaxllm.server.state import ServerState
from jaxllm.server.validation import (
    LIGHTLLM_PARAMETERS,
    boolean,
    integer,
    number,
    obj,
    read_fields,
    require,
    stop_strings,
    string,
)


def _null_only(name: str, value: Any) -> None:
    raise invalid(f"{name}: not supported by this server", name)


# TGI's launcher default for --max-top-n-tokens: the most alternatives a request may ask for per token.
MAX_TOP_N_TOKENS = 5

# TGI's names (its client sends every one, null meaning "default"), on top of LightLLM's, which pass too.
TGI_PARAMETERS = {
    **LIGHTLLM_PARAMETERS,
    "return_details": boolean,
    "details": boolean,
    "stop": stop_strings,
    "decoder_input_details": boolean,
    "return_full_text": boolean,
    "seed": integer,
    "truncate": integer,
    "typical_p": number,
    "watermark": boolean,
    "top_n_tokens": integer,
    **GUIDED_CHECKS,
    "grammar": tgi_grammar,
    "adapter_id": _null_only,
}


@dataclasses.dataclass
class TgiOptions:
    """What TGI asks for beyond the generation itself."""

    decoder_input_details: bool
    return_full_text: bool
    seeded: bool  # a seed was sent or chosen (sampling): report it in details


def _tgi_fields(parameters: dict) -> tuple[dict, TgiOptions, int | None]:
    """TGI's parameters → our sampling fields, TGI-only options and the truncate length (400/422 on bad ones)."""
    given = {k: v for k, v in parameters.items() if v is not None}  # TGI's null = default
    fields = read_fields(given, TGI_PARAMETERS, "parameters")
    if "details" in fields:
        fields.setdefault("return_details", fields.pop("details"))
    if "stop" in fields:
        fields.setdefault("stop_sequences", fields.pop("stop"))
    if fields.pop("watermark", False):
        raise invalid("watermark: watermarking is not supported", "watermark")
    top_n = fields.pop("top_n_tokens", 0)
    if not 0 <= top_n <= MAX_TOP_N_TOKENS:
        raise invalid(f"top_n_tokens: must be between 0 and {MAX_TOP_N_TOKENS}", "top_n_tokens")
    fields["top_logprobs"] = top_n
    truncate = fields.pop("truncate", None)
    if truncate is not None and truncate < 1:
        raise invalid("truncate: must be at least 1", "truncate")
    if fields.get("seed") is None and fields.get("do_sample", False):
        fields["seed"] = random.randrange(SEED_LIMIT)  # reported back, so the sample can be reproduced
    options = TgiOptions(
        decoder_input_details=fields.pop("decoder_input_details", False),
        return_full_text=fields.pop("return_full_text", False),
        seeded=fields.get("seed") is not None,
    )
    return fields, options, truncate


def parse(state: ServerState, body: Any, *, stream: bool) -> tuple[GenerateRequest, TgiOptions]:
    body = obj("body", body)
    require(body, "inputs", string)
    parameters = body.get("parameters")
    parameters = {} if parameters is None else obj("parameters", parameters)
    fields, options, truncate = _tgi_fields(parameters)
    return_details = fields.pop("return_details", False)
    # only /generate answers carry prompt logprobs (prefill, --return_all_prompt_logprobs)
    fields["prompt_logprobs"] = not stream and (state.args.return_all_prompt_logprobs or options.decoder_input_details)
    req = prepare(state, body, stream=stream, fields=fields, return_details=return_details, truncate=truncate)
    return req, options


def finish_reason(state: ServerState, req: GenerateRequest, last: TokenEvent) -> str:
    """TGI's finish reasons: length, eos_token or stop_sequence."""
    if last.finish_reason == "length":
        return "length"
    if state.is_eos(last.token_id) and not req.params.ignore_eos:
        return "eos_token"
    return "stop_sequence"


def prefill(state: ServerState, req: GenerateRequest, seq: Sequence) -> list[dict]:
    """TGI's decoder input details: each prompt token with the logprob the model gave it (none for the first)."""
    # prompt_logprobs[i] = [id_i, {"<id_i+1>": logprob of id_i+1}]: position p's logprob is in entry p - 1
    logprobs = [None] + [finite_logprob(next(iter(nxt.values()))) for _, nxt in seq.prompt_logprobs or []]
    logprobs += [None] * (len(req.prompt_ids) - len(logprobs))
    return [{"id": token_id, "text": state.tokenizer.decode([token_id]), "logprob": lp}
            for token_id, lp in zip(req.prompt_ids, logprobs)]


def _details(state: ServerState, req: GenerateRequest, opts: TgiOptions, seq: Sequence, prefill_tokens: list) -> dict:
    return {
        "finish_reason": finish_reason(state, req, seq.last),
        "generated_tokens": seq.last.count_output_tokens,
        "seed": seq.params.seed if opts.seeded else None,
        "prefill": prefill_tokens,
        "tokens": [token_dict(e, prompt_tokens=False) for e in seq.events],
        **({"top_tokens": [top_tokens(state, e) for e in seq.events]} if seq.params.top_logprobs else {}),
    }


def top_tokens(state: ServerState, e: TokenEvent) -> list[dict]:
    """top_n_tokens: the position's most likely tokens, best first, as TGI describes a token."""
    return [{"id": token_id, "text": state.tokenizer.decode([token_id]), "logprob": finite_logprob(logprob),
             "special": state.is_special(token_id)} for token_id, logprob in e.top_logprobs or ()]


def generate_body(state: ServerState, req: GenerateRequest, opts: TgiOptions, sequences: list[Sequence]) -> list:
    """TGI's answer: one object per sequence, the most likely first (beam search: the best score first, as the
    engine ranks them), whose details list the others."""
    ranked = sequences if state.args.beam_mode else sorted(sequences, key=lambda s: s.cumulative_logprob,
                                                           reverse=True)
    prefill_tokens = prefill(state, req, ranked[0]) if opts.decoder_input_details else []
    prefix = req.prompt if opts.return_full_text else ""
    out = []
    for seq in ranked:
        item = {
            "generated_text": prefix + seq.text,
            "count_output_tokens": seq.last.count_output_tokens,
            "finish_reason": seq.finish_reason,
        }
        if req.return_details:
            item["details"] = _details(state, req, opts, seq, prefill_tokens)
        if state.args.return_all_prompt_logprobs:
            item["prompt_token_ids"] = req.prompt_ids
            item["prompt_logprobs"] = seq.prompt_logprobs
        out.append(item)
    if req.return_details and len(out) > 1:
        others = [{"generated_text": o["generated_text"], **o["details"]} for o in out[1:]]
        out[0]["details"]["best_of_sequences"] = others
    return out


async def generate(state: ServerState, body: Any) -> Response:
    track, (req, opts) = state.track_parsed(parse, state, body, stream=False)
    await track.guard(check_guided(state.engine, req.params.guided))
    images = await track.guard(load_images(state.engine, req.images))
    sequences = await track.collect(Generation(state.engine, [req.prompt_ids], req.params, images=images))
    return json_response(generate_body(state, req, opts, sequences))


async def generate_stream(state: ServerState, body: Any) -> Response:
    track, (req, opts) = state.track_parsed(parse, state, body, stream=True)
    await track.guard(check_guided(state.engine, req.params.guided))
    images = await track.guard(load_images(state.engine, req.images))
    generation = Generation(state.engine, [req.prompt_ids], req.params, images=images)
    prefix = req.prompt if opts.return_full_text else ""

    pieces = []

    def chunk(e: TokenEvent) -> bytes:
        pieces.append(e.text)
        body = {
            "token": token_dict(e, prompt_tokens=False),
            **({"top_tokens": top_tokens(state, e)} if req.params.top_logprobs else {}),
            "generated_text": None,
            "finished": e.finished,
            "finish_reason": e.finish_reason if e.finished else None,
            "details": None,
        }
        if e.finished:
            body["generated_text"] = prefix + "".join(pieces)
            if req.return_details:
                body["details"] = {
                    "finish_reason": finish_reason(state, req, e),
                    "generated_tokens": e.count_output_tokens,
                    "seed": req.params.seed if opts.seeded else None,
                }
        return event(body)

    async def chunks() -> AsyncIterator[bytes]:
        async with contextlib.aclosing(track.batches(generation)) as batches:
            async for batch in batches:
                yield b"".join(chunk(e) for _, e in batch)

    return stream_response(chunks(), lambda err: event(tgi_error_body(err)))
