"""Token-level KV memory: which slots are free, which requests hold which (per token, like LightLLM's
TokenAttention; sequences of one group share slots by reference), the prompt cache's share of them
(--use_dynamic_prompt_cache), and the device buffers: one cache tuple per layer plus the request→slot and
request→token tables that the jitted steps update in place.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxllm.engine.prefix_cache import PrefixCache
from jaxllm.engine.request import Request
from jaxllm.models import init_kv_cache
from jaxllm.models.backends import cache_array_spec


class KVCacheFull(RuntimeError):
    """Fewer free slots than asked for; nothing was allocated."""


class KVCache:
    """Host-side accounting of `num_slots` token slots and `num_rows` table rows.

    A request holds exactly one slot per computed token. Sequences of one group share slots: `fork` gives a
    request another's leading slots (a copy of its slot list, the table row filled from it by the runner, never
    a copy of K/V) and counts one more owner on each; a shared slot is freed when its last owner lets it go, and
    is counted once everywhere. Slots are handed out so that a request's
    positions fill consecutive slots of `page_size`-aligned pages when the cache allows it (a request's
    first slot starts a free page; it grows into the rest of its page, then into another free page),
    but any free slot is used before an allocation fails: pages cost no capacity.

    With a `prefix_cache`, every slot is free, owned by the prompt cache, or private to one request
    (prefix_cache.py's rule): a request starts on the cache's slots of its longest cached prefix
    (`attach_prefix`, locked while it runs), hands its computed tokens to the cache (`share_prefix` while
    it runs, `release` when it ends) and frees only its private slots. Unlocked cached slots count as
    available: an allocation that finds too few free slots evicts the least recently used ones.
    """

    def __init__(self, num_slots: int, num_rows: int, page_size: int = 16, prefix_cache: PrefixCache | None = None):
        if num_slots < 1 or num_rows < 1:
            raise ValueError("the KV cache needs at least one slot and one row")
        self.num_slots = num_slots
        self.num_rows = num_rows
        self.page_size = page_size
        self.prefix = prefix_cache
        self.scratch_slot = num_slots  # padded tokens write here; padded table entries point here
        self.scratch_row = num_rows  # padded rows of a step read this row (all scratch slots)
        self._free = np.ones(num_slots, bool)
        self._num_free = num_slots
        self._owners = np.zeros(num_slots, np.int32)  # requests holding each private slot (0: free or cached)
        num_pages = -(-num_slots // page_size)
        sizes = np.full(num_pages, page_size, np.int64)
        sizes[-1] = num_slots - page_size * (num_pages - 1)
        self._page_size_of = sizes
        self._page_free = sizes.copy()  # free slots per page
        self._free_pages = list(range(num_pages - 1, -1, -1))  # stack of pages that may be wholly free
        self._free_rows = list(range(num_rows - 1, -1, -1))

    # --- accounting ------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Slots in no one's hands (the prompt cache's evictable slots are not among them)."""
        return self._num_free

    @property
    def num_available(self) -> int:
        """Slots an allocation can get: free ones plus the prompt cache's unlocked ones."""
        return self._num_free + (self.prefix.evictable_tokens if self.prefix is not None else 0)

    @property
    def num_used(self) -> int:
        """Slots in use by requests: their private slots and the cached prefixes they lock."""
        return self.num_slots - self.num_available

    @property
    def num_cached(self) -> int:
        """Slots the prompt cache owns, locked or not."""
        return self.prefix.cached_tokens if self.prefix is not None else 0

    @property
    def num_locked(self) -> int:
        """Cached slots locked by running requests: shared prefixes, each counted once."""
        return self.prefix.locked_tokens if self.prefix is not None else 0

    @property
    def num_free_rows(self) -> int:
        return len(self._free_rows)

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_available

    # --- allocation ------------------------------------------------------------------------------
    def allocate(self, req: Request, n: int) -> list[int]:
        """Give `req` n more slots (appended to req.slots, and a table row if it has none)."""
        if req.kv_row < 0 and not self._free_rows:
            raise KVCacheFull("no free request row")
        self._reserve(n)
        if req.kv_row < 0:
            req.kv_row = self._free_rows.pop()
        new: list[int] = []
        if req.slots:
            new += self._extend_run(req.slots[-1] + 1, n)
        if len(new) < n:  # then wholly free pages, as many as the rest needs, taken together
            new += self._take_pages(n - len(new))
        if len(new) < n:  # fragmented: any free slots, from the top (others' runs grow upwards)
            rest = np.flatnonzero(self._free)[::-1][: n - len(new)]
            self._take(rest)
            new += rest.tolist()
        req.slots += new
        return new

    def allocate_one_each(self, reqs: list[Request]) -> None:
        """One more slot for each request (a decode step), as `allocate(req, 1)` would give it, in a few array
        operations (a Python call a request cost ~15 µs where a run crosses into a new page, 1 in 16 a step): the
        next slot of its run where free (at a page's first slot only into a wholly free page), else the first slot
        of a wholly free page, else any free slot."""
        if not reqs:
            return
        self._reserve(len(reqs))
        nxt = np.fromiter((r.slots[-1] + 1 for r in reqs), np.int64, len(reqs))
        ok = (nxt < self.num_slots) & self._first_of_equals(nxt)  # a group's requests sharing their last slot
        ok[ok] = self._free[nxt[ok]]  # want the same next one: the first of them may take it
        crossing = np.flatnonzero(ok & (nxt % self.page_size == 0))
        pages = nxt[crossing] // self.page_size
        ok[crossing] = self._page_free[pages] == self._page_size_of[pages]
        self._take(nxt[ok])
        slots = nxt.tolist()
        rest = np.flatnonzero(~ok).tolist()
        fresh = self._free_page_starts(len(rest))
        self._take(np.asarray(fresh, np.int64))
        for i, slot in zip(rest, fresh):
            slots[i] = slot
        stuck = rest[len(fresh):]  # fragmented: no wholly free page left for them
        for i in stuck:
            slots[i] = None
        for req, slot in zip(reqs, slots):
            if slot is None:
                self.allocate(req, 1)
            else:
                req.slots.append(slot)

    @staticmethod
    def _first_of_equals(values: np.ndarray) -> np.ndarray:
        """A mask of the entries no earlier entry equals."""
        order = np.argsort(values, kind="stable")
        ranked = values[order]
        first = np.zeros(len(values), bool)
        first[order[np.concatenate(([True], ranked[1:] != ranked[:-1]))]] = True
        return first

    def _free_page_starts(self, n: int) -> list[int]:
        """The first slots of up to n wholly free pages (not taken yet)."""
        return [page * self.page_size for page in itertools.islice(self._popped_free_pages(), n)]

    def release(self, req: Request, *, cache: bool = True) -> None:
        """Let go of `req`'s private slots (freed unless another request of its group still holds them) and its
        row (finish, abort, error, preemption). With the prompt cache, its computed tokens whose ids are known
        are cached first, up to the first slot still shared with another request (unless `cache` is False: their
        KV may never have been written, after a failed step) and its lock is released."""
        slots, private_from = req.slots, req.num_cached
        to_drop = slots[private_from:]
        if self.prefix is not None:
            keep = min(req.num_computed, req.num_known, len(slots)) if cache else 0
            keep = min(keep, private_from + self._unshared_run(slots[private_from:keep]))
            if keep > private_from:
                already = self.prefix.insert(req.token_ids(0, keep), slots[:keep])
                # The cache now owns slots[already:keep]; ours for [private_from, already) were duplicates.
                self._owners[np.asarray(slots[already:keep], np.int64)] = 0
                to_drop = slots[private_from:already] + slots[keep:]
            if req.cache_node is not None:
                self.prefix.unlock(req.cache_node)
        self._drop(req, to_drop)
        req.slots, req.num_cached, req.cache_node = [], 0, None
        if req.kv_row >= 0:
            self._free_rows.append(req.kv_row)
            req.kv_row = -1
        req.num_computed = 0

    # --- sharing within a group ------------------------------------------------------------------
    def fork(self, parent: Request, child: Request, n: int) -> None:
        """Start `child` (holding nothing) on `parent`'s first n slots, shared by reference, with a table row
        of its own (which the runner fills from child.slots); child.num_computed = n."""
        if child.slots or child.num_cached or child.kv_row >= 0:
            raise ValueError(f"request {child.request_id} already holds KV")
        if n > min(parent.num_computed, len(parent.slots)):
            raise ValueError(f"fork of {n} positions, request {parent.request_id} has computed fewer")
        if not self._free_rows:
            raise KVCacheFull("no free request row")
        child.kv_row = self._free_rows.pop()
        child.num_cached = min(parent.num_cached, n)
        if child.num_cached:
            self.prefix.lock(parent.cache_node)
            child.cache_node = parent.cache_node
        child.slots = parent.slots[:n]
        self._owners[np.asarray(child.slots[child.num_cached:], np.int64)] += 1
        child.num_computed = n

    def reassign(self, moves: list[tuple[Request, list[int]]]) -> None:
        """Give each request a new slot list made of slots that requests of its group hold now (beam search:
        a beam continues from its parent's slots). Every new owner is counted before any old one lets go, so
        no shared slot is freed on the way. Requests keep their rows (one without gets one); no prompt cache here."""
        for req, slots in moves:
            if req.num_cached:
                raise ValueError(f"request {req.request_id}: slots shared with the prompt cache are not reassigned")
            held = np.asarray(slots, np.int64)
            if (self._owners[held] == 0).any():
                raise AssertionError(f"request {req.request_id} is given a slot no request holds")
            self._owners[held] += 1
        for req, slots in moves:
            old, req.slots = req.slots, list(slots)
            self._drop(req, old)
            req.num_computed = len(slots)
            if slots and req.kv_row < 0:  # a member that waited without a beam (and was paused meanwhile)
                req.kv_row = self._free_rows.pop()

    def shares(self, req: Request) -> bool:
        """Whether some of req's private slots are also held by another request."""
        return bool(len(req.slots) > req.num_cached and
                    (self._owners[np.asarray(req.slots[req.num_cached:], np.int64)] > 1).any())

    def _unshared_run(self, slots: list[int]) -> int:
        """How many leading slots of `slots` have a single owner."""
        shared = np.flatnonzero(self._owners[np.asarray(slots, np.int64)] > 1)
        return int(shared[0]) if len(shared) else len(slots)

    def _drop(self, req: Request, slots: list[int]) -> None:
        """One owner fewer on each of `slots`; those left without an owner are freed."""
        if not slots:
            return
        dropped = np.sort(np.asarray(slots, np.int64))  # (sorted: a repeat sits beside its twin)
        if (dropped[1:] == dropped[:-1]).any() or (self._owners[dropped] < 1).any():
            raise AssertionError(f"request {req.request_id} releases a slot twice")
        self._owners[dropped] -= 1
        freed = dropped[self._owners[dropped] == 0]
        if len(freed):
            self._give(freed)

    # --- the prompt cache --------------------------------------------------------------------------
    def attach_prefix(self, req: Request) -> int:
        """Start `req` (holding nothing) on the longest cached prefix of its sequence but the last token, which
        is computed for its logits: req.slots are the cache's slots, locked until `release`. Returns the
        prefix length (0 without the prompt cache, and for requests that want prompt logprobs)."""
        if req.slots or req.num_cached:
            raise ValueError(f"request {req.request_id} already holds KV")
        if self.prefix is None or req.params.prompt_logprobs:
            return 0
        match = self.prefix.match_prefix(req.token_ids(0, req.num_known), max_length=req.num_tokens - 1)
        if match.length == 0:
            return 0
        self.prefix.lock(match.node)
        req.cache_node, req.num_cached = match.node, match.length
        req.slots = match.slots.tolist()
        req.num_computed = match.length
        return match.length

    def share_prefix(self, req: Request) -> None:
        """Cache `req`'s computed tokens while it runs (after the step computing them is dispatched), so that
        requests admitted later reuse them; the cache takes the slots over and req keeps them locked. When
        another request cached part of them meanwhile, req's copies stay private until `release`."""
        if self.prefix is None:
            return
        k = min(req.num_computed, req.num_known)
        if k <= req.num_cached or self.shares(req):  # group-shared slots are cached by their last owner
            return
        ids = req.token_ids(0, k)
        if self.prefix.match_prefix(ids).length > req.num_cached:
            return
        self.prefix.insert(ids, req.slots[:k])
        self._owners[np.asarray(req.slots[req.num_cached:k], np.int64)] = 0  # the cache's now
        node = self.prefix.match_prefix(ids).node
        self.prefix.lock(node)
        if req.cache_node is not None:
            self.prefix.unlock(req.cache_node)
        req.cache_node, req.num_cached = node, k

    def clear_prefix_cache(self) -> None:
        """Free every cached slot (their KV was lost); no request may hold a lock."""
        if self.prefix is None:
            return
        if self.prefix.locked_tokens:
            raise ValueError("the prompt cache is cleared while requests lock part of it")
        self._give(self.prefix.evict(self.prefix.cached_tokens).astype(np.int64))

    def _reserve(self, n: int) -> None:
        """Make n slots free, evicting unlocked cached ones if needed; KVCacheFull if it cannot."""
        if n > self.num_available:
            raise KVCacheFull(f"{n} KV slots asked for, {self.num_available} available")
        if n > self._num_free:
            self._give(self.prefix.evict(n - self._num_free).astype(np.int64))

    def check(self, holders: list[Request]) -> None:
        """Assert the invariants: distinct private + cached + free = total, each private slot's owner count is
        the number of holders listing it, no row held twice, no slot in use marked free (tests, debugging)."""
        empty = np.zeros(0, np.int64)
        private = np.concatenate([np.asarray(r.slots[r.num_cached:], np.int64) for r in holders] or [empty])
        shared = np.concatenate([np.asarray(r.slots[: r.num_cached], np.int64) for r in holders] or [empty])
        for r in holders:
            assert len(set(r.slots)) == len(r.slots), f"request {r.request_id} lists a KV slot twice"
        held, counts = np.unique(private, return_counts=True)
        assert (self._owners[held] == counts).all(), "a KV slot's owner count is not its number of holders"
        assert int(self._owners.sum()) == len(private), "a KV slot counts an owner that does not hold it"
        assert not self._free[held].any() and not self._free[shared].any(), "a KV slot in use is marked free"
        assert not np.isin(shared, held).any(), "a cached KV slot is also private"
        assert len(held) + self.num_cached + self._num_free == self.num_slots, (
            f"{self.num_slots - self._num_free - self.num_cached - len(held)} KV slots leaked"
        )
        assert int(self._free.sum()) == self._num_free
        rows = [r.kv_row for r in holders if r.kv_row >= 0]
        assert len(set(rows)) == len(rows) and len(rows) + len(self._free_rows) == self.num_rows, "rows leaked"
        pages = np.add.reduceat(self._free, np.arange(0, self.num_slots, self.page_size))
        assert (pages == self._page_free).all()
        if self.prefix is not None:
            self.prefix.check_invariants()
            locks = sum(r.cache_node is not None for r in holders)
            assert locks or not self.prefix.locked_tokens, "the prompt cache holds locks no request owns"

    # --- internals -------------------------------------------------------------------------------
    def _extend_run(self, start: int, n: int) -> list[int]:
        """Take up to n free slots start, start+1, ... without leaving start's page; a run that reaches a
        page's first slot continues only into a wholly free page."""
        if n <= 0 or start >= self.num_slots:
            return []
        page = start // self.page_size
        if start % self.page_size == 0 and self._page_free[page] != self._page_size_of[page]:
            return []
        stop = min(start + n, (page + 1) * self.page_size, self.num_slots)
        free = self._free[start:stop]
        count = len(free) if free.all() else int(np.argmin(free))
        if count == 0:
            return []
        run = np.arange(start, start + count)
        self._take(run)
        return run.tolist()

    def _take_pages(self, n: int) -> list[int]:
        """Up to n slots from the front of wholly free pages (one page after another, as the free-page stack
        gives them: the last one partly)."""
        pages, room = [], 0
        for page in self._popped_free_pages():
            pages.append(page)
            room += int(self._page_size_of[page])
            if room >= n:
                break
        if not pages:
            return []
        slots = (np.fromiter(pages, np.int64, len(pages))[:, None] * self.page_size + np.arange(self.page_size)).ravel()
        slots = slots[slots < self.num_slots][:n]
        self._take(slots)
        return slots.tolist()

    def _popped_free_pages(self):
        """Wholly free pages popped off the free-page stack as they are asked for, each once (the stack may hold a
        page twice: it is still free when met again before its slots are taken)."""
        seen = set()
        while (page := self._pop_free_page()) is not None:
            if page not in seen:
                seen.add(page)
                yield page

    def _pop_free_page(self) -> int | None:
        while self._free_pages:
            page = self._free_pages.pop()
            if self._page_free[page] == self._page_size_of[page]:
                return page
        return None

    def _take(self, slots: np.ndarray) -> None:
        if len(slots) == 0:
            return
        self._owners[slots] = 1
        self._free[slots] = False
        self._num_free -= len(slots)
        np.subtract.at(self._page_free, slots // self.page_size, 1)

    def _give(self, slots: np.ndarray) -> None:
        """Free `slots` (distinct); pages they leave wholly free go on the free-page stack, once each where the
        slots come in runs (a request's do; np.unique's sort cost more than the rest of a release)."""
        self._free[slots] = True
        self._num_free += len(slots)
        pages = slots // self.page_size
        np.add.at(self._page_free, pages, 1)
        whole = pages[self._page_free[pages] == self._page_size_of[pages]]
        if len(whole) > 1:
            whole = whole[np.concatenate(([True], whole[1:] != whole[:-1]))]
        self._free_pages.extend(whole.tolist())
        if len(self._free_pages) > 2 * len(self._page_free):  # drop stale entries now and then
            full = np.flatnonzero(self._page_free == self._page_size_of)
            self._free_pages = full[::-1].tolist()


@struct.dataclass
class DeviceKV:
    """The device state the steps donate and update in place."""

    layers: tuple  # one backend cache tuple per layer (opaque to the engine)
    slot_table: jax.Array  # [num_rows + 1, width] int32: row → KV slot of each position
    token_table: jax.Array  # [num_rows + 1, width] int32: row → token id of each position (penalties)


def init_device_kv(model, num_slots: int, num_rows: int, width: int, mesh: Mesh, kv_spec: PartitionSpec):
    """Allocate the per-layer caches (with the scratch slot) and the two tables, placed on the mesh."""
    c = model.config
    abstract = jax.eval_shape(lambda: init_kv_cache(model, num_slots))[0]
    layer_shardings = tuple(NamedSharding(mesh, cache_array_spec(a.ndim, kv_spec[1])) for a in abstract)
    table = NamedSharding(mesh, PartitionSpec())
    shardings = DeviceKV(
        layers=tuple(layer_shardings for _ in range(c.num_layers)), slot_table=table, token_table=table
    )

    def build():
        layers = init_kv_cache(model, num_slots)
        slot_table = jnp.full((num_rows + 1, width), num_slots, jnp.int32)
        token_table = jnp.zeros((num_rows + 1, width), jnp.int32)
        return DeviceKV(layers=layers, slot_table=slot_table, token_table=token_table)

    return jax.jit(build, out_shardings=shardings)(), shardings
