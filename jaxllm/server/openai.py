"""OpenAI-compatible answers: /v1/chat/completions and /v1/completions (JSON and streamed chunks ending in
`data: [DONE]`), /v1/models; usage, finish_reason, logprobs, n/best_of, and matched stop strings dropped.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from typing import Any, AsyncIterator, Iterator

from quart import Response

from jaxllm.engine.request import TokenEvent
from jaxllm.server.errors import openai_error_body
from jaxllm.server.generation import Generation, Sequence
from jaxllm.server.guided import check_guided
from jaxllm.server.images import load_images
from jaxllm.server.jsonio import finite_logprob, json_response
from jaxllm.server.openai_request import OpenAIRequest, parse_chat, parse_completion
from jaxllm.server.sse import DONE, event, stream_response
from jaxllm.server.state import ServerState


def without_stop(text: str, last: TokenEvent) -> str:
    """OpenAI leaves a matched stop string out of the text (the engine's events keep it)."""
    stop = last.stop_sequence
    return text[: -len(stop)] if last.finished and stop and text.endswith(stop) else text


def finish_reason(last: TokenEvent) -> str:
    return "length" if last.finish_reason == "length" else "stop"


def _ends_with_eos(state: ServerState, e: TokenEvent, ignore_eos: bool) -> bool:
    return e.finished and e.finish_reason == "stop" and state.is_eos(e.token_id) and not ignore_eos


def _token_events(state: ServerState, seq: Sequence) -> list[TokenEvent]:
    """The tokens a client sees logprobs for: all but an eos that ended the sequence."""
    if _ends_with_eos(state, seq.last, seq.params.ignore_eos):
        return seq.events[:-1]
    return seq.events


def _chat_token(state: ServerState, token_id: int, logprob: float) -> dict:
    token = state.tokenizer.decode([token_id])
    return {"token": token, "logprob": finite_logprob(logprob), "bytes": list(token.encode("utf-8"))}


def _chat_logprob(state: ServerState, e: TokenEvent) -> dict:
    top = [_chat_token(state, t, lp) for t, lp in e.top_logprobs or ()]
    return {**_chat_token(state, e.token_id, e.logprob), "top_logprobs": top}


def _completion_top(state: ServerState, e: TokenEvent, token: str) -> dict:
    """The position's alternatives as {text: logprob}, most likely first (the chosen token alone when none
    were asked for); of two tokens with the same text, the more likely is kept."""
    if not e.top_logprobs:
        return {token: finite_logprob(e.logprob)}
    return _top_by_text(state, e.top_logprobs)


def _top_by_text(state: ServerState, alternatives) -> dict[str, float]:
    """(id, logprob) pairs, most likely first, as {text: logprob}; of two tokens with the same text, the first."""
    top: dict[str, float] = {}
    for token_id, logprob in alternatives:
        top.setdefault(state.tokenizer.decode([token_id]), finite_logprob(logprob))
    return top


def _prompt_logprobs(state: ServerState, prompt_ids: list[int], seq: Sequence, top_logprobs: int) -> dict:
    """The echoed prompt's share of a completion's logprobs: each prompt token with the logprob the model gave it
    after the tokens before it (none for the first) and, as for generated tokens, that position's `top_logprobs`
    most likely tokens (the token alone when none were asked for); text offsets from 0."""
    first = seq.events[0]
    given = [None] + [finite_logprob(next(iter(nxt.values()))) for _, nxt in first.prompt_logprobs or []]
    alternatives = [None] + list(first.prompt_top_logprobs or [])
    tokens, logprobs, tops, offsets, offset = [], [], [], [], 0
    for j, token_id in enumerate(prompt_ids):
        token = state.tokenizer.decode([token_id])
        logprob = given[j] if j < len(given) else None
        tokens.append(token)
        logprobs.append(logprob)
        if logprob is None:  # the first token's (given[0]) and any past what the engine scored
            tops.append(None)
        elif top_logprobs and j < len(alternatives):
            tops.append(_top_by_text(state, alternatives[j]))
        else:
            tops.append({token: logprob})
        offsets.append(offset)
        offset += len(token)
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}


def _completion_logprobs(state: ServerState, events: list[TokenEvent], offset: int) -> dict:
    tokens, logprobs, tops, offsets = [], [], [], []
    for e in events:
        token = state.tokenizer.decode([e.token_id])
        tokens.append(token)
        logprobs.append(finite_logprob(e.logprob))
        tops.append(_completion_top(state, e, token))
        offsets.append(offset)
        offset += len(e.text)
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}


def chosen(req: OpenAIRequest, sequences: list[Sequence]) -> list[tuple[int, Sequence]]:
    """(prompt index, sequence) of the choices returned: per prompt, the n of best_of samples with the
    highest mean logprob (all of them, in order, when best_of == n; beam search results come best first by
    that same score)."""
    best_of = req.params.best_of
    out = []
    for p in range(len(req.prompts)):
        group = sequences[p * best_of:(p + 1) * best_of]
        if best_of > req.n:
            group = sorted(group, key=lambda s: s.cumulative_logprob / len(s.events), reverse=True)[: req.n]
        out.extend((p, s) for s in group)
    return out


def usage(req: OpenAIRequest, completion_tokens: int) -> dict:
    prompt_tokens = sum(len(ids) for ids in req.prompts)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _envelope(kind: str, req: OpenAIRequest, rid: str, created: int, choices: list, **extra) -> dict:
    return {"id": rid, "object": kind, "created": created, "model": req.model, "choices": choices, **extra}


def chat_body(state: ServerState, req: OpenAIRequest, sequences: list[Sequence], rid: str, created: int) -> dict:
    choices, completion_tokens = [], 0
    for i, (_, seq) in enumerate(chosen(req, sequences)):
        completion_tokens += seq.last.count_output_tokens
        logprobs = None
        if req.logprobs:
            logprobs = {"content": [_chat_logprob(state, e) for e in _token_events(state, seq)]}
        message, finish = {"role": "assistant", "content": without_stop(seq.text, seq.last)}, finish_reason(seq.last)
        if req.tools is not None:
            message, finish = req.tools.message(message["content"], finish)
        choices.append({"index": i, "message": message, "logprobs": logprobs, "finish_reason": finish})
    return _envelope("chat.completion", req, rid, created, choices, usage=usage(req, completion_tokens))


def completion_body(state: ServerState, req: OpenAIRequest, sequences: list[Sequence], rid: str,
                    created: int) -> dict:
    choices, completion_tokens = [], 0
    for i, (p, seq) in enumerate(chosen(req, sequences)):
        completion_tokens += seq.last.count_output_tokens
        prefix = req.prompt_texts[p] if req.echo else ""
        logprobs = None
        if req.logprobs:
            logprobs = _completion_logprobs(state, _token_events(state, seq), len(prefix))
            if req.echo:
                echoed = _prompt_logprobs(state, req.prompts[p], seq, req.top_logprobs)
                logprobs = {key: echoed[key] + logprobs[key] for key in logprobs}
        choices.append({
            "index": i,
            "text": prefix + without_stop(seq.text, seq.last),
            "logprobs": logprobs,
            "finish_reason": finish_reason(seq.last),
        })
    return _envelope("text_completion", req, rid, created, choices, usage=usage(req, completion_tokens))


def _stream_chunks(state: ServerState, req: OpenAIRequest, batches: AsyncIterator, chat: bool, rid: str,
                   created: int) -> AsyncIterator[bytes]:
    """One chunk per token and choice (chat opens each choice with the assistant role), a last chunk per
    choice with its finish_reason, the usage chunk if asked, then [DONE]; the events of one batch (see
    Generation.batches) are written together."""
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(index: int, piece: str | None, *, logprobs=None, finish=None, role: bool = False,
              delta: dict | None = None) -> bytes:
        if chat:
            if delta is None:
                delta = {"role": "assistant", "content": ""} if role else {} if piece is None else {"content": piece}
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        else:
            choice = {"index": index, "text": piece or "", "logprobs": logprobs, "finish_reason": finish}
        usage_field = {"usage": None} if req.include_usage else {}  # as OpenAI: null until the last chunk
        return event(_envelope(kind, req, rid, created, [choice], **usage_field), space=True)

    async def chunks() -> AsyncIterator[bytes]:
        # Streams have best_of == n: choice i is sample i, of prompt i // n.
        offsets = [0] * (len(req.prompts) * req.n)
        tool_streams = [req.tools.stream() for _ in offsets] if chat and req.tools is not None else None
        for i in range(len(offsets)):
            if chat:
                yield chunk(i, None, role=True)
            elif req.echo:
                yield chunk(i, req.prompt_texts[i // req.n])
                offsets[i] = len(req.prompt_texts[i // req.n])
        completion_tokens = 0

        def token_chunks(i: int, e: TokenEvent) -> Iterator[bytes]:
            nonlocal completion_tokens
            logprobs = None
            if req.logprobs and not _ends_with_eos(state, e, req.params.ignore_eos):
                if chat:
                    logprobs = {"content": [_chat_logprob(state, e)]}
                else:
                    logprobs = _completion_logprobs(state, [e], offsets[i])
            offsets[i] += len(e.text)
            piece = without_stop(e.text, e)
            finish = finish_reason(e) if e.finished else None
            if tool_streams is not None:  # content and tool_calls deltas as the parser finds them
                deltas = tool_streams[i].feed(piece)
                if e.finished:
                    more, called = tool_streams[i].finish()
                    deltas += more
                    finish = "tool_calls" if called and finish == "stop" else finish
                for delta in deltas:
                    yield chunk(i, None, delta=delta)
            elif piece or logprobs is not None:
                yield chunk(i, piece, logprobs=logprobs)
            if e.finished:
                completion_tokens += e.count_output_tokens
                yield chunk(i, None, finish=finish)

        async with contextlib.aclosing(batches) as stream:
            async for batch in stream:
                out = b"".join(piece for i, e in batch for piece in token_chunks(i, e))
                if out:
                    yield out
        if req.include_usage:
            yield event(_envelope(kind, req, rid, created, [], usage=usage(req, completion_tokens)), space=True)
        yield DONE

    return chunks()


async def _answer(state: ServerState, body: Any, *, chat: bool) -> Response:
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    track, req = state.track_parsed(parse_chat if chat else parse_completion, state.engine, body)
    await track.guard(check_guided(state.engine, req.params.guided))
    images = await track.guard(load_images(state.engine, req.images))
    generation = Generation(state.engine, req.prompts, req.params, images=images)
    if req.stream:
        chunks = _stream_chunks(state, req, track.batches(generation), chat, rid, created)
        return stream_response(chunks, lambda err: event(openai_error_body(err), space=True))
    sequences = await track.collect(generation)
    build = chat_body if chat else completion_body
    return json_response(build(state, req, sequences, rid, created))


async def chat_completions(state: ServerState, body: Any) -> Response:
    return await _answer(state, body, chat=True)


async def completions(state: ServerState, body: Any) -> Response:
    return await _answer(state, body, chat=False)


def models(state: ServerState, created: int) -> dict:
    return {
        "object": "list",
        "data": [{
            "id": state.model_name,
            "object": "model",
            "created": created,
            "owned_by": "jaxllm",
            "max_model_len": state.args.max_req_total_len,
        }],
    }
