"""The cache against a real etcd: every answer equals etcd's at the revision the cache reports."""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from typing import Any

import pytest

import shmcache
from tests.helpers import (
    WriterProcess,
    delete,
    drain,
    etcd_current_revision,
    etcd_events,
    etcd_get,
    etcd_range,
    put,
    txn,
)


@pytest.fixture
def writer(etcd_session: Any, cache_name: str, unique_prefix: bytes) -> Any:
    w = WriterProcess(cache_name, etcd_session.endpoint, unique_prefix)
    yield w
    w.close()


def _wait_rev(r: shmcache.Reader, rev: int) -> None:
    assert r.wait(rev, timeout=15), f"cache stuck at {r.revision}, want {rev}"


def test_list_get_watch_equal_etcd_for_puts_deletes_txns_and_leases(
        etcd_session: Any, etcd_client: Any, writer: WriterProcess, unique_prefix: bytes) -> None:
    """Puts, deletes, multi-op transactions and lease expiry: list/get/watch equal etcd's answers."""
    p = unique_prefix
    for i in range(50):
        put(etcd_client, p + b"k%03d" % i, b"v%d" % i)
    writer.start()
    r = shmcache.Reader(writer.name)
    start = r.list(p)
    assert start.items == etcd_range(etcd_client, p, start.revision)
    w = r.watch(p, since_revision=start.revision)

    put(etcd_client, p + b"k001", b"changed")
    delete(etcd_client, p + b"k002")
    txn(etcd_client, [("put", p + b"t1", b"a"), ("put", p + b"t2", b"b"),
                      ("delete", p + b"k003", b"")])
    lease = etcd_client.lease(1)
    put(etcd_client, p + b"leased", b"x", lease=lease)
    delete(etcd_client, p + b"k01", prefix=True)  # range delete: k010..k019 in one revision
    last = put(etcd_client, p + b"last", b"1")
    # The lease expires: etcd deletes its key in a revision of its own.
    deadline = time.monotonic() + 15
    while etcd_get(etcd_client, p + b"leased") is not None:
        assert time.monotonic() < deadline, "lease did not expire"
        time.sleep(0.2)
    last = put(etcd_client, p + b"after-lease", b"1")

    _wait_rev(r, last)
    res = r.list(p)
    assert res.revision >= last
    assert res.items == etcd_range(etcd_client, p, res.revision)
    for kv in etcd_range(etcd_client, p, res.revision) + [None]:
        if kv is not None:
            assert r.get(kv.key) == kv
    assert r.get(p + b"k002") is None
    assert r.get(p + b"leased") is None

    got = drain(w, last)
    want = etcd_events(etcd_session.endpoint, p, start.revision, last)
    assert got == want
    # The transaction's three events share one revision and arrive together, in order.
    txn_events = [e for e in got if e.kv.key in (p + b"t1", p + b"t2", p + b"k003")]
    assert len({e.revision for e in txn_events}) == 1 and len(txn_events) == 3
    range_del = [e for e in got if e.type == "DELETE" and e.kv.key.startswith(p + b"k01")]
    assert len(range_del) == 10 and all(e.prev_kv is not None for e in range_del)
    lease_del = [e for e in got if e.kv.key == p + b"leased" and e.type == "DELETE"]
    assert len(lease_del) == 1
    w.close()
    r.close()


def test_binary_keys_empty_and_large_values(etcd_client: Any, writer: WriterProcess,
                                            unique_prefix: bytes) -> None:
    """Binary keys and values, empty values and a 1 MiB value survive the round trip."""
    p = unique_prefix
    writer.start()
    r = shmcache.Reader(writer.name)
    since = r.revision
    keys = [p + b"\x00\xff\x01", p + b"\xff\xfe", p + "ключ".encode(), p + b"empty", p + b"big"]
    values = [os.urandom(64), b"\x00" * 10, "значение".encode(), b"", os.urandom(1 << 20)]
    last = 0
    for k, v in zip(keys, values, strict=False):
        last = put(etcd_client, k, v)
    _wait_rev(r, last)
    for k, v in zip(keys, values, strict=False):
        kv = r.get(k)
        assert kv is not None and kv.value == v and kv == etcd_get(etcd_client, k)
    assert r.list(p).items == etcd_range(etcd_client, p, r.revision)
    events = drain(r.watch(p, since_revision=since), last)
    assert [e.kv.value for e in events] == values
    # str keys are UTF-8 encoded
    assert r.get(p.decode() + "ключ").value == "значение".encode()
    r.close()


def test_watch_across_snapshot_republish(etcd_session: Any, etcd_client: Any, cache_name: str,
                                         unique_prefix: bytes) -> None:
    """A watch keeps delivering every event while the writer republishes snapshots under it."""
    p = unique_prefix
    w = WriterProcess(cache_name, etcd_session.endpoint, p, ring_size="1MiB")
    try:
        w.start()
        r = shmcache.Reader(cache_name)
        since = r.revision
        first_snap = r.status().snapshot_revision
        watch = r.watch(p, since_revision=since)
        last = 0
        # ~500 bytes a record: 800 records fit the 1 MiB ring, and pass the 256 KiB
        # that triggers a republish.
        for i in range(800):
            last = put(etcd_client, p + b"k%d" % (i % 40), b"x" * 200)
        got = drain(watch, last)
        assert r.status().snapshot_revision > first_snap  # at least one republish happened
        assert got == etcd_events(etcd_session.endpoint, p, since, last)
        assert r.list(p).items == etcd_range(etcd_client, p, r.revision)
        r.close()
    finally:
        w.close()


def test_compacted_error_for_old_since_and_for_lapped_watcher(
        etcd_session: Any, etcd_client: Any, cache_name: str, unique_prefix: bytes) -> None:
    """Too old a since_revision, and a watcher lapped by a tiny ring, both get CompactedError."""
    p = unique_prefix
    w = WriterProcess(cache_name, etcd_session.endpoint, p, ring_size="64KiB")
    try:
        w.start()
        r = shmcache.Reader(cache_name)
        start = r.revision
        slow = r.watch(p, since_revision=start)
        last = 0
        for i in range(400):
            last = put(etcd_client, p + b"k%d" % (i % 10), b"y" * 400)
        _wait_rev(r, last)
        oldest = r.status().oldest_watchable_revision
        assert oldest > start
        with pytest.raises(shmcache.CompactedError) as ei:
            r.watch(p, since_revision=start)
        assert ei.value.compact_revision == oldest
        with pytest.raises(shmcache.CompactedError) as ei2:
            slow.poll(timeout=0)
        assert ei2.value.compact_revision > start
        # The documented recovery: list again, watch from the list's revision.
        res = r.list(p)
        assert res.items == etcd_range(etcd_client, p, res.revision)
        fresh = r.watch(p, since_revision=res.revision)
        nxt = put(etcd_client, p + b"k0", b"after")
        assert [e.revision for e in drain(fresh, nxt)] == [nxt]
        # Watching from exactly the oldest watchable revision works and is complete.
        ok = r.watch(p, since_revision=r.status().oldest_watchable_revision)
        assert ok.poll(timeout=1)
        r.close()
    finally:
        w.close()


def _spawned_reader(name: str, prefix: bytes, since: int, until: int, q: Any) -> None:
    r = shmcache.Reader(name)
    w = r.watch(prefix, since_revision=since)
    events = drain(w, until, timeout=30)
    res = r.list(prefix)
    q.put(([tuple(e) for e in events], res.revision, [tuple(kv) for kv in res.items], os.getpid()))
    r.close()


def test_readers_in_spawned_processes(etcd_session: Any, etcd_client: Any, writer: WriterProcess,
                                      unique_prefix: bytes) -> None:
    """Reader processes started with spawn see exactly etcd's events while the writer runs."""
    p = unique_prefix
    writer.start()
    since = shmcache.Reader(writer.name).revision
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    values = []
    for i in range(100):
        values.append(put(etcd_client, p + b"k%d" % (i % 7), b"v%d" % i))
    last = values[-1]
    procs = [ctx.Process(target=_spawned_reader, args=(writer.name, p, since, last, q))
             for _ in range(3)]
    for pr in procs:
        pr.start()
    results = [q.get(timeout=60) for _ in procs]
    for pr in procs:
        pr.join(10)
        assert pr.exitcode == 0
    want = [tuple(e) for e in etcd_events(etcd_session.endpoint, p, since, last)]
    assert len(want) == 100
    pids = set()
    for events, rev, items, pid in results:
        assert events == want
        assert items == [tuple(kv) for kv in etcd_range(etcd_client, p, rev)]
        pids.add(pid)
    assert len(pids) == 3 and os.getpid() not in pids


def test_reader_attaching_after_thousands_of_events(etcd_client: Any, writer: WriterProcess,
                                                    unique_prefix: bytes) -> None:
    """A reader that attaches late sees the current state at once."""
    p = unique_prefix
    writer.start()
    last = 0
    for i in range(3000):
        last = put(etcd_client, p + b"k%d" % (i % 500), b"%d" % i)
    with shmcache.Reader(writer.name) as r:
        _wait_rev(r, last)
        res = r.list(p)
        assert len(res.items) == 500
        assert res.items == etcd_range(etcd_client, p, res.revision)


def test_writer_sigkill_and_restart_watch_continues(etcd_session: Any, etcd_client: Any,
                                                   writer: WriterProcess,
                                                   unique_prefix: bytes) -> None:
    """SIGKILL the writer, write meanwhile, restart it: the watch has no gap and no duplicate."""
    p = unique_prefix
    writer.start()
    r = shmcache.Reader(writer.name)
    since = r.revision
    w = r.watch(p, since_revision=since)
    for i in range(50):
        put(etcd_client, p + b"a%d" % i, b"1")
    epoch = r.status().epoch
    writer.kill()
    st = r.status()
    assert not st.writer_alive
    # Readers keep serving the last published data while the writer is down.
    assert r.list(p).items == etcd_range(etcd_client, p, r.revision)
    last = 0
    for i in range(50):
        last = put(etcd_client, p + b"b%d" % i, b"2")
    writer.start()
    got = drain(w, last)
    assert got == etcd_events(etcd_session.endpoint, p, since, last)
    st = r.status()
    assert st.writer_alive and st.epoch == epoch  # resumed, no relist
    r.close()


def test_etcd_killed_and_restarted_writer_resumes(etcd_server: Any, cache_name: str,
                                                  unique_prefix: bytes) -> None:
    """etcd SIGKILLed and restarted on the same data dir: the writer reconnects and resumes."""
    p = unique_prefix
    client = etcd_server.client()
    put(client, p + b"a", b"1")
    w = WriterProcess(cache_name, etcd_server.endpoint, p)
    try:
        w.start()
        r = shmcache.Reader(cache_name)
        since = r.revision
        watch = r.watch(p, since_revision=since)
        client.close()
        etcd_server.kill()
        time.sleep(1.0)
        etcd_server.restart()
        client = etcd_server.client()
        last = put(client, p + b"b", b"2")
        got = drain(watch, last, timeout=30)
        assert [e.kv.key for e in got] == [p + b"b"]
        assert r.status().epoch == 1
        assert r.list(p).items == etcd_range(client, p, r.revision)
        r.close()
    finally:
        client.close()
        w.close()


def test_compaction_while_writer_down_relists_new_epoch(etcd_server: Any, cache_name: str,
                                                        unique_prefix: bytes) -> None:
    """etcd compacted past the writer's revision while it was down: relist, new epoch,
    CompactedError for the old watchers, correct data for everyone."""
    p = unique_prefix
    client = etcd_server.client()
    put(client, p + b"a", b"1")
    w = WriterProcess(cache_name, etcd_server.endpoint, p)
    try:
        w.start()
        r = shmcache.Reader(cache_name)
        watch = r.watch(p, since_revision=r.revision)
        epoch = r.status().epoch
        w.kill()
        put(client, p + b"b", b"2")
        delete(client, p + b"a")
        last = put(client, p + b"c", b"3")
        etcd_server.compact(last)
        w.start()
        _wait_rev(r, last)
        st = r.status()
        assert st.epoch == epoch + 1
        assert st.oldest_watchable_revision >= last - 1
        with pytest.raises(shmcache.CompactedError):
            watch.poll(timeout=1)
        res = r.list(p)
        assert res.items == etcd_range(client, p, res.revision)
        assert r.get(p + b"a") is None and r.get(p + b"c").value == b"3"
        r.close()
    finally:
        client.close()
        w.close()


def test_idle_range_revision_advances_with_progress(etcd_client: Any, writer: WriterProcess,
                                                    unique_prefix: bytes) -> None:
    """Writes outside the prefix still advance the cache's revision (progress notifications)."""
    writer.start()
    with shmcache.Reader(writer.name) as r:
        outside = put(etcd_client, b"/outside/" + unique_prefix, b"x")
        assert r.wait(outside, timeout=10)
        assert r.list(unique_prefix).revision >= outside


def test_second_writer_refused(etcd_session: Any, writer: WriterProcess) -> None:
    """A second writer for the same name exits with a clear error; the first keeps running."""
    import subprocess

    writer.start()
    out = subprocess.run(writer.args, capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert "already has a running writer" in out.stderr and str(writer.pid) in out.stderr
    with shmcache.Reader(writer.name) as r:
        assert r.status().writer_pid == writer.pid and r.status().writer_alive


def test_clean_sigterm_keeps_segments_and_marks_writer_gone(
        etcd_client: Any, writer: WriterProcess, unique_prefix: bytes) -> None:
    """SIGTERM stops the writer within 2 s; readers keep the data and see the writer is gone."""
    writer.start()
    last = put(etcd_client, unique_prefix + b"k", b"v")
    r = shmcache.Reader(writer.name)
    _wait_rev(r, last)
    t0 = time.monotonic()
    assert writer.terminate() == 0
    assert time.monotonic() - t0 < 2.0
    st = r.status()
    assert not st.writer_alive
    assert r.get(unique_prefix + b"k").value == b"v"
    with pytest.raises(shmcache.StaleError):
        shmcache.Reader(writer.name, max_staleness=5).get(unique_prefix + b"k")
    r.close()


def test_whole_keyspace_cache(etcd_server: Any, cache_name: str) -> None:
    """The default empty prefix caches every key (etcd needs key b"\\0" for that)."""
    client = etcd_server.client()
    try:
        put(client, b"/a", b"1")
        put(client, b"\x00zero", b"2")
        put(client, b"\xff\xff", b"3")
        w = WriterProcess(cache_name, etcd_server.endpoint, b"")
        try:
            w.start()
            with shmcache.Reader(cache_name) as r:
                assert r.prefix == b""
                res = r.list()
                assert [kv.key for kv in res.items] == [b"\x00zero", b"/a", b"\xff\xff"]
                assert res.items == _all_keys(client, res.revision)
                assert r.list(b"\xff").items[0].value == b"3"  # all-0xff prefix: no upper bound
                last = put(client, b"/b", b"4")
                _wait_rev(r, last)
                assert r.get(b"/b").value == b"4"
        finally:
            w.close()
    finally:
        client.close()


def _all_keys(client: Any, revision: int) -> list[shmcache.KeyValue]:
    from etcd3.etcdrpc import rpc_pb2

    resp = client.kvstub.Range(rpc_pb2.RangeRequest(key=b"\0", range_end=b"\0",
                                                    revision=revision), 10)
    return [shmcache.KeyValue(kv.key, kv.value, kv.create_revision, kv.mod_revision, kv.version,
                              kv.lease) for kv in resp.kvs]


def test_restart_with_another_prefix_publishes_it(etcd_session: Any, etcd_client: Any,
                                                  cache_name: str, unique_prefix: bytes) -> None:
    """A writer restarted with a different prefix relists into a new epoch that readers follow."""
    a, b = unique_prefix + b"a/", unique_prefix + b"b/"
    put(etcd_client, a + b"1", b"A")
    put(etcd_client, b + b"1", b"B")
    w1 = WriterProcess(cache_name, etcd_session.endpoint, a)
    w2 = WriterProcess(cache_name, etcd_session.endpoint, b)
    try:
        w1.start()
        r = shmcache.Reader(cache_name)
        assert r.get(a + b"1").value == b"A"
        epoch = r.status().epoch
        w1.terminate()
        w2.start()  # ready once it has claimed the cache; the relist follows
        deadline = time.monotonic() + 15
        while r.status().epoch == epoch:
            assert time.monotonic() < deadline, "the new writer never relisted"
            r.wait(r.revision + 1, timeout=0.1)
        assert r.prefix == b
        assert r.status().epoch == epoch + 1
        assert r.get(b + b"1").value == b"B"
        with pytest.raises(ValueError):
            r.get(a + b"1")
        r.close()
    finally:
        w1.close()
        w2.close()


def test_writer_stuck_inside_publish_does_not_slow_readers(
        etcd_client: Any, writer: WriterProcess, unique_prefix: bytes) -> None:
    """A writer that died between its two seqlock stores leaves readers serving the last
    consistent state at full speed, not spinning on every read."""
    import mmap as _mmap
    import struct

    import posix_ipc

    from shmcache.format import layout

    last = put(etcd_client, unique_prefix + b"k", b"v")
    writer.start()
    r = shmcache.Reader(writer.name)
    _wait_rev(r, last)
    writer.kill()
    shm = posix_ipc.SharedMemory(layout.control_name(writer.name), flags=0, size=0)
    with _mmap.mmap(shm.fd, layout.CONTROL_SIZE) as m:
        seq = struct.unpack_from("<Q", m, layout.C_SEQ)[0]
        struct.pack_into("<Q", m, layout.C_SEQ, seq + 1)  # odd: "publish in progress"
    shm.close_fd()
    t0 = time.monotonic()
    for _ in range(200):
        assert r.get(unique_prefix + b"k").value == b"v"
    assert time.monotonic() - t0 < 0.5
    assert r.revision >= last
    # A new writer repairs the seqlock and takes over.
    writer.start()
    nxt = put(etcd_client, unique_prefix + b"k", b"v2")
    _wait_rev(r, nxt)
    assert r.get(unique_prefix + b"k").value == b"v2"
    r.close()


def test_events_are_published_while_a_snapshot_is_built(
        etcd_session: Any, etcd_client: Any, cache_name: str, unique_prefix: bytes,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Snapshots are built beside the watch loop: with a build held up (as a 1M-key one
    is, for a second), new events still reach readers at once; the finished snapshot is
    published afterwards and a reader attaching then sees the exact state."""
    import threading

    from shmcache.format import snapshot as snapshot_module
    from shmcache.writer.writer import Writer

    p = unique_prefix
    for i in range(50):
        put(etcd_client, p + b"k%02d" % i, b"v%d" % i)
    release = threading.Event()
    held = threading.Event()
    real_write = snapshot_module.write

    def held_write(*args: Any, **kwargs: Any) -> None:
        if threading.current_thread().name == "shmcache-snapshot":
            held.set()
            release.wait(30)
        real_write(*args, **kwargs)

    monkeypatch.setattr(snapshot_module, "write", held_write)
    w = Writer(cache_name, [etcd_session.endpoint], p, ring_size="1MiB",
               snapshot_bytes=1, remove_on_close=True)
    t = threading.Thread(target=w.run)
    t.start()
    try:
        assert w.ready.wait(15)
        with shmcache.Reader(cache_name, timeout=5) as r:
            first_snap = r.status().snapshot_revision
            rev = put(etcd_client, p + b"k00", b"changed")  # starts a background build
            assert held.wait(10), "no background snapshot build started"
            revs = [put(etcd_client, p + b"during%d" % i, b"x") for i in range(20)]
            revs.append(delete(etcd_client, p + b"k01"))
            _wait_rev(r, revs[-1])  # published while the build is held
            assert r.status().snapshot_revision == first_snap
            assert r.get(p + b"during19").value == b"x" and r.get(p + b"k01") is None
            release.set()
            deadline = time.monotonic() + 10
            while r.status().snapshot_revision < rev and time.monotonic() < deadline:
                time.sleep(0.05)
            assert r.status().snapshot_revision >= rev
        put(etcd_client, p + b"after", b"y")
        want = etcd_range(etcd_client, p)
        with shmcache.Reader(cache_name, timeout=5) as fresh:
            _wait_rev(fresh, etcd_current_revision(etcd_client))
            assert list(fresh.list(p)) == want
        assert w.stats["snapshots"] >= 2
    finally:
        release.set()
        w.stop()
        t.join(10)
