"""Idle Readers release superseded segments: /dev/shm holds what the writer publishes, not
every snapshot an idle process once mapped (issue 19, item 7; shmcache/reader/janitor.py).

Real etcd, a real writer that republishes its snapshot every 0.2 s while keys
change, and idle Readers in other processes (spawned, and forked with an
inherited Reader) that make no call while the writer replaces the segments
they mapped. The tests read those processes' /proc/PID/maps.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import shmcache
from tests.etcdserver import EtcdServer
from tests.helpers import WriterProcess, put, wait_rev

# An idle Reader: attach, read (by index too, when asked), then make no call until stdin closes.
IDLE_READER = """
import sys, shmcache
r = shmcache.Reader(sys.argv[1])
r.list(limit=1)
if len(sys.argv) > 2:
    r.by_index(sys.argv[2], sys.argv[3])
print("ready", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def writer(etcd_session: EtcdServer, cache_name: str,
           unique_prefix: bytes) -> Iterator[WriterProcess]:
    w = WriterProcess(cache_name, etcd_session.endpoint, unique_prefix,
                      extra=["--snapshot-interval", "0.2", "--index", "kind=segment:0"])
    try:
        yield w.start()
    finally:
        w.close()


def _maps(pid: int, name: str) -> list[tuple[str, int, bool]]:
    """(path, bytes, unlinked) of each mapping of a segment of cache ``name`` in process ``pid``."""
    out = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            if f"/shmcache.{name}." not in line:
                continue
            fields = line.split()
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            out.append((fields[5], hi - lo, line.rstrip().endswith("(deleted)")))
    return out


def _pinned(pids: list[int], name: str) -> int:
    """Bytes of unlinked segments of cache ``name`` that processes ``pids`` still map."""
    return sum(size for pid in pids for _path, size, gone in _maps(pid, name) if gone)


def _until(cond: Callable[[], Any], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _replace_segments(client: Any, prefix: bytes, paths: set[str], r: shmcache.Reader) -> None:
    """Put keys until the writer has unlinked every segment in ``paths`` (it republishes
    its snapshot every 0.2 s while keys change)."""
    i = 0
    deadline = time.monotonic() + 60
    while any(os.path.exists(p) for p in paths):
        assert time.monotonic() < deadline, f"the writer kept {paths}"
        wait_rev(r, put(client, prefix + b"a/k%d" % i, b"v" * 2000))
        i += 1


def _spawn_idle(name: str, n: int, *index: str) -> list[subprocess.Popen[str]]:
    procs = [subprocess.Popen([sys.executable, "-c", IDLE_READER, name, *index],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for _ in range(n)]
    for p in procs:
        assert p.stdout is not None and p.stdout.readline() == "ready\n"
    return procs


def _stop(procs: list[subprocess.Popen[str]]) -> None:
    for p in procs:
        assert p.stdin is not None
        p.stdin.close()
    for p in procs:
        assert p.wait(60) == 0


def test_idle_reader_processes_release_superseded_segments(
        writer: WriterProcess, etcd_client: Any, unique_prefix: bytes) -> None:
    """Four idle Readers in other processes (one by index): once the writer has replaced
    the snapshot and index segment they mapped, each unmaps them without a call."""
    name = writer.name
    for i in range(20):
        put(etcd_client, unique_prefix + b"a/base%d" % i, b"x" * 2000)
    procs = _spawn_idle(name, 3) + _spawn_idle(name, 1, "kind", "a")
    pids = [p.pid for p in procs]
    try:
        mapped = {path for pid in pids for path, _size, _gone in _maps(pid, name)}
        assert any(".snap." in p for p in mapped) and any(".idx." in p for p in mapped)
        old = {p for p in mapped if ".snap." in p or ".idx." in p or ".ovl." in p}
        with shmcache.Reader(name) as r:
            _replace_segments(etcd_client, unique_prefix, old, r)
        _until(lambda: _pinned(pids, name) == 0,
               "the idle readers to unmap the unlinked segments")
        for pid in pids:
            assert not {path for path, _size, _gone in _maps(pid, name)} & old
    finally:
        _stop(procs)


def test_forked_child_releases_what_its_inherited_reader_mapped(
        writer: WriterProcess, etcd_client: Any, unique_prefix: bytes) -> None:
    """A Reader made before fork(), idle in the child: the child's own janitor (threads do
    not survive fork) unmaps the snapshot once the writer replaced it."""
    name = writer.name
    put(etcd_client, unique_prefix + b"a/base", b"x")
    r = shmcache.Reader(name)
    r.list(limit=1)
    old = {path for path, _size, _gone in _maps(os.getpid(), name) if ".snap." in path}
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: idle until the parent closes the pipe
        os.close(wfd)
        os.read(rfd, 1)
        os._exit(0)
    os.close(rfd)
    try:
        r.close()  # (the parent's copy: the child's stays mapped)
        assert {path for path, _size, _gone in _maps(pid, name)} & old
        with shmcache.Reader(name) as r2:
            _replace_segments(etcd_client, unique_prefix, old, r2)
        _until(lambda: _pinned([pid], name) == 0, "the forked child to unmap the old snapshot")
    finally:
        os.close(wfd)
        assert os.waitpid(pid, 0)[1] == 0


def test_status_counts_what_a_stopped_reader_pins(
        writer: WriterProcess, etcd_client: Any, unique_prefix: bytes) -> None:
    """A reader process that does not run (SIGSTOP) keeps the snapshot it mapped: status()
    and `shmcache status` count its bytes; once it runs again it releases them, and the
    count drops to 0."""
    name = writer.name
    put(etcd_client, unique_prefix + b"a/base", b"x" * 5000)
    procs = _spawn_idle(name, 1)
    pid = procs[0].pid
    try:
        old = {path: size for path, size, _gone in _maps(pid, name)
               if ".snap." in path or ".ovl." in path}
        with shmcache.Reader(name) as r:
            assert r.status().pinned_bytes == 0
            os.kill(pid, signal.SIGSTOP)
            _replace_segments(etcd_client, unique_prefix, set(old), r)
            assert r.status().pinned_bytes == _pinned([pid], name) == sum(old.values())
            out = subprocess.run([sys.executable, "-m", "shmcache", "status", name],
                                 capture_output=True, text=True, timeout=60).stdout
            assert re.search(rf"^pinned by readers +{sum(old.values())} bytes of unlinked "
                             rf"segments$", out, re.M), out
            os.kill(pid, signal.SIGCONT)
            _until(lambda: r.status().pinned_bytes == 0, "the reader to release them")
    finally:
        os.kill(pid, signal.SIGCONT)
        _stop(procs)
