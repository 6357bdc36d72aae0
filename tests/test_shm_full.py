"""A full /dev/shm is a state of the cache, not an etcd error (issue 18, item 2).

Each test mounts a fresh small tmpfs at /dev/shm in a mount namespace of its own
(``unshare --mount``, as root) and runs the writer there; etcd runs outside
(the session server). Readers, watches and ``shmcache status`` enter the
writer's mount namespace (``nsenter --mount --target PID``), and the test
reaches the tmpfs through ``/proc/PID/root/dev/shm`` to fill it and free it.
The writer's counters come from its metrics endpoint (the network namespace is
shared).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.etcdserver import EtcdServer, free_port
from tests.helpers import etcd_current_revision, etcd_events, etcd_range, put, txn
from tests.test_service import FakeSystemd, _scrape, systemd  # noqa: F401

ROOT = str(Path(__file__).parent.parent)


def _namespace_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root to mount a tmpfs at /dev/shm in a mount namespace"
    if shutil.which("unshare") is None or shutil.which("nsenter") is None:
        return "needs unshare and nsenter (util-linux)"
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                            "mount -t tmpfs -o size=1m tmpfs /dev/shm"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot make a mount namespace with a tmpfs: {probe.stderr.strip()}"
    return None


pytestmark = pytest.mark.skipif(bool(_namespace_unavailable()),
                                reason=_namespace_unavailable() or "")


def _wait(pred: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for: {what}")
        time.sleep(0.1)


class TmpfsWriter:
    """``shmcache serve`` alone in a mount namespace whose /dev/shm is a tmpfs of ``size``."""

    def __init__(self, name: str, endpoint: str, prefix: bytes, size: str, ring_size: str,
                 log_path: Path) -> None:
        self.name = name
        self.port = free_port()
        serve = [sys.executable, "-m", "shmcache", "serve", name, "--endpoints", endpoint,
                 "--prefix", prefix.decode(), "--ring-size", ring_size,
                 "--metrics", f"127.0.0.1:{self.port}", "--log-level", "info"]
        self.log_path = log_path
        self._log = open(log_path, "ab")
        script = f"mount -t tmpfs -o size={size} tmpfs /dev/shm && exec \"$@\""
        self.proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *serve],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT)
        self.children: list[subprocess.Popen[bytes]] = []

    @property
    def shm(self) -> Path:
        """The namespace's /dev/shm, seen from outside it."""
        return Path(f"/proc/{self.proc.pid}/root/dev/shm")

    def inside(self, *args: str) -> list[str]:
        """A command line that runs ``args`` in the writer's mount namespace."""
        return ["nsenter", "--mount", f"--target={self.proc.pid}", *args]

    def cli(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.inside(sys.executable, "-m", "shmcache", *args),
                              capture_output=True, text=True, timeout=timeout, cwd=ROOT)

    def spawn(self, *args: str) -> tuple[subprocess.Popen[bytes], Path, Path]:
        """Start a command in the namespace; its output goes to files (a pipe nobody
        reads would hold it up); returns the process and the two files."""
        out, err = (self.log_path.with_suffix(f".{len(self.children)}.{s}")
                    for s in ("out", "err"))
        with open(out, "wb") as fo, open(err, "wb") as fe:
            p = subprocess.Popen(self.inside(sys.executable, "-m", "shmcache", *args),
                                 stdout=fo, stderr=fe, cwd=ROOT)
        self.children.append(p)
        return p, out, err

    def metrics(self) -> dict[str, float]:
        try:
            return _scrape(self.port)
        except OSError:
            return {}

    def status(self, *extra: str) -> tuple[int, dict[str, Any]]:
        out = self.cli("status", self.name, "--json", *extra)
        assert out.returncode in (0, 1), (out.returncode, out.stderr)
        return out.returncode, json.loads(out.stdout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self) -> None:
        def ready() -> bool:
            assert self.proc.poll() is None, self.log()
            return self.metrics().get("shmcache_ready") == 1.0
        _wait(ready, 60, "the writer publishes its first snapshot")

    def wait(self, pred: Callable[[], Any], timeout: float, what: str) -> Any:
        """_wait, with the writer's log in the failure."""
        try:
            return _wait(pred, timeout, what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nwriter log:\n{self.log()[-6000:]}") from None

    def fill(self, leave: int) -> int:
        """Take all of the tmpfs's free space but ``leave`` bytes with a filler file."""
        st = os.statvfs(self.shm)
        size = st.f_bavail * st.f_frsize - leave
        fd = os.open(self.shm / "filler", os.O_CREAT | os.O_WRONLY, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)
        finally:
            os.close(fd)
        return size

    def unfill(self) -> None:
        (self.shm / "filler").unlink()

    def close(self) -> None:
        for p in self.children:
            if p.poll() is None:
                p.kill()
            p.wait()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture
def tmpfs_writer(etcd_session: EtcdServer, cache_name: str, unique_prefix: bytes,
                 tmp_path: Path) -> Iterator[Callable[..., TmpfsWriter]]:
    made: list[TmpfsWriter] = []

    def make(size: str = "24m", ring_size: str = "1MiB", endpoint: str | None = None,
             ) -> TmpfsWriter:
        w = TmpfsWriter(cache_name, endpoint or etcd_session.endpoint, unique_prefix, size,
                        ring_size, tmp_path / "writer.log")
        made.append(w)
        return w

    yield make
    for w in made:
        w.close()


def _cache_items(w: TmpfsWriter, prefix: bytes) -> tuple[int, list[tuple[bytes, bytes, int]]]:
    out = w.cli("list", w.name, prefix.decode(), "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    # (etcdctl's shape: empty fields are left out)
    return doc["header"]["revision"], [
        (base64.b64decode(i["key"]), base64.b64decode(i.get("value", "")), i["mod_revision"])
        for i in doc.get("kvs", [])]


def test_a_ring_larger_than_dev_shm_is_refused_at_start(
        etcd_session: EtcdServer, cache_name: str, unique_prefix: bytes) -> None:
    """``--ring-size`` beyond /dev/shm's free space: one line and exit 2 at start (it used
    to relist every few seconds forever, the ring's creation failing each time)."""
    serve = [sys.executable, "-m", "shmcache", "serve", cache_name, "--endpoints",
             etcd_session.endpoint, "--prefix", unique_prefix.decode(), "--ring-size", "64MiB"]
    out = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         "mount -t tmpfs -o size=24m tmpfs /dev/shm && exec \"$@\"", "sh", *serve],
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 2, out.stderr
    last = out.stderr.splitlines()[-1]
    assert last.startswith("shmcache serve: ring size 64.0 MiB does not fit in /dev/shm: "
                           "24.0 MiB free of 24.0 MiB"), out.stderr
    assert "Traceback" not in out.stderr


def test_full_dev_shm_is_a_state_not_an_etcd_error(
        tmpfs_writer: Callable[..., TmpfsWriter], etcd_client: Any, etcd_session: EtcdServer,
        systemd: FakeSystemd, unique_prefix: bytes) -> None:  # noqa: F811
    """The issue's scenario, on a 24 MiB tmpfs: values of 6 KB until /dev/shm is full.

    The writer never reconnects or relists for it; status shows the error, since
    when, and fails readiness after the grace; a watch at the head is never cut
    off; once space returns the writer catches up and the cache equals etcd.
    """
    for i in range(20):
        put(etcd_client, unique_prefix + b"k%05d" % i, os.urandom(3000).hex())
    w = tmpfs_writer(ring_size="1MiB")
    w.wait_ready()
    watch, watch_out, watch_err = w.spawn("watch", w.name, unique_prefix.decode(), "--json")

    def watching() -> bool:
        put(etcd_client, unique_prefix + b"watched", b"1")
        return bool(watch_out.read_bytes())
    _wait(watching, 30, "the watch is attached")
    start = w.metrics()
    assert start["shmcache_relists_total"] == 1 and start["shmcache_reconnects_total"] == 0

    w.fill(leave=512 << 10)
    value = os.urandom(3000).hex().encode()  # 6 KB
    n = 0

    def stuck() -> bool:
        nonlocal n
        for _ in range(20):
            put(etcd_client, unique_prefix + b"k%05d" % (n % 400), value)
            n += 1
        return w.metrics().get("shmcache_publish_failing") == 1.0

    w.wait(stuck, 120, "publishing fails on the full tmpfs")
    # A failed snapshot alone leaves room in the ring: write past a ring's worth (1 MiB)
    # so the events themselves cannot be published; etcd holds them meanwhile.
    for _ in range(250):
        put(etcd_client, unique_prefix + b"k%05d" % (n % 400), value)
        n += 1
    code, st = w.status()
    assert st["publish_error"] and "No space left on device" in st["publish_error"], st
    assert abs(st["publish_failing_since"] - time.time()) < 120
    code, st = w.wait(lambda: (lambda r: r if r[0] == 1 else None)(
        w.status("--publish-grace", "1")), 30, "status fails readiness after the grace")
    assert "cannot publish" in st["not_ready_reason"], st
    text = w.cli("status", w.name, "--publish-grace", "1")
    assert text.returncode == 1
    assert "FAILING since" in text.stdout and "NO: the writer cannot publish" in text.stdout
    stuck_rev = st["revision"]
    assert stuck_rev < etcd_current_revision(etcd_client)
    assert _cache_items(w, unique_prefix)[0] == stuck_rev  # readers serve the last revision
    m = w.metrics()
    assert m["shmcache_publish_errors_total"] >= 1
    assert m["shmcache_healthy"] == 0
    assert m["shmcache_reconnects_total"] == 0 and m["shmcache_relists_total"] == 1, m
    assert "etcd error" not in w.log()
    w.wait(lambda: any("cannot publish since" in t for t in systemd.statuses()), 10,
           "systemd's STATUS= says publishing fails")

    w.unfill()
    last = put(etcd_client, unique_prefix + b"last", b"1")

    def caught_up() -> bool:
        return w.metrics().get("shmcache_revision", 0) >= last
    w.wait(caught_up, 60, "the writer catches up once space returns")
    code, st = w.status()
    assert code == 0 and st["publish_error"] is None and st["publish_failing_since"] is None, st
    m = w.metrics()
    assert m["shmcache_publish_failing"] == 0 and m["shmcache_healthy"] == 1
    assert m["shmcache_reconnects_total"] == 0 and m["shmcache_relists_total"] == 1, m
    rev, items = _cache_items(w, unique_prefix)
    assert items == [(kv.key, kv.value, kv.mod_revision)
                     for kv in etcd_range(etcd_client, unique_prefix, rev)]

    # The watch read every event, in order, and was never cut off.
    def watched_last() -> bool:
        assert watch.poll() is None, watch_err.read_text()
        lines = watch_out.read_bytes().splitlines()
        return bool(lines) and json.loads(lines[-1])["revision"] >= last
    _wait(watched_last, 60, "the watch receives the last event")
    watch.kill()
    watch.wait()
    events = [json.loads(line) for line in watch_out.read_bytes().splitlines()]
    revs = [e["revision"] for e in events]
    assert revs[-1] == last, (revs[-5:], watch_err.read_text())
    theirs = etcd_events(etcd_session.endpoint, unique_prefix, revs[0] - 1, last)
    assert revs == [e.revision for e in theirs], watch_err.read_text()
    assert [base64.b64decode(e["kv"]["value"]) for e in events] == [e.kv.value for e in theirs]


def test_compaction_while_publishing_fails_ends_equal_to_etcd(
        tmpfs_writer: Callable[..., TmpfsWriter], etcd_server: EtcdServer,
        unique_prefix: bytes) -> None:
    """etcd compacts past the cache's revision while the writer cannot publish (and
    holds events it has not read): once space returns the writer relists into a new epoch,
    once, and the cache equals etcd. It never reconnects for the full /dev/shm itself."""
    client = etcd_server.client()
    try:
        w = tmpfs_writer(ring_size="1MiB", endpoint=etcd_server.endpoint)
        w.wait_ready()
        w.fill(leave=512 << 10)
        value = os.urandom(3000).hex().encode()
        n = 0

        def stuck() -> bool:
            nonlocal n
            for _ in range(20):
                put(client, unique_prefix + b"k%05d" % (n % 300), value)
                n += 1
            return w.metrics().get("shmcache_publish_failing") == 1.0
        w.wait(stuck, 120, "publishing fails on the full tmpfs")
        # More than gRPC's flow-control window (a few MB): etcd still holds some of
        # these events when it compacts them away.
        for _ in range(1500):
            last = put(client, unique_prefix + b"k%05d" % (n % 300), value)
            n += 1
        etcd_server.compact(last)
        w.unfill()
        w.wait(lambda: w.metrics().get("shmcache_revision", 0) >= last, 60,
               "the writer catches up once space returns")
        rev, items = _cache_items(w, unique_prefix)
        assert items == [(kv.key, kv.value, kv.mod_revision)
                         for kv in etcd_range(client, unique_prefix, rev)]
        m = w.metrics()
        # Relisted once for the compaction (9 MB of events outran gRPC's window, at most
        # 4 MiB), never for the full /dev/shm.
        assert m["shmcache_relists_total"] == 2 and m["shmcache_epoch"] == 2, m
        assert "relisting: etcd compacted" in w.log()
        assert m["shmcache_publish_failing"] == 0 and w.status()[0] == 0
        assert "No space left on device); retrying in" not in w.log()  # (the etcd error line)
    finally:
        client.close()


def test_ring_growth_under_a_full_dev_shm(
        tmpfs_writer: Callable[..., TmpfsWriter], etcd_client: Any,
        unique_prefix: bytes) -> None:
    """A 1.4 MB transaction (etcd takes at most 1.5 MiB) on a 64 KiB ring needs an 8 MiB
    ring and a snapshot of the state before it (300 KB here): with room for the ring but
    not the snapshot, readers keep attaching and reading the last revision, and once
    space returns the writer finishes the growth and the cache equals etcd.

    Needs the Publisher's transactional ring switch (branch ``publish``): before it,
    the new ring generation was half announced and readers could not attach.
    """
    w = tmpfs_writer(size="24m", ring_size="64KiB")
    w.wait_ready()
    before = 0
    for i in range(30):
        before = put(etcd_client, unique_prefix + b"small%02d" % i, os.urandom(5000).hex())
    w.wait(lambda: w.metrics().get("shmcache_revision", 0) >= before, 30,
           "the writer has the 300 KB state")
    w.fill(leave=(8 << 20) + 8192)  # the new ring, not its snapshot
    big = [("put", unique_prefix + b"big%03d" % i, os.urandom(5400).hex().encode())
           for i in range(128)]
    rev = txn(etcd_client, big)
    w.wait(lambda: w.metrics().get("shmcache_publish_failing") == 1.0, 60,
           "publishing fails during the ring growth")
    for _ in range(3):  # readers attach and read, again and again
        got_rev, items = _cache_items(w, unique_prefix)
        assert got_rev == before and len(items) == 30
    chk = w.cli("check", w.name)
    assert chk.returncode == 0, chk.stdout + chk.stderr
    m = w.metrics()
    assert m["shmcache_reconnects_total"] == 0 and m["shmcache_relists_total"] == 1, m
    w.unfill()
    w.wait(lambda: w.metrics().get("shmcache_revision", 0) >= rev, 60,
           "the writer finishes the growth once space returns")
    got_rev, items = _cache_items(w, unique_prefix)
    assert items == [(kv.key, kv.value, kv.mod_revision)
                     for kv in etcd_range(etcd_client, unique_prefix, got_rev)]
    assert len(items) == 158 and w.status()[0] == 0
    chk = w.cli("check", w.name)
    assert chk.returncode == 0, chk.stdout + chk.stderr
