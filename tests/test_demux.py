"""The per-process watch demultiplexer (shmcache/_demux.py) against a real writer and etcd.

Every watch of a Reader, once caught up, is fed by one reader of the ring that decodes
each record once: these tests check that the events are still exactly etcd's (no gap,
no repeat, in order) for many watches, across catching up, a slow watch, a lap of the
demultiplexer itself, a history reset, a fork, and watches dropped without close().
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import pytest

import shmcache
from shmcache import _demux
from tests.helpers import WriterProcess, delete, drain, etcd_events, put, txn, wait_rev


@pytest.fixture
def cache(etcd_session: Any, cache_name: str, unique_prefix: bytes) -> Any:
    w = WriterProcess(cache_name, etcd_session.endpoint, unique_prefix, ring_size="256KiB")
    try:
        w.start()
        yield w, unique_prefix
    finally:
        w.close()


def test_threads_on_distinct_prefixes_get_exactly_their_events(
        etcd_session: Any, etcd_client: Any, cache: Any) -> None:
    """20 threads, each iterating a Watch of its own sub-prefix (and one of the whole range),
    get exactly etcd's events for it; each record is decoded once for all of them."""
    w, p = cache
    r = shmcache.Reader(w.name)
    since = r.revision
    n = 20
    got: list[list[shmcache.Event]] = [[] for _ in range(n + 1)]
    watches = [r.watch(p + b"s%02d/" % i, since_revision=since) for i in range(n)]
    watches.append(r.watch(p, since_revision=since))
    for wt in watches:
        assert wt.poll(timeout=0) == []  # caught up: joined
    assert all(wt.joined for wt in watches)
    d = _demux.demux_of(r)
    assert d.joined_count() == n + 1
    records_before = d.records

    def consume(i: int) -> None:
        for ev in watches[i]:
            got[i].append(ev)
            if ev.kv.key.endswith(b"/end"):
                break

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    revs = []
    for j in range(5):
        for i in range(n):
            revs.append(put(etcd_client, p + b"s%02d/k%d" % (i, j % 2), b"v%d" % j))
    revs.append(txn(etcd_client, [("put", p + b"s00/t", b"x"), ("put", p + b"s01/t", b"y"),
                                  ("delete", p + b"s02/k0", b"")]))
    revs.append(delete(etcd_client, p + b"s03/", prefix=True))
    for i in range(n):
        revs.append(put(etcd_client, p + b"s%02d/end" % i, b"."))
    for t in threads:
        t.join(30)
        assert not t.is_alive()
    last = revs[-1]
    got[n] = drain(watches[n], last)
    every = etcd_events(etcd_session.endpoint, p, since, last)
    assert got[n] == every
    for i in range(n):
        assert got[i] == [e for e in every if e.kv.key.startswith(p + b"s%02d/" % i)], i
    # One decode per record, whatever the number of watches.
    assert d.records - records_before == len(revs)
    for wt in watches:
        wt.close()
    assert d.joined_count() == 0
    r.close()


def test_a_watch_from_the_past_catches_up_then_joins(
        etcd_session: Any, etcd_client: Any, cache: Any) -> None:
    """A watch started behind the demultiplexer reads on its own until it reaches it, then
    joins; no event is lost or repeated at the seam, while writes go on."""
    w, p = cache
    r = shmcache.Reader(w.name)
    since = r.revision
    live = r.watch(p)
    live.poll(0)
    assert live.joined
    for i in range(30):
        put(etcd_client, p + b"k%d" % (i % 4), b"%d" % i)
    wait_rev(r, r.sync())
    live.poll(0)
    old = r.watch(p, since_revision=since)
    assert not old.joined
    stop = threading.Event()
    last: list[int] = []

    def writes() -> None:
        i = 0
        while not stop.is_set():
            last.append(put(etcd_client, p + b"w%d" % (i % 3), b"%d" % i))
            i += 1

    t = threading.Thread(target=writes)
    t.start()
    got: list[shmcache.Event] = []
    deadline = time.monotonic() + 15
    while not old.joined:
        assert time.monotonic() < deadline
        got.extend(old.poll(timeout=0.2))
    time.sleep(0.2)
    stop.set()
    t.join()
    got.extend(drain(old, last[-1]))
    assert got == etcd_events(etcd_session.endpoint, p, since, last[-1])
    live.close()
    old.close()
    r.close()


def test_a_slow_joined_watch_is_cut_off_alone(etcd_session: Any, etcd_client: Any,
                                              cache: Any) -> None:
    """A joined watch nobody reads gets CompactedError once its queued events exceed the
    ring's capacity; a watch read meanwhile gets every event, and a new watch works."""
    w, p = cache
    r = shmcache.Reader(w.name)
    since = r.revision
    slow = r.watch(p, since_revision=since)
    fast = r.watch(p, since_revision=since)
    slow.poll(0)
    fast.poll(0)
    assert slow.joined and fast.joined
    got: list[shmcache.Event] = []
    last = since
    for i in range(200):  # 200 x 2 KB: well past the 256 KiB ring
        last = put(etcd_client, p + b"k%d" % (i % 5), b"x" * 2000)
        got.extend(fast.poll(0))
    got.extend(drain(fast, last))
    assert got == etcd_events(etcd_session.endpoint, p, since, last)
    with pytest.raises(shmcache.CompactedError) as ei:
        slow.poll(0)
    assert ei.value.compact_revision > since
    with pytest.raises(shmcache.CompactedError):  # and it stays so
        slow.poll(0)
    res = r.list(p)
    again = r.watch(p, since_revision=res.revision)
    nxt = put(etcd_client, p + b"k0", b"after")
    assert [e.revision for e in drain(again, nxt)] == [nxt]
    r.close()


def test_a_lap_of_the_demultiplexer_ends_every_joined_watch(
        etcd_session: Any, etcd_client: Any, cache: Any) -> None:
    """If the demultiplexer itself falls a ring behind (here: its lock held while the writer
    publishes more than the ring holds), each joined watch first gets the events queued
    before, then CompactedError; watches started afterwards work."""
    w, p = cache
    r = shmcache.Reader(w.name)
    since = r.revision
    a = r.watch(p, since_revision=since)
    a.poll(0)
    first = put(etcd_client, p + b"a", b"1")
    wait_rev(r, first)
    time.sleep(0.3)  # the demultiplexer's thread queues it
    d = _demux.demux_of(r)
    with d.lock:
        last = first
        for i in range(200):
            last = put(etcd_client, p + b"k%d" % (i % 5), b"y" * 2000)
        wait_rev(r, last)
    assert [e.revision for e in a.poll(0)] == [first]
    with pytest.raises(shmcache.CompactedError):
        a.poll(0)
    res = r.list(p)
    b = r.watch(p, since_revision=res.revision)
    nxt = put(etcd_client, p + b"b", b"2")
    assert [e.revision for e in drain(b, nxt)] == [nxt]
    r.close()


def test_a_history_reset_ends_joined_watches(etcd_session: Any, etcd_client: Any,
                                             cache_name: str, unique_prefix: bytes) -> None:
    """A writer restarted with other index definitions relists into a new epoch: joined
    watches get CompactedError, and watches of the new epoch are fed again."""
    p = unique_prefix
    w = WriterProcess(cache_name, etcd_session.endpoint, p)
    try:
        w.start()
        r = shmcache.Reader(cache_name)
        a = r.watch(p)
        a.poll(0)
        assert a.joined
        epoch = r.status().epoch
        w.terminate()
        w2 = WriterProcess(cache_name, etcd_session.endpoint, p,
                           extra=["--index", "first=segment:0"]).start()
        try:
            rev = put(etcd_client, p + b"x/1", b"v")
            wait_rev(r, rev)
            assert r.status().epoch > epoch
            with pytest.raises(shmcache.CompactedError):
                a.poll(timeout=2)
            b = r.watch(p, since_revision=r.revision)
            nxt = put(etcd_client, p + b"x/2", b"v")
            assert [e.kv.key for e in drain(b, nxt)] == [p + b"x/2"]
            assert b.joined
            r.close()
        finally:
            w2.close()
    finally:
        w.close()


def test_a_joined_watch_continues_in_a_forked_child(etcd_session: Any, etcd_client: Any,
                                                   cache: Any) -> None:
    """A watch joined in the parent, with events queued and not yet read, continues in a
    forked child with exactly etcd's events (read again from the ring), none lost or
    repeated."""
    w, p = cache
    r = shmcache.Reader(w.name)
    since = r.revision
    wt = r.watch(p, since_revision=since)
    first = put(etcd_client, p + b"a", b"1")
    got = drain(wt, first)
    assert wt.joined
    queued = put(etcd_client, p + b"b", b"2")  # queued in the parent, not read there
    wait_rev(r, queued)
    time.sleep(0.3)
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        code = 1
        try:
            os.close(rfd)
            more = drain(wt, queued + 1, timeout=20)
            os.write(wfd, repr([(e.type, e.kv.key, e.revision) for e in more]).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(wfd)
    after = put(etcd_client, p + b"c", b"3")
    data = b""
    while chunk := os.read(rfd, 65536):
        data += chunk
    os.close(rfd)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    child = eval(data.decode())  # noqa: S307 - our own repr of tuples of str/bytes/int
    want = etcd_events(etcd_session.endpoint, p, since, after)
    assert [(e.type, e.kv.key, e.revision) for e in got] + child == \
        [(e.type, e.kv.key, e.revision) for e in want]
    # The parent's watch is unaffected.
    assert [e.revision for e in drain(wt, after)] == [queued, after]
    r.close()


def test_dropped_watches_are_forgotten(etcd_client: Any, cache: Any) -> None:
    """Watches dropped without close() (a loop left with break) are not fed forever: the
    demultiplexer forgets them, and its thread exits once none is left."""
    w, p = cache
    r = shmcache.Reader(w.name)
    for i in range(5):
        wt = r.watch(p + b"%d/" % i)
        wt.poll(0)
    del wt
    d = _demux.demux_of(r)
    assert d.thread() is not None
    put(etcd_client, p + b"0/x", b"1")
    deadline = time.monotonic() + 5
    while d.thread() is not None or d.joined_count():
        assert time.monotonic() < deadline, (d.joined_count(), d.thread())
        time.sleep(0.05)
    r.close()


def test_closing_the_reader_wakes_a_joined_watch_at_once(cache: Any) -> None:
    """A thread blocked iterating a joined watch sees the Reader's close() at once."""
    w, p = cache
    r = shmcache.Reader(w.name)
    wt = r.watch(p)
    wt.poll(0)
    errors: list[BaseException] = []

    def consume() -> None:
        try:
            wt.poll(timeout=30)
        except shmcache.ShmCacheError as exc:
            errors.append(exc)

    t = threading.Thread(target=consume)
    t.start()
    time.sleep(0.2)
    t0 = time.monotonic()
    r.close()
    t.join(5)
    assert not t.is_alive() and time.monotonic() - t0 < 0.4
    assert errors and "closed" in str(errors[0])
