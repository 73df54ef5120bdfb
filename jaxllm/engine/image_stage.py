"""Requests with images on their way to the scheduler (LightLLM's visual server, on the engine thread):
in arrival order each request's images take references on image cache entries; the entries new to the cache
are encoded in batches on the device, into their rows of the embedding buffer; then the request is ready.
The first request whose images find no room waits, and the requests after it, until a release makes room.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Callable

import numpy as np

from jaxllm.engine.image_cache import CacheEntry, ImageCache
from jaxllm.engine.request import ImageSpan, Request
from jaxllm.models.vision.interface import ImageInput, expand_placeholders

# Image key ids (the prompt's ids at image positions, which the prompt cache matches on) lie in
# [vocab, KEY_LIMIT): the same image always gets the same key, another image almost surely another.
KEY_LIMIT = 2**31 - 1


def image_key(digest: str, vocab_size: int) -> int:
    """The id every position of the image `digest` carries in a prompt (past the vocabulary)."""
    return vocab_size + int(digest[:15], 16) % (KEY_LIMIT - vocab_size)


def with_images(prompt_ids: list[int], images: list[ImageInput], image_token_id: int,
                vocab_size: int) -> tuple[list[int], tuple[ImageSpan, ...]]:
    """The prompt with its i-th placeholder expanded to images[i]'s positions, which carry the image's key id,
    and the images' spans. ValueError when placeholders and images differ in number."""
    expanded = expand_placeholders(prompt_ids, image_token_id, images)
    spans, at = [], 0
    for image in images:
        at = expanded.index(image_token_id, at)
        spans.append(ImageSpan(at, image, image_token_id))
        expanded[at : at + image.num_tokens] = [image_key(image.digest, vocab_size)] * image.num_tokens
        at += image.num_tokens
    return expanded, tuple(spans)


Encoder = Callable[[np.ndarray, tuple, np.ndarray], None]  # (pixels [B, ...], grid, rows [B, tokens])


class ImageStage:
    """`encode(pixels, grid, rows)` writes the embeddings of a batch of same-shaped images into `rows`
    (the runner's `encode_images`); at most `max_batch` images per call."""

    def __init__(self, cache: ImageCache, encode: Encoder, max_batch: int = 16):
        self.cache = cache
        self._encode = encode
        self.max_batch = max_batch
        self.pending: deque[Request] = deque()
        self.images_encoded = 0
        self.encode_calls = 0
        self.encode_s = 0.0  # host time dispatching encodes (the device runs them asynchronously)
        self.room_waits = 0  # times the first pending request found no room in the image cache

    def has_work(self) -> bool:
        return bool(self.pending)

    def add(self, req: Request) -> None:
        distinct = {span.image.digest for span in req.images}
        if len(distinct) > self.cache.capacity:
            raise ValueError(f"{len(distinct)} distinct images exceed --cache_capacity {self.cache.capacity}")
        self.pending.append(req)

    def advance(self) -> tuple[list[Request], list[tuple[Request, str]]]:
        """(requests ready for the scheduler, (request, error) for those whose images failed to encode)."""
        ready: list[Request] = []
        batches: dict[tuple, list[tuple[CacheEntry, ImageInput]]] = {}
        queued: set[str] = set()
        while self.pending:
            if not self._acquire(self.pending[0], batches, queued):
                self.room_waits += 1
                break
            ready.append(self.pending.popleft())
        failed: list[tuple[Request, str]] = []
        for items in batches.values():
            for start in range(0, len(items), self.max_batch):
                chunk = items[start : start + self.max_batch]
                try:
                    self._run(chunk)
                except Exception as exc:  # noqa: BLE001 - a failed encode fails its requests only
                    message = f"image encoding failed: {type(exc).__name__}: {exc}"
                    bad = {entry.digest for entry, _ in chunk}
                    failed += [(r, message) for r in ready if any(e.digest in bad for e in r.image_entries)]
        if failed:
            dropped = {id(r) for r, _ in failed}
            ready = [r for r in ready if id(r) not in dropped]
        return ready, failed

    def release(self, req: Request) -> bool:
        """Drop `req`'s image references (it finished or was aborted); True when it was still pending here."""
        for entry in req.image_entries:
            self.cache.release(entry)
        req.image_entries = []
        if req in self.pending:
            self.pending.remove(req)
            return True
        return False

    def _acquire(self, req: Request, batches: dict, queued: set[str]) -> bool:
        """Take references on `req`'s remaining images, queueing new entries for encoding; False when one
        found no room (the references taken so far are kept for the next try)."""
        while len(req.image_entries) < len(req.images):
            image = req.images[len(req.image_entries)].image
            entry = self.cache.acquire(image.digest, image.num_tokens)
            if entry is None:
                return False
            req.image_entries.append(entry)
            if not entry.encoded and entry.digest not in queued:
                queued.add(entry.digest)
                batches.setdefault((image.pixels.shape, image.grid), []).append((entry, image))
        return True

    def _run(self, items: list[tuple[CacheEntry, ImageInput]]) -> None:
        started = time.perf_counter()
        pixels = np.stack([image.pixels for _, image in items])
        rows = np.stack([entry.rows for entry, _ in items])
        self._encode(pixels, items[0][1].grid, rows)
        for entry, _ in items:
            entry.encoded = True
        self.images_encoded += len(items)
        self.encode_calls += 1
        self.encode_s += time.perf_counter() - started
