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
from jaxllm.models.vision.interface import EncodeBatch, ImageInput, expand_placeholders

# Image key ids (the prompt's ids at image positions, which the prompt cache matches on) lie in
# [vocab, KEY_LIMIT): the same image always gets the same key, another image almost surely another.
KEY_LIMIT = 2**31 - 1
ENCODE_BATCH = 16  # images per encoder call at most (each call's batch padded to a power of two)


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


Encoder = Callable[[tuple, tuple, np.ndarray], None]  # (inputs, static, rows [B, T]): the runner's encode_images
Batcher = Callable[[list[ImageInput], int], list[EncodeBatch]]  # the vision family's `batches` for the config


class ImageStage:
    """`batches(images, max_batch)` groups new images into encoder calls (at most `max_batch` images each);
    `encode(inputs, static, rows)` runs one, writing its outputs into the image buffer's `rows` (padding
    outputs: `scratch_row`)."""

    def __init__(self, cache: ImageCache, batches: Batcher, encode: Encoder, scratch_row: int, max_batch: int = ENCODE_BATCH):
        self.cache = cache
        self._batches = batches
        self._encode = encode
        self.scratch_row = scratch_row
        self.max_batch = max_batch
        self.pending: deque[Request] = deque()
        self.images_encoded = 0
        self.encode_calls = 0
        self.encode_s = 0.0  # host time dispatching encodes (the device runs them asynchronously)
        self.room_waits = 0  # times the first pending request found no room in the image cache

    def has_work(self) -> bool:
        return bool(self.pending)

    def stats(self) -> dict:
        cache = self.cache
        return {"images_waiting": len(self.pending), "images_encoded": self.images_encoded,
                "image_encode_calls": self.encode_calls, "image_encode_s": self.encode_s,
                "image_cache_entries": len(cache), "image_cache_referenced": cache.num_referenced,
                "image_cache_hits": cache.hits, "image_cache_evictions": cache.evictions,
                "image_room_waits": self.room_waits}

    def add(self, req: Request) -> None:
        self.pending.append(req)

    def advance(self) -> tuple[list[Request], list[tuple[Request, str]]]:
        """(requests ready for the scheduler, (request, error) for those whose images failed to encode)."""
        ready: list[Request] = []
        new: dict[str, tuple[CacheEntry, ImageInput]] = {}  # entries to encode, by digest
        while self.pending:
            if not self._acquire(self.pending[0], new):
                self.room_waits += 1
                break
            ready.append(self.pending.popleft())
        failed: list[tuple[Request, str]] = []
        items = list(new.values())
        for batch in self._batches([image for _, image in items], self.max_batch) if items else []:
            entries = [items[i][0] for i in batch.images]
            try:
                self._run(batch, entries)
            except Exception as exc:  # noqa: BLE001 - a failed encode fails its requests only
                message = f"image encoding failed: {type(exc).__name__}: {exc}"
                bad = {entry.digest for entry in entries}
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

    def _acquire(self, req: Request, new: dict) -> bool:
        """Take references on `req`'s remaining images, noting entries to encode in `new`; False when one
        found no room (the references taken so far are kept for the next try)."""
        while len(req.image_entries) < len(req.images):
            image = req.images[len(req.image_entries)].image
            entry = self.cache.acquire(image.digest, image.num_tokens)
            if entry is None:
                return False
            req.image_entries.append(entry)
            if not entry.encoded:
                new.setdefault(entry.digest, (entry, image))
        return True

    def run_example(self, batch: EncodeBatch) -> None:
        """Encode `batch` into the scratch row only (compiles its shape)."""
        self._encode(batch.inputs, batch.static, np.full(batch.token_index.shape, self.scratch_row, np.int32))

    def _run(self, batch: EncodeBatch, entries: list[CacheEntry]) -> None:
        """One encoder call: output (b, t) goes to row `token_index[b, t]` of row b's image's entry."""
        started = time.perf_counter()
        index = batch.token_index
        rows = np.full(index.shape, self.scratch_row, np.int32)
        for b, entry in enumerate(entries):
            valid = index[b] >= 0
            rows[b, valid] = entry.rows[index[b, valid]]
        self._encode(batch.inputs, batch.static, rows)
        for entry in entries:
            entry.encoded = True
        self.images_encoded += len(entries)
        self.encode_calls += 1
        self.encode_s += time.perf_counter() - started
