"""The publisher without etcd: synthetic batches in, real segments out, checked with a Reader.

These drive shmcache.writer.publisher.Publisher directly (no feed, no gRPC) over real
/dev/shm segments, and read the result back through the public Reader and
``shmcache check``, in this process and in a child process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

import shmcache
from shmcache.cli import check as _check
from shmcache.format.codec import EventTuple
from shmcache.ipc import shm as _shm
from shmcache.writer.lock import remove_cache
from shmcache.writer.publisher import Publisher
from shmcache.writer.segments import CacheSegments

P = b"/p/"


def _stats() -> dict[str, Any]:
    return {"events": 0, "records": 0, "bytes": 0, "snapshots": 0, "relists": 0,
            "snapshot_seconds": 0.0, "snapshot_seconds_total": 0.0, "snapshot_keys": 0,
            "snapshot_bytes": 0}


def _publisher(name: str, ring_size: int = 1 << 20, snapshot_bytes: int = 1 << 30) -> Publisher:
    segs = CacheSegments(name, P, 0o600, None)
    return Publisher(segs, ring_size=ring_size, snapshot_interval=3600.0,
                     snapshot_bytes=snapshot_bytes, stats=_stats())


@pytest.fixture
def pub(cache_name: str) -> Iterator[Publisher]:
    p = _publisher(cache_name)
    assert p.attach() is False  # a fresh cache
    try:
        yield p
    finally:
        p.close(removed_under_us=False, remove=True)


def put(key: bytes, value: bytes, rev: int, create: int | None = None,
        version: int = 1) -> EventTuple:
    return (0, key, value, create or rev, rev, version, 0, None)


def delete(key: bytes, rev: int) -> EventTuple:
    return (1, key, b"", 0, rev, 0, 0, None)


def test_batches_become_revisions_a_reader_serves(pub: Publisher, cache_name: str) -> None:
    pub.reset(10, [(P + b"a", (b"1", 5, 5, 1, 0))], "test")
    with shmcache.Reader(cache_name) as r:
        assert r.revision == 10 and r.get(P + b"a").value == b"1"
        w = r.watch(P, since_revision=10)
        pub.apply([(11, [put(P + b"b", b"2", 11)]),
                   (12, [put(P + b"a", b"3", 12, create=5, version=2), delete(P + b"b", 12)])])
        assert r.revision == 12
        assert [(kv.key, kv.value) for kv in r.list(P)] == [(P + b"a", b"3")]
        events = w.poll(timeout=1)
        assert [(e.type, e.kv.key, e.revision) for e in events] == [
            ("PUT", P + b"b", 11), ("PUT", P + b"a", 12), ("DELETE", P + b"b", 12)]
        # prev_kv left out by the feed (None) is filled from the state.
        assert events[1].prev_kv is not None and events[1].prev_kv.value == b"1"
        assert events[2].prev_kv is not None and events[2].prev_kv.value == b"2"
        assert events[0].prev_kv is None  # a creation has none
        # Past revisions come from the same records.
        assert r.get(P + b"a", revision=11).value == b"1"
        assert [kv.key for kv in r.list(P, revision=11)] == [P + b"a", P + b"b"]
    assert _check.check_cache(cache_name)[1] == []


def test_progress_moves_the_revision_without_a_record(pub: Publisher, cache_name: str) -> None:
    pub.reset(3, [], "test")
    with shmcache.Reader(cache_name) as r:
        head = r.status().ring_used
        pub.progress(9)
        assert r.revision == 9 and r.status().ring_used == head
        pub.progress(7)  # never backwards
        assert r.revision == 9


def test_a_child_process_reads_what_the_publisher_wrote(pub: Publisher, cache_name: str) -> None:
    pub.reset(1, [], "test")
    pub.apply([(2 + i, [put(P + b"k%03d" % i, b"v%d" % i, 2 + i)]) for i in range(50)])
    code = ("import shmcache, sys; r = shmcache.Reader(sys.argv[1]); "
            "print(r.revision, len(r.list(b'/p/')), r.get(b'/p/k049').value.decode())")
    out = subprocess.run([sys.executable, "-c", code, cache_name], capture_output=True,
                         text=True, timeout=30, check=True).stdout.split()
    assert out == ["51", "50", "v49"]


def test_the_ring_laps_and_snapshots_keep_the_state(cache_name: str) -> None:
    """A 64 KiB ring, 2 KB values: the ring laps many times; forced snapshots keep every
    key readable, a watch that fell behind gets CompactedError, a fresh one continues."""
    p = _publisher(cache_name, ring_size=64 << 10)
    p.attach()
    try:
        p.reset(1, [], "test")
        with shmcache.Reader(cache_name) as r:
            slow = r.watch(P, since_revision=1)
            for i in range(200):
                p.apply([(2 + i, [put(P + b"k%02d" % (i % 20), b"x" * 2000 + b"%d" % i,
                                      2 + i, create=2 + i % 20, version=1 + i // 20)])])
            assert r.revision == 201 and len(r.list(P)) == 20
            assert r.get(P + b"k19").value.endswith(b"199")
            with pytest.raises(shmcache.CompactedError):
                slow.poll(timeout=0)
            st = r.status()
            assert st.oldest_watchable_revision > 1 and p.stats["snapshots"] > 1
            # From the oldest watchable revision: every event retained, in order.
            retained = r.watch(P, since_revision=st.oldest_watchable_revision).poll(timeout=1)
            assert [e.revision for e in retained] == list(
                range(st.oldest_watchable_revision + 1, 202))
            fresh = r.watch(P, since_revision=201)
            p.apply([(202, [delete(P + b"k00", 202)])])
            assert [(e.type, e.revision) for e in fresh.poll(timeout=1)] == [("DELETE", 202)]
        assert _check.check_cache(cache_name)[1] == []
    finally:
        p.close(removed_under_us=False, remove=True)


def test_a_revision_larger_than_the_ring_switches_rings_in_the_same_epoch(
        cache_name: str) -> None:
    p = _publisher(cache_name, ring_size=64 << 10)
    p.attach()
    try:
        p.reset(1, [], "test")
        with shmcache.Reader(cache_name) as r:
            w = r.watch(P, since_revision=1)
            epoch = r.status().epoch
            big = [put(P + b"b%04d" % i, b"y" * 100, 2) for i in range(500)]  # ~60 KB
            p.apply([(2, big), (3, [put(P + b"after", b"1", 3)])])
            st = r.status()
            assert st.epoch == epoch and st.ring_capacity > 64 << 10
            got = w.poll(timeout=1)
            assert len(got) == 501 and got[-1].kv.key == P + b"after"
        assert _check.check_cache(cache_name)[1] == []
    finally:
        p.close(removed_under_us=False, remove=True)


def test_a_new_publisher_resumes_from_the_segments(cache_name: str) -> None:
    p = _publisher(cache_name)
    p.attach()
    p.reset(1, [(P + b"a", (b"1", 1, 1, 1, 0))], "test")
    p.apply([(2, [put(P + b"b", b"2", 2)]), (3, [delete(P + b"a", 3)])])
    p.close(removed_under_us=False, remove=False)
    q = _publisher(cache_name)
    try:
        assert q.attach() is True
        assert q.restore() is None
        assert q.revision == 3 and dict(q.kv) == {P + b"b": (b"2", 2, 2, 1, 0)}
        q.apply([(4, [put(P + b"c", b"3", 4)])])
        with shmcache.Reader(cache_name) as r:
            assert [kv.key for kv in r.list(P)] == [P + b"b", P + b"c"]
            assert [e.revision for e in r.watch(P, since_revision=1).poll(timeout=1)] == [2, 3, 4]
    finally:
        q.close(removed_under_us=False, remove=True)
    assert _shm.list_segments(cache_name) == []


def test_a_second_publisher_cannot_take_a_held_cache(pub: Publisher, cache_name: str) -> None:
    other = _publisher(cache_name)
    with pytest.raises(shmcache.CacheExistsError):
        other.attach()


def test_a_token_from_an_earlier_epoch_is_a_value_error(pub: Publisher, cache_name: str) -> None:
    pub.reset(5, [(P + b"k%d" % i, (b"v", 5, 5, 1, 0)) for i in range(5)], "test")
    with shmcache.Reader(cache_name) as r:
        tok = r.list(P, limit=2).continue_token
        assert tok is not None
        assert len(r.list(P, limit=2, continue_token=tok)) == 2
        pub.reset(9, [(P + b"k0", (b"v", 5, 5, 1, 0))], "a relist")
        with pytest.raises(ValueError, match="epoch .* list again") as exc:
            r.list(P, limit=2, continue_token=tok)
        # Also a CompactedError: a relist during an iter_list is "list again", not a bug.
        assert isinstance(exc.value, shmcache.CompactedError)
        assert exc.value.compact_revision == r.status().oldest_watchable_revision
        assert [kv.key for kv in r.iter_list(P, page_size=1)] == [P + b"k0"]
        # An iter_list across a relist ends in CompactedError, the remedy it documents.
        pub.reset(12, [(P + b"k%d" % i, (b"v", 5, 5, 1, 0)) for i in range(3)], "a relist")
        it = r.iter_list(P, page_size=1)
        assert next(it).key == P + b"k0"
        pub.reset(15, [(P + b"k%d" % i, (b"v", 5, 5, 1, 0)) for i in range(3)], "a relist")
        with pytest.raises(shmcache.CompactedError):
            next(it)



def test_attach_that_loses_the_creation_race_opens_the_winner_s_segment(
        cache_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two writers start at once: both find no control segment, the other creates it
    first. The loser's exclusive create fails (posix_ipc raises ExistentialError, not
    FileExistsError); it must open the winner's segment and go on (here: take the lock
    the winner has released), not crash."""
    winner = _publisher(cache_name)
    winner.attach()
    winner.reset(3, [], "test")
    winner.close(removed_under_us=False, remove=False)
    real = _shm.open_writable
    calls: list[str] = []

    def not_there_yet(name: str) -> Any:
        calls.append(name)
        return None if len(calls) == 1 else real(name)  # the winner created it just after

    monkeypatch.setattr(_shm, "open_writable", not_there_yet)
    loser = _publisher(cache_name)
    try:
        assert loser.attach() is True
        assert len(calls) == 2
        monkeypatch.undo()
        assert loser.restore() is None and loser.revision == 3
    finally:
        loser.close(removed_under_us=False, remove=True)


def test_a_restore_that_fails_unmaps_what_it_mapped(
        cache_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """_restore.load on damaged segments returns the reason and leaves no mapping open,
    even while something else still refers to the segments (so refcounting does not
    unmap them by chance)."""
    from shmcache.format import layout
    from shmcache.writer import restore as _restore

    p = _publisher(cache_name)
    p.attach()
    p.reset(1, [(P + b"a", (b"1", 1, 1, 1, 0))], "test")
    p.apply([(2, [put(P + b"b", b"2", 2)])])
    p.close(removed_under_us=False, remove=False)
    mapped: list[_shm.Segment] = []
    ro, rw = _shm.open_readonly, _shm.open_writable

    def open_readonly(name: str) -> Any:
        seg = ro(name)
        if seg is not None:
            mapped.append(seg)
        return seg

    def open_writable(name: str) -> Any:
        got = rw(name)
        if got is not None:
            mapped.append(got[0])
        return got

    ctl, fd = rw(layout.control_name(cache_name)) or (None, -1)
    assert ctl is not None
    os.close(fd)
    try:
        monkeypatch.setattr(_shm, "open_readonly", open_readonly)
        monkeypatch.setattr(_shm, "open_writable", open_writable)
        # A bad ring header (the ring is mapped, then refused) ...
        seg, fd2 = rw(layout.ring_name(cache_name, 1)) or (None, -1)
        assert seg is not None
        os.close(fd2)
        good = bytes(seg.buf[:8])
        seg.buf[:8] = b"XXXXXXXX"
        assert "bad ring magic" in str(_restore.load(cache_name, P, ctl, b""))
        seg.buf[:8] = good
        # ... and a missing snapshot (the ring is mapped, then the snapshot is not there).
        snap_name = layout.snapshot_name(cache_name, 1)
        saved = ro(snap_name)
        assert saved is not None
        _shm.unlink(snap_name)
        assert "is missing" in str(_restore.load(cache_name, P, ctl, b""))
        seg.close()
        saved.close()
        assert len(mapped) == 2
        assert all(m.buf.closed for m in mapped), "load left a segment mapped"
    finally:
        monkeypatch.undo()
        ctl.close()
        remove_cache(cache_name, force=True)


def test_closing_a_segment_with_a_live_view_lets_go_of_the_mapping(cache_name: str) -> None:
    """Segment.close while a memoryview of it is alive (BufferError from mmap.close): the
    segment behaves as closed and no longer keeps the map, which is unmapped as soon as
    the view goes, even though the Segment object lives on."""
    name = f"/shmcache.{cache_name}.ctl"
    seg = _shm.create(name, 4096)
    try:
        view = memoryview(seg.buf)[:16]
        seg.close()
        with pytest.raises(ValueError):
            seg.buf[:1]  # noqa: B018  (closed, like any closed segment)
        seg.close()  # idempotent
        del view
        with open("/proc/self/maps") as f:
            assert name not in f.read()
    finally:
        _shm.unlink(name)
