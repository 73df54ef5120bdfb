"""The checks a submission passes before it is queued (parameters, prompt lengths and vocabulary, group rules),
shared by the in-process engine and the engine client, which runs them in the frontend process so that an invalid
request fails at submit, before anything crosses to the engine core."""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxllm.engine.request import SamplingParams


def check_prompt(prompt_ids: list[int], params: SamplingParams, args) -> list[int]:
    """LightLLM's length checks: prompt vs --max_req_input_len (rejected, or truncated by
    --long_truncation_mode head | center), then prompt + max_new_tokens vs --max_req_total_len, then
    that total + 1 vs --max_total_token_num. Returns the prompt to run; raises ValueError."""
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    limit = args.max_req_input_len
    if len(prompt_ids) > limit:
        mode = args.long_truncation_mode
        if mode is None:
            raise ValueError(
                f"the prompt has {len(prompt_ids)} tokens, more than --max_req_input_len {limit}"
            )
        if mode == "head":
            prompt_ids = prompt_ids[len(prompt_ids) - limit :]
        elif mode == "center":
            tail = limit - limit // 2
            prompt_ids = prompt_ids[: limit // 2] + prompt_ids[len(prompt_ids) - tail :]
        else:
            raise ValueError(f"--long_truncation_mode {mode!r} is not one of None, head, center")
    total = len(prompt_ids) + params.max_new_tokens
    if total > args.max_req_total_len:
        raise ValueError(
            f"the prompt ({len(prompt_ids)} tokens) + max_new_tokens ({params.max_new_tokens}) = {total} "
            f"exceeds --max_req_total_len {args.max_req_total_len}"
        )
    if total + 1 > args.max_total_token_num:
        raise ValueError(
            f"the prompt + max_new_tokens + 1 = {total + 1} exceeds --max_total_token_num "
            f"{args.max_total_token_num}"
        )
    group_total = len(prompt_ids) + params.best_of * params.max_new_tokens
    if params.best_of > 1 and group_total + 1 > args.max_total_token_num:
        raise ValueError(
            f"the prompt + best_of × max_new_tokens + 1 = {group_total + 1} exceeds --max_total_token_num "
            f"{args.max_total_token_num}"
        )
    return list(prompt_ids)


@dataclasses.dataclass(frozen=True)
class SubmitRules:
    """What a submission is checked against: the flags, the model's vocabulary, its kind, its tokenizer."""

    args: Any  # ServerArgs
    vocab_size: int
    scoring: bool  # a reward model: prompts are scored, none generates
    has_tokenizer: bool

    def prompt(self, prompt_ids: list[int], params: SamplingParams) -> list[int]:
        """The prompt to run (truncated per --long_truncation_mode) or ValueError with the reason."""
        self._in_vocabulary(prompt_ids)
        return check_prompt(list(prompt_ids), params, self.args)

    def _in_vocabulary(self, ids: list[int], field: str = "") -> None:
        """ValueError naming the first of `ids` outside the vocabulary (`field`: the message's prefix)."""
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"{field}token id {bad[0]} is outside the vocabulary (size {self.vocab_size})")

    def sequence(self, prompt_ids: list[int], params: SamplingParams,
                 scoring: bool = False) -> tuple[list[int], SamplingParams]:
        """One sequence's checked prompt and normalised parameters; ValueError with the reason."""
        if scoring != self.scoring:
            raise ValueError("this engine serves a reward model: it scores prompts (submit_score), it does not "
                             "generate" if self.scoring else "this engine serves a generative model: it has no "
                             "score head to score prompts with (a reward model and --use_reward_model)")
        params = params.normalized()
        params.validate()
        self._in_vocabulary([k for k, _ in params.logit_bias], "logit_bias: ")
        if params.stop_sequences and not self.has_tokenizer:
            raise ValueError("stop_sequences: this engine has no tokenizer to match them")
        return self.prompt(prompt_ids, params), params

    def images(self, prompt_ids: list[int], params: SamplingParams, images: list, vision) -> tuple[list[int], tuple]:
        """A checked prompt with its placeholders expanded to its images' positions, and the images' spans
        (`image_stage.with_images`); ValueError for what cannot run: no vision tower (`vision`: the model
        config's, or None) or no --enable_multimodal, token healing, more distinct images than --cache_capacity,
        placeholders and images that differ in number, a prompt too long once its images are counted."""
        from jaxllm.engine.image_stage import with_images

        args = self.args
        if vision is None or not args.enable_multimodal:
            raise ValueError("multimodal_params.images: images need a vision-language model served with "
                             "--enable_multimodal" if vision is not None else
                             "multimodal_params.images: this model has no vision tower")
        if args.token_healing_mode:
            raise ValueError("multimodal_params.images: --token_healing_mode does not take images")
        distinct = len({image.digest for image in images})
        if distinct > args.cache_capacity:
            raise ValueError(f"multimodal_params.images: {distinct} distinct images are more than "
                             f"--cache_capacity ({args.cache_capacity})")
        ids, spans = with_images(prompt_ids, list(images), vision.image_token_id, self.vocab_size)
        if len(check_prompt(list(ids), params, args)) != len(ids):
            raise ValueError("a prompt with images is not truncated (--long_truncation_mode): it has "
                             f"{len(ids)} tokens with its images")
        return ids, spans

    def group(self, params: SamplingParams, request_ids: list | None) -> list:
        """The request ids of a best_of group (None each when not given); ValueError for what groups refuse."""
        count = params.best_of
        request_ids = request_ids or [None] * count
        if len(request_ids) != count:
            raise ValueError(f"{len(request_ids)} request ids for best_of {count}")
        if count > 1 and self.args.beam_mode and params.stop_sequences:
            raise ValueError("stop_sequences: not supported with --beam_mode (beams end at eos or max_new_tokens)")
        if count > 1 and self.args.beam_mode and params.guided is not None:
            raise ValueError(f"{params.guided.field}: constrained decoding is not supported with --beam_mode")
        return request_ids

    @staticmethod
    def singles(requests: list[tuple[list[int], SamplingParams, Any]]) -> None:
        """submit_many runs one sequence per request."""
        if any(params.best_of != 1 for _, params, _ in requests):
            raise ValueError("best_of: submit() and submit_many() run one sequence each; submit_group() runs best_of")
