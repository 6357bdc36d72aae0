"""The cache checks itself against etcd: the writer's verifier and `check --against-etcd`."""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any

import pytest

import shmcache
from shmcache.writer import verify as _verify
from shmcache.writer.etcd import connection as _etcd
from tests.etcdserver import EtcdServer, free_port
from tests.helpers import WriterProcess, delete, etcd_range, put, txn
from tests.test_service import _scrape


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shmcache", *args], capture_output=True,
                          text=True, timeout=60)


def _wait(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout}s: {what}")


def test_a_lost_event_is_found_and_repaired_by_a_relist(
        etcd_session: EtcdServer, etcd_client: Any, cache_name: str, unique_prefix: bytes) -> None:
    """SHMCACHE_FAULT=drop_event makes the writer lose one applied event (as a bug would);
    the next check of a snapshot against etcd finds the key, counts it, and relists."""
    p = unique_prefix
    put(etcd_client, p + b"base", b"0")
    port = free_port()
    w = WriterProcess(cache_name, etcd_session.endpoint, p,
                      extra=["--verify-interval", "1", "--snapshot-interval", "0.5",
                             "--metrics", f"127.0.0.1:{port}"])
    w.env["SHMCACHE_FAULT"] = "drop_event"
    try:
        w.start()
        with shmcache.Reader(cache_name) as r:
            epoch = r.status().epoch
            lost = put(etcd_client, p + b"lost", b"1")  # dropped by the fault point
            kept = put(etcd_client, p + b"kept", b"2")
            assert r.wait(kept, timeout=10)
            assert r.get(p + b"lost") is None  # the divergence is real
            _wait(lambda: r.status().epoch > epoch, 20, "a relist after the mismatch")
            assert r.get(p + b"lost").value == b"1" and r.revision >= lost
            assert r.list(p).items == etcd_range(etcd_client, p, r.revision)
        log = w.log()
        assert "verification failed" in log and repr(p + b"lost") in log, log
        metrics = _scrape(port)
        assert metrics["shmcache_verify_mismatches_total"] >= 1
        assert metrics["shmcache_verify_rounds_total"] >= 1
    finally:
        w.close()


def test_no_mismatch_while_etcd_is_written(
        etcd_session: EtcdServer, etcd_client: Any, cache_name: str, unique_prefix: bytes) -> None:
    p = unique_prefix
    port = free_port()
    w = WriterProcess(cache_name, etcd_session.endpoint, p,
                      extra=["--verify-interval", "0.5", "--snapshot-interval", "0.3",
                             "--metrics", f"127.0.0.1:{port}"])
    try:
        w.start()
        deadline = time.monotonic() + 5
        i = 0
        lease = etcd_client.lease(60)
        while time.monotonic() < deadline:
            txn(etcd_client, [("put", p + b"k%02d" % (i % 30), b"v%d" % i),
                              ("put", p + b"t%02d" % (i % 7), b"w")])
            if i % 5 == 0:
                delete(etcd_client, p + b"k%02d" % ((i + 3) % 30))
            if i % 9 == 0:
                put(etcd_client, p + b"leased%d" % i, b"x", lease=lease)
            i += 1
            time.sleep(0.02)
        _wait(lambda: _scrape(port)["shmcache_verify_rounds_total"] >= 3, 15, "three rounds")
        metrics = _scrape(port)
        assert metrics["shmcache_verify_mismatches_total"] == 0, w.log()
        assert metrics["shmcache_verify_last_revision"] > 0
        assert "verification failed" not in w.log()
    finally:
        w.close()


def test_check_against_etcd(etcd_session: EtcdServer, etcd_client: Any, cache_name: str,
                            unique_prefix: bytes) -> None:
    p = unique_prefix
    for i in range(20):
        put(etcd_client, p + b"k%02d" % i, b"v%d" % i)
    w = WriterProcess(cache_name, etcd_session.endpoint, p)
    try:
        w.start()
        ok = run_cli("check", cache_name, "--against-etcd", "--endpoints", etcd_session.endpoint)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert "ok: etcd: 20 keys equal at revision" in ok.stdout
        values = run_cli("check", cache_name, "--against-etcd", "--values",
                         "--endpoints", etcd_session.endpoint)
        assert values.returncode == 0 and "and values" in values.stdout, values.stdout
        down = run_cli("check", cache_name, "--against-etcd", "--endpoints",
                       "http://127.0.0.1:1")
        assert down.returncode == 2 and down.stderr.count("\n") == 1, down.stderr
    finally:
        w.close()


def test_compare_reports_differences_and_compaction(tmp_path: Any, cache_name: str,
                                                    unique_prefix: bytes) -> None:
    """The comparison itself, against an etcd changed behind the cache's back: a writer
    stopped at R, then etcd changed; compared at R it agrees; after a compaction past R
    the round is inconclusive, not a mismatch."""
    p = unique_prefix
    with EtcdServer(data_dir=tmp_path / "etcd") as server:
        client = server.client()
        for i in range(10):
            put(client, p + b"k%d" % i, b"v")
        w = WriterProcess(cache_name, server.endpoint, p)
        try:
            w.start()
            assert w.terminate() == 0
            put(client, p + b"k3", b"changed later")
            conn = _etcd.Connection(_etcd.EtcdSettings(endpoints=[server.endpoint]))
            conn.connect()
            try:
                res = _verify.compare_cache(cache_name, conn, values=True)
                assert res.mismatches == 0 and res.keys == 10
                server.compact(put(client, p + b"x", b"y"))
                with pytest.raises(_verify.Inconclusive, match="compacted"):
                    _verify.compare_cache(cache_name, conn)
            finally:
                conn.close()
        finally:
            client.close()
            w.close()


def test_check_against_etcd_reports_a_difference(
        etcd_session: EtcdServer, etcd_client: Any, cache_name: str, unique_prefix: bytes) -> None:
    """A writer that lost an event (fault point) and does not verify itself: the on-demand
    check finds the key, names it, and exits 1."""
    p = unique_prefix
    put(etcd_client, p + b"base", b"0")
    w = WriterProcess(cache_name, etcd_session.endpoint, p,
                      extra=["--verify-interval", "0", "--snapshot-interval", "0.3"])
    w.env["SHMCACHE_FAULT"] = "drop_event"
    try:
        w.start()
        with shmcache.Reader(cache_name) as r:
            put(etcd_client, p + b"lost", b"1")
            kept = put(etcd_client, p + b"kept", b"2")
            assert r.wait(kept, timeout=10)
            _wait(lambda: r.status().snapshot_revision >= kept, 10, "a snapshot after the loss")
        bad = run_cli("check", cache_name, "--against-etcd", "--endpoints", etcd_session.endpoint)
        assert bad.returncode == 1, bad.stdout + bad.stderr
        assert "VIOLATION: etcd at revision" in bad.stdout
        assert repr(p + b"lost") in bad.stdout and "is in etcd but not in the cache" in bad.stdout
    finally:
        w.close()
