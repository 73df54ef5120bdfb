"""Shared builders for the kernel tests: random KV caches and ragged slot tables (never zeros)."""

from __future__ import annotations

import zlib

import numpy as np
import pytest


class Case:
    """A random cache of `slots` tokens (+ the scratch slot) and a slot table for rows of given lengths.

    Slots are a random permutation (nothing contiguous); a row of length 0 is a padding row: context 1,
    every table entry at the scratch slot, as the engine pads.
    """

    def __init__(self, rng, lengths, kv_heads, head_dim, width, slots=None):
        self.lengths = [max(1, n) for n in lengths]
        self.scratch = slots if slots is not None else sum(lengths) + 7
        perm = rng.permutation(self.scratch)
        table = np.full((len(lengths), width), self.scratch, np.int32)
        used = 0
        for row, n in enumerate(lengths):
            table[row, :n] = perm[used : used + n]
            used += n
        self.table = table
        shape = (self.scratch + 1, kv_heads, head_dim)
        self.k = rng.standard_normal(shape).astype(np.float32)
        self.v = rng.standard_normal(shape).astype(np.float32)


@pytest.fixture
def rng(request):
    return np.random.default_rng(zlib.crc32(request.node.name.encode()))
