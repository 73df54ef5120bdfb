"""PrefixCache: matching, splitting, ref-counted locks, LRU eviction, slot ownership under random traffic."""

import numpy as np
import pytest

from jaxllm.engine.prefix_cache import PrefixCache


def cache_with(*seqs: list[int]) -> tuple[PrefixCache, list[np.ndarray]]:
    """A cache holding each sequence under fresh slots (100·k + position for the k-th), as inserted."""
    cache = PrefixCache()
    given = []
    for k, seq in enumerate(seqs):
        slots = np.arange(len(seq), dtype=np.int32) + 100 * (k + 1)
        n = cache.insert(seq, slots)
        given.append(slots[n:])
    cache.check_invariants()
    return cache, given


def test_empty_cache_and_empty_input():
    cache = PrefixCache()
    m = cache.match_prefix([3, 1, 4])
    assert m.length == 0 and m.slots.dtype == np.int32 and m.slots.shape == (0,)
    cache.lock(m.node)  # the root: accepted, holds nothing
    assert cache.locked_tokens == 0
    cache.unlock(m.node)
    assert cache.insert([], []) == 0
    cache, _ = cache_with([3, 1, 4])
    m = cache.match_prefix([])
    assert m.length == 0 and len(m.slots) == 0
    assert cache.evict(0).shape == (0,) and cache.cached_tokens == 3
    cache.check_invariants()


def test_match_returns_the_longest_cached_prefix_and_its_slots():
    cache, _ = cache_with([1, 2, 3, 4, 5])
    m = cache.match_prefix([1, 2, 3, 4, 5, 6, 7])
    assert m.length == 5 and m.slots.tolist() == [100, 101, 102, 103, 104]
    assert cache.match_prefix([9, 1, 2]).length == 0
    assert cache.match_prefix(np.array([1, 2, 3, 4, 5])).length == 5  # numpy input works the same
    assert cache.cached_tokens == 5 and cache.evictable_tokens == 5 and cache.locked_tokens == 0


def test_match_ending_mid_edge_splits_so_the_lock_covers_exactly_the_match():
    cache, _ = cache_with([1, 2, 3, 4, 5])
    m = cache.match_prefix([1, 2, 3, 9])
    assert m.length == 3 and m.slots.tolist() == [100, 101, 102]
    cache.lock(m.node)
    assert cache.locked_tokens == 3 and cache.evictable_tokens == 2
    cache.check_invariants()
    assert sorted(cache.evict(100).tolist()) == [103, 104]  # only the unlocked tail goes
    assert cache.match_prefix([1, 2, 3, 4]).length == 3
    cache.unlock(m.node)
    assert sorted(cache.evict(100).tolist()) == [100, 101, 102]
    assert cache.cached_tokens == 0
    cache.check_invariants()


def test_max_length_leaves_the_last_prompt_token_to_compute():
    cache, _ = cache_with([1, 2, 3, 4])
    prompt = [1, 2, 3, 4]
    m = cache.match_prefix(prompt, max_length=len(prompt) - 1)
    assert m.length == 3 and m.slots.tolist() == [100, 101, 102]
    cache.lock(m.node)
    assert cache.locked_tokens == 3 and cache.evictable_tokens == 1  # the split-off last token stays evictable
    assert cache.match_prefix([1], max_length=0).length == 0
    with pytest.raises(ValueError):
        cache.match_prefix(prompt, max_length=-1)
    cache.check_invariants()


def test_insert_returns_the_already_cached_length_and_takes_only_new_slots():
    cache, _ = cache_with([1, 2, 3])
    assert cache.insert([1, 2, 3], [7, 8, 9]) == 3  # all duplicates: the caller frees 7, 8, 9
    assert cache.match_prefix([1, 2, 3]).slots.tolist() == [100, 101, 102] and cache.cached_tokens == 3
    assert cache.insert([1, 2], [7, 8]) == 2  # a prefix of a cached sequence (ends mid-edge)
    assert cache.cached_tokens == 3
    cache.check_invariants()


def test_insert_extending_a_cached_sequence_adds_only_the_extension():
    cache, _ = cache_with([1, 2, 3])
    assert cache.insert([1, 2, 3, 4, 5], [7, 8, 9, 50, 51]) == 3
    assert cache.cached_tokens == 5
    assert cache.match_prefix([1, 2, 3, 4, 5, 6]).slots.tolist() == [100, 101, 102, 50, 51]
    cache.check_invariants()


def test_two_sequences_diverging_mid_edge_share_the_common_part():
    cache, given = cache_with([1, 2, 3, 4, 5], [1, 2, 3, 7, 8])
    assert given[1].tolist() == [203, 204]  # 200..202 were duplicates of the cached [1, 2, 3]
    assert cache.cached_tokens == 7
    assert cache.match_prefix([1, 2, 3, 4, 5]).slots.tolist() == [100, 101, 102, 103, 104]
    assert cache.match_prefix([1, 2, 3, 7, 8]).slots.tolist() == [100, 101, 102, 203, 204]
    assert cache.match_prefix([1, 2, 3, 6]).length == 3
    assert cache.insert([1, 2, 6], [60, 61, 62]) == 2  # a third branch inside the shared part
    assert cache.match_prefix([1, 2, 6]).slots.tolist() == [100, 101, 62]
    assert cache.cached_tokens == 8
    cache.check_invariants()


def test_locks_are_reference_counted():
    cache, _ = cache_with([1, 2, 3])
    m = cache.match_prefix([1, 2, 3])
    cache.lock(m.node)
    cache.lock(m.node)  # two requests share the prefix
    cache.unlock(m.node)
    assert cache.locked_tokens == 3 and cache.evict(3).shape == (0,)
    cache.unlock(m.node)
    assert cache.locked_tokens == 0 and cache.evictable_tokens == 3
    with pytest.raises(ValueError, match="not locked"):
        cache.unlock(m.node)
    assert sorted(cache.evict(3).tolist()) == [100, 101, 102]
    with pytest.raises(ValueError, match="not in this cache"):
        cache.lock(m.node)  # evicted: its handle is dead
    cache.check_invariants()


def test_a_lock_holds_the_whole_path_and_survives_later_splits():
    cache, _ = cache_with([1, 2, 3, 4], [1, 2, 5])
    m = cache.match_prefix([1, 2, 3, 4])
    cache.lock(m.node)
    assert cache.locked_tokens == 4
    cache.insert([1, 2, 3, 9], [30, 31, 32, 33])  # splits the locked edge [3, 4]
    cache.insert([1, 8], [40, 41])  # splits the shared edge [1, 2]
    cache.check_invariants()
    assert cache.locked_tokens == 4
    freed = cache.evict(100)
    assert sorted(freed.tolist()) == [33, 41, 202]  # every unlocked leaf, nothing of the locked path
    assert cache.match_prefix([1, 2, 3, 4]).slots.tolist() == [100, 101, 102, 103]
    cache.unlock(m.node)
    assert cache.locked_tokens == 0 and cache.evictable_tokens == 4
    cache.check_invariants()


def test_eviction_takes_the_least_recently_used_leaf_first():
    cache, _ = cache_with([1, 1], [2, 2], [3, 3])
    cache.match_prefix([1, 1])  # now [2, 2] is the oldest, then [3, 3]
    assert sorted(cache.evict(2).tolist()) == [200, 201]
    cache.insert([3, 3, 3], [50, 51, 52])  # an insert through [3, 3] uses it too
    assert sorted(cache.evict(2).tolist()) == [100, 101]
    cache.check_invariants()


def test_eviction_cascades_to_parents_that_become_unlocked_leaves():
    cache, _ = cache_with([1, 2, 3, 4], [1, 2, 3, 5])
    freed = cache.evict(5)  # the two one-token leaves, then their parent [1, 2, 3]
    assert sorted(freed.tolist()) == [100, 101, 102, 103, 203]
    assert cache.cached_tokens == 0
    cache.check_invariants()


def test_eviction_trims_a_leaf_tail_to_free_exactly_what_is_asked():
    cache, _ = cache_with([1, 2, 3, 4, 5])
    assert cache.evict(2).tolist() == [103, 104]
    assert cache.match_prefix([1, 2, 3, 4, 5]).length == 3 and cache.cached_tokens == 3
    cache.check_invariants()


def test_eviction_frees_fewer_only_when_nothing_more_is_evictable():
    cache, _ = cache_with([1, 2, 3], [4, 5])
    m = cache.match_prefix([4, 5])
    cache.lock(m.node)
    assert cache.evictable_tokens == 3
    assert sorted(cache.evict(10).tolist()) == [100, 101, 102]
    assert cache.evict(10).shape == (0,) and cache.cached_tokens == 2
    cache.check_invariants()


def test_repeated_lock_cycles_keep_the_eviction_queue_small():
    cache, _ = cache_with([1, 2, 3])
    m = cache.match_prefix([1, 2, 3])
    for _ in range(1000):  # each unlock queues the leaf again; stale and duplicate entries get dropped
        cache.lock(m.node)
        cache.unlock(m.node)
    assert len(cache._heap) < 100
    cache.check_invariants()
    assert sorted(cache.evict(3).tolist()) == [100, 101, 102]


def test_invalid_input_is_refused():
    cache = PrefixCache()
    with pytest.raises(ValueError, match="2 token ids but 3 slots"):
        cache.insert([1, 2], [5, 6, 7])
    with pytest.raises(ValueError, match="one-dimensional"):
        cache.match_prefix([[1, 2]])
    with pytest.raises(ValueError, match="not in this cache"):
        cache.lock(cache_with([1])[0].match_prefix([1]).node)


def test_check_invariants_reports_a_slot_cached_twice():
    cache, _ = cache_with([1, 2, 3])
    cache.insert([7, 8], [55, 102])  # a caller bug: 102 already caches token 3 of [1, 2, 3]
    with pytest.raises(AssertionError, match=r"slots cached twice: \[102\]"):
        cache.check_invariants()


def test_finished_and_chunked_requests_follow_the_ownership_rule():
    """The documented life cycle, with a tiny allocator: no slot is leaked or freed twice."""
    free = list(range(20))
    cache = PrefixCache()
    # Request A computes [1, 2, 3, 4] with private slots and finishes: the cache takes all of them.
    a = [free.pop() for _ in range(4)]
    assert cache.insert([1, 2, 3, 4], a) == 0
    # Request B: prompt [1, 2, 3, 9], reuses [1, 2, 3], computes 9, then one chunk more [6].
    prompt = [1, 2, 3, 9]
    m = cache.match_prefix(prompt, max_length=len(prompt) - 1)
    cache.lock(m.node)
    b = [*m.slots.tolist(), free.pop()]
    assert b[:3] == a[:3]
    n = cache.insert(prompt, b)  # chunk boundary: cache what is computed, keep running
    free += b[m.length : n]
    m2 = cache.match_prefix(prompt)
    cache.lock(m2.node)
    cache.unlock(m.node)
    b = [*m2.slots.tolist(), free.pop()]
    cache.check_invariants()
    n = cache.insert([*prompt, 6], b)  # finished
    assert n == 4
    free += b[m2.length : n]
    cache.unlock(m2.node)
    assert len(free) + cache.cached_tokens == 20 and cache.locked_tokens == 0
    free += cache.evict(cache.evictable_tokens).tolist()
    assert sorted(free) == list(range(20))
    cache.check_invariants()


# --- randomized stress test ----------------------------------------------------------------------

NUM_SLOTS = 250  # tight: requests evict the cache and sometimes cannot start or grow
VOCAB = 5  # few token ids: random suffixes collide and diverge mid-edge all the time


def prefix_hashes(ids) -> list[int]:
    """hash of ids[:j + 1] for each j: what the KV in a token's slot depends on."""
    out, h = [], 0
    for t in ids:
        h = hash((h, int(t)))
        out.append(h)
    return out


class Request:
    def __init__(self, ids, node, matched, slots):
        self.ids, self.node, self.matched = list(ids), node, matched
        self.slots = list(slots)  # slots[:matched] are the cache's (locked), the rest are private
        self.chain = prefix_hashes(ids)


class World:
    """A cache, a slot allocator, simulated KV contents, running requests and extra pins (shared locks)."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.cache = PrefixCache()
        self.is_free = np.ones(NUM_SLOTS, bool)
        self.free = list(range(NUM_SLOTS))
        self.content = np.zeros(NUM_SLOTS, np.int64)  # prefix hash of the token whose KV a slot holds
        self.running: list[Request] = []
        self.pins: list[tuple] = []  # (node, prefix hashes it holds)
        self.hits = self.evicted = self.failed = 0  # what the run exercised
        shared = self.tokens(30)
        # System prompts that share prefixes of their own, so that requests diverge inside edges.
        self.systems = [shared[:20] + self.tokens(15), shared[:20] + self.tokens(10),
                        shared[:8] + self.tokens(20), self.tokens(25)]

    def tokens(self, n: int) -> list[int]:
        return self.rng.integers(0, VOCAB, n).tolist()

    def prompt(self) -> list[int]:
        system = self.systems[self.rng.integers(len(self.systems))]
        cut = len(system) if self.rng.random() < 0.7 else int(self.rng.integers(0, len(system)))
        return system[:cut] + self.tokens(int(self.rng.integers(1, 25)))

    # --- the allocator ---
    def alloc(self, n: int, chain: list[int]) -> list[int] | None:
        """n slots for the tokens whose prefix hashes are `chain` (evicting if short), or None."""
        if len(self.free) < n:
            self.evict(n - len(self.free))
        if len(self.free) < n:
            return None
        slots = [self.free.pop() for _ in range(n)]
        assert self.is_free[slots].all()
        self.is_free[slots] = False
        self.content[slots] = chain
        return slots

    def release(self, slots) -> None:
        slots = np.asarray(slots, np.int64)
        assert len(np.unique(slots)) == len(slots) and not self.is_free[slots].any(), "double free"
        self.is_free[slots] = True
        self.content[slots] = 0
        self.free += slots.tolist()

    def evict(self, n: int) -> None:
        before = self.cache.evictable_tokens
        freed = self.cache.evict(n)
        assert len(freed) == min(n, before)
        self.evicted += len(freed)
        held = np.zeros(NUM_SLOTS, bool)
        for r in self.running:
            held[r.slots] = True
        assert not held[freed].any(), "evicted a slot that a running request holds"
        self.release(freed)

    # --- operations ---
    def match(self, ids, **kw):
        m = self.cache.match_prefix(ids, **kw)
        assert len(m.slots) == m.length and (self.content[m.slots] == prefix_hashes(ids[: m.length])).all()
        return m

    def start(self) -> None:
        ids = self.prompt()
        m = self.match(ids, max_length=len(ids) - 1)
        assert m.length <= len(ids) - 1
        self.cache.lock(m.node)
        req = Request(ids, m.node, m.length, m.slots.tolist())
        self.running.append(req)  # its locked prefix counts as held while it allocates
        new = self.alloc(len(ids) - m.length, req.chain[m.length :])
        if new is None:
            self.cache.unlock(m.node)
            self.running.remove(req)
            return
        req.slots += new
        self.hits += m.length

    def decode(self, req: Request) -> None:
        req.ids.append(int(self.rng.integers(VOCAB)))
        req.chain = prefix_hashes(req.ids)
        new = self.alloc(1, req.chain[-1:])
        if new is None:
            self.failed += 1
            req.ids.pop()
            req.chain.pop()
            return
        req.slots += new

    def finish(self, req: Request) -> None:
        n = self.cache.insert(req.ids, req.slots)
        assert n >= req.matched
        self.release(req.slots[req.matched : n])
        self.cache.unlock(req.node)
        self.running.remove(req)

    def checkpoint(self, req: Request) -> None:
        """Chunked prefill: cache what is computed and keep running on the cached slots."""
        n = self.cache.insert(req.ids, req.slots)
        self.release(req.slots[req.matched : n])
        m = self.match(req.ids)
        assert m.length == len(req.ids)
        self.cache.lock(m.node)
        self.cache.unlock(req.node)
        req.node, req.matched, req.slots = m.node, m.length, m.slots.tolist()

    def abort(self, req: Request) -> None:
        self.release(req.slots[req.matched :])
        self.cache.unlock(req.node)
        self.running.remove(req)

    def insert_uncached(self) -> None:
        """A request computed without looking the cache up (matched = 0): all its duplicates are private."""
        ids = self.prompt()
        slots = self.alloc(len(ids), prefix_hashes(ids))
        if slots is not None:
            self.release(slots[: self.cache.insert(ids, slots)])

    def pin(self) -> None:
        ids = self.prompt()
        m = self.match(ids)
        for _ in range(int(self.rng.integers(1, 4))):  # the same node locked up to three times
            self.cache.lock(m.node)
            self.pins.append((m.node, prefix_hashes(ids[: m.length])))

    def unpin(self) -> None:
        node, _ = self.pins.pop(int(self.rng.integers(len(self.pins))))
        self.cache.unlock(node)

    def step(self) -> None:
        ops = ["start", "decode", "finish", "checkpoint", "abort", "insert", "evict", "pin", "unpin"]
        op = self.rng.choice(ops, p=[0.25, 0.25, 0.14, 0.06, 0.05, 0.06, 0.07, 0.06, 0.06])
        req = self.running[int(self.rng.integers(len(self.running)))] if self.running else None
        if op == "start" or (req is None and op in ("decode", "finish", "checkpoint", "abort")):
            self.start()
        elif op in ("decode", "finish", "checkpoint", "abort"):
            getattr(self, op)(req)
        elif op == "insert":
            self.insert_uncached()
        elif op == "evict":
            self.evict(int(self.rng.integers(0, 60)))
        elif op == "pin" or not self.pins:
            self.pin()
        else:
            self.unpin()

    def check(self) -> None:
        cache = self.cache
        cache.check_invariants()
        private = sum(len(r.slots) - r.matched for r in self.running)
        assert len(self.free) + cache.cached_tokens + private == NUM_SLOTS, "a slot leaked or is counted twice"
        assert len(self.free) == int(self.is_free.sum())
        held = [r.chain[: r.matched] for r in self.running] + [chain for _, chain in self.pins]
        assert cache.locked_tokens == len(set().union(*held)), "locked tokens ≠ the union of locked prefixes"
        assert cache.evictable_tokens == cache.cached_tokens - cache.locked_tokens
        for r in self.running:  # nobody else wrote into a running request's slots
            assert (self.content[r.slots] == r.chain[: len(r.slots)]).all()

    def drain(self) -> None:
        """Finish or abort everything, drop the pins, evict all: every slot must be free again."""
        while self.running:
            (self.finish if self.rng.random() < 0.7 else self.abort)(self.running[-1])
        while self.pins:
            self.unpin()
        self.evict(self.cache.cached_tokens)
        self.check()
        assert self.cache.cached_tokens == 0 and self.is_free.all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_traffic_keeps_every_slot_accounted_for(seed):
    world = World(seed)
    for i in range(2000):
        if len(world.running) > 12:
            world.finish(world.running[0])
        else:
            world.step()
        world.check()
        if i % 500 == 499:
            world.drain()
    # The run did exercise prefix hits, eviction under memory pressure and allocation failures.
    assert world.hits > 5000 and world.evicted > 3000 and world.failed > 0
