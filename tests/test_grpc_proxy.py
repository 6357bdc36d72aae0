"""Writers through etcd's gRPC proxy (``etcd grpc-proxy start``, tests/grpcproxy.py), against
real processes: what the proxy forwards, the cache equal to etcd event by event through it,
``sync()`` on an idle range (the proxy drops progress requests: writer/range_proof.py), the
fault checker's workload through a proxy that is killed while etcd compacts, and several
writers costing etcd one watcher."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import random
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

import shmcache
from shmcache.etcdapi import Stub, rpc
from shmcache.etcdapi.dial import open_channel
from shmcache.format import layout
from shmcache.writer import range_proof
from shmcache.writer.etcd import connection as _etcd
from tests import checker
from tests.checker_etcd import cluster_id
from tests.checker_workload import PREFIX, workload
from tests.etcdserver import EtcdServer
from tests.grpcproxy import GrpcProxy, parse_metrics
from tests.helpers import (
    WriterProcess,
    delete,
    drain,
    etcd_current_revision,
    etcd_events,
    etcd_range,
    put,
    txn,
)
from tests.test_consistency import _etcd_binaries

# etcd's own periodic progress notifications (default every 10 minutes) every second,
# so that a test sees whether the proxy passes them on.
NOTIFY_EVERY_SECOND = ["--experimental-watch-progress-notify-interval=1s"]


def _etcd_metrics(server: EtcdServer) -> dict[str, float]:
    with urllib.request.urlopen(server.endpoint + "/metrics", timeout=5) as resp:
        return parse_metrics(resp.read().decode())


def _watchers(server: EtcdServer) -> tuple[int, int]:
    """etcd's (watchers, watch streams) now."""
    m = _etcd_metrics(server)
    return (int(m["etcd_debugging_mvcc_watcher_total"]),
            int(m["etcd_debugging_mvcc_watch_stream_total"]))


class _RawWatch:
    """One Watch call through ``channel`` with requests sent at will, responses in a queue."""

    def __init__(self, channel: Any, create: Any) -> None:
        self.requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.requests.put(rpc.WatchRequest(create_request=create))
        self.responses: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.call = Stub(channel, "Watch").Watch(iter(self.requests.get, None))
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for resp in self.call:
                self.responses.put(resp)
        except Exception as exc:
            self.responses.put(exc)

    def next(self, timeout: float) -> Any:
        try:
            return self.responses.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        self.requests.put(None)
        self.call.cancel()


def test_the_proxy_fixture_restarts_on_its_port_and_leaves_nothing(
        etcd_server: EtcdServer) -> None:
    """GrpcProxy: SIGKILL and start again on the same port (a client's channel works
    again), and close() leaves no process and no directory."""
    import os

    import psutil

    proxy = GrpcProxy([etcd_server.endpoint]).start()
    try:
        port, pid, directory = proxy.port, proxy.pid, proxy.dir
        ch = open_channel("127.0.0.1", port)
        kv = Stub(ch, "KV")
        assert kv.Range(rpc.RangeRequest(key=b"k"), timeout=10).header.revision >= 1
        proxy.kill()
        assert not proxy.running and not psutil.pid_exists(pid or 0)
        proxy.start()
        assert proxy.port == port and proxy.pid != pid
        assert kv.Range(rpc.RangeRequest(key=b"k"), timeout=10, wait_for_ready=True)
        assert proxy.metrics()["etcd_debugging_mvcc_watch_stream_total"] >= 1
        ch.close()
        pid = proxy.pid
    finally:
        proxy.close()
    assert not psutil.pid_exists(pid or 0) and not os.path.exists(directory)


@pytest.mark.parametrize("binary", _etcd_binaries())
def test_what_the_proxy_forwards_and_what_it_drops(binary: Any, tmp_path: Path) -> None:
    """Through the proxy: Status, linearizable ranges with etcd's header, compaction errors,
    leases, watches with etcd's periodic progress notifications and compaction cancels all
    come through; a progress request is dropped (no answer, while etcd answers one)."""
    with EtcdServer(binary=binary, data_dir=tmp_path / "etcd",
                    extra_args=NOTIFY_EVERY_SECOND) as etcd, \
            GrpcProxy([etcd.endpoint], binary=binary) as proxy:
        ch = open_channel("127.0.0.1", proxy.port)
        direct = open_channel("127.0.0.1", etcd.port)
        try:
            kv, dkv = Stub(ch, "KV"), Stub(direct, "KV")
            status = Stub(ch, "Maintenance").Status(rpc.StatusRequest(), timeout=10)
            assert status.header.cluster_id == cluster_id(etcd)
            first = dkv.Put(rpc.PutRequest(key=b"/p/a", value=b"1"), timeout=10).header.revision
            for i in range(3):
                dkv.Put(rpc.PutRequest(key=b"/p/b", value=b"%d" % i), timeout=10)
            got = kv.Range(rpc.RangeRequest(key=b"/p/", range_end=b"/p0"), timeout=10)
            assert got.header.revision == first + 3 and len(got.kvs) == 2
            # The proof's reads: a mod-revision filter and a count at a revision.
            got = kv.Range(rpc.RangeRequest(key=b"/p/", range_end=b"/p0", keys_only=True,
                                            min_mod_revision=first + 1), timeout=10)
            assert [k.key for k in got.kvs] == [b"/p/b"] and got.count == 2
            kv.Compact(rpc.CompactionRequest(revision=first + 1, physical=True), timeout=10)
            with pytest.raises(Exception, match="compacted"):
                kv.Range(rpc.RangeRequest(key=b"/p/", revision=first), timeout=10)
            lease = Stub(ch, "Lease").LeaseGrant(rpc.LeaseGrantRequest(TTL=30), timeout=10)
            assert lease.ID

            now = got.header.revision
            for channel, answers in ((direct, True), (ch, False)):
                w = _RawWatch(channel, rpc.WatchCreateRequest(
                    key=b"/p/", range_end=b"/p0", start_revision=now + 1, progress_notify=True))
                try:
                    assert w.next(10).created
                    # A periodic notification (etcd's, every second here) comes through.
                    note = w.next(10)
                    assert note is not None and not note.events, note
                    dkv.Put(rpc.PutRequest(key=b"/q/outside", value=b"x"), timeout=10)
                    now += 1
                    deadline = time.monotonic() + 10
                    while True:  # until a notification at the new revision
                        note = w.next(5)
                        assert note is not None and time.monotonic() < deadline
                        if note.header.revision == now:
                            break
                finally:
                    w.close()
                # A progress request, on a watch without periodic notifications: etcd
                # answers it, the proxy never does.
                w = _RawWatch(channel, rpc.WatchCreateRequest(
                    key=b"/p/", range_end=b"/p0", start_revision=now + 1))
                try:
                    assert w.next(10).created
                    w.requests.put(rpc.WatchRequest(progress_request=rpc.WatchProgressRequest()))
                    answer = w.next(3)
                    if answers:
                        assert answer is not None and answer.header.revision == now, answer
                    else:
                        assert answer is None, answer
                finally:
                    w.close()
            # A watch from a compacted revision is cancelled with etcd's compact revision.
            w = _RawWatch(ch, rpc.WatchCreateRequest(key=b"/p/", range_end=b"/p0",
                                                     start_revision=first))
            try:
                resp = w.next(10)
                while resp is not None and not resp.canceled:
                    resp = w.next(10)
                assert resp is not None and resp.compact_revision == first + 1
            finally:
                w.close()
        finally:
            ch.close()
            direct.close()


def test_a_writer_through_a_proxy_equals_etcd_event_by_event(
        etcd_server: EtcdServer, cache_name: str) -> None:
    """Puts, deletes, a transaction, a range delete and a lease revoked, through the proxy:
    the cache's watch equals etcd's own watch event by event, and its list etcd's range;
    across a proxy SIGKILLed and restarted too, without a relist."""
    p = b"/gp/"
    client = etcd_server.client()
    with GrpcProxy([etcd_server.endpoint]) as proxy:
        # (a ring that holds the two 1 MiB values with their previous ones, and more)
        w = WriterProcess(cache_name, proxy.endpoint, p, ring_size="16MiB")
        try:
            since = put(client, p + b"a", b"0")
            w.start()
            lease = client.lease(60)
            put(client, p + b"l1", b"x", lease=lease)
            put(client, p + b"l2", b"y", lease=lease)
            txn(client, [("put", p + b"t1", b"1"), ("put", p + b"t2", b"2"),
                         ("delete", p + b"a", b"")])
            put(client, p + b"big", b"v" * (1 << 20))  # (watch responses over 1.5 MiB too)
            put(client, p + b"big", b"w" * (1 << 20))
            delete(client, p + b"t", prefix=True)
            lease.revoke()
            last = put(client, p + b"z", b"end")
            with shmcache.Reader(cache_name) as r, r.watch(p, since_revision=since) as watch:
                got = drain(watch, last)
                want = etcd_events(etcd_server.endpoint, p, since, last)
                assert got == want
                assert r.sync(timeout=10) >= last
                res = r.list(p)
                assert res.items == etcd_range(client, p, res.revision)
                # The proxy dies and comes back; writes go on meanwhile: the writer
                # reconnects and resumes its watch, with no relist.
                proxy.kill()
                put(client, p + b"while-down", b"1")
                proxy.start()
                again = put(client, p + b"after", b"1")
                assert drain(watch, again) == etcd_events(etcd_server.endpoint, p, last, again)
            assert w.log().count("listing '") == 1, w.log()
        finally:
            w.close()
            client.close()


def test_sync_through_a_proxy_is_exact_on_an_idle_range(
        etcd_server: EtcdServer, cache_name: str) -> None:
    """The proxy drops progress requests: on a range that idles while etcd moves on, the
    cache's revision still follows etcd's, and sync() returns within its timeout at etcd's
    revision, proven by linearizable ranges (before the fallback both stayed at the range's
    last event: sync() timed out)."""
    p = b"/idle/"
    client = etcd_server.client()
    with GrpcProxy([etcd_server.endpoint]) as proxy:
        w = WriterProcess(cache_name, proxy.endpoint, p)
        try:
            put(client, p + b"a", b"1")
            w.start()
            with shmcache.Reader(cache_name) as r:
                # Idle progress alone (no sync) brings the revision to etcd's.
                outside = put(client, b"/elsewhere/k", b"idle")
                assert r.wait(outside, timeout=20), w.log()
                for i in range(5):
                    outside = put(client, b"/elsewhere/k", b"%d" % i)
                    t0 = time.monotonic()
                    assert r.sync(timeout=5) >= outside
                    took = time.monotonic() - t0
                    assert r.list(p).items == etcd_range(client, p, r.revision)
                # With requests known to go unanswered, a round is one proof, no wait.
                assert took < 2.0
                # Concurrent syncs while etcd moves on elsewhere: all return, exact.
                answers: list[int] = []

                def sync_many() -> None:
                    for _ in range(10):
                        answers.append(r.sync(timeout=5))

                threads = [threading.Thread(target=sync_many) for _ in range(4)]
                for t in threads:
                    t.start()
                for i in range(20):
                    outside = put(client, b"/elsewhere/k", b"flood %d" % i)
                for t in threads:
                    t.join()
                assert len(answers) == 40
                assert r.sync(timeout=5) >= outside
                # A change in the range is an event again, not proven away.
                changed = put(client, p + b"a", b"2")
                assert r.sync(timeout=5) >= changed
                assert r.get(p + b"a").value == b"2"
            assert "proving progress with linearizable ranges" in w.log()
        finally:
            w.close()
            client.close()


def test_a_range_proof_sees_puts_deletes_and_a_count_change(etcd_server: EtcdServer) -> None:
    """``range_proof.prove`` against etcd: the current revision when the range is untouched
    since r, None after a put, a delete, or an update of an existing key; a key created and
    deleted again within the window is the one change it cannot see (module docstring)."""
    p = b"/proof/"
    end = layout.prefix_range_end(p)
    client = etcd_server.client()
    conn = _etcd.Connection(_etcd.EtcdSettings(endpoints=[etcd_server.endpoint]))
    conn.connect()
    try:
        put(client, p + b"a", b"1")
        r = put(client, p + b"b", b"1")
        outside = put(client, b"/other", b"x")
        assert range_proof.prove(conn, p, end, r, 2) == outside
        assert range_proof.prove(conn, p, end, r, 3) is None  # (the count differs)
        assert range_proof.prove(conn, p, end, outside, 2) is None  # (nothing after it)
        put(client, p + b"a", b"2")  # an update: same count
        assert range_proof.prove(conn, p, end, r, 2) is None
        r = delete(client, p + b"a")
        put(client, p + b"c", b"1")  # a delete and a create: same count
        assert range_proof.prove(conn, p, end, r - 1, 2) is None
        r = etcd_current_revision(client)
        put(client, p + b"tmp", b"1")
        last = delete(client, p + b"tmp")
        assert range_proof.prove(conn, p, end, r, 2) == last  # the known blind spot
    finally:
        conn.close()
        client.close()


def test_tls_and_a_read_only_user_through_a_proxy(tmp_path: Path, cache_name: str) -> None:
    """etcd with TLS and authentication, the proxy speaking TLS on both sides: a writer
    with a CA file and a user allowed to read only its prefix lists, watches and syncs
    through it (the proxy forwards Authenticate and the token; the proofs read only the
    prefix)."""
    from tests.etcdserver import generate_tls_files

    tls = generate_tls_files(tmp_path / "pki", client_cn="")
    p = b"/tls/"
    with EtcdServer(data_dir=tmp_path / "etcd", tls=tls) as etcd:
        etcd.enable_auth("root-pw")
        etcd.add_user("cache-reader", "s3cret", read_prefix=p)
        pw = tmp_path / "password"
        pw.write_text("s3cret\n")
        pw.chmod(0o600)
        client = etcd.client()
        with GrpcProxy([etcd.endpoint], tls=tls) as proxy:
            assert proxy.endpoint.startswith("https://")
            w = WriterProcess(cache_name, proxy.endpoint, p, extra=[
                "--ca-file", tls.ca, "--user", "cache-reader", "--password-file", str(pw)])
            try:
                since = put(client, p + b"a", b"1")
                w.start()
                put(client, p + b"b", b"2")
                last = delete(client, p + b"a")
                with shmcache.Reader(cache_name) as r:
                    got = drain(r.watch(p, since_revision=since), last)
                    assert [(e.type, e.kv.key) for e in got] == [("PUT", p + b"b"),
                                                                ("DELETE", p + b"a")]
                    outside = put(client, b"/elsewhere", b"x")
                    assert r.sync(timeout=10) >= outside
                    assert r.list(p).items == etcd_range(client, p, r.revision)
            finally:
                w.close()
                client.close()


def test_writers_through_one_proxy_cost_etcd_one_watcher(
        etcd_server: EtcdServer, tmp_path: Path) -> None:
    """Three caches of one prefix through one proxy add at most 1 watcher and 1 watch stream
    on etcd; directly they add 3 and 3 (etcd's etcd_debugging_mvcc_* gauges)."""
    p = b"/fleet/"
    client = etcd_server.client()
    names = [f"t-gp{i}-{os.getpid()}" for i in range(6)]
    writers: list[WriterProcess] = []
    with GrpcProxy([etcd_server.endpoint]) as proxy:
        try:
            put(client, p + b"a", b"1")
            for endpoint, group in ((proxy.endpoint, names[:3]), (etcd_server.endpoint, names[3:])):
                before = _watchers(etcd_server)
                for name in group:
                    writers.append(WriterProcess(name, endpoint, p, ring_size="256KiB").start())
                last = put(client, p + b"b", b"%d" % len(writers))
                for name in group:
                    with shmcache.Reader(name) as r:
                        assert r.wait(last, timeout=15)
                after = _watchers(etcd_server)
                added = (after[0] - before[0], after[1] - before[1])
                if endpoint == proxy.endpoint:
                    # (at most: the proxy keeps 2 watchers on 1 stream of its own, and
                    # one bench round saw the range's watcher come with no net change)
                    assert added[0] <= 1 and added[1] <= 1, added
                else:
                    assert added == (3, 3), added
        finally:
            for w in writers:
                w.close()
            client.close()


# -- the fault checker's workload through a proxy -------------------------------------------


def _checker_through_proxy(seconds: float, seed: int, tmp_path: Path) -> checker.Report:
    """The checker's workload and readers (tests/checker.py) with the writer behind a proxy
    that is SIGKILLed and restarted, while etcd compacts: now, and while the proxy is down
    (the writer then relists: readers' watches end with CompactedError, an explicit error)."""
    rnd = random.Random(seed)
    report = checker.Report(seed=seed, seconds=seconds)
    ctx = mp.get_context("spawn")
    name = f"chkgp-{os.getpid()}-{seed}"  # (unique per test run: suites may share a host)
    with EtcdServer(data_dir=tmp_path / "etcd") as etcd, \
            GrpcProxy([etcd.endpoint]) as proxy:
        writer = WriterProcess(name, proxy.endpoint, PREFIX, ring_size="256KiB",
                               extra=["--verify-interval", "2"])
        stop, counter, flips = ctx.Event(), ctx.Value("q", 0), ctx.Value("q", 0)
        swaps, cluster = ctx.Value("q", 0), ctx.Value("Q", cluster_id(etcd))
        results: Any = ctx.Queue()
        procs = []
        try:
            writer.start()
            procs.append(ctx.Process(target=workload, args=(etcd.endpoint, seed, stop, counter)))
            for i in range(2):
                procs.append(ctx.Process(target=checker.reader_loop, args=(
                    name, etcd.endpoint, seed, stop, results, i, flips, False, swaps, cluster)))
            for proc in procs:
                proc.start()
            t_end = time.monotonic() + seconds
            kinds = ["proxy_kill", "compact", "compact_while_proxy_down"]
            while time.monotonic() < t_end:
                time.sleep(rnd.uniform(0.5, 2.0))
                kind = rnd.choice(kinds)
                report.faults[kind] = report.faults.get(kind, 0) + 1
                if kind == "proxy_kill":
                    proxy.kill()
                    time.sleep(rnd.uniform(0, 1))
                    proxy.start()
                else:
                    if kind == "compact_while_proxy_down":
                        proxy.kill()
                        time.sleep(0.5)
                    c = etcd.client()
                    try:
                        etcd.compact(etcd_current_revision(c))
                    except Exception as exc:  # (no write since the last compaction)
                        if "compacted" not in str(exc):
                            raise
                    finally:
                        c.close()
                    if not proxy.running:
                        proxy.start()
                checker._collect(results, report)
            stop.set()
            for proc in procs:
                proc.join(timeout=30)
            checker._collect(results, report)
            c = etcd.client()
            try:
                rev = etcd_current_revision(c)
                with shmcache.Reader(name, timeout=30) as r:
                    if not r.wait(rev, timeout=30):
                        report.divergences.append(f"cache stuck at {r.revision} < {rev}")
                    res = r.list(PREFIX)
                    if res.items != etcd_range(c, PREFIX, res.revision):
                        report.divergences.append("final list differs from etcd")
                    report.lists_verified += 1
            finally:
                c.close()
            log = writer.log()
            if "verification failed" in log:
                report.divergences.append("the writer's check against etcd found a mismatch")
        finally:
            stop.set()
            for proc in procs:
                if proc.is_alive():
                    proc.kill()
                proc.join()
            if report.divergences:
                report.kept_log = str(tmp_path / "writer.log")
                Path(report.kept_log).write_text(writer.log())
            writer.close()
    return report


def _assert_clean(report: checker.Report) -> None:
    print(report.summary())
    assert not report.divergences, report.summary() + "\n" + "\n".join(report.divergences)
    assert report.events_verified > 0 and report.syncs_verified > 0, report.summary()
    assert report.faults.get("proxy_kill", 0) + report.faults.get(
        "compact_while_proxy_down", 0) > 0, report.summary()


def test_checker_workload_through_a_proxy_killed_while_etcd_compacts(tmp_path: Path) -> None:
    """The checker's verification through a proxy that dies and comes back while etcd
    compacts: no skipped, repeated or reordered event, CompactedError where due."""
    _assert_clean(_checker_through_proxy(12, seed=21, tmp_path=tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_checker_workload_through_a_proxy_long(seed: int, tmp_path: Path) -> None:
    """The same for a minute per seed."""
    _assert_clean(_checker_through_proxy(60, seed=seed, tmp_path=tmp_path))


@pytest.mark.slow
def test_fleet_benchmark_smoke(tmp_path: Path) -> None:
    """``bench/fleet.py --smoke`` runs every part at toy sizes and writes its results only
    where told (bench/results/ is left alone)."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "bench/fleet.py", "--smoke", "--out", str(tmp_path)],
                         cwd=root, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    with open(tmp_path / "fleet-smoke.json") as f:
        results = json.load(f)
    assert results["stamp"]["machine"]["cores"] and results["proof"]["proof_wall_ms"] > 0
    modes = {(r["n"], r["mode"]) for r in results["steady"]}
    assert modes == {(1, "direct"), (1, "proxy"), (2, "direct"), (2, "proxy")}
    added = {(r["n"], r["mode"]): r["etcd_watchers_added"] for r in results["steady"]}
    assert added[(2, "direct")] == 2 and added[(2, "proxy")] <= 1, added
    assert {(r["n"], r["mode"]) for r in results["failover"]} == modes
