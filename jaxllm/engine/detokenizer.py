"""Token ids → text for streaming: tokenizer loading (--tokenizer_mode), incremental decoding that holds back
incomplete UTF-8 at O(1) cost per token, and text-level stop-string matching."""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from tokenizers import Tokenizer, decoders

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase
# transformers (and torch through it: seconds) is imported where a tokenizer is loaded, not with this module:
# the engine core imports it while its weights load (jaxllm/engine/loading.py).

logger = logging.getLogger(__name__)

TOKENIZER_MODES = ("slow", "fast", "auto")
REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens kept as decoding context for the first generated tokens, so that they decode as they would
# after the whole prompt (a SentencePiece word-initial space is kept, not stripped as at the start of a text).
_CONTEXT_TOKENS = 6

_warned_no_slow: set[str] = set()


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def model_tokenizer(args) -> PreTrainedTokenizerBase | None:
    """The tokenizer of --model_dir as the flags ask (load_tokenizer), or None when the directory has none."""
    if not any((Path(args.model_dir) / name).is_file() for name in _TOKENIZER_FILES):
        return None
    return load_tokenizer(args.model_dir, args.tokenizer_mode, trust_remote_code=args.trust_remote_code)


def special_ids(tokenizer) -> frozenset[int]:
    """The tokenizer's special token ids (none for None or a tokenizer without them): the ids a generated
    token's `special` flag marks."""
    return frozenset(getattr(tokenizer, "all_special_ids", ()) or ())


def load_tokenizer(model_dir: str, mode: str = "slow", *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer in `model_dir` (local files only), as LightLLM's --tokenizer_mode asks: "slow" (Python),
    "fast" (Rust `tokenizers`; an error if the model has none) or "auto" (fast, else slow). When no slow
    tokenizer exists for the model (transformers 5 ships none for Llama/GPT-2/Qwen-style tokenizer.json models),
    "slow" falls back to the fast one and logs a warning, once per directory."""
    import transformers

    if mode not in TOKENIZER_MODES:
        raise ValueError(f"tokenizer_mode {mode!r} is not one of {', '.join(TOKENIZER_MODES)}")
    path = Path(model_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {model_dir} does not exist")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            str(path), use_fast=(mode != "slow"), local_files_only=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise OSError(f"no usable tokenizer in {model_dir} (tokenizer_mode {mode}): {err}") from err
    if mode == "fast" and not tokenizer.is_fast:
        raise ValueError(
            f"{model_dir} has no fast tokenizer (no tokenizer.json and none convertible); "
            "use --tokenizer_mode slow or auto"
        )
    if mode == "slow" and tokenizer.is_fast:
        key = str(path.resolve())
        if key not in _warned_no_slow:
            _warned_no_slow.add(key)
            logger.warning(
                "--tokenizer_mode slow: transformers %s has no slow tokenizer for %s (%s); using the fast one",
                transformers.__version__, model_dir, type(tokenizer).__name__,
            )
    return tokenizer


@dataclass(frozen=True)
class _VocabInfo:
    special: frozenset[int]   # ids dropped by skip_special_tokens
    added: dict[int, str]     # added-vocabulary ids → their literal text (special or not)
    backend: Tokenizer | None  # the Rust tokenizer that decode() calls, when its class adds nothing else
    bpe: bool                 # the backend's model is BPE (transformers then skips clean_up_tokenization)
    byte_level: bool          # the backend's decoder is a bare ByteLevel one


_vocab_cache: "weakref.WeakKeyDictionary[PreTrainedTokenizerBase, tuple[int, _VocabInfo]]" = weakref.WeakKeyDictionary()


def _vocab_info(tokenizer: PreTrainedTokenizerBase) -> _VocabInfo:
    """Special and added ids of `tokenizer`, computed once per tokenizer (and again if tokens are added)."""
    from transformers import PreTrainedTokenizerBase, TokenizersBackend

    size = len(tokenizer)
    cached = _vocab_cache.get(tokenizer)
    if cached is not None and cached[0] == size:
        return cached[1]
    special = set(tokenizer.all_special_ids)
    added = {}
    for token_id, token in tokenizer.added_tokens_decoder.items():
        added[token_id] = token.content
        if token.special:
            special.add(token_id)
    cls = type(tokenizer)
    backend = None
    if (isinstance(tokenizer, TokenizersBackend) and cls.decode is PreTrainedTokenizerBase.decode
            and cls._decode is TokenizersBackend._decode):
        backend = tokenizer.backend_tokenizer
    bpe = backend is not None and type(backend.model).__name__ == "BPE"
    byte_level = backend is not None and isinstance(backend.decoder, decoders.ByteLevel)
    info = _VocabInfo(frozenset(special), added, backend, bpe, byte_level)
    _vocab_cache[tokenizer] = (size, info)
    return info


def _decoder(tokenizer: PreTrainedTokenizerBase, vocab: _VocabInfo) -> tuple[Callable[[list[int]], str], bool]:
    """(`decode`, `byte_level`): `decode(ids)` is `tokenizer.decode(ids, skip_special_tokens=False)` for a list of
    ints. For a fast tokenizer whose class keeps transformers' decode, it is the Rust backend's decode plus the
    post-processing of TokenizersBackend._decode (clean_up_tokenization when asked for, except for BPE models
    unless forced): the same text without transformers' Python overhead per call (several times the Rust
    decode's own cost). `byte_level`: the text is the UTF-8 of the tokens' bytes and nothing else (a bare
    ByteLevel decoder: each token's bytes, whatever its neighbours, all read as one lossy UTF-8 string)."""
    if vocab.backend is None:
        return partial(tokenizer.decode, skip_special_tokens=False), False
    rust = partial(vocab.backend.decode, skip_special_tokens=False)
    cleanup = tokenizer.clean_up_tokenization_spaces and (
        not vocab.bpe or tokenizer.clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output
    )
    if cleanup:
        clean_up = tokenizer.clean_up_tokenization
        return (lambda ids: clean_up(rust(ids))), False
    return rust, vocab.byte_level


class IncrementalDetokenizer:
    """Decodes one request's generated tokens as they come, emitting only complete text.

    The text is that of `tokenizer.decode(prompt_ids + output_ids, skip_special_tokens=...)` past the prompt's
    text (the prompt's last tokens are decoding context, so a SentencePiece word-initial space survives). With
    `spaces_between_special_tokens` (LightLLM's and the slow HF tokenizers' rule) each added token (special or
    not, unless skipped) is a piece of its own and the output's non-empty pieces are joined with one space.

    Each token costs one or two decodes of a short window (one with a byte-level decoder): `_ids[:_read]` is
    text already emitted (kept as context), `_ids[_read:]` tokens not yet emitted; a window whose text ends in
    U+FFFD (an incomplete UTF-8 character split across byte-level tokens) is held back until a later token
    completes it, so text that ends incomplete at the finish is never emitted. Invalid bytes (not merely
    incomplete ones) come out as U+FFFD as decode() gives them, except that SentencePiece's ByteFallback
    decoder, which turns a whole run of byte tokens into U+FFFD when any is invalid, may blank fewer characters
    here than in a whole decode.
    Feed the tokens that belong in the text: the caller drops an eos it does not print.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_ids: Sequence[int],
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ):
        self._skip_special = skip_special_tokens
        self._spaces = spaces_between_special_tokens
        self._vocab = _vocab_info(tokenizer)
        self._decode_ids, self._byte_level = _decoder(tokenizer, self._vocab)
        context = [int(i) for i in prompt_ids if not self._skipped(int(i))]
        if self._spaces:
            # Pieces split at added tokens: the context is the prompt's last run of ordinary tokens.
            last_added = max((k for k, i in enumerate(context) if i in self._vocab.added), default=-1)
            context = context[last_added + 1:]
        self._ids: list[int] = context[-_CONTEXT_TOKENS:]
        self._read = len(self._ids)
        self._prefix_text = self._decode(self._ids)
        self._pieces = 0              # non-empty pieces emitted so far (spaces mode)
        self._run_has_text = False    # the current run of ordinary tokens has emitted text (spaces mode)
        self._chunks: list[str] = []
        self._text = ""

    @property
    def text(self) -> str:
        """All text emitted so far (the concatenation of add()'s results)."""
        if self._chunks:
            self._text += "".join(self._chunks)
            self._chunks.clear()
        return self._text

    def add(self, token_id: int) -> str:
        """Take one generated token; return the new complete text it produced ("" while held back or skipped)."""
        token_id = int(token_id)
        if self._skipped(token_id):
            return ""
        if self._spaces and token_id in self._vocab.added:
            out = self._run_text(self._pending_text())
            out += (" " if self._pieces else "") + self._vocab.added[token_id]
            self._pieces += 1
            self._ids, self._read, self._prefix_text = [], 0, ""
            self._run_has_text = False
            return self._emit(out)
        self._ids.append(token_id)
        new_text = self._decode_ids(self._ids)
        prefix_len = len(self._prefix_text)
        if len(new_text) <= prefix_len or new_text.endswith(REPLACEMENT_CHAR):
            return ""
        delta = new_text[prefix_len:]
        # What was just emitted becomes the context of the next window; older tokens are dropped.
        del self._ids[:self._read]
        self._read = len(self._ids)
        if self._byte_level and not self._prefix_text.endswith(REPLACEMENT_CHAR):
            # The context's bytes ended on a complete character, so lossy UTF-8 decoding restarted there:
            # the window's text is the context's text then the emitted tokens' own text, `delta`.
            self._prefix_text = delta
        else:
            self._prefix_text = self._decode(self._ids)
        return self._emit(self._run_text(delta))

    def _skipped(self, token_id: int) -> bool:
        return self._skip_special and token_id in self._vocab.special

    def _decode(self, ids: list[int]) -> str:
        return self._decode_ids(ids) if ids else ""

    def _pending_text(self) -> str:
        """The held-back text of the current run, as decoded (with U+FFFD for bytes that never completed)."""
        if len(self._ids) == self._read:
            return ""
        return self._decode(self._ids)[len(self._prefix_text):]

    def _run_text(self, delta: str) -> str:
        """`delta` of the current run, preceded by the separator when it opens a new piece (spaces mode)."""
        if not delta or not self._spaces:
            return delta
        if not self._run_has_text:
            self._run_has_text = True
            self._pieces += 1
            if self._pieces > 1:
                return " " + delta
        return delta

    def _emit(self, text: str) -> str:
        if text:
            self._chunks.append(text)
        return text


class StopMatcher:
    """Finds stop strings in streamed text: emits text as soon as it cannot be the start of a stop string, and
    stops at the first stop string to complete (the earliest end in the text), however the text was split
    into feeds. The stop text itself is returned, as LightLLM keeps it; empty stop strings are ignored."""

    def __init__(self, stop_strings: Sequence[str]):
        if isinstance(stop_strings, str):
            stop_strings = [stop_strings]
        self._stops = tuple(dict.fromkeys(s for s in stop_strings if s))
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> tuple[str, bool]:
        """Add generated text; return (text safe to emit now, whether a stop string was found)."""
        if self.stopped:
            return "", True
        buf = self._held + text
        best_end = -1
        for stop in self._stops:
            start = buf.find(stop)
            if start >= 0 and (best_end < 0 or start + len(stop) < best_end):
                best_end = start + len(stop)
        if best_end >= 0:
            self.stopped = True
            self._held = ""
            return buf[:best_end], True
        keep = self._partial_suffix_len(buf)
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep], False

    def flush(self) -> str:
        """At a finish without a stop string: the text still held back."""
        held, self._held = self._held, ""
        return held

    def _partial_suffix_len(self, buf: str) -> int:
        """Length of the longest suffix of `buf` that is a proper prefix of some stop string."""
        longest = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(buf)), longest, -1):
                if buf.endswith(stop[:k]):
                    longest = k
                    break
        return longest
