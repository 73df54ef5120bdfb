"""Grammars for constrained decoding through llguidance: a request's `Guided` spec → a matcher (each distinct
spec validated and compiled once, then copied per request) → a `GrammarConstraint` that fills each step's
allowed-token row and follows the sampled tokens."""

from __future__ import annotations

import json
import threading
from collections import OrderedDict

import llguidance
import llguidance.hf
import llguidance.numpy
import numpy as np

from jaxllm.engine.constraints import allow
from jaxllm.engine.request import Guided

_CACHE_SIZE = 256  # distinct compiled grammars kept
# llguidance's thread pool for a step's masks, made when first used: one call fills every row, releasing the
# GIL once. Per-row calls from 8 Python threads measured no clear gain on the H200 (docs/perf.md, session 7).
_EXECUTOR: llguidance.LLExecutor | None = None
# JSON as OpenAI's structured outputs write it: ", " and ": " between items, no other whitespace (free
# whitespace lets a sampled answer spend its tokens on blanks). A schema's "x-guidance" may override it.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def grammar_text(spec: Guided) -> str:
    """llguidance's grammar for a spec; ValueError("<field>: reason") for a malformed value."""
    kind, value = spec.kind, spec.value
    if kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
    if kind == "json_schema":
        try:
            schema = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{spec.field}: the JSON schema is not valid JSON: {exc}") from None
        if not isinstance(schema, (dict, bool)):
            raise ValueError(f"{spec.field}: a JSON schema must be an object")
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(value)
    if kind == "choice":
        choices = json.loads(value)
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
            raise ValueError(f"{spec.field}: expected a non-empty list of non-empty strings")
        alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)
        return llguidance.LLMatcher.grammar_from_lark(f"start: {alternatives}")
    if kind == "lark":
        return llguidance.LLMatcher.grammar_from_lark(value)
    raise ValueError(f"{spec.field}: unknown constraint kind {kind!r}")


class GrammarCompiler:
    """Owns the llguidance tokenizer (built on first use, ~1 s) and the cache of compiled grammars."""

    def __init__(self, tokenizer, eos_ids, mask_words: int):
        if tokenizer is None:
            raise ValueError("constrained decoding needs the model's tokenizer")
        self._hf_tokenizer = tokenizer
        self.eos_ids = tuple(eos_ids)
        self.mask_words = mask_words
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._cache: OrderedDict[tuple[str, str], llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()  # submit() runs on any thread

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        if self._tokenizer is None:
            # One end-of-sequence id for llguidance (versions before 1.9 take no list): the constraint itself
            # allows, and stops on, every id of the model's eos list once the grammar accepts.
            eos = self.eos_ids[0] if self.eos_ids else None
            self._tokenizer = llguidance.hf.from_tokenizer(_fast(self._hf_tokenizer), eos_token=eos)
        return self._tokenizer

    def constraint(self, spec: Guided) -> "GrammarConstraint":
        """A fresh constraint for one request; ValueError("<field>: reason") for an invalid grammar."""
        key = (spec.kind, spec.value)
        with self._lock:
            template = self._cache.get(key)
            if template is not None:
                self._cache.move_to_end(key)
            else:
                grammar = grammar_text(spec)
                is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
                if is_error:
                    raise ValueError(f"{spec.field}: invalid {spec.kind.replace('_', ' ')}: {messages[0].strip()}")
                template = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
                if template.is_error():
                    raise ValueError(f"{spec.field}: invalid {spec.kind.replace('_', ' ')}: {template.get_error()}")
                self._cache[key] = template
                if len(self._cache) > _CACHE_SIZE:
                    self._cache.popitem(last=False)
            return GrammarConstraint(template.deep_copy(), self.eos_ids, self.mask_words, self.tokenizer.vocab_size)


def _fast(tokenizer):
    """llguidance reads the Rust tokenizer: a slow tokenizer's fast twin from the same files."""
    if getattr(tokenizer, "is_fast", False):
        return tokenizer
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(tokenizer.name_or_path, use_fast=True, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ValueError(f"constrained decoding needs a fast tokenizer, none in {tokenizer.name_or_path}: {exc}") from None


class GrammarConstraint:
    """A request's grammar state: llguidance's matcher over its sampled tokens."""

    def __init__(self, matcher: llguidance.LLMatcher, eos_ids: tuple[int, ...], mask_words: int, vocab: int):
        """mask_words: the model's mask width; vocab: the tokenizer's size (llguidance's mask covers it)."""
        self._matcher = matcher
        self._eos_ids = eos_ids
        self._words = mask_words
        self._scratch = np.zeros((1, (vocab + 31) // 32), np.int32)
        # Kept here, not read from the matcher: the engine thread reads it while the mask thread may be filling
        # the matcher's next row (llguidance's matchers take one borrower at a time).
        self.complete = matcher.is_stopped()

    active = True

    def fill(self, row: np.ndarray) -> None:
        m = self._matcher
        row[:] = 0
        if m.is_error() or m.is_stopped():
            allow(row, self._eos_ids)
            return
        m.unsafe_compute_mask_ptr(self._scratch.ctypes.data, self._scratch.nbytes)
        n = min(self._words, self._scratch.shape[1])
        row[:n] = self._scratch[0, :n]
        if m.is_accepting():
            allow(row, self._eos_ids)

    @property
    def _live(self) -> bool:
        return not (self._matcher.is_error() or self._matcher.is_stopped())

    @staticmethod
    def fill_many(entries: list[tuple["GrammarConstraint", int]], mask: np.ndarray) -> None:
        """Several rows of a step's mask [rows, words] at once, in llguidance's threads. llguidance writes rows
        of the tokenizer's width, which is often narrower than the model's (a padded vocabulary): they are
        computed into a block of that width and copied in, the model's extra ids left disallowed."""
        global _EXECUTOR
        live = [(c, i) for c, i in entries if c._live]
        if live:
            if _EXECUTOR is None:
                _EXECUTOR = llguidance.LLExecutor()
            width = live[0][0]._scratch.shape[1]
            block = np.zeros((len(live), width), np.int32)
            llguidance.numpy.fill_next_token_bitmask_par(_EXECUTOR, [(c._matcher, k) for k, (c, _) in enumerate(live)],
                                                         block)
            rows = np.fromiter((i for _, i in live), np.int64, len(live))
            n = min(width, mask.shape[1])
            mask[rows, :n] = block[:, :n]
            mask[rows, n:] = 0
            for c, i in live:
                if c._matcher.is_accepting():
                    allow(mask[i], c._eos_ids)
        for c, i in entries:
            if not c._live:
                c.fill(mask[i])

    def advance(self, token: int) -> None:
        if token in self._eos_ids and (self._matcher.is_accepting() or self._matcher.is_stopped()):
            return
        accepted = self._matcher.consume_token(token)
        self.complete = self._matcher.is_stopped()
        if not accepted:
            raise ValueError(f"the grammar rejected token {token}: {self._matcher.get_error()}")
