"""Host weights onto the devices in a pool of threads: reading a tensor's pages from its (memory-mapped) file,
its layout change and dtype cast and the device transfer of each shard run in the pool, several tensors at
once, while the loader reads on; numpy's copies and JAX's transfers release the GIL. A bounded number of
tensors is in flight, so the host memory held stays a few tensors' worth."""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import jax
import numpy as np
from jax.sharding import NamedSharding


def _bits(array: np.ndarray) -> np.ndarray:
    """`array` as unsigned integers of its item size when its dtype is not numpy's own (bfloat16, float8):
    numpy copies those item by item, 3-4x slower than the integers of the same bits."""
    return array.view(f"u{array.dtype.itemsize}") if array.dtype.kind == "V" else array


def contiguous(array: np.ndarray, dtype) -> np.ndarray:
    """`array` (any layout, e.g. a transposed view of a memory-mapped file) contiguous in `dtype`: no copy when
    it is already, else its layout changed on the raw bits, then its dtype cast."""
    packed = np.ascontiguousarray(_bits(array)).view(array.dtype)
    return packed if packed.dtype == dtype else packed.astype(dtype)


def assemble(shape: tuple, parts: list[tuple]) -> np.ndarray:
    """A fused param's host buffer of `shape` from its parts [(index into it, array)]."""
    buffer = np.empty(shape, parts[0][1].dtype)
    for index, part in parts:
        _bits(buffer)[index] = _bits(part)
    return buffer


def place(host: np.ndarray, dtype, sharding: NamedSharding) -> jax.Array:
    """`host` as `dtype` on `sharding`, each device given only its shard (one host copy at most)."""
    return jax.make_array_from_callback(host.shape, sharding, lambda index: contiguous(host[index], dtype))


def _assemble_and_place(shape: tuple, parts: list[tuple], dtype, sharding: NamedSharding) -> jax.Array:
    return place(assemble(shape, parts), dtype, sharding)


def _threads() -> int:
    return max(2, min(8, os.cpu_count() or 1))


class Placer:
    """`submit` placements; `result` the tree with every placement done (use as a context manager)."""

    def __init__(self, threads: int | None = None):
        threads = threads or _threads()
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="jaxllm-weights")
        self._slots = threading.BoundedSemaphore(2 * threads)  # tensors submitted and not yet placed

    def submit(self, host: np.ndarray, dtype, sharding: NamedSharding) -> Future:
        """`place(host, dtype, sharding)` in the pool."""
        return self._submit(place, host, dtype, sharding)

    def submit_fused(self, shape: tuple, parts: list[tuple], dtype, sharding: NamedSharding) -> Future:
        """The param `assemble(shape, parts)`, placed, in the pool."""
        return self._submit(_assemble_and_place, shape, parts, dtype, sharding)

    def _submit(self, fn, *args) -> Future:
        self._slots.acquire()
        future = self._pool.submit(fn, *args)
        future.add_done_callback(lambda _: self._slots.release())
        return future

    @staticmethod
    def result(tree):
        """`tree` with each Future leaf replaced by its array (raises the first placement's error)."""
        return jax.tree.map(lambda leaf: leaf.result() if isinstance(leaf, Future) else leaf, tree)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._pool.shutdown(wait=True, cancel_futures=exc[0] is not None)
