"""Shared builders for the kernel tests: random KV caches and ragged slot tables (never zeros).
On a GPU the same tests run the compiled kernels; on the CPU, Pallas interpret mode."""

from __future__ import annotations

import zlib

import jax
import numpy as np
import pytest


class Case:
    """A random cache of `slots` tokens (+ the scratch slot) and a slot table for rows of given lengths.

    Slots are a random permutation (nothing contiguous); a row of length 0 is a padding row: context 1,
    every table entry at the scratch slot, as the engine pads.
    """

    def __init__(self, rng, lengths, kv_heads, head_dim, width, contiguous=False):
        self.lengths = [max(1, n) for n in lengths]
        self.scratch = sum(-(-n // 8) * 8 for n in lengths) + 11
        # contiguous: each row's slots in one consecutive run from a multiple of 8 (the last row's from an odd
        # slot), except one swapped pair in rows past 100 tokens (as after frees).
        perm = np.arange(self.scratch) if contiguous else rng.permutation(self.scratch)
        table = np.full((len(lengths), width), self.scratch, np.int32)
        used = 0
        for row, n in enumerate(lengths):
            start = used + 3 if contiguous and row == len(lengths) - 1 else used
            table[row, :n] = perm[start : start + n]
            if contiguous and n > 100:
                a, b = rng.choice(n, 2, replace=False)
                table[row, [a, b]] = table[row, [b, a]]
            used += -(-n // 8) * 8
        self.table = table
        rows = -(-(self.scratch + 1) // 8) * 8  # a multiple of 8 rows, as PallasAttention allocates
        shape = (rows, kv_heads, head_dim)
        self.k = rng.standard_normal(shape).astype(np.float32)
        self.v = rng.standard_normal(shape).astype(np.float32)


# Kernels only the GPU can run (no interpret mode): collected where a GPU is the default backend.
collect_ignore = [] if jax.default_backend() == "gpu" else ["test_attention_mosaic.py"]


@pytest.fixture
def rng(request):
    return np.random.default_rng(zlib.crc32(request.node.name.encode()))
