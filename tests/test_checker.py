"""The fault checker itself (tests/checker.py): what it counts as a divergence, a fault step
that overruns its time reported instead of aborting the run, and its host faults
(tests/checker_faults.py): flipped bytes, Readers closed under their calls, ENOSPC."""

from __future__ import annotations

import os
import struct
import time
import zlib
from pathlib import Path
from typing import Any

import pytest

import shmcache
from shmcache.format import control, layout
from shmcache.format.snapshot import Snapshot
from tests import checker, checker_etcd, checker_faults
from tests.etcdserver import EtcdServer
from tests.helpers import WriterProcess, delete, drain, etcd_events, etcd_range, put
from tests.test_consistency import _etcd_binaries


@pytest.mark.parametrize("binary", _etcd_binaries())
def test_a_prev_kv_etcd_could_no_longer_send_is_no_divergence(
        binary: Any, tmp_path: Path, cache_name: str) -> None:
    """etcd reads an event's prev_kv at the revision before it: a watch from the compact
    revision gets its first event without one, which the writer fills from its state. The
    checker compares the cache's prev_kv with etcd's values all the same (the flaky
    "prev_kv: set vs None" after compaction), and still finds a wrong or missing one."""
    p = checker.PREFIX
    with EtcdServer(binary=binary, data_dir=tmp_path / "etcd") as etcd:
        client = etcd.client()
        w = WriterProcess(cache_name, etcd.endpoint, p)
        try:
            w.start()
            put(client, p + b"gone", b"0")
            since = put(client, p + b"k", b"1")
            at_start = etcd_range(client, p, since)
            compact = put(client, p + b"k", b"2")
            delete(client, p + b"gone")
            last = put(client, p + b"k", b"3")
            with shmcache.Reader(cache_name) as r, r.watch(p, since_revision=since) as watch:
                got = drain(watch, last)
            assert [ev.revision for ev in got] == [compact, compact + 1, last]
            client.compact(compact, physical=True)

            # etcd's own watch from `compact` now lacks the first event's prev_kv: what the
            # checker compared the cache with.
            raw = etcd_events(etcd.endpoint, p, since, last)
            assert raw[0].prev_kv is None and raw[1].prev_kv is not None
            assert got[0].prev_kv == at_start[1]  # (b"k", b"1"), as etcd had it
            assert "prev_kv: set vs None" in checker_etcd._diff_events(0, since, got, raw)

            # From before the compact revision: etcd cancels the watch, and the checker
            # learns it at once (it retries what fails otherwise, up to 50 times).
            t0 = time.monotonic()
            with pytest.raises(AssertionError, match="etcd compacted to revision"):
                etcd_events(etcd.endpoint, p, since - 1, last)
            assert time.monotonic() - t0 < 10  # (the helper's own deadline is 15 s)

            def etcd_call(fn: Any, *args: Any) -> Any:
                return fn(*args)

            verify = checker_etcd.verify_watch
            assert verify(0, etcd.endpoint, since, got, at_start, etcd_call) is None
            # Without etcd's range at the start, that prev_kv cannot be checked.
            assert verify(0, etcd.endpoint, since, got, checker_etcd.UNVERIFIABLE,
                          etcd_call) is checker_etcd.UNVERIFIABLE
            # A wrong or a missing prev_kv in the cache is still a divergence.
            assert got[0].prev_kv is not None
            wrong = [got[0]._replace(prev_kv=got[0].prev_kv._replace(value=b"x")), *got[1:]]
            assert "prev_kv.value: b'x' vs b'1'" in str(
                checker_etcd.verify_watch(0, etcd.endpoint, since, wrong, at_start, etcd_call))
            missing = [got[0]._replace(prev_kv=None), *got[1:]]
            assert "prev_kv: None vs set" in str(
                checker_etcd.verify_watch(0, etcd.endpoint, since, missing, at_start, etcd_call))
        finally:
            w.close()
            client.close()


def test_a_fault_step_that_overruns_is_a_finding_and_the_log_is_kept() -> None:
    """A writer that does not reach its fault point in time (a loaded machine) is reported
    as a finding with the writer's log kept; the run goes on and still checks the cache."""
    report = checker.run(seconds=3, seed=5, readers=1, fault_every=1.0, log=lambda *_: None,
                         faults=["writer_fault_point"], fault_points=("nowhere",),
                         step_limit=2.0)
    try:
        assert not report.divergences, "\n".join(report.divergences)
        assert report.findings and report.faults["writer_fault_point"] == len(report.findings)
        assert all("had not reached fault point 'nowhere' after 2s" in f
                   for f in report.findings), report.findings
        assert report.lists_verified >= 1  # the final list against etcd
        assert report.kept_log is not None and f"kept at {report.kept_log}" in report.summary()
        with open(report.kept_log) as f:
            log = f.read()
        # The first writer and each replacement started (a writer killed at its step's
        # deadline may not have logged yet on a loaded machine).
        assert log.count("settings from") >= len(report.findings) + 1, log[-3000:]
    finally:
        if report.kept_log is not None and os.path.exists(report.kept_log):
            os.unlink(report.kept_log)


def test_how_a_call_on_a_closing_reader_ends_is_classified() -> None:
    """The one closed error is expected from any call; an explicit error only from a call
    already in flight when close() returned; anything else (the AssertionError, ValueError
    and CorruptSegmentError issue 18 saw, another message) is a finding."""
    closed = shmcache.ShmCacheError(checker_faults.closed_message("c"))
    for after in (False, True):
        assert checker_faults.classify_end("c", closed, after) == "closed"
    compacted = shmcache.CompactedError("fell behind", compact_revision=5)
    assert checker_faults.classify_end("c", compacted, False) == "explicit"
    assert checker_faults.classify_end("c", compacted, True) is None
    for exc in (AssertionError(), ValueError("mmap closed or invalid"),
                shmcache.CorruptSegmentError("bad"),
                shmcache.ShmCacheError(checker_faults.closed_message("other"))):
        assert checker_faults.classify_end("c", exc, False) is None, exc


def _forge_value(name: str, key: bytes) -> tuple[Any, int, bytes]:
    """Change one byte of ``key``'s value in the live snapshot and fix the entry's CRC, as
    no flip can: a reader then answers wrongly without any error. Returns (the read-write
    mapping, the entry's offset, its original bytes) to put back."""
    ctl = checker_faults._map_rw(layout.control_name(name))
    assert ctl is not None
    b = control.read_block(ctl)
    ctl.close()
    assert b is not None and b.snap_seq
    buf = checker_faults._map_rw(layout.snapshot_name(name, b.snap_seq))
    assert buf is not None
    snap = Snapshot("forged", buf, len(buf))
    off = snap.offset(snap.bisect(key))
    snap.close()
    _crc, klen, vlen = layout.SNAP_ENTRY.unpack_from(buf, off)[:3]
    end = off + layout.SNAP_ENTRY.size + klen + vlen
    original = bytes(buf[off:end])
    assert buf[off + layout.SNAP_ENTRY.size:off + layout.SNAP_ENTRY.size + klen] == key
    buf[end - 1] ^= 1
    struct.pack_into("<I", buf, off, zlib.crc32(buf[off + 4:end]))
    return buf, off, original


def test_a_wrong_answer_while_bytes_are_changed_is_a_divergence(
        etcd_session: Any, etcd_client: Any, cache_name: str, unique_prefix: bytes) -> None:
    """The probe that runs while a byte is flipped accepts an exact answer or
    CorruptSegmentError, and reports a wrong one: a value changed with its CRC fixed."""
    for i in range(3):
        put(etcd_client, unique_prefix + b"k%d" % i, b"value %d" % i)
    w = WriterProcess(cache_name, etcd_session.endpoint, unique_prefix)
    try:
        w.start()
        counts, problems = checker_faults.probe_while_flipped(cache_name, etcd_client,
                                                              unique_prefix, 0.2)
        assert counts["lists"] >= 1 and not problems, problems
        buf, off, original = _forge_value(cache_name, unique_prefix + b"k1")
        try:
            counts, problems = checker_faults.probe_while_flipped(cache_name, etcd_client,
                                                                  unique_prefix, 0.2)
        finally:
            buf[off:off + len(original)] = original
            buf.close()
        assert problems and all("differs from etcd (3 vs 3 keys)" in p for p in problems), \
            problems
        counts, problems = checker_faults.probe_while_flipped(cache_name, etcd_client,
                                                              unique_prefix, 0.2)
        assert counts["lists"] >= 1 and not problems, problems
    finally:
        w.close()


@pytest.mark.parametrize("indexed", [True, False], ids=["indexed", "overlays"])
def test_flipped_bytes_and_closed_readers_are_exact_answers_or_errors(indexed: bool) -> None:
    """Bytes flipped for a moment in the ring, the snapshot, the control segment's block and
    prefix, and the index segment (with indexes) or the overlay segment (without), and
    Readers closed under their calls from a thread and from a signal handler: every answer
    equals etcd, every error is CorruptSegmentError while a byte is flipped or the closed
    error, and a fresh Reader equals etcd after each close."""
    flips = ["flip_ring", "flip_snapshot", "flip_control_block", "flip_control_prefix",
             "flip_index" if indexed else "flip_overlay"]
    closes = ["reader_close_thread", "reader_close_signal"]
    report = checker.run(seconds=12, seed=19, readers=2, fault_every=0.8,
                         log=lambda *_: None, faults=flips + closes, indexed=indexed)
    print(report.summary())
    assert not report.divergences, "\n".join(report.divergences[:10])
    assert not report.findings, report.findings
    applied = {k: n - report.no_segment.get(k, 0) for k, n in report.faults.items()}
    assert applied.get("flip_ring", 0) + applied.get("flip_snapshot", 0) >= 1, report.summary()
    assert report.corrupt_errors >= 1, report.summary()  # the flips were read
    assert sum(report.faults.get(k, 0) for k in closes) >= 1, report.summary()
    assert report.closed_calls >= 1, report.summary()
    assert report.events_verified > 100 and report.lists_verified > 5


def test_the_enospc_fault_runs_or_is_skipped_with_its_reason() -> None:
    """writer_enospc needs SHMCACHE_FAULT's enospc action (the `publish` branch) and a
    writer that retries a failed publish (`writerstate`): with both, the cache catches up
    with etcd although publishing fails now and then; otherwise the run skips the kind and
    says why (instead of a writer that cannot parse SHMCACHE_FAULT, or a reconnect storm
    reported as a divergence)."""
    report = checker.run(seconds=6, seed=23, readers=1, fault_every=1.0, log=lambda *_: None,
                         faults=["writer_enospc", "readers_attach_detach"])
    print(report.summary())
    assert not report.divergences, "\n".join(report.divergences[:10])
    why = checker_faults.unsupported(["writer_enospc"], indexed=True).get("writer_enospc")
    if why is None:
        assert report.faults.get("writer_enospc", 0) >= 1, report.summary()
    else:
        assert "writer_enospc" not in report.faults
        assert report.skipped == [f"writer_enospc skipped: {why}"], report.skipped
        assert f"writer_enospc skipped: {why}" in report.summary()


def test_a_cluster_swap_is_followed_and_checked() -> None:
    """cluster_swap: another etcd cluster, ahead in revision and holding other data, takes
    the writer's etcd address. The checker finds the cache equal to the new cluster, the
    watch opened before ended with CompactedError after the old cluster's events only, and
    the writer's log naming the change; the readers hold each answer against the cluster
    it came from, so the swap is no divergence of theirs."""
    report = checker.run(seconds=8, seed=29, readers=2, fault_every=1.0, log=lambda *_: None,
                         faults=["cluster_swap", "readers_attach_detach"])
    print(report.summary())
    assert not report.divergences, "\n".join(report.divergences[:10])
    assert not report.findings, report.findings
    swaps = report.faults.get("cluster_swap", 0)
    assert swaps >= 1 and report.swaps_ahead == swaps, report.summary()
    assert report.explicit_errors >= swaps  # (each swap's watch ended with CompactedError)
    assert report.events_verified > 50 and report.lists_verified > 3 + swaps


def test_events_of_another_cluster_in_a_watch_are_a_divergence(tmp_path: Path) -> None:
    """The check of a watch opened before a swap reports events that are not the old
    cluster's own (the new cluster's history read as a continuation, issue 19 item 1)."""
    p = checker.PREFIX
    with EtcdServer(data_dir=tmp_path / "a") as a, \
            EtcdServer(data_dir=tmp_path / "b", name="other") as b:
        ca, cb = a.client(), b.client()
        try:
            since = put(ca, p + b"k", b"a0")
            for i in range(3):
                put(ca, p + b"k", b"a%d" % (i + 1))
                put(cb, p + b"k", b"b%d" % i)
            put(cb, p + b"k", b"b3")
            own = etcd_events(a.endpoint, p, since, etcd_range(ca, p)[0].mod_revision)
            other = etcd_events(b.endpoint, p, since, etcd_range(cb, p)[0].mod_revision)
        finally:
            ca.close()
            cb.close()
        assert checker_etcd._events_of(a, p, since, own) == []
        problems = checker_etcd._events_of(a, p, since, other)
        assert problems and "a watch opened before the swap" in problems[0], problems
