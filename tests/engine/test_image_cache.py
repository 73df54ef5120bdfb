"""The image cache's rules: at most --cache_capacity entries; when full, unreferenced entries are evicted
(least recently used first) down to reserved_ratio × capacity; no room → None (the request waits); an entry
never encoded goes when its last reference does."""

import pytest

from jaxllm.engine.image_cache import ImageCache


def filled(capacity=4, ratio=0.5, tokens=3):
    cache = ImageCache(capacity, ratio, num_rows=capacity * tokens)
    entries = [cache.acquire(f"img{i}", tokens) for i in range(capacity)]
    for e in entries:
        e.encoded = True
    return cache, entries


def test_capacity_and_reserved_ratio():
    cache, entries = filled()
    assert len(cache) == 4 and cache.num_free_rows == 0
    for e in entries[:3]:
        cache.release(e)  # img0..2 unreferenced, img3 held
    new = cache.acquire("img4", 3)
    # Evicted down to 0.5 × 4 = 2 entries (oldest first: img0, img1), then img4 added.
    assert new is not None and len(cache) == 3 and all(d in cache for d in ("img2", "img3", "img4"))
    assert "img0" not in cache and "img1" not in cache
    assert cache.evictions == 2 and set(new.rows.tolist()) <= set(range(6))


def test_no_room_waits_until_release():
    cache, entries = filled(capacity=2)
    assert cache.acquire("other", 3) is None and len(cache) == 2  # every entry is referenced
    cache.release(entries[1])
    assert cache.acquire("other", 3) is not None and "img1" not in cache


def test_hits_refs_and_lru_order():
    cache, entries = filled(capacity=3, ratio=0.0)
    again = cache.acquire("img0", 3)
    assert again is entries[0] and again.refs == 2 and cache.hits == 1
    for e in entries:
        cache.release(e)
    cache.release(again)
    assert cache.num_referenced == 0
    cache.acquire("img1", 3)  # img1 used last: img0 and img2 go first
    assert cache.acquire("new", 3) is not None and "img1" in cache and "img0" not in cache


def test_unencoded_entry_goes_with_its_last_reference():
    cache = ImageCache(2, 0.5, num_rows=6)
    entry = cache.acquire("a", 3)
    cache.release(entry)
    assert "a" not in cache and cache.num_free_rows == 6
    with pytest.raises(RuntimeError):
        cache.release(entry)


def test_rows_bound_variable_sized_images():
    cache = ImageCache(4, 1.0, num_rows=8)
    big = cache.acquire("big", 6)
    big.encoded = True
    assert cache.acquire("small", 3) is None  # 2 rows left
    cache.release(big)
    assert cache.acquire("small", 3) is not None and "big" not in cache  # evicted for its rows
    with pytest.raises(ValueError, match="exceeds"):
        cache.acquire("huge", 9)
