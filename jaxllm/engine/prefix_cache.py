"""Radix tree of cached prompt tokens (--use_dynamic_prompt_cache): shared token prefixes → the KV slots
already computed for them; reference-counted locks for running requests, least-recently-used eviction.

Slot ownership. Every KV slot is, at any moment, in exactly one place: free in the KV allocator, owned by
this cache (`cached_tokens` of them), or private to one running request. So that
free + cached_tokens + Σ private = num_slots always:
- `match_prefix` lends the cache's slots without giving them away; `lock(match.node)` before the next
  `evict` keeps the whole match cached until the matching `unlock`.
- `insert(ids, slots)` returns n: the cache keeps its own slots for ids[:n] and owns slots[n:] from then on.
  The caller's slots[:n] that were private (those past its locked match) are duplicates: it frees them.
- `evict` returns slots the cache no longer owns: the caller gives them back to the allocator.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass
from typing import Sequence

import numpy as np


class _Node:
    """One edge of the tree: `key` tokens and the slots holding their KV, under the path to `parent`."""

    __slots__ = ("key", "slots", "children", "parent", "ref", "last_access")

    def __init__(self, key: np.ndarray, slots: np.ndarray, parent: _Node | None, last_access: int):
        self.key = key  # [n] int64 token ids (n ≥ 1 except at the root)
        self.slots = slots  # [n] int32 KV slot of each token
        self.children: dict[int, _Node] = {}  # first token of the child's key → child
        self.parent = parent  # None at the root and once evicted
        self.ref = 0  # locks held on this node or on any node below it
        self.last_access = last_access  # logical clock of the last match/insert through this node


@dataclass(frozen=True, eq=False)
class PrefixMatch:
    """The longest cached prefix of a query."""

    length: int  # tokens matched
    slots: np.ndarray  # [length] int32: the cache's KV slots of token_ids[:length] (a copy)
    node: _Node  # opaque handle for lock/unlock: the tree node that ends exactly at `length`


class PrefixCache:
    """Radix tree over token ids at token granularity: the KV is token-level and the attention gathers per-token
    slots, so a page size would only shorten hits (hence no page_size argument).

    Request life cycle (the engine loop is the only user; nothing here is thread-safe):
        m = cache.match_prefix(prompt, max_length=len(prompt) - 1)  # the last token must still be computed
        cache.lock(m.node)                      # m.slots stay cached while the request runs
        slots = [*m.slots, *allocate(len(prompt) - m.length)]        # allocate: evict first if short
        ...                                     # decode appends private slots
        n = cache.insert(computed_ids, slots)   # finished: cache every token whose KV was computed
        free(slots[m.length:n]); cache.unlock(m.node)
    A request that keeps running (chunked prefill) re-matches instead of unlocking at once:
        n = insert(...); free(slots[m.length:n]); m2 = match_prefix(computed_ids); lock(m2.node);
        unlock(m.node); slots[:m2.length] = m2.slots.
    """

    def __init__(self) -> None:
        self._root = _Node(np.empty(0, np.int64), np.empty(0, np.int32), None, 0)
        self._clock = 0
        self._heap: list[tuple[int, int, _Node]] = []  # (last_access, tie, node); stale entries are skipped
        self._tie = itertools.count()
        self._num_nodes = 0
        self._cached = 0
        self._locked = 0

    # --- accounting ------------------------------------------------------------------------------
    @property
    def cached_tokens(self) -> int:
        """Slots the cache owns (locked or not)."""
        return self._cached

    @property
    def locked_tokens(self) -> int:
        """Cached slots on the path of at least one lock: never evicted."""
        return self._locked

    @property
    def evictable_tokens(self) -> int:
        """Cached slots that `evict` can free now (all of them, cascading from the leaves)."""
        return self._cached - self._locked

    # --- the API ---------------------------------------------------------------------------------
    def match_prefix(self, token_ids: Sequence[int], max_length: int | None = None) -> PrefixMatch:
        """The longest cached prefix of token_ids[:max_length]. Splits the node where the match ends mid-edge,
        so that `node` covers exactly the match, and marks the path as used now. Empty input matches
        nothing (length 0, node = the root, which lock/unlock accept and ignore)."""
        ids = _as_ids(token_ids)
        if max_length is not None:
            if max_length < 0:
                raise ValueError(f"max_length must be ≥ 0, got {max_length}")
            ids = ids[:max_length]
        now = self._tick()
        node, i, pieces = self._root, 0, []
        while i < len(ids):
            child = node.children.get(int(ids[i]))
            if child is None:
                break
            k = _common_prefix(child.key, ids[i:])
            if k < len(child.key):
                child = self._split(child, k)
            child.last_access = now
            pieces.append(child.slots)
            node, i = child, i + k
        self._queue_if_evictable(node)
        slots = np.concatenate(pieces) if pieces else np.empty(0, np.int32)
        return PrefixMatch(length=i, slots=slots, node=node)

    def lock(self, node: _Node) -> None:
        """Hold `node` and its ancestors (one reference each): their slots are not evicted until unlock.
        Lock a match before the next `evict`; a held handle stays valid when later calls split its edge."""
        for n in self._path(node):
            if n.ref == 0:
                self._locked += len(n.key)
            n.ref += 1

    def unlock(self, node: _Node) -> None:
        """Release one `lock(node)`; a node locked N times stays locked until the N-th unlock."""
        path = self._path(node)
        if path and path[0].ref == 0:
            raise ValueError("unlock of a node that is not locked")
        for n in path:
            n.ref -= 1
            if n.ref == 0:
                self._locked -= len(n.key)
        self._queue_if_evictable(node)

    def insert(self, token_ids: Sequence[int], slots: Sequence[int]) -> int:
        """Cache token_ids → slots (one slot per token). Returns n, the length of the prefix that was already
        cached: the cache keeps its own slots for it and takes ownership of slots[n:]; the caller frees
        whichever of slots[:n] were its private ones. Marks the path as used now."""
        ids = _as_ids(token_ids)
        values = np.array(slots, dtype=np.int32)
        if values.shape != ids.shape:
            raise ValueError(f"{len(ids)} token ids but {values.size} slots")
        now = self._tick()
        node, i = self._root, 0
        while i < len(ids):
            child = node.children.get(int(ids[i]))
            if child is None:
                break
            k = _common_prefix(child.key, ids[i:])
            if k < len(child.key) and i + k < len(ids):  # diverges mid-edge: the new branch starts at k
                child = self._split(child, k)
            child.last_access = now
            node, i = child, i + k
        if i < len(ids):
            leaf = _Node(ids[i:].copy(), values[i:].copy(), node, now)
            node.children[int(ids[i])] = leaf
            self._num_nodes += 1
            self._cached += len(ids) - i
            node = leaf
        self._queue_if_evictable(node)
        return i

    def evict(self, n_tokens: int) -> np.ndarray:
        """Free min(n_tokens, evictable_tokens) slots, least recently used first: the tails of unlocked
        leaves, then parents that become unlocked leaves. Returns them ([freed] int32) for the allocator."""
        freed, count = [], 0
        while count < n_tokens and self._heap:
            stamp, _, node = heapq.heappop(self._heap)
            if stamp != node.last_access or not self._is_evictable_leaf(node):
                continue
            keep = len(node.key) - min(len(node.key), n_tokens - count)
            freed.append(node.slots[keep:])
            count += len(node.key) - keep
            self._cached -= len(node.key) - keep
            if keep:  # the rest of the leaf stays cached, as old as before
                node.key, node.slots = node.key[:keep].copy(), node.slots[:keep].copy()
                heapq.heappush(self._heap, (stamp, next(self._tie), node))
            else:
                parent = node.parent
                del parent.children[int(node.key[0])]
                node.parent = None
                self._num_nodes -= 1
                self._queue_if_evictable(parent)
        return np.concatenate(freed) if freed else np.empty(0, np.int32)

    def check_invariants(self) -> None:
        """Raise AssertionError (with the reason) unless the tree is consistent: links and keys, sizes that add
        up, no slot twice, ref counts ≥ 0 and ≥ their children's (so a locked node's ancestors are locked),
        every evictable leaf queued for eviction."""
        cached = locked = nodes = 0
        slots, evictable = [], []
        stack = [self._root]
        while stack:
            node = stack.pop()
            child_refs = 0
            for first, child in node.children.items():
                _require(child.parent is node, "a child's parent link is wrong")
                _require(len(child.key) >= 1, "a non-root node has an empty key")
                _require(len(child.key) == len(child.slots), "a node has as many slots as tokens")
                _require(int(child.key[0]) == first, f"child indexed by {first} starts with {child.key[0]}")
                _require(child.ref >= 0, f"negative ref count {child.ref}")
                _require(node is self._root or child.last_access <= node.last_access,
                         "a node was used more recently than its parent")
                child_refs += child.ref
                stack.append(child)
            if node is self._root:
                continue
            _require(node.ref >= child_refs, f"ref count {node.ref} below its children's total {child_refs}")
            nodes += 1
            cached += len(node.key)
            locked += len(node.key) if node.ref else 0
            slots.append(node.slots)
            if self._is_evictable_leaf(node):
                evictable.append(node)
        _require(nodes == self._num_nodes, f"{nodes} nodes, {self._num_nodes} counted")
        _require(cached == self._cached, f"{cached} cached tokens, {self._cached} counted")
        _require(locked == self._locked, f"{locked} locked tokens, {self._locked} counted")
        every = np.concatenate(slots) if slots else np.empty(0, np.int32)
        values, counts = np.unique(every, return_counts=True)
        _require(len(values) == len(every), f"slots cached twice: {values[counts > 1][:10].tolist()}")
        _require(len(every) == 0 or every.min() >= 0, "a negative slot id is cached")
        queued = {id(n) for stamp, _, n in self._heap if stamp == n.last_access}
        _require(all(id(n) in queued for n in evictable), "an evictable leaf is missing from the eviction heap")

    # --- internals -------------------------------------------------------------------------------
    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _path(self, node: _Node) -> list[_Node]:
        """node and its ancestors below the root; ValueError if node is not (any more) in this tree."""
        path = []
        while node is not None and node is not self._root:
            path.append(node)
            node = node.parent
        if node is None:
            raise ValueError("node is not in this cache (evicted, or from another cache)")
        return path

    def _split(self, node: _Node, k: int) -> _Node:
        """Cut node's edge after k tokens; the new upper node (returned) takes its place under the parent and
        its locks, `node` keeps the rest (so handles to `node` still mean the same prefix)."""
        upper = _Node(node.key[:k].copy(), node.slots[:k].copy(), node.parent, node.last_access)
        upper.ref = node.ref
        upper.children[int(node.key[k])] = node
        node.parent.children[int(node.key[0])] = upper
        node.key, node.slots, node.parent = node.key[k:].copy(), node.slots[k:].copy(), upper
        self._num_nodes += 1
        return upper

    def _is_evictable_leaf(self, node: _Node) -> bool:
        return node.parent is not None and not node.children and node.ref == 0

    def _queue_if_evictable(self, node: _Node) -> None:
        if not self._is_evictable_leaf(node):
            return
        heapq.heappush(self._heap, (node.last_access, next(self._tie), node))
        if len(self._heap) > 2 * self._num_nodes + 64:  # now and then, keep one live entry per leaf
            live = {id(n): (t, tie, n) for t, tie, n in self._heap
                    if t == n.last_access and self._is_evictable_leaf(n)}
            self._heap = list(live.values())
            heapq.heapify(self._heap)


def _as_ids(token_ids: Sequence[int]) -> np.ndarray:
    ids = np.array(token_ids, dtype=np.int64)  # a copy: the caller's list or array is never aliased
    if ids.ndim != 1:
        raise ValueError(f"token ids must be one-dimensional, got shape {ids.shape}")
    return ids


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


def _require(condition: bool, reason: str) -> None:
    if not condition:  # not `assert`: the check must also run under python -O
        raise AssertionError(reason)
