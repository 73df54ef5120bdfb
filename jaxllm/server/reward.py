"""LightLLM's /get_score for reward models (--use_reward_model): `{"chat": str}` → the score head's output at
the chat's last token, `{"score", "prompt_tokens", "finish_reason"}`; the chat is scored through the engine like
a prefill whose KV is freed after its step.
"""

from __future__ import annotations

from typing import Any

from quart import Response

from jaxllm.engine.request import SCORE_PARAMS
from jaxllm.server.errors import ApiError, invalid
from jaxllm.server.generation import Generation, check_prompt
from jaxllm.server.jsonio import json_response
from jaxllm.server.images import lightllm_images
from jaxllm.server.state import ServerState
from jaxllm.server.validation import obj


def parse(state: ServerState, body: Any) -> list[int]:
    """The chat's token ids (special tokens as the tokenizer adds them), after the engine's length checks;
    other keys are ignored, as LightLLM does (400 for a missing, empty or too long chat)."""
    body = obj("body", body)
    chat = body.get("chat")
    if not isinstance(chat, str) or not chat:
        raise invalid("chat: expected a non-empty string", "chat")
    if lightllm_images(body):  # the reward families served have no vision tower
        raise invalid("multimodal_params.images: /get_score scores text only", "multimodal_params.images")
    return check_prompt(state.engine, state.tokenizer.encode(chat), SCORE_PARAMS, "chat")


async def get_score(state: ServerState, body: Any) -> Response:
    if not state.args.use_reward_model:
        raise ApiError(400, "/get_score needs a reward model (--use_reward_model); this server runs a "
                            "generative model")
    track, ids = state.track_parsed(parse, state, body)
    (sequence,) = await track.collect(Generation(state.engine, [ids], SCORE_PARAMS, scoring=True))
    score = sequence.last.score  # prompt_tokens: the chat's, trailing padding (not run) included
    return json_response({"score": score[0] if len(score) == 1 else score, "prompt_tokens": len(ids),
                          "finish_reason": "stop"})
