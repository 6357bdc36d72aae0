"""The per-process watch demultiplexer (shmcache/reader/demux.py) against a real writer and etcd.

Every watch of a Reader, once caught up, is fed by one reader of the ring that decodes
each record once: these tests check that the events are still exactly etcd's (no gap,
no repeat, in order) for many watches, across catching up, a slow watch, a lap of the
demultiplexer itself, a history reset, a fork, and watches dropped without close(); and
that a joined watch is cut off exactly when a ring record it has not read is overwritten,
with a 64 KiB ring and transactions of thousands of puts that make it grow.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import shmcache
from shmcache.reader import demux as _demux
from tests.etcdserver import EtcdServer
from tests.helpers import (
    WriterProcess,
    delete,
    drain,
    etcd_events,
    put,
    txn,
    wait_rev,
    writer_fixture,
)

cache = writer_fixture(ring_size="256KiB")


def wait_queued(d: _demux.Demux, rev: int) -> None:
    """Until the demultiplexer ``d`` has read (and queued the events of) revision ``rev``."""
    deadline = time.monotonic() + 15
    while True:
        with d.lock:
            c = d.cursor
            if c is not None and c.revision >= rev:
                return
        assert time.monotonic() < deadline, f"demultiplexer stuck below {rev}"
        time.sleep(0.01)


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
    at_join = len(last)
    while len(last) < at_join + 5:  # writes after the join too
        assert time.monotonic() < deadline
        got.extend(old.poll(timeout=0.2))
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


# -- revisions larger than the ring ----------------------------------------------------------


@pytest.fixture(scope="module")
def etcd_big_txns(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    """An etcd that takes one transaction of thousands of puts (its defaults: 128
    operations, 1.5 MiB per request)."""
    server = EtcdServer(data_dir=Path(tmp_path_factory.mktemp("etcd-big-txns")),
                        extra_args=["--max-txn-ops", "5000", "--max-request-bytes",
                                    str(16 << 20)])
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def tiny(etcd_big_txns: EtcdServer, cache_name: str,
         unique_prefix: bytes) -> Iterator[tuple[WriterProcess, bytes, Any]]:
    """A writer with the smallest ring (64 KiB) on that etcd, its prefix, and a client."""
    w = WriterProcess(cache_name, etcd_big_txns.endpoint, unique_prefix, ring_size="64KiB")
    client = etcd_big_txns.client()
    try:
        w.start()
        yield w, unique_prefix, client
    finally:
        client.close()
        w.close()


def puts(under: bytes, n: int, size: int) -> list[tuple[str, bytes, bytes]]:
    return [("put", under + b"k%05d" % i, b"v" * size) for i in range(n)]


@pytest.mark.parametrize("joined", [False, True], ids=["on-its-own", "joined"])
@pytest.mark.parametrize(("n", "size", "ring_after"),
                         [(400, 10, 64 << 10), (2000, 800, 8 << 20)],
                         ids=["400-puts-of-10B", "2000-puts-of-800B-ring-grows"])
def test_a_watch_that_keeps_up_gets_every_event_of_a_large_revision(
        etcd_big_txns: EtcdServer, tiny: Any, n: int, size: int, ring_after: int,
        joined: bool) -> None:
    """One transaction of many puts, nothing overwritten: a watch that keeps up gets every
    event, reading on its own or joined to the demultiplexer, also when the revision is
    larger than the 64 KiB ring and the writer continues in an 8 MiB one."""
    w, p, client = tiny
    r = shmcache.Reader(w.name)
    since = r.revision
    wt = r.watch(p, since_revision=since)
    if joined:
        assert wt.poll(0) == [] and wt.joined
    rev = txn(client, puts(p, n, size))
    got = drain(wt, rev)
    st = r.status()
    assert st.ring_capacity == ring_after
    if ring_after == 64 << 10:
        assert st.oldest_watchable_revision <= since  # nothing was overwritten
    assert got == etcd_events(etcd_big_txns.endpoint, p, since, rev)
    nxt = put(client, p + b"next", b"1")
    assert [e.revision for e in drain(wt, nxt)] == [nxt] and wt.joined
    r.close()


def test_a_joined_watch_is_cut_off_when_a_record_it_has_not_read_is_overwritten(
        etcd_big_txns: EtcdServer, tiny: Any) -> None:
    """Joined watches that do not read keep their events, across a ring growth, for as
    long as the ring holds the records they came from (judged by the new ring once it
    grew); once one of those records is overwritten they get CompactedError, however few
    events they hold. A watch that reads meanwhile gets every event."""
    w, p, client = tiny
    r = shmcache.Reader(w.name)
    since = r.revision
    slow = r.watch(p + b"a/", since_revision=since)  # never read until cut off
    late = r.watch(p + b"a/", since_revision=since)  # read once, late
    quiet = r.watch(p + b"b/", since_revision=since)  # one event, never read
    fast = r.watch(p, since_revision=since)
    for wt in (slow, late, quiet, fast):
        assert wt.poll(0) == [] and wt.joined
    got: list[shmcache.Event] = []
    first = put(client, p + b"a/first", b"1")  # in the 64 KiB ring
    got += drain(fast, first)
    big = txn(client, puts(p + b"a/", 2000, 800))  # the ring grows to 8 MiB
    got += drain(fast, big)
    one = put(client, p + b"b/one", b"1")
    got += drain(fast, one)
    assert r.status().ring_capacity == 8 << 20
    last = one
    for _ in range(3):  # 3 MB of other keys: the 8 MiB ring overwrites nothing yet
        last = txn(client, puts(p + b"c/", 500, 2000))
        got += drain(fast, last)
    assert r.status().oldest_watchable_revision < big  # the new ring starts at big
    assert [e.revision for e in late.poll(0)] == [first] + [big] * 2000
    rounds = 0
    while r.status().oldest_watchable_revision < one:  # until the ring overwrote "one"
        rounds += 1
        assert rounds < 20
        last = txn(client, puts(p + b"c/", 500, 2000))
        got += drain(fast, last)
    for wt in (slow, quiet):
        with pytest.raises(shmcache.CompactedError) as ei:
            wt.poll(0)
        assert ei.value.compact_revision > since
    assert got == etcd_events(etcd_big_txns.endpoint, p, since, last)
    assert late.poll(0) == []  # it read its events: it goes on
    nxt = put(client, p + b"a/next", b"2")
    assert [e.revision for e in drain(late, nxt)] == [nxt]
    r.close()


def test_a_record_overwritten_just_before_the_ring_grows_still_cuts_its_watch(
        etcd_big_txns: EtcdServer, tiny: Any) -> None:
    """If the writer overwrites a watch's unread record and then moves to a larger ring
    before the demultiplexer reads on (here: its lock held), the watch is cut off, judged
    by the old ring's seal; the others, whose records the seal kept, get every event."""
    w, p, client = tiny
    r = shmcache.Reader(w.name)
    since = r.revision
    victim = r.watch(p + b"a/", since_revision=since)
    fast = r.watch(p, since_revision=since)
    for wt in (victim, fast):
        assert wt.poll(0) == [] and wt.joined
    a = put(client, p + b"a/big", b"x" * 20000)  # unread by victim
    got = drain(fast, a)
    d = _demux.demux_of(r)
    wait_queued(d, a)
    with d.lock:
        after_a = d.cursor.pos if d.cursor is not None else 0
        last = a
        # 1 KB at a time until the tail passes "a/big" and lands on its end, where the
        # demultiplexer stands: it is not lapped itself.
        while r.control.tail() < after_a:
            assert last - a < 100
            last = put(client, p + b"b/%d" % (last % 7), b"y" * 1000)
            wait_rev(r, last)
        assert r.control.tail() == after_a
        last = txn(client, puts(p + b"c/", 2000, 800))  # the ring grows to 8 MiB
        wait_rev(r, last)
    with pytest.raises(shmcache.CompactedError):
        victim.poll(0)
    got += drain(fast, last)
    assert r.status().ring_capacity == 8 << 20
    assert got == etcd_events(etcd_big_txns.endpoint, p, since, last)
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
    d = _demux.demux_of(r)
    wait_queued(d, first)
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
    wait_queued(_demux.demux_of(r), queued)
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
    # Best effort to let it block first; if it has not yet, poll() after close() must
    # raise the same error, which the assertions below accept too.
    time.sleep(0.2)
    t0 = time.monotonic()
    r.close()
    t.join(20)
    # Woken by close(), not by poll's 30 s timeout (no tighter bound: the machine may be loaded).
    assert not t.is_alive() and time.monotonic() - t0 < 20
    assert errors and "closed" in str(errors[0])
