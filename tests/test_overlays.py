"""Delta segments (shmcache/writer/delta_segments.py; the format calls them overlay
segments): what a Reader decodes at attach is bounded by the writer's delta segment
cadence, not by the history since the snapshot; every answer still equals etcd's. Real
etcd, real writer processes, real /dev/shm.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from typing import Any

import pytest

import shmcache
from shmcache.format import layout
from shmcache.writer import delta_segments
from tests.helpers import (
    delete,
    drain,
    etcd_events,
    etcd_range,
    put,
    txn,
    wait_rev,
    writer_fixture,
)


def _churn(client: Any, p: bytes, rng: random.Random, n: int, keys: int = 200) -> int:
    """``n`` random changes of ~1 KB values: puts, deletes, re-creates, transactions."""
    rev = 0
    for i in range(n):
        k = p + b"k%04d" % rng.randrange(keys)
        x = rng.random()
        if x < 0.75:
            rev = put(client, k, b"v%d-" % i + b"x" * rng.randrange(200, 1500))
        elif x < 0.9:
            rev = delete(client, k)
        else:
            rev = txn(client, [("put", p + b"t%02d" % rng.randrange(20), b"t%d" % i),
                               ("delete", k, b""), ("put", k + b"/sub", b"s%d" % i)])
    return rev


# A 4 MiB ring: snapshots every 1 MiB of records, overlay segments every 128 KiB.
cache = writer_fixture(ring_size="4MiB")


def test_a_fresh_reader_decodes_only_the_records_after_the_overlay_segment(
        etcd_client: Any, cache: Any) -> None:
    """After ~700 KB of changes and no new snapshot, the block names an overlay segment; a
    Reader attached then holds in private only the records after it (under the overlay
    cadence), and its get/list equal etcd's range at its revision."""
    w, p = cache
    rev = _churn(etcd_client, p, random.Random(1), 700)
    with shmcache.Reader(w.name) as r:
        wait_rev(r, rev)
        b = r.control.block()
        assert b is not None and b.snap_seq == 1, "a snapshot came: the test needs none"
        assert b.ovl_seq >= 3 and b.snap_revision < b.ovl_revision <= b.revision
    with shmcache.Reader(w.name) as fresh:
        v = fresh._view
        assert v.delta is not None and v.delta.revision == b.ovl_revision
        private_bytes = b.ring_head - b.ovl_ring_pos
        assert private_bytes < 2 * delta_segments.DELTA_BYTES + 64 * 1024
        assert len(v.rec_revs) < 200 and len(v.recent) <= len(v.rec_revs) * 3
        res = fresh.list(p)
        want = etcd_range(etcd_client, p, res.revision)
        assert res.items == want
        for kv in want[::7]:
            assert fresh.get(kv.key) == kv
        gone = {p + b"k%04d" % i for i in range(200)} - {kv.key for kv in want}
        assert gone, "the churn deleted some keys"
        assert all(fresh.get(k) is None for k in gone)
        # Pages and prefix lists merge the three layers too.
        sub = fresh.list(p + b"k01")
        assert sub.items == [kv for kv in want if kv.key.startswith(p + b"k01")]
        assert [kv for page in fresh.iter_list(p, page_size=17) for kv in [page]] == want


def test_answers_equal_etcd_across_overlay_and_snapshot_switches(
        etcd_session: Any, etcd_client: Any, cache: Any) -> None:
    """Under ~2.5 MB of churn (several snapshots, many overlay segments), a long-lived
    Reader and Readers attached at random moments answer list, get, reads at past
    revisions (before and after the overlay segment's revision) and a watch exactly as
    etcd does."""
    w, p = cache
    rng = random.Random(7)
    with shmcache.Reader(w.name) as old:
        since = old.revision
        watch = old.watch(p, since_revision=since)
        got: list[shmcache.Event] = []
        seen_ovl = set()
        last = since
        for _round in range(12):
            last = _churn(etcd_client, p, rng, 150)
            got.extend(watch.poll(0))
            with shmcache.Reader(w.name) as fresh:
                wait_rev(fresh, last)
                b = fresh.control.block()
                assert b is not None
                seen_ovl.add((b.snap_seq, b.ovl_seq))
                res = fresh.list(p)
                assert res.items == etcd_range(etcd_client, p, res.revision)
                for kv in res.items[::11]:
                    assert fresh.get(kv.key) == kv
                # Past revisions on both sides of the overlay segment's revision.
                for past in {b.snap_revision, b.ovl_revision or b.snap_revision,
                             (b.snap_revision + res.revision) // 2, res.revision - 1}:
                    if past >= b.compact_revision:
                        assert fresh.list(p, revision=past).items == etcd_range(
                            etcd_client, p, past), past
            wait_rev(old, last)
            res = old.list(p)
            assert res.items == etcd_range(etcd_client, p, res.revision)
        got.extend(drain(watch, last))
        assert got == etcd_events(etcd_session.endpoint, p, since, last)
    assert len({s for s, _ in seen_ovl}) >= 2, seen_ovl  # snapshots came
    assert any(o for _, o in seen_ovl), seen_ovl  # and overlay segments


def test_a_watch_from_before_the_overlay_segment(etcd_session: Any, etcd_client: Any,
                                                 cache: Any) -> None:
    """A watch from a revision between the snapshot and the overlay segment starts at the
    right record (found by walking record headers from the snapshot's position)."""
    w, p = cache
    with shmcache.Reader(w.name) as r:
        since = r.revision
        mid = _churn(etcd_client, p, random.Random(3), 60)
        last = _churn(etcd_client, p, random.Random(4), 400)
        wait_rev(r, last)
        b = r.control.block()
        assert b is not None and b.ovl_seq and b.snap_revision <= mid < b.ovl_revision
        for start in (since, mid):
            events = drain(r.watch(p, since_revision=start), last)
            assert events == etcd_events(etcd_session.endpoint, p, start, last)


def test_a_restarted_writer_withdraws_the_overlay_segment_and_builds_a_new_one(
        etcd_client: Any, cache: Any) -> None:
    """A writer restarted over existing segments does not trust its predecessor's overlay
    segment: it withdraws it, unlinks it, and publishes one of its own at once."""
    w, p = cache
    rev = _churn(etcd_client, p, random.Random(5), 500)
    with shmcache.Reader(w.name) as r:
        wait_rev(r, rev)
        before = r.control.block()
        assert before is not None and before.ovl_seq
    w.terminate()
    w.start()
    rev = put(etcd_client, p + b"after-restart", b"1")
    with shmcache.Reader(w.name) as r:
        wait_rev(r, rev)
        # Built in the background from the first response on, published with the next
        # one (or the idle writer's progress check, once a second).
        deadline = time.monotonic() + 10
        while (b := r.control.block()) is None or b.ovl_seq <= before.ovl_seq:
            assert time.monotonic() < deadline, b
            time.sleep(0.05)
        assert b.epoch == before.epoch  # resumed, not relisted
        names = shmcache.ipc.shm.list_segments(w.name)
        assert layout.overlay_name(w.name, before.ovl_seq) not in names
        assert layout.overlay_name(w.name, b.ovl_seq) in names
        res = r.list(p)
        assert res.items == etcd_range(etcd_client, p, res.revision)


def test_a_damaged_overlay_segment_is_an_error_not_a_wrong_answer(
        etcd_client: Any, cache: Any) -> None:
    """A flipped byte in an overlay segment's entry: readers raise CorruptSegmentError for
    the key it holds, and `shmcache check` reports it."""
    w, p = cache
    rev = _churn(etcd_client, p, random.Random(6), 400)
    with shmcache.Reader(w.name) as r:
        wait_rev(r, rev)
        b = r.control.block()
        assert b is not None and b.ovl_seq
    w.terminate()  # nothing republishes while we damage it
    path = "/dev/shm" + layout.overlay_name(w.name, b.ovl_seq)
    with shmcache.Reader(w.name) as r:
        ovl = r._view.delta
        assert ovl is not None
        i, kv = next((i, kv) for i, kv in enumerate(ovl.range_list(b"", None, -1))
                     if kv.version)  # a live entry: it has value bytes to damage
        off = ovl.offset(i)
    with open(path, "r+b") as f:
        f.seek(off + 48 + len(kv.key))  # the first byte of its value
        byte = f.read(1)
        f.seek(off + 48 + len(kv.key))
        f.write(bytes([byte[0] ^ 0x01]))
    with shmcache.Reader(w.name) as r:
        if r._view.recent.get(kv.key, None) is None and kv.key not in r._view.recent:
            with pytest.raises(shmcache.CorruptSegmentError):
                r.get(kv.key)
        with pytest.raises(shmcache.CorruptSegmentError):
            r.list(p)
    out = subprocess.run([sys.executable, "-m", "shmcache", "check", w.name],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "overlay" in (out.stdout + out.stderr), out


def test_pure_python_and_c_readers_agree(etcd_client: Any, cache: Any) -> None:
    """The C get path (overlay dict, overlay segment, snapshot in one call) and the pure
    Python path give the same answers."""
    w, p = cache
    rev = _churn(etcd_client, p, random.Random(8), 500)
    with shmcache.Reader(w.name) as r:
        wait_rev(r, rev)
        assert r.control.block().ovl_seq  # type: ignore[union-attr]
        keys = [p + b"k%04d" % i for i in range(200)]
        here = [r.get(k) for k in keys]
        rev_seen = r.revision
    code = ("import sys, shmcache; r = shmcache.Reader(sys.argv[1]); "
            "assert r.wait(int(sys.argv[3]), 10); "
            "print(repr([r.get(sys.argv[2].encode() + b'k%04d' % i) for i in range(200)]))")
    out = subprocess.run([sys.executable, "-c", code, w.name, p.decode(), str(rev_seen)],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "SHMCACHE_PURE_PYTHON": "1"})
    assert out.returncode == 0, out.stderr
    there = eval(out.stdout, {"KeyValue": shmcache.KeyValue})  # noqa: S307 - our own repr
    assert [tuple(x) if x is not None else None for x in here] == \
        [tuple(x) if x is not None else None for x in there]
    assert any(x is None for x in here) and any(x is not None for x in here)
