"""LightLLM's wire format: the /generate body (`inputs`, `parameters`, `multimodal_params`), its JSON answer
and the /generate_stream events, field by field as LightLLM's api_server writes them.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, AsyncIterator

from quart import Response

from jaxllm.engine.request import SamplingParams, TokenEvent
from jaxllm.server.errors import invalid, lightllm_error_body
from jaxllm.server.generation import Generation, Sequence, check_prompt
from jaxllm.server.images import ImageRef, check_placeholders, lightllm_images, load_images
from jaxllm.server.jsonio import finite_logprob, json_response
from jaxllm.server.sse import event, stream_response
from jaxllm.server.state import ServerState
from jaxllm.server.guided import GUIDED_CHECKS, check_guided, take_guided
from jaxllm.server.validation import LIGHTLLM_PARAMETERS, boolean, obj, read_fields, require, sampling_params, string


@dataclasses.dataclass
class GenerateRequest:
    """A generation request as the engine needs it, whatever the wire format it came in."""

    prompt: str
    prompt_ids: list[int]
    params: SamplingParams
    return_details: bool
    images: list[ImageRef] = dataclasses.field(default_factory=list)  # multimodal_params.images, not loaded yet


def prepare(state: ServerState, body: Any, *, stream: bool, fields: dict[str, Any], return_details: bool,
            truncate: int | None = None) -> GenerateRequest:
    """Shared tail of the LightLLM and TGI formats: build and validate the params, refuse best_of > 1 on a
    stream, read multimodal_params, tokenise, (TGI) truncate, then the engine's length checks and the images'
    placeholder count (the grammar is checked and the images loaded after: `check_guided`, `load_images`)."""
    prompt = body["inputs"]
    take_guided(fields)
    params = sampling_params(fields)
    if stream and params.best_of != 1:
        raise invalid("best_of: streaming requires best_of == 1", "best_of")
    images = lightllm_images(body)
    ids = state.tokenizer.encode(prompt)  # LightLLM's: special tokens as the tokenizer adds them
    if truncate is not None:
        ids = ids[-truncate:]
    ids = check_prompt(state.engine, ids, params)
    check_placeholders(state.engine, ids, images, "multimodal_params.images")
    return GenerateRequest(prompt, ids, params, return_details, images)


def parse(state: ServerState, body: Any, *, stream: bool) -> GenerateRequest:
    """LightLLM's validation order: body shape (422), parameter values (400), prompt lengths (400)."""
    body = obj("body", body)
    require(body, "inputs", string)
    parameters = dict(require(body, "parameters", obj))
    return_details = boolean("return_details", parameters.pop("return_details", False))
    fields = read_fields(parameters, {**LIGHTLLM_PARAMETERS, **GUIDED_CHECKS}, "parameters")
    fields["prompt_logprobs"] = state.args.return_all_prompt_logprobs and not stream  # streams do not carry them
    return prepare(state, body, stream=stream, fields=fields, return_details=return_details)


def token_dict(e: TokenEvent, *, prompt_tokens: bool = True) -> dict:
    """One generated token as LightLLM describes it (details and stream events)."""
    out = {
        "id": e.token_id,
        "text": e.text,
        "logprob": finite_logprob(e.logprob),
        "special": e.special,
        "count_output_tokens": e.count_output_tokens,
    }
    if prompt_tokens:
        out["prompt_tokens"] = e.prompt_tokens
    if e.cumlogprob is not None:  # --diverse_mode / --beam_mode, as LightLLM's group modes report
        out["cumlogprob"] = finite_logprob(e.cumlogprob)
    return out


def _one_or_list(values: list) -> Any:
    return values[0] if len(values) == 1 else values


def generate_body(req: GenerateRequest, sequences: list[Sequence], *, prompt_logprobs: bool) -> dict:
    """The /generate answer: lists for several sequences, a single value for one (generated_text always a list)."""
    body = {
        "generated_text": [s.text for s in sequences],
        "count_output_tokens": _one_or_list([s.last.count_output_tokens for s in sequences]),
        "finish_reason": _one_or_list([s.finish_reason for s in sequences]),
        "prompt_tokens": sequences[0].last.prompt_tokens,
    }
    if req.return_details:
        body["tokens"] = _one_or_list([[token_dict(e) for e in s.events] for s in sequences])
    if prompt_logprobs:
        body["prompt_token_ids"] = req.prompt_ids
        body["prompt_logprobs"] = sequences[0].prompt_logprobs
    return body


def stream_event(e: TokenEvent) -> dict:
    return {
        "token": token_dict(e),
        "generated_text": None,
        "finished": e.finished,
        "finish_reason": e.finish_reason if e.finished else None,
        "details": None,
    }


async def generate(state: ServerState, body: Any) -> Response:
    track, req = state.track_parsed(parse, state, body, stream=False)
    await track.guard(check_guided(state.engine, req.params.guided))
    images = await track.guard(load_images(state.engine, req.images))
    sequences = await track.collect(Generation(state.engine, [req.prompt_ids], req.params, images=images))
    return json_response(generate_body(req, sequences, prompt_logprobs=state.args.return_all_prompt_logprobs))


async def generate_stream(state: ServerState, body: Any) -> Response:
    track, req = state.track_parsed(parse, state, body, stream=True)
    await track.guard(check_guided(state.engine, req.params.guided))
    images = await track.guard(load_images(state.engine, req.images))
    generation = Generation(state.engine, [req.prompt_ids], req.params, images=images)

    async def chunks() -> AsyncIterator[bytes]:
        async with contextlib.aclosing(track.batches(generation)) as batches:
            async for batch in batches:
                yield b"".join(event(stream_event(e)) for _, e in batch)

    return stream_response(chunks(), lambda err: event(lightllm_error_body(err)))
