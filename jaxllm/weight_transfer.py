"""Checkpoint tensors onto the devices as they are stored, their layout changed there: each tensor (a
memory-mapped view of its file, in the checkpoint's layout and dtype) is transferred as plain reads, each device
given only the slice it needs, then a jitted function on the devices transposes, reshapes, casts and fuses it into
the param (`jaxllm/models/hf_map.py`'s transforms). The host does no transposing copies: its work is reading the
file's pages. Transfers run in a pool of threads, several tensors at once, while the loader reads on; a bounded
number of tensors is in flight, so the memory held stays the params plus a few tensors' worth."""

from __future__ import annotations

import functools
import math
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxllm.thread_names import name_os_thread

# --- host copies (pre-quantised checkpoints' fields are assembled on the host: jaxllm/prequant.py) ---------


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


def put(host: np.ndarray, sharding: NamedSharding, dtype=None) -> jax.Array:
    """`host` (cast to `dtype` if given) on `sharding`, each device given only its slice (contiguous slices
    are not copied on the host: rows of a memory-mapped file are read straight into the transfer)."""
    dtype = host.dtype if dtype is None else dtype
    return jax.make_array_from_callback(host.shape, sharding, lambda index: contiguous(host[index], dtype))


# --- layouts changed on the devices -----------------------------------------------------------------------

# Params of fewer bytes change layout on the host: numpy's copy of a small tensor costs less than compiling its
# transform (tens of ms an executable on the CPU backend; tiny test models would compile a dozen each).
HOST_LAYOUT_BYTES = 1 << 20


class Layout:
    """A transform of one tensor into its param's layout (array → array: transposes, reshapes, jnp ops), equal
    to another when it computes the same thing: the same code over the same captured values. The layers of a
    model build a closure each; they share one compiled executable per shape through this equality."""

    def __init__(self, fn):
        self.fn = fn
        self._key = _code_key(fn)

    def __eq__(self, other):
        return isinstance(other, Layout) and self._key == other._key

    def __hash__(self):
        return hash(self._key)


def _code_key(fn):
    code = getattr(fn, "__code__", None)
    if code is None:
        return fn
    key = (code, tuple(cell.cell_contents for cell in fn.__closure__ or ()), fn.__defaults__,
           tuple(sorted((fn.__kwdefaults__ or {}).items())))
    try:
        hash(key)
    except TypeError:  # a captured value that is not hashable: this closure compiles alone
        return fn
    return key


def _part_spec(spec: PartitionSpec, ndim: int, index) -> PartitionSpec:
    """The sharding of `param[index]` (`spec`: the param's, `ndim` axes): integer-indexed axes drop, axes sliced
    whole keep their mesh axes, axes sliced in part are not split."""
    entries = list(spec) + [None] * (ndim - len(spec))
    index = index if isinstance(index, tuple) else (index,)
    if Ellipsis in index:
        at = index.index(Ellipsis)
        index = index[:at] + (slice(None),) * (ndim - len(index) + 1) + index[at + 1 :]
    index = index + (slice(None),) * (ndim - len(index))
    kept = []
    for entry, item in zip(entries, index):
        if isinstance(item, slice):
            kept.append(entry if item == slice(None) else None)
    return PartitionSpec(*kept)


def _split(mesh, entry) -> int:
    names = entry if isinstance(entry, tuple) else (entry,)
    return math.prod(mesh.shape[name] for name in names if name is not None)


@functools.lru_cache(maxsize=None)
def source_spec(layout: Layout, shape: tuple, dtype, mesh, out_spec: PartitionSpec) -> PartitionSpec:
    """How to split a stored tensor of `shape` over the devices so that each holds what its slice of the
    result (`out_spec`) needs: each split axis of the result followed back through the transform's transposes
    and reshapes to the stored axis it comes from. A transform that mixes axes otherwise (concatenations,
    reductions) gets the stored tensor split on its first axis (the devices then exchange slices), or whole on
    each device if that axis does not divide."""
    jaxpr = _layout_jaxpr(layout, shape, dtype)
    splits = {axis: entry for axis, entry in enumerate(out_spec) if _split(mesh, entry) > 1}
    if not splits:
        return PartitionSpec()
    traced = _trace_back(jaxpr, splits, mesh)
    if traced is not None:
        return PartitionSpec(*(traced.get(axis) for axis in range(len(shape))))
    return _first_axis_spec(shape, splits.values(), mesh)


def _first_axis_spec(shape: tuple, entries, mesh) -> PartitionSpec:
    """A tensor of `shape` split on its first axis over the mesh axes of `entries` when they divide it, else
    whole on each device."""
    names = tuple(name for entry in entries for name in (entry if isinstance(entry, tuple) else (entry,)))
    if shape and shape[0] % _split(mesh, names) == 0:
        return PartitionSpec(names if len(names) > 1 else names[0])
    return PartitionSpec()


def _trace_back(jaxpr, splits: dict, mesh) -> dict | None:
    """{stored axis: mesh axes} for `splits` ({result axis: mesh axes}) through a chain of transposes,
    reshapes and casts; None for anything else."""
    if len(jaxpr.outvars) != 1 or len(jaxpr.invars) != 1:
        return None
    var = jaxpr.outvars[0]
    producers = {out: eqn for eqn in jaxpr.eqns for out in eqn.outvars}
    while var is not jaxpr.invars[0]:
        eqn = producers.get(var)
        if eqn is None or len(eqn.invars) != 1:
            return None
        source = eqn.invars[0]
        name = eqn.primitive.name
        if name == "transpose":
            splits = {eqn.params["permutation"][axis]: entry for axis, entry in splits.items()}
        elif name == "reshape":
            splits = _reshape_back(source.aval.shape, var.aval.shape, splits, mesh)
            if splits is None:
                return None
        elif name not in ("convert_element_type", "copy", "copy_p"):
            return None
        var = source
    return splits


def _reshape_back(before: tuple, after: tuple, splits: dict, mesh) -> dict | None:
    """A reshape's result axis split in n even blocks is the same split of the axis before it that starts at
    the same flat offset (both sizes dividing by n)."""
    starts = {}  # flat offset → the axis starting there (past any axes of size 1)
    for axis in range(len(before)):
        offset = math.prod(before[:axis])
        if offset not in starts or before[starts[offset]] == 1:
            starts[offset] = axis
    mapped = {}
    for axis, entry in splits.items():
        source = starts.get(math.prod(after[:axis]))
        n = _split(mesh, entry)
        if source is None or after[axis] % n or before[source] % n:
            return None
        mapped[source] = entry
    return mapped


@functools.lru_cache(maxsize=None)
def _changer(layout: Layout, dtype, sharding: NamedSharding):
    return jax.jit(lambda stored: layout.fn(stored).astype(dtype), out_shardings=sharding)


@functools.lru_cache(maxsize=None)
def _fuser(shape: tuple, dtype, sharding: NamedSharding, indices: tuple):
    """One fused param from its parts, each already in its layout: `indices` holds where each goes."""

    def fuse(*parts):
        param = jnp.zeros(shape, dtype)
        for index, part in zip(indices, parts):
            param = param.at[_unfrozen(index)].set(part)
        return param

    return jax.jit(fuse, out_shardings=sharding)


def place(host: np.ndarray, layout: Layout, dtype, sharding: NamedSharding) -> jax.Array:
    """The stored tensor `host` transferred as it is, then changed by `layout` and cast to `dtype` on the
    devices, into `sharding`."""
    if host.nbytes < HOST_LAYOUT_BYTES:
        return put(np.asarray(layout.fn(host)), sharding, dtype)
    source = NamedSharding(sharding.mesh, source_spec(layout, host.shape, host.dtype, sharding.mesh, sharding.spec))
    if (host.dtype == dtype and _is_identity(layout, host.shape, host.dtype)
            and source.is_equivalent_to(sharding, host.ndim)):
        return put(host, sharding)  # stored as the param is: nothing to change
    return _changer(layout, dtype, sharding)(put(host, source))


def _is_identity(layout: Layout, shape: tuple, dtype) -> bool:
    jaxpr = _layout_jaxpr(layout, shape, dtype)
    return not jaxpr.eqns and jaxpr.outvars[0] is jaxpr.invars[0]


@functools.lru_cache(maxsize=None)
def _layout_jaxpr(layout: Layout, shape: tuple, dtype):
    """The transform traced once per stored shape and dtype (each layer's closure of one code shares it)."""
    return jax.make_jaxpr(layout.fn)(jax.ShapeDtypeStruct(shape, dtype)).jaxpr


def place_fused(shape: tuple, parts: list[tuple], dtype, sharding: NamedSharding) -> jax.Array:
    """A fused param of `shape` from `parts` [(index into it, stored host array, Layout)]: each part placed
    and changed on the devices, then put together there. (Apart: XLA's CPU backend runs a transpose fused into
    the concatenation 6x slower than the two one after the other.)"""
    if sum(host.nbytes for _, host, _ in parts) < HOST_LAYOUT_BYTES:
        return put(assemble(shape, [(index, np.asarray(layout.fn(host))) for index, host, layout in parts]),
                   sharding, dtype)
    changed = [place(host, layout, dtype, _part_sharding(sharding, shape, index)) for index, host, layout in parts]
    return _fuser(tuple(shape), dtype, sharding, tuple(_frozen(index) for index, _, _ in parts))(*changed)


def _part_sharding(sharding: NamedSharding, shape: tuple, index) -> NamedSharding:
    """Where a fused param's part is changed: split as the param splits the axes the part spans whole. A part
    that lies on some of the devices only (an integer index into a split axis: one expert of experts placed
    per device) is split on its first axis instead, each device sent a slice; the fusion moves the slices."""
    mesh = sharding.mesh
    spec = _part_spec(sharding.spec, len(shape), index)
    split = [entry for entry in sharding.spec if _split(mesh, entry) > 1]
    if split and not any(_split(mesh, entry) > 1 for entry in spec):
        spec = _first_axis_spec(np.broadcast_to(np.empty((), np.int8), shape)[index].shape, split, mesh)
    return NamedSharding(mesh, spec)


def _frozen(index):
    """A hashable twin of an index (slices are not hashable before Python 3.12)."""
    items = index if isinstance(index, tuple) else (index,)
    frozen = tuple(("slice", i.start, i.stop, i.step) if isinstance(i, slice) else i for i in items)
    return frozen if isinstance(index, tuple) else ("one", frozen[0])


def _unfrozen(frozen):
    thaw = lambda i: slice(*i[1:]) if isinstance(i, tuple) and i[0] == "slice" else i  # noqa: E731
    if frozen and frozen[0] == "one":
        return thaw(frozen[1])
    return tuple(thaw(i) for i in frozen)


# --- the pool ---------------------------------------------------------------------------------------------


def _threads() -> int:
    return max(2, min(8, os.cpu_count() or 1))


class Placer:
    """`submit` placements; `result` the tree with every placement done (use as a context manager)."""

    def __init__(self, threads: int | None = None):
        threads = threads or _threads()
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="jaxllm-weights",
                                        initializer=name_os_thread)
        self._slots = threading.BoundedSemaphore(2 * threads)  # tensors submitted and not yet placed

    def submit(self, fn, *args) -> Future:
        """`fn(*args)` (a placement: `place`, `place_fused`, ...) in the pool."""
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
