"""KVCache: per-token accounting, page-friendly placement that never wastes capacity, no leaks."""

import numpy as np
import pytest

from jaxllm.engine.kv_cache import KVCache, KVCacheFull
from jaxllm.engine.request import Request, SamplingParams


def new_request(i: int) -> Request:
    return Request(f"r{i}", [5] * 4, SamplingParams(), seed=i, arrival=i)


def runs(slots: list[int]) -> int:
    """Number of maximal runs of consecutive slots."""
    return 1 + int(np.sum(np.diff(slots) != 1)) if slots else 0


def whole_pages(slots: list[int], page: int = 16) -> tuple[int, int]:
    """(position blocks of `page` tokens stored as one aligned page, complete position blocks)."""
    blocks = len(slots) // page
    good = sum(
        slots[j * page] % page == 0 and runs(slots[j * page : (j + 1) * page]) == 1 for j in range(blocks)
    )
    return good, blocks


def test_a_request_holds_one_slot_per_token_in_page_aligned_runs():
    kv = KVCache(num_slots=100, num_rows=4, page_size=16)
    a, b = new_request(0), new_request(1)
    kv.allocate(a, 20)
    kv.allocate(b, 5)
    for _ in range(10):
        kv.allocate_one_each([a, b])
    assert len(a.slots) == 30 and len(b.slots) == 15
    assert kv.num_used == 45 and kv.num_free == 55
    # Each request starts a page and grows into consecutive slots.
    assert a.slots[0] % 16 == 0 and b.slots[0] % 16 == 0
    assert runs(a.slots) == 1 and runs(b.slots) == 1
    kv.check([a, b])


def test_a_decode_step_continues_runs_and_starts_crossing_ones_on_free_pages():
    """allocate_one_each: a run whose next slot is free continues, across into its next page when that page is
    wholly free; one whose next slot is taken, or whose next page is not wholly free, starts a wholly free page;
    with none left, it takes any free slot (the top one)."""
    kv = KVCache(num_slots=128, num_rows=8, page_size=16)
    a, b, c, d, e = (new_request(i) for i in range(5))
    for req, n in ((a, 5), (b, 16), (c, 16), (d, 3), (e, 16)):  # pages 0-4 in turn
        kv.allocate(req, n)
    assert [r.slots[0] for r in (a, b, c, d, e)] == [0, 16, 32, 48, 64]
    kv.allocate_one_each([a, b, c, d, e])
    # a and d continue in their pages; e into page 5 (wholly free); b (32 is c's) and c (page 3 holds d's run)
    # start the next wholly free pages, 6 and 7
    assert [r.slots[-1] for r in (a, b, c, d, e)] == [5, 96, 112, 51, 80]
    kv.check([a, b, c, d, e])

    kv = KVCache(num_slots=32, num_rows=2, page_size=16)
    x, y = new_request(0), new_request(1)
    kv.allocate(x, 16)
    kv.allocate(y, 3)  # page 1 is y's: x's run has no wholly free page to cross into
    kv.allocate_one_each([x, y])
    assert x.slots[-1] == 31 and y.slots[-1] == 19
    kv.check([x, y])


def test_fragmented_cache_is_used_to_the_last_slot():
    kv = KVCache(num_slots=64, num_rows=64, page_size=16)
    reqs = [new_request(i) for i in range(32)]
    for r in reqs:
        kv.allocate(r, 2)
    for r in reqs[::2]:  # free every other request: 32 free slots scattered over every page
        kv.release(r)
    big = new_request(99)
    kv.allocate(big, 32)
    assert kv.num_free == 0 and len(big.slots) == 32
    kv.check(reqs[1::2] + [big])
    with pytest.raises(KVCacheFull):
        kv.allocate(new_request(100), 1)


def test_allocation_failure_changes_nothing():
    kv = KVCache(num_slots=10, num_rows=2)
    r = new_request(0)
    kv.allocate(r, 8)
    with pytest.raises(KVCacheFull):
        kv.allocate(new_request(1), 3)
    with pytest.raises(KVCacheFull):
        kv.allocate_one_each([r, new_request(2), new_request(3)])
    assert kv.num_free == 2
    kv.check([r])


def test_rows_are_a_resource_too():
    kv = KVCache(num_slots=10, num_rows=1)
    a, b = new_request(0), new_request(1)
    kv.allocate(a, 1)
    with pytest.raises(KVCacheFull, match="row"):
        kv.allocate(b, 1)
    kv.release(a)
    kv.allocate(b, 1)
    assert b.kv_row == 0 and a.kv_row == -1


def test_no_slot_leaks_after_thousands_of_random_requests():
    """A saturated cache: random admissions, growth and releases, invariants checked throughout."""
    rng = np.random.default_rng(0)
    kv = KVCache(num_slots=1000, num_rows=64, page_size=16)
    live: list[Request] = []
    admitted = 0
    for i in range(8000):
        op = rng.random()
        if op < 0.35 and len(live) < 64:
            n = int(rng.integers(1, 80))
            if kv.can_allocate(n):
                r = new_request(i)
                kv.allocate(r, n)
                live.append(r)
                admitted += 1
        elif op < 0.85 and live:
            grow = [r for r in live if rng.random() < 0.7]
            if len(grow) <= kv.num_free:
                kv.allocate_one_each(grow)
        elif live:
            kv.release(live.pop(int(rng.integers(len(live)))))
        if i % 200 == 0:
            kv.check(live)
    for r in live:
        kv.release(r)
    kv.check([])
    assert admitted > 900
    assert kv.num_free == 1000 and kv.num_free_rows == 64


def test_requests_fill_aligned_pages_under_conservative_admission():
    """Admission that reserves each request's final length (the router's default): most blocks of 16
    positions land in one aligned page, as a paged attention kernel reads them."""
    rng = np.random.default_rng(1)
    kv = KVCache(num_slots=1000, num_rows=64, page_size=16)
    target: dict[Request, int] = {}
    aligned = blocks = 0
    for i in range(2000):
        prompt, new = int(rng.integers(1, 80)), int(rng.integers(1, 120))
        if sum(target.values()) + prompt + new <= 1000 and rng.random() < 0.3:
            r = new_request(i)
            kv.allocate(r, prompt)
            target[r] = prompt + new
        kv.allocate_one_each([r for r, t in target.items() if len(r.slots) < t])
        for r in [r for r, t in target.items() if len(r.slots) >= t or rng.random() < 0.01]:
            good, count = whole_pages(r.slots)
            aligned, blocks = aligned + good, blocks + count
            del target[r]
            kv.release(r)
    kv.check(list(target))
    assert aligned / blocks > 0.9
