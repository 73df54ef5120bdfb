"""The image cache (--cache_capacity, --cache_reserved_ratio): one entry per distinct image (its bytes'
digest) holding the device rows of the image-embedding buffer its embeddings are written to; each running
request holds a reference on its images' entries.

When an image finds no entry left (or not enough free rows), unreferenced entries are evicted, least
recently used first, down to `reserved_ratio × capacity`; when that leaves no room, `acquire` answers None
and the request waits (never fails) until a running request's release makes room.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict

import numpy as np


@dataclasses.dataclass
class CacheEntry:
    digest: str
    rows: np.ndarray  # [num_tokens] int32: rows of the embedding buffer, in token order
    refs: int = 0
    encoded: bool = False  # its embeddings are written (or their encoding is dispatched)


class ImageCache:
    """Entries for at most `capacity` images over `num_rows` embedding rows (row `num_rows` is scratch,
    written by padding images of an encode batch)."""

    def __init__(self, capacity: int, reserved_ratio: float, num_rows: int):
        if capacity < 1:
            raise ValueError(f"--cache_capacity must be >= 1 (got {capacity})")
        if not 0.0 <= reserved_ratio <= 1.0:
            raise ValueError(f"--cache_reserved_ratio must be between 0 and 1 (got {reserved_ratio})")
        self.capacity = capacity
        self.reserved = int(reserved_ratio * capacity)
        self.num_rows = num_rows
        self.scratch_row = num_rows
        self._free_rows = list(range(num_rows - 1, -1, -1))  # popped from the end: row 0 first
        self._entries: OrderedDict[str, CacheEntry] = OrderedDict()  # least recently acquired first
        self.hits = 0  # acquisitions that found the image cached
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, digest: str) -> bool:
        return digest in self._entries

    @property
    def num_referenced(self) -> int:
        """Entries some request holds."""
        return sum(1 for e in self._entries.values() if e.refs)

    @property
    def num_free_rows(self) -> int:
        return len(self._free_rows)

    def acquire(self, digest: str, num_tokens: int) -> CacheEntry | None:
        """A reference on `digest`'s entry, made (not yet encoded) if absent; None when there is no room."""
        entry = self._entries.get(digest)
        if entry is not None:
            self.hits += entry.encoded
            entry.refs += 1
            self._entries.move_to_end(digest)
            return entry
        if num_tokens > self.num_rows:
            raise ValueError(f"an image of {num_tokens} tokens exceeds the image cache's {self.num_rows} rows")
        if len(self._entries) >= self.capacity or len(self._free_rows) < num_tokens:
            self._evict(num_tokens)
        if len(self._entries) >= self.capacity or len(self._free_rows) < num_tokens:
            return None
        rows = np.asarray([self._free_rows.pop() for _ in range(num_tokens)], np.int32)
        entry = CacheEntry(digest, rows, refs=1)
        self._entries[digest] = entry
        return entry

    def release(self, entry: CacheEntry) -> None:
        """Drop one reference. An entry never encoded (its request ended first) is removed at once."""
        entry.refs -= 1
        if entry.refs < 0:
            raise RuntimeError(f"image {entry.digest}: released more often than acquired")
        if entry.refs == 0 and not entry.encoded:
            self._remove(entry)

    def _evict(self, num_tokens: int) -> None:
        """Unreferenced entries, oldest first, down to the reserved count, then on while the rows for
        `num_tokens` are still missing."""
        for entry in [e for e in self._entries.values() if e.refs == 0]:
            if len(self._entries) <= self.reserved and len(self._free_rows) >= num_tokens:
                break
            self._remove(entry)
            self.evictions += 1

    def _remove(self, entry: CacheEntry) -> None:
        del self._entries[entry.digest]
        self._free_rows.extend(entry.rows[::-1].tolist())
