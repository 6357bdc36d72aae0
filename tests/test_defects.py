"""Regression tests for the operating defects of issue 9, one test (or two) per item.

Every test runs real parts: a real etcd server, ``shmcache serve`` as a child
process, readers on the real /dev/shm. The CLI items (3, 9, 10, 15 and parts of
16) are in tests/test_cli.py.
"""

from __future__ import annotations

import inspect
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from typing import Any

import posix_ipc
import pytest

import shmcache
from shmcache.cli import check as _check
from shmcache.format import control, layout, ring
from shmcache.ipc import shm as _shm
from shmcache.ipc.liveness import process_start_ticks
from tests.etcdserver import EtcdServer, free_port
from tests.helpers import WriterProcess, delete, drain, etcd_events, etcd_range, put, txn
from tests.test_service import FakeSystemd, _scrape, _writer_log, systemd  # noqa: F401


def run_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shmcache", *args], capture_output=True,
                          text=True, timeout=timeout)


def _wait(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout}s: {what}")


def _published(name: str, revision: int, timeout: float = 15.0) -> None:
    with shmcache.Reader(name) as r:
        assert r.wait(revision, timeout=timeout), f"cache did not reach {revision}"


# -- 1. rm refuses while a writer runs; a writer whose control segment goes away exits -------

def test_rm_refuses_while_a_writer_runs_and_force_makes_the_writer_exit(
        etcd_session: EtcdServer, etcd_client: Any, cache_name: str, unique_prefix: bytes) -> None:
    rev = put(etcd_client, unique_prefix + b"a", b"1")
    w = WriterProcess(cache_name, etcd_session.endpoint, unique_prefix)
    try:
        w.start()
        _published(cache_name, rev)
        before = _shm.list_segments(cache_name)
        refused = run_cli("rm", cache_name)
        assert refused.returncode == 2, refused
        assert refused.stderr.count("\n") == 1 and f"pid {w.pid}" in refused.stderr, refused
        assert "Traceback" not in refused.stderr
        with pytest.raises(shmcache.WriterRunningError) as ei:
            shmcache.remove(cache_name)
        assert ei.value.pid == w.pid
        assert _shm.list_segments(cache_name) == before  # nothing was removed

        forced = run_cli("rm", cache_name, "--force")
        assert forced.returncode == 0 and ".ctl" in forced.stdout, forced
        # The writer notices within its heartbeat period, stops and says why.
        assert w.proc is not None
        w.proc.wait(timeout=5)
        assert w.proc.returncode != 0
        log = w.log()
        assert "was removed while this writer ran" in log, log
        # It unlinked what it had created after the removal: nothing is left behind.
        assert _shm.list_segments(cache_name) == []

        # A new writer starts cleanly on the name and serves current data.
        w2 = WriterProcess(cache_name, etcd_session.endpoint, unique_prefix)
        try:
            w2.start()
            rev2 = put(etcd_client, unique_prefix + b"b", b"2")
            with shmcache.Reader(cache_name) as r:
                assert r.wait(rev2, timeout=10)
                assert [kv.key for kv in r.list(unique_prefix)] == [unique_prefix + b"a",
                                                                   unique_prefix + b"b"]
            assert w2.terminate() == 0
        finally:
            w2.close()
    finally:
        w.close()


# -- 2. backoff doubles while etcd is down; status, metrics and STATUS say so ---------------

def test_backoff_doubles_after_a_healthy_watch_and_status_says_etcd_is_unreachable(
        systemd: FakeSystemd, etcd_server: EtcdServer, cache_name: str,  # noqa: F811
        unique_prefix: bytes) -> None:
    client = etcd_server.client()
    rev = put(client, unique_prefix + b"a", b"1")
    client.close()
    port = free_port()
    w = WriterProcess(cache_name, etcd_server.endpoint, unique_prefix,
                      extra=["--metrics", f"127.0.0.1:{port}"])
    try:
        w.start()
        _published(cache_name, rev)
        with shmcache.Reader(cache_name) as r:
            assert r.status().etcd_unreachable_since is None
        assert _scrape(port)["shmcache_etcd_reachable"] == 1
        assert "retrying in" not in _writer_log(w)
        etcd_server.kill()
        t_kill = time.time()
        time.sleep(7.0)
        log = _writer_log(w)
        retries = log.count("retrying in")
        waits = [float(x) for x in re.findall(r"retrying in ([\d.]+)s", log)]
        # Doubling from 0.1 s to backoff_max (5 s): 0.1+0.2+0.4+0.8+1.6+3.2 = 6.3 s.
        # Before the fix: ~70 lines of "retrying in 0.1s" in 7 s.
        assert 4 <= retries <= 9, log
        assert waits[:5] == [0.1, 0.2, 0.4, 0.8, 1.6], waits
        with shmcache.Reader(cache_name) as r:
            st = r.status()
            assert st.etcd_unreachable_since is not None
            assert t_kill - 1 <= st.etcd_unreachable_since <= t_kill + 2
            assert r.get(unique_prefix + b"a") is not None  # still serving
        status = run_cli("status", cache_name)
        assert "unreachable" in status.stdout, status
        metrics = _scrape(port)
        assert metrics["shmcache_etcd_reachable"] == 0
        assert metrics["shmcache_etcd_unreachable_seconds"] >= 5
        # Still serving its last revision, and saying since when etcd is gone.
        assert any(s.startswith("serving revision") and "etcd unreachable since" in s
                   for s in systemd.statuses()), systemd.statuses()

        etcd_server.start()
        def reachable() -> bool:
            with shmcache.Reader(cache_name) as r:
                return r.status().etcd_unreachable_since is None
        _wait(reachable, 20, "the writer reaches etcd again")
        assert _scrape(port)["shmcache_etcd_reachable"] == 1
        assert w.terminate() == 0
    finally:
        w.close()


# -- 4. bad control bytes, and Watch.poll after close: ShmCacheError subclasses --------------

def test_bad_control_bytes_with_a_timeout_raise_corrupt_segment_error(cache_name: str) -> None:
    seg = _shm.create(layout.control_name(cache_name), layout.CONTROL_SIZE)
    seg.buf[:64] = b"\xa5" * 64
    seg.close()
    with pytest.raises(shmcache.CorruptSegmentError):
        shmcache.Reader(cache_name, timeout=0.5)
    with pytest.raises(shmcache.CorruptSegmentError):
        shmcache.Reader(cache_name)
    status = run_cli("status", cache_name)
    assert status.returncode == 2 and "Traceback" not in status.stderr, status
    assert status.stderr.count("\n") == 1 and "shmcache check" in status.stderr


def test_watch_poll_after_its_reader_closed_raises_shmcache_error(
        etcd_session: EtcdServer, etcd_client: Any, cache_name: str, unique_prefix: bytes) -> None:
    rev = put(etcd_client, unique_prefix + b"a", b"1")
    w = WriterProcess(cache_name, etcd_session.endpoint, unique_prefix)
    try:
        w.start()
        _published(cache_name, rev)
        r = shmcache.Reader(cache_name)
        watch = r.watch(unique_prefix, since_revision=rev)
        assert watch.poll(timeout=0) == []
        r.close()
        with pytest.raises(shmcache.ShmCacheError, match="closed"):
            watch.poll(timeout=0)
        with pytest.raises(shmcache.ShmCacheError, match="closed"):
            watch.poll(timeout=0.2)
    finally:
        w.close()


# -- 5. a revision larger than the ring: watches continue into the new ring ------------------

def test_a_revision_too_large_for_the_ring_keeps_every_watch(
        etcd_session: EtcdServer, etcd_client: Any, cache_name: str, unique_prefix: bytes) -> None:
    p = unique_prefix
    value = b"v" * 1500
    w = WriterProcess(cache_name, etcd_session.endpoint, p, ring_size="4MiB")
    try:
        w.start()
        first = 0
        for batch in range(15):
            last = txn(etcd_client, [("put", p + b"k%04d" % (batch * 100 + i), value)
                                     for i in range(100)])
            first = first or last
        _published(cache_name, last)
        with shmcache.Reader(cache_name) as r:
            gen_before = r.status()
            watch = r.watch(p, since_revision=last)
            older = r.watch(p, since_revision=first)
            assert len(drain(older, last)) == 1400  # the 14 revisions after the first
            # One prefix delete: 1,500 events with their prev_kv, ~2.4 MB in one record.
            big = delete(etcd_client, p, prefix=True)
            assert r.wait(big, timeout=20)
            after = r.status()
            assert after.ring_capacity > gen_before.ring_capacity  # the ring grew
            assert after.epoch == gen_before.epoch  # without a history reset
            got = drain(watch, big)
            expected = etcd_events(etcd_session.endpoint, p, last, big)
            assert len(got) == 1500 and got == expected
            assert drain(older, big) == expected  # no CompactedError on either
            # A new watch from the last revision before the big one is served too.
            again = r.watch(p, since_revision=last)
            assert drain(again, big) == expected
            rev2 = put(etcd_client, p + b"after", b"x")
            assert [e.kv.key for e in drain(watch, rev2)] == [p + b"after"]
        assert _check.check_cache(cache_name)[1] == []
    finally:
        w.close()


# -- 6. a zombie writer is dead ---------------------------------------------------------------

def test_a_killed_unreaped_writer_is_not_alive(
        etcd_session: EtcdServer, etcd_client: Any, cache_name: str, unique_prefix: bytes) -> None:
    rev = put(etcd_client, unique_prefix + b"a", b"1")
    w = WriterProcess(cache_name, etcd_session.endpoint, unique_prefix)
    try:
        w.start()
        _published(cache_name, rev)
        assert w.proc is not None
        os.kill(w.pid, signal.SIGKILL)

        def zombie() -> bool:
            with open(f"/proc/{w.pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] == "Z"
        _wait(zombie, 5, "the killed writer becomes a zombie")  # not reaped: no wait()
        with shmcache.Reader(cache_name) as r:
            st = r.status()
            assert st.writer_pid == w.pid and not st.writer_alive
            assert r.get(unique_prefix + b"a") is not None
        assert process_start_ticks(w.pid) is None
        w.proc.wait()
    finally:
        w.close()


# -- 7. a cache whose writer never connected and is gone: "no writer is running" -------------

def test_a_cache_whose_writer_never_connected_says_no_writer_runs(
        cache_name: str, unique_prefix: bytes) -> None:
    w = WriterProcess(cache_name, "http://127.0.0.1:1", unique_prefix)
    try:
        w.start(wait=False)
        _wait(lambda: os.path.exists(f"/dev/shm{layout.control_name(cache_name)}"), 10,
              "the control segment exists")
        time.sleep(0.5)
        assert w.terminate() == 0
        status = run_cli("status", cache_name)
        assert status.returncode == 2 and "no writer is running" in status.stderr, status
        assert "still loading" not in status.stderr
        with pytest.raises(shmcache.NotFoundError, match="no writer is running"):
            shmcache.Reader(cache_name, timeout=1.0)
        rm = run_cli("rm", cache_name)
        assert rm.returncode == 0, rm
        assert _shm.list_segments(cache_name) == []
    finally:
        w.close()


# -- 8. a restart applies a new ring size and mode ---------------------------------------------

def test_a_restart_applies_ring_size_and_mode(
        etcd_session: EtcdServer, etcd_client: Any, cache_name: str, unique_prefix: bytes) -> None:
    p = unique_prefix
    rev = put(etcd_client, p + b"a", b"1")
    w = WriterProcess(cache_name, etcd_session.endpoint, p, ring_size="1MiB")
    try:
        w.start()
        _published(cache_name, rev)
        r = shmcache.Reader(cache_name)
        watch = r.watch(p, since_revision=rev)
        assert w.terminate() == 0
        rev2 = put(etcd_client, p + b"b", b"2")
        w.args[w.args.index("--ring-size") + 1] = "4MiB"
        w.args += ["--mode", "644"]
        w.start()
        assert r.wait(rev2, timeout=15)
        st = r.status()
        assert st.ring_capacity == 4 << 20
        for seg in _shm.list_segments(cache_name):
            assert stat.S_IMODE(os.stat(f"/dev/shm{seg}").st_mode) == 0o644, seg
        log = w.log()
        assert "mode 600 -> 644" in log and "ring" in log, log
        # The ring changed generation without a relist: the watch continues, exact.
        assert st.epoch == r.status().epoch
        got = drain(watch, rev2)
        assert got == etcd_events(etcd_session.endpoint, p, rev, rev2)
        assert r.get(p + b"a").value == b"1" and r.get(p + b"b").value == b"2"
        r.close()
        assert w.terminate() == 0
    finally:
        w.close()


# -- 11. a restart repairs a damaged ring ----------------------------------------------------------

def test_a_restart_repairs_ring_history_damaged_before_the_snapshot(
        etcd_session: EtcdServer, etcd_client: Any, cache_name: str, unique_prefix: bytes) -> None:
    """Damage in history that the state does not need (before the snapshot's ring position)
    but that watches can reach: the restart drops that history (a watch from there gets
    CompactedError) instead of leaving records that fail their checksum."""
    p = unique_prefix
    # Small snapshot_bytes: snapshots follow the writes, so most records lie before the newest.
    w = WriterProcess(cache_name, etcd_session.endpoint, p, ring_size="16MiB",
                      extra=["--snapshot-bytes", "1MiB"])
    try:
        w.start()
        with shmcache.Reader(cache_name) as r:
            base = r.status().revision
        last = 0
        for _batch in range(40):  # ~6 MB of records
            last = txn(etcd_client, [("put", p + b"k%03d" % i, b"x" * 1500) for i in range(100)])
        _published(cache_name, last)
        _wait(lambda: _block(cache_name).snap_ring_pos > 4_000_000, 20,
              "a snapshot is published past 4 MB of ring")
        b = _block(cache_name)
        assert b.ring_tail == 0 and b.compact_revision <= base
        w.kill()
        offset = ring._DATA + b.snap_ring_pos // 2
        with open(f"/dev/shm{layout.ring_name(cache_name, b.ring_gen)}", "r+b") as f:
            f.seek(offset)
            flipped = bytes(x ^ 0xFF for x in f.read(16))
            f.seek(offset)
            f.write(flipped)
        assert _check.check_cache(cache_name)[1], "the damage is visible before the restart"
        w.start()  # returns once the writer has claimed the cache, before it restores
        _wait(lambda: "resumed cache" in w.log(), 15, "the writer resumes")
        assert "ring history before the snapshot is damaged" in w.log(), w.log()
        problems = _check.check_cache(cache_name)[1]
        assert problems == [], problems
        check = run_cli("check", cache_name)
        assert check.returncode == 0, check
        with shmcache.Reader(cache_name) as r:
            assert r.wait(last, timeout=15)
            st = r.status()
            assert st.epoch == b.epoch  # no relist: the state did not need that history
            assert st.oldest_watchable_revision == b.snap_revision
            assert r.list(p).items == etcd_range(etcd_client, p, r.revision)
            with pytest.raises(shmcache.CompactedError) as ei:
                r.watch(p, since_revision=base).poll(timeout=1)
            assert ei.value.compact_revision == b.snap_revision
            rev = put(etcd_client, p + b"new", b"1")
            watch = r.watch(p, since_revision=st.oldest_watchable_revision)
            got = drain(watch, rev)
            assert got == etcd_events(etcd_session.endpoint, p, b.snap_revision, rev)
        since = run_cli("watch", cache_name, p.decode(), "--since", str(base), timeout=10)
        assert since.returncode == 2 and "Traceback" not in since.stderr, since
        assert w.terminate() == 0
    finally:
        w.close()


def _block(name: str) -> control.Block:
    seg = _shm.open_readonly(layout.control_name(name))
    assert seg is not None
    try:
        b = control.read_block(seg.buf)
        assert b is not None
        return b
    finally:
        seg.close()


# -- 12. Writer takes TLS/auth settings as public keywords --------------------------------------

def test_writer_takes_connection_settings_as_keywords(cache_name: str) -> None:
    params = inspect.signature(shmcache.Writer).parameters
    assert "etcd" not in params
    assert {"ca_file", "cert_file", "key_file", "user", "password", "etcd_timeout"} <= set(params)
    endpoints = ["http://127.0.0.1:23790"]
    w = shmcache.Writer(cache_name, endpoints, b"/p/", user="u", password="pw",
                        ca_file="/ca.pem", etcd_timeout=2.0)
    assert w.etcd_settings.endpoints == endpoints and w.etcd_settings.endpoints is not endpoints
    assert (w.etcd_settings.user, w.etcd_settings.password, w.etcd_settings.ca_cert,
            w.etcd_settings.timeout) == ("u", "pw", "/ca.pem", 2.0)
    assert shmcache.Writer(cache_name).etcd_settings.endpoints == ["http://127.0.0.1:2379"]
    assert shmcache.Writer(cache_name, "http://h:1").etcd_settings.endpoints == ["http://h:1"]


def test_writer_with_auth_keywords_serves(tmp_path: Any, cache_name: str,
                                          unique_prefix: bytes) -> None:
    with EtcdServer(data_dir=tmp_path / "etcd") as server:
        client = server.client()
        rev = put(client, unique_prefix + b"a", b"1")
        client.close()
        server.enable_auth("root-pw")
        w = shmcache.Writer(cache_name, [server.endpoint], unique_prefix, ring_size="1MiB",
                            user="root", password="root-pw", remove_on_close=True)
        t = threading.Thread(target=w.run)
        t.start()
        try:
            assert w.ready.wait(20)
            with shmcache.Reader(cache_name) as r:
                assert r.wait(rev, timeout=10) and r.get(unique_prefix + b"a").value == b"1"
        finally:
            w.stop()
            t.join(10)
        assert not t.is_alive()


# -- 13. a refresh that fails part-way leaves the reader's view as it was ----------------------

def test_a_refresh_failing_part_way_leaves_the_view_intact(
        etcd_session: EtcdServer, etcd_client: Any, cache_name: str, unique_prefix: bytes) -> None:
    p = unique_prefix
    r1 = put(etcd_client, p + b"k1", b"1")
    w = WriterProcess(cache_name, etcd_session.endpoint, p,
                      extra=["--snapshot-interval", "600"])
    try:
        w.start()
        r = shmcache.Reader(cache_name)
        assert r.wait(r1, timeout=10) and r.get(p + b"k1").value == b"1"
        seen = r.revision
        r2 = put(etcd_client, p + b"k2", b"2")
        r3 = put(etcd_client, p + b"k3", b"3")
        _published(cache_name, r3)
        # Find record r3 and damage one byte of its payload, as a stray write would.
        b = _block(cache_name)
        shm = posix_ipc.SharedMemory(layout.ring_name(cache_name, b.ring_gen), size=0)
        import mmap
        m = mmap.mmap(shm.fd, 0)
        shm.close_fd()
        try:
            positions = {rev: pos for pos, rev, _n, _p in ring.iter_records(
                m, b.ring_capacity, b.snap_ring_pos, b.ring_head, lambda: b.ring_tail)}
            off = ring._DATA + positions[r3] % b.ring_capacity + ring._REC_SIZE + 3
            m[off] ^= 0xFF
            with pytest.raises(shmcache.CorruptSegmentError):
                r.get(p + b"k2")
            m[off] ^= 0xFF  # repaired: the next refresh must not report false corruption
        finally:
            m.close()
        assert r.revision == b.revision >= r3 > r2 > seen
        assert [(kv.key, kv.value) for kv in r.list(p)] == [
            (p + b"k1", b"1"), (p + b"k2", b"2"), (p + b"k3", b"3")]
        assert r.list(p).items == etcd_range(etcd_client, p, r.revision)
        r.close()
    finally:
        w.close()


# -- 14. Writer.stop() from a signal handler while its thread is inside close() ------------------

def test_stop_from_a_signal_handler_takes_no_lock(
        etcd_session: EtcdServer, cache_name: str, unique_prefix: bytes) -> None:
    w = shmcache.Writer(cache_name, [etcd_session.endpoint], unique_prefix, ring_size="1MiB",
                        remove_on_close=True)
    t = threading.Thread(target=w.run)
    t.start()
    try:
        assert w.ready.wait(20)
        _wait(lambda: w._feed.stream is not None, 10, "the watch stream is open")
        stream = w._feed.stream
        assert stream is not None
        fired = threading.Event()

        def handler(signum: int, frame: Any) -> None:
            w.stop()
            fired.set()

        old = signal.signal(signal.SIGUSR1, handler)
        try:
            # The signal arrives while this (main) thread holds the stream's lock, as it
            # would inside close(): a stop() that took that lock would hang here.
            with stream._lock:
                os.kill(os.getpid(), signal.SIGUSR1)
                assert fired.wait(2)
        finally:
            signal.signal(signal.SIGUSR1, old)
        t.join(10)
        assert not t.is_alive()
    finally:
        w.stop()
        t.join(10)
    assert _shm.list_segments(cache_name) == []


# -- 16. the first systemd STATUS carries etcd's revision; logs print the prefix as text --------

def test_first_ready_status_has_etcds_revision_and_logs_show_text(
        systemd: FakeSystemd, etcd_session: EtcdServer, etcd_client: Any,  # noqa: F811
        cache_name: str, unique_prefix: bytes) -> None:
    rev = put(etcd_client, unique_prefix + b"a", b"1")
    w = WriterProcess(cache_name, etcd_session.endpoint, unique_prefix)
    try:
        w.start(wait=False)
        _t, fields = systemd.wait_for("READY", timeout=30)
        m = re.match(r"revision (\d+), etcd (\d+)", fields["STATUS"])
        assert m and int(m.group(2)) >= rev, fields
        log = w.log()
        assert f"'{unique_prefix.decode()}'" in log and "b'/t/" not in log, log
        assert "(first start)" in log
        assert w.terminate() == 0
    finally:
        w.close()
