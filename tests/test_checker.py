"""The fault checker itself (tests/checker.py): what it counts as a divergence, and a fault step
that overruns its time reported instead of aborting the run."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

import shmcache
from tests import checker
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
            assert "prev_kv: set vs None" in checker._diff_events(0, since, got, raw)

            # From before the compact revision: etcd cancels the watch, and the checker
            # learns it at once (it retries what fails otherwise, up to 50 times).
            t0 = time.monotonic()
            with pytest.raises(AssertionError, match="etcd compacted to revision"):
                etcd_events(etcd.endpoint, p, since - 1, last)
            assert time.monotonic() - t0 < 10  # (the helper's own deadline is 15 s)

            def etcd_call(fn: Any, *args: Any) -> Any:
                return fn(*args)

            assert checker.verify_watch(0, etcd.endpoint, since, got, at_start, etcd_call) is None
            # Without etcd's range at the start, that prev_kv cannot be checked.
            assert checker.verify_watch(0, etcd.endpoint, since, got, checker.UNVERIFIABLE,
                                        etcd_call) is checker.UNVERIFIABLE
            # A wrong or a missing prev_kv in the cache is still a divergence.
            assert got[0].prev_kv is not None
            wrong = [got[0]._replace(prev_kv=got[0].prev_kv._replace(value=b"x")), *got[1:]]
            assert "prev_kv.value: b'x' vs b'1'" in str(
                checker.verify_watch(0, etcd.endpoint, since, wrong, at_start, etcd_call))
            missing = [got[0]._replace(prev_kv=None), *got[1:]]
            assert "prev_kv: None vs set" in str(
                checker.verify_watch(0, etcd.endpoint, since, missing, at_start, etcd_call))
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
