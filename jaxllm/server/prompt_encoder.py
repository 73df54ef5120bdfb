"""Prompt text → token ids for the HTTP routes, off the event loop and in batches.

Tokenising on the frontend's event loop held it for a third of a request's handling (py-spy of the server under
a burst of 512 LightLLM requests, 2-core CPU box, 2026-12-02: 375 of the loop's 1,034 busy samples in
`tokenizer.encode`), time in which no other request was read and no stream written. Here the prompts that arrive
while one batch is being encoded wait together and go, as the next batch, through one `encode_batch` of the Rust
tokenizer on a worker thread: it releases the GIL for the whole batch and spreads it over the cores, so the loop
only queues the text and picks up the ids.

The ids are those of `tokenizer.encode` by construction: for a fast tokenizer whose class keeps transformers'
own encode path, that path is exactly the Rust tokenizer's `encode_batch` with truncation and padding off and
`encode_special_tokens` set from `split_special_tokens`, which a private copy of the Rust tokenizer reproduces (a
copy, so that no call elsewhere can change its settings under a batch). A start-up check compares both on a few
texts. Any other tokenizer (a slow one, a class with its own encode) is called as before, on the loop.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any

# Modules whose definitions of the encode path are transformers' own (v4 and v5)
_TRANSFORMERS_ENCODE = {"transformers.tokenization_utils_base", "transformers.tokenization_utils_fast",
                        "transformers.tokenization_utils_tokenizers"}
_ENCODE_PATH = ("encode", "_encode_plus", "_batch_encode_plus")
log = logging.getLogger("jaxllm.server")
_CHECK_TEXTS = ("Hello, world!", "  leading spaces, trailing\n\n", "naïve café — 東京 🙂 ∑", "a\tb\r\nc", "")


def rust_copy(tokenizer: Any):
    """A copy of `tokenizer`'s Rust tokenizer that encodes exactly as `tokenizer.encode` does, or None when that
    cannot be guaranteed (no fast tokenizer; a class that changes the encode path; a check text that differs)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "encode_batch"):
        return None
    for name in _ENCODE_PATH:
        method = getattr(type(tokenizer), name, None)
        if method is not None and getattr(method, "__module__", None) not in _TRANSFORMERS_ENCODE:
            return None
    copy = type(backend).from_str(backend.to_str())
    copy.no_truncation()
    copy.no_padding()
    copy.encode_special_tokens = bool(getattr(tokenizer, "split_special_tokens", False))
    specials = " ".join(getattr(tokenizer, "all_special_tokens", [])[:8])
    for text in (*_CHECK_TEXTS, f"x {specials} y"):
        for add in (True, False):
            if _ids(copy, [text], add)[0] != list(tokenizer.encode(text, add_special_tokens=add)):
                return None
    return copy


def _ids(backend, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    return [e.ids for e in backend.encode_batch(texts, add_special_tokens=add_special_tokens)]


class PromptEncoder:
    """`await encode(text)`: the ids of `tokenizer.encode(text)`, encoded in a batch on a worker thread when the
    tokenizer allows (`rust_copy`), else on the caller's loop."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.backend = rust_copy(tokenizer) if tokenizer is not None else None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="jaxllm-encode") if self.backend else None
        if tokenizer is not None:
            log.info("prompts are tokenised %s", "in batches on a worker thread" if self.backend else
                     f"on the event loop (the {type(tokenizer).__name__} cannot be matched by its Rust tokenizer)")
        # per event loop: the prompts waiting for the next batch (None while no batch is under way)
        self._waiting: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self.backend is None:
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        waiting = self._waiting.get(loop)
        if waiting is None:  # no batch under way on this loop: this prompt starts one
            waiting = self._waiting[loop] = []
            loop.create_task(self._drain(loop))
        waiting.append((text, add_special_tokens, future))
        return await future

    async def _drain(self, loop) -> None:
        """Encode what waits, batch after batch, until nothing does."""
        try:
            while self._waiting[loop]:
                batch, self._waiting[loop] = self._waiting[loop], []
                try:
                    ids = await loop.run_in_executor(self._executor, self._encode, [(t, a) for t, a, _ in batch])
                except Exception as exc:  # each request of the batch gets the error
                    for _, _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, _, future), one in zip(batch, ids):
                    if not future.done():  # a request whose client left was cancelled
                        future.set_result(one)
        finally:
            del self._waiting[loop]

    def _encode(self, prompts: list[tuple[str, bool]]) -> list[list[int]]:
        """The ids of every prompt, one encode_batch per add_special_tokens value (on the worker thread)."""
        out: list[list[int] | None] = [None] * len(prompts)
        for add in {a for _, a in prompts}:
            where = [i for i, (_, a) in enumerate(prompts) if a == add]
            for i, ids in zip(where, _ids(self.backend, [prompts[i][0] for i in where], add)):
                out[i] = ids
        return out
