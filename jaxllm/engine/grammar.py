"""Grammars for constrained decoding through llguidance, the mask worker's side (jaxllm.engine.mask_worker): a
request's grammar spec → llguidance's grammar text → a matcher (each distinct spec validated and compiled once,
then copied per request); a step's sampled tokens taken and its rows filled, all matchers at once in llguidance's
threads. It imports no JAX and no transformers; the frontend reads JSON_OPTIONS for tool-call grammars."""

from __future__ import annotations

import json
import os
from collections import OrderedDict

import llguidance
import llguidance.numpy
import numpy as np

from jaxllm.engine.constraints import allow

CACHE_SIZE = 256  # distinct compiled grammars kept
# JSON as OpenAI's structured outputs write it: ", " and ": " between items, no other whitespace (free
# whitespace lets a sampled answer spend its tokens on blanks). A schema's "x-guidance" may override it.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def grammar_text(kind: str, value: str, field: str) -> str:
    """llguidance's grammar for a spec (jaxllm.engine.request.Guided's kind, value and field); ValueError
    ("<field>: reason") for a malformed value."""
    if kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
    if kind == "json_schema":
        try:
            schema = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{field}: the JSON schema is not valid JSON: {exc}") from None
        if not isinstance(schema, (dict, bool)):
            raise ValueError(f"{field}: a JSON schema must be an object")
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(value)
    if kind == "choice":
        choices = json.loads(value)
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
            raise ValueError(f"{field}: expected a non-empty list of non-empty strings")
        alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)
        return llguidance.LLMatcher.grammar_from_lark(f"start: {alternatives}")
    if kind == "lark":
        return llguidance.LLMatcher.grammar_from_lark(value)
    raise ValueError(f"{field}: unknown constraint kind {kind!r}")


class GrammarCompiler:
    """The cache of compiled grammars over one llguidance tokenizer. A grammar's requests copy their matchers
    from up to `families` templates compiled apart, in turn: matchers copied from one template share its lexer,
    whose lazily built states sit behind one lock, so rows of one family fill one at a time even in llguidance's
    threads (64 rows of a JSON schema walked at random on the H200's host: 3.4–3.9 ms a step whatever the
    threads; 16 families on 8 threads: 1.9–2.0 ms; docs/perf.md, session 11)."""

    def __init__(self, tokenizer: llguidance.LLTokenizer, families: int = 1):
        self.tokenizer = tokenizer
        self.families = max(1, families)
        self._cache: OrderedDict[tuple[str, str], _Templates] = OrderedDict()

    def __len__(self) -> int:
        return len(self._cache)

    def matcher(self, kind: str, value: str, field: str) -> llguidance.LLMatcher:
        """A fresh matcher for one request; ValueError("<field>: reason") for an invalid grammar."""
        key = (kind, value)
        templates = self._cache.get(key)
        if templates is not None:
            self._cache.move_to_end(key)
        else:
            grammar = grammar_text(kind, value, field)
            is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
            if is_error:
                raise ValueError(f"{field}: invalid {kind.replace('_', ' ')}: {messages[0].strip()}")
            templates = _Templates(grammar)
            first = templates.add(self.tokenizer)
            if first.is_error():
                raise ValueError(f"{field}: invalid {kind.replace('_', ' ')}: {first.get_error()}")
            self._cache[key] = templates
            if len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return templates.next(self.tokenizer, self.families).deep_copy()


class _Templates:
    """One grammar's compiled templates (a family each), handed out in turn; a new family is compiled when the
    turn first reaches it, so a grammar of few requests costs one compile."""

    __slots__ = ("grammar", "compiled", "turn")

    def __init__(self, grammar: str):
        self.grammar, self.compiled, self.turn = grammar, [], 0

    def add(self, tokenizer: llguidance.LLTokenizer) -> llguidance.LLMatcher:
        self.compiled.append(llguidance.LLMatcher(tokenizer, self.grammar, log_level=0))
        return self.compiled[-1]

    def next(self, tokenizer: llguidance.LLTokenizer, families: int) -> llguidance.LLMatcher:
        k, self.turn = self.turn, (self.turn + 1) % families
        return self.compiled[k] if k < len(self.compiled) else self.add(tokenizer)


def take_token(matcher: llguidance.LLMatcher, token: int, eos_ids: tuple[int, ...]) -> str | None:
    """The matcher takes a sampled token; returns why it rejected it (None: taken). Any eos id ends a grammar
    that accepts (llguidance knows one eos id)."""
    if token in eos_ids and (matcher.is_accepting() or matcher.is_stopped()):
        return None
    if matcher.consume_token(token):
        return None
    return _rejection(matcher, token)


def _rejection(matcher: llguidance.LLMatcher, token: int) -> str:
    return f"the grammar rejected token {token}: {matcher.get_error()}"


def default_threads() -> int:
    """llguidance's pool by default: half the cores, 1 to 8 (the engine's own threads must find a core when the
    answers come back; on 2 cores a pool of 2 slowed the engine's wake-up, docs/perf.md)."""
    return max(1, min(8, (os.cpu_count() or 1) // 2))


class StepRows:
    """A step's constrained rows, all at once in llguidance's threads: the tokens they took (`take`), and their
    allowed-token rows filled into a block [rows, words] of the model's mask width (`fill`; llguidance writes
    the tokenizer's width, often narrower than the model's padded vocabulary, whose extra ids stay
    disallowed; a finished or failed grammar's row allows only the eos ids)."""

    def __init__(self, vocab: int, eos_ids: tuple[int, ...], threads: int | None = None):
        """threads: llguidance's pool (default: $JAXLLM_GRAMMAR_THREADS, else default_threads())."""
        self.eos_ids = eos_ids
        self.words = (vocab + 31) // 32  # llguidance's row width
        self.threads = threads or int(os.environ.get("JAXLLM_GRAMMAR_THREADS") or 0) or default_threads()
        self._executor = llguidance.LLExecutor(self.threads)

    def take(self, entries: list[tuple[llguidance.LLMatcher, int]]) -> list[str | None]:
        """Each matcher takes its token (take_token's rules); returns, per entry, why it was rejected."""
        answers: list[str | None] = [None] * len(entries)
        consuming = [k for k, (m, token) in enumerate(entries)
                     if not (token in self.eos_ids and (m.is_accepting() or m.is_stopped()))]
        if not consuming:  # llguidance refuses an empty batch
            return answers
        taken = llguidance.numpy.consume_token_par(self._executor, [entries[k] for k in consuming])
        for k, ok in zip(consuming, taken):
            if not ok:
                answers[k] = _rejection(*entries[k])
        return answers

    def fill(self, matchers: list[llguidance.LLMatcher | None], block: np.ndarray) -> None:
        """Row k of `block` for matchers[k] (None: a request already gone, its row allows eos only)."""
        n = min(self.words, block.shape[1])
        live = [k for k, m in enumerate(matchers) if m is not None and not (m.is_error() or m.is_stopped())]
        block[: len(matchers)] = 0
        if live:
            # llguidance writes rows of exactly its width: a wider block gets them through a scratch block.
            target = block if block.shape[1] == self.words else np.zeros((len(matchers), self.words), np.int32)
            llguidance.numpy.fill_next_token_bitmask_par(self._executor, [(matchers[k], k) for k in live], target)
            if target is not block:
                block[live, :n] = target[live, :n]
        for k, m in enumerate(matchers):
            if m is None or m.is_error() or m.is_stopped() or m.is_accepting():
                allow(block[k], self.eos_ids)
