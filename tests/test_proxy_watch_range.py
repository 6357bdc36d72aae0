"""etcd's (key, range_end) of a watch as a cache watch's prefix and key test (pure logic)."""

from __future__ import annotations

import pytest

from shmcache.proxy.watch_range import EmptyRange, select

P = b"/app/"
KEYS = [b"", b"\0", b"/ap", b"/app", b"/app/", b"/app/a", b"/app/a/b", b"/app/a0", b"/app/b",
        b"/app/\xff", b"/app0", b"/b", b"\xff\xff"]


def _in(key: bytes, end: bytes, k: bytes) -> bool:
    """etcd's reading of a watch's keys (server/mvcc/watcher_group.go)."""
    key = key or b"\0"
    if not end:
        return k == key
    if end == b"\0":
        return k >= key
    return key <= k < end


@pytest.mark.parametrize(("key", "end"), [
    (b"/app/a", b""), (b"/app/a", b"/app/b"), (b"/app/a/", b"/app/a0"), (b"/app/", b"/app0"),
    (b"/app/a", b"/app/a\x01"), (b"/app/\xff", b"/app0"), (b"/app/a", b"/app/a/c")])
def test_a_range_inside_the_prefix_selects_exactly_etcds_keys(key: bytes, end: bytes) -> None:
    sel = select(key, end, P)
    assert sel is not None
    for k in KEYS:
        got = k.startswith(sel.prefix) and (sel.matches is None or sel.matches(k))
        assert got == _in(key, end, k), k
    assert sel.prefix.startswith(P)


@pytest.mark.parametrize(("key", "end"), [
    (b"/other", b""), (b"/app", b"/app0"), (b"/app/", b"\0"), (b"", b"\0"), (b"/app/a", b"/b"),
    (b"/ap", b"/app/a")])
def test_a_range_reaching_outside_the_prefix_is_not_served(key: bytes, end: bytes) -> None:
    assert select(key, end, P) is None


def test_a_cache_of_the_whole_keyspace_serves_every_range() -> None:
    for key, end in [(b"", b"\0"), (b"/b", b"\0"), (b"", b""), (b"/a", b"/b")]:
        sel = select(key, end, b"")
        assert sel is not None
        for k in KEYS:
            if k:  # (etcd has no empty key)
                assert (k.startswith(sel.prefix) and (sel.matches is None or sel.matches(k))) \
                    == _in(key, end, k), (key, end, k)


def test_an_empty_range_is_refused_as_etcd_does() -> None:
    with pytest.raises(EmptyRange):
        select(b"/app/b", b"/app/a", P)
    with pytest.raises(EmptyRange):
        select(b"/app/b", b"/app/b", P)
