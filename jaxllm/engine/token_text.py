"""One request's generated text, token by token: the incremental detokenizer with LightLLM's eos rules
(print_eos_token; an eos printed despite skip_special_tokens). The engine makes the text of the rows whose text it
needs itself (stop strings end them, token healing cuts the text at the prompt's end, images expand the prompt);
behind the HTTP frontend every other row's text is made there (EngineClient), off the engine core's thread."""

from __future__ import annotations

from typing import Sequence

from jaxllm.engine.detokenizer import IncrementalDetokenizer


class TokenText:
    """The text of one request's generated tokens (`add`: the new complete text of one more token)."""

    def __init__(self, tokenizer, prompt_ids: Sequence[int], params, eos: frozenset, special: frozenset):
        self._tokenizer, self._eos, self._special = tokenizer, eos, special
        self._print_eos, self._skip_special = params.print_eos_token, params.skip_special_tokens
        self.detokenizer = IncrementalDetokenizer(
            tokenizer, prompt_ids, skip_special_tokens=params.skip_special_tokens,
            spaces_between_special_tokens=params.add_spaces_between_special_tokens,
        )

    def add(self, token: int) -> str:
        """The text `token` adds: "" for an eos unless print_eos_token, which prints it even when
        skip_special_tokens drops specials."""
        is_eos = token in self._eos
        if is_eos and not self._print_eos:
            return ""
        text = self.detokenizer.add(token)
        if is_eos and self._skip_special and token in self._special:
            text += self._tokenizer.decode([token], skip_special_tokens=False)
        return text


def text_needed_in_engine(req) -> bool:
    """Whether the engine must make req's text itself even when a frontend could: a stop string ends the request
    by its text, token healing cuts the text at the caller's prompt end, and an image prompt is expanded only in
    the engine."""
    return bool(req.params.stop_sequences) or req.healing is not None or bool(req.images)
