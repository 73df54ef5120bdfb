"""Token healing (--token_healing_mode, LightLLM's later rule): a prompt that ends mid-token is backed up over
its last tokens (up to 2), and the first generated tokens are held to vocabulary entries consistent with the
removed text (each extends what is left of it, or covers it) until it is covered again; then generation is free.
The allowed set comes from a prefix index of the vocabulary's decoded strings, built once per engine."""

from __future__ import annotations

import bisect

import numpy as np

from jaxllm.engine.constraints import allow
from jaxllm.engine.detokenizer import special_ids

MAX_BACKUP = 2  # prompt tokens backed up at most
_AFTER_ALL = "\U0010ffff"  # sorts after every string with the same prefix


class VocabularyIndex:
    """Each usable token's decoded string (specials, empty strings and partial UTF-8 left out), sorted, so
    that the tokens whose string starts with a text are one slice, and those whose string is a text, a lookup."""

    def __init__(self, tokenizer, vocab_size: int):
        special = special_ids(tokenizer)
        size = min(vocab_size, len(tokenizer))
        ids = [t for t in range(size) if t not in special]
        texts = tokenizer.batch_decode([[t] for t in ids], skip_special_tokens=False,
                                       clean_up_tokenization_spaces=False)
        # SentencePiece drops a lone token's leading space ("▁word" decodes to "word"): put it back.
        pieces = tokenizer.convert_ids_to_tokens(ids)
        texts = [" " + s if p.startswith("▁") and not s.startswith(" ") else s for s, p in zip(texts, pieces)]
        entries = sorted((s, t) for s, t in zip(texts, ids) if s and "\ufffd" not in s)
        self.strings = [s for s, _ in entries]
        self.ids = np.array([t for _, t in entries], np.int64)
        self.text_of = {t: s for s, t in entries}
        self.exact: dict[str, list[int]] = {}
        for s, t in entries:
            self.exact.setdefault(s, []).append(t)

    def starting_with(self, text: str) -> np.ndarray:
        lo = bisect.bisect_left(self.strings, text)
        hi = bisect.bisect_left(self.strings, text + _AFTER_ALL, lo)
        return self.ids[lo:hi]

    def consistent_with(self, text: str) -> np.ndarray:
        """Tokens whose string extends `text` (a prefix of it) or covers it (starts with it)."""
        prefixes = [t for n in range(1, len(text)) for t in self.exact.get(text[:n], ())]
        return np.concatenate([self.starting_with(text), np.asarray(prefixes, np.int64)])


def backup(index: VocabularyIndex, prompt_ids: list[int]) -> int:
    """How many of the prompt's last tokens to back up over: up to MAX_BACKUP, keeping at least one token,
    and only over tokens the index knows (a special or a partial character is never healed)."""
    k = 0
    while k < MAX_BACKUP and k + 1 < len(prompt_ids) and prompt_ids[-1 - k] in index.text_of:
        k += 1
    return k


class HealingConstraint:
    """A request's healing state: the removed text not yet covered by its generated tokens."""

    def __init__(self, index: VocabularyIndex, backed_up: int, removed_text: str):
        self._index = index
        self.backed_up = backed_up  # prompt tokens removed from the caller's prompt
        self.remaining = removed_text
        self.tokens_within_prompt = 0  # generated tokens that end inside the caller's prompt
        self._to_skip = len(removed_text)  # characters of the answer's text that repeat the caller's prompt

    complete = False

    @property
    def active(self) -> bool:
        return bool(self.remaining)

    def fill(self, row: np.ndarray) -> None:
        row[:] = 0
        allow(row, self._index.consistent_with(self.remaining))

    def skip_prompt_text(self, text: str) -> str:
        """The part of a generated text piece beyond the caller's prompt."""
        cut = min(self._to_skip, len(text))
        self._to_skip -= cut
        return text[cut:]

    def advance(self, token: int) -> None:
        text = self._index.text_of.get(token)
        if text is None or not (text.startswith(self.remaining) or self.remaining.startswith(text)):
            raise ValueError(f"token {token} does not continue the healed prompt text {self.remaining!r}")
        if len(text) <= len(self.remaining):
            self.tokens_within_prompt += 1
        self.remaining = self.remaining[len(text):] if self.remaining.startswith(text) else ""


class TokenHealer:
    """Owns the vocabulary index; heals one prompt at a time."""

    def __init__(self, tokenizer, vocab_size: int):
        if tokenizer is None:
            raise ValueError("--token_healing_mode needs the model's tokenizer")
        self.index = VocabularyIndex(tokenizer, vocab_size)

    def heal(self, prompt_ids: list[int]) -> tuple[list[int], HealingConstraint | None]:
        """The prompt to run and its constraint (None when nothing is backed up)."""
        k = backup(self.index, prompt_ids)
        if k == 0:
            return prompt_ids, None
        removed = "".join(self.index.text_of[t] for t in prompt_ids[-k:])
        return prompt_ids[:-k], HealingConstraint(self.index, k, removed)
