"""Consistent reads for readers only: who may make the writer ask etcd, and how often.

A user who may not read the segments cannot make the writer run a sync round
(each costs etcd a range read); a reader flooding the request socket gets no
more rounds than the rate limit; a legitimate ``sync()`` completes meanwhile;
readers as other uids with access (a group, mode 644) sync. Real etcd, a real
writer process (as root, mode 640 + a readers group unless said otherwise),
floods from processes run as throwaway users (setpriv).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

import shmcache
from shmcache.format import control, layout
from shmcache.ipc import shm as _shm
from shmcache.writer import sync_server as _sync
from tests.etcdserver import EtcdServer
from tests.helpers import (
    CHILD_ENV,
    Account,
    Accounts,
    WriterProcess,
    etcd_current_revision,
    put,
    throwaway_accounts,
)


@pytest.fixture(scope="module")
def accounts() -> Iterator[Accounts]:
    with throwaway_accounts() as acc:
        yield acc


@contextlib.contextmanager
def _writer(etcd: EtcdServer, mode: str, extra: list[str]) -> Iterator[str]:
    name = f"t-{secrets.token_hex(4)}"
    prefix = b"/t/" + secrets.token_hex(8).encode() + b"/"
    w = WriterProcess(name, etcd.endpoint, prefix, extra=["--mode", mode, *extra])
    try:
        w.start()
        yield name
    finally:
        w.close()


@pytest.fixture(scope="module")
def cache_640(accounts: Accounts, etcd_session: EtcdServer) -> Iterator[str]:
    with _writer(etcd_session, "640", ["--group", accounts.readers]) as name:
        yield name


def stat_mode(p: str) -> int:
    return os.stat(p).st_mode & 0o777


def _rounds_started(name: str) -> int:
    """SYNC_STARTED: how many sync rounds the writer has started."""
    seg = _shm.open_readonly(layout.control_name(name))
    assert seg is not None
    try:
        deadline = time.monotonic() + 10
        while (b := control.read_block(seg.buf)) is None:  # mid-publish
            assert time.monotonic() < deadline, "control block never stable"
            time.sleep(0.001)
        return b.sync_started
    finally:
        seg.close()


# Sends request datagrams, as fast as it can for SECONDS, to every address a writer
# listens at now or did (the abstract name and the socket file); says "flooding" once
# it has sent, then prints what the sends returned.
_FLOOD = r"""
import errno, json, socket, sys, time
name, seconds = sys.argv[1], float(sys.argv[2])
addrs = [b"\0shmcache." + name.encode() + b".sync", "/dev/shm/shmcache." + name + ".sync"]
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.setblocking(False)
counts = {}
end = time.monotonic() + seconds
while time.monotonic() < end:
    for a in addrs:
        try:
            s.sendto(b"s", a)
            k = "sent"
        except BlockingIOError:
            k = "queue full"
        except OSError as exc:
            k = errno.errorcode.get(exc.errno, str(exc.errno))
        where = "abstract" if isinstance(a, bytes) else "file"
        counts[where + " " + k] = counts.get(where + " " + k, 0) + 1
        if len(counts) == 1 and sum(counts.values()) == 1:
            print("flooding", flush=True)
print(json.dumps(counts), flush=True)
"""


class _Flood:
    """A flooder process as ``account``; ``wait_started`` until it sends, ``result`` its counts."""

    def __init__(self, account: Account, name: str, seconds: float) -> None:
        self.proc = subprocess.Popen(
            account.argv(sys.executable, "-c", _FLOOD, name, str(seconds)),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/", env=CHILD_ENV)

    def wait_started(self, timeout: float = 60) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        assert select.select([fd], [], [], timeout)[0], "the flooder never started"
        line = self.proc.stdout.readline()
        assert line == b"flooding\n", (line, self.proc.stderr.read() if self.proc.stderr else "")

    def result(self, timeout: float = 120) -> dict[str, int]:
        out, err = self.proc.communicate(timeout=timeout)
        assert self.proc.returncode == 0, err
        counts: dict[str, int] = json.loads(out.splitlines()[-1])
        return counts

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=60)


def test_a_user_who_cannot_read_the_segments_starts_no_round(
        accounts: Accounts, cache_640: str) -> None:
    """A flood from a uid outside the readers' group is refused by the kernel (EACCES on
    the socket file, nothing listens at the abstract name): SYNC_STARTED does not move.
    (The writer used to listen at an abstract address, which has no permissions: every
    datagram drove a round, an etcd range read.)"""
    with shmcache.Reader(cache_640) as r:  # its round drains what earlier tests' floods queued
        r.sync(timeout=30)
    before = _rounds_started(cache_640)
    counts = _Flood(accounts.outsider, cache_640, 1.0).result()
    assert _rounds_started(cache_640) == before, counts
    assert counts.get("file EACCES", 0) > 0, counts
    assert not any(k.endswith(" sent") or k.endswith("queue full") for k in counts), counts


def test_a_legitimate_sync_completes_during_a_flood_of_refused_requests(
        accounts: Accounts, cache_640: str, etcd_client: Any) -> None:
    """Refused datagrams take nothing from readers but CPU: sync() calls complete during
    the flood, each reflecting etcd's revision from before it."""
    flood = _Flood(accounts.outsider, cache_640, 30.0)
    try:
        flood.wait_started()
        with shmcache.Reader(cache_640) as r:
            for _ in range(3):
                target = etcd_current_revision(etcd_client)
                assert r.sync(timeout=5) >= target
    finally:
        flood.kill()


def test_a_reader_flooding_the_socket_gets_no_more_rounds_than_the_limit(
        accounts: Accounts, cache_640: str, etcd_client: Any) -> None:
    """A member of the readers' group may send, but rounds start at most ROUND_BURST at once
    and ROUNDS_PER_SECOND a second however many datagrams arrive (it used to be one round
    after another, about 500 a second here); another reader's sync() still completes
    meanwhile."""
    t0 = time.monotonic()
    before = _rounds_started(cache_640)
    flood = _Flood(accounts.member, cache_640, 2.0)
    try:
        flood.wait_started()
        with shmcache.Reader(cache_640) as r:
            target = etcd_current_revision(etcd_client)
            assert r.sync(timeout=5) >= target
        counts = flood.result()
    finally:
        flood.kill()
    rounds = _rounds_started(cache_640) - before
    elapsed = time.monotonic() - t0
    assert counts.get("file sent", 0) > 0, counts
    # The writer's budget runs on the same monotonic clock, within this window.
    assert 1 <= rounds <= elapsed * _sync.ROUNDS_PER_SECOND + _sync.ROUND_BURST, (
        rounds, elapsed, counts)


def test_round_budget_allows_a_burst_then_the_rate() -> None:
    """Pure logic, on a fake clock: ``burst`` rounds at once, then one per 1/rate; an idle
    spell refills the burst, never beyond it."""
    now = [100.0]
    budget = _sync.RoundBudget(per_second=8, burst=3, clock=lambda: now[0])  # binary-exact
    for _ in range(3):
        assert budget.delay() == 0
        budget.spend()
    assert budget.delay() == 0.125
    now[0] += 0.0625
    assert budget.delay() == 0.0625
    now[0] += 0.0625
    assert budget.delay() == 0
    budget.spend()
    now[0] += 60  # idle
    for _ in range(3):
        assert budget.delay() == 0
        budget.spend()
    assert budget.delay() > 0


# A reader as another uid: one consistent read, its revision on stdout.
_SYNC = """
import sys
import shmcache
with shmcache.Reader(sys.argv[1]) as r:
    print(r.sync(timeout=30))
"""


def _sync_as(account: Account, name: str) -> int:
    out = subprocess.run(account.argv(sys.executable, "-c", _SYNC, name), capture_output=True,
                         text=True, timeout=120, cwd="/", env=CHILD_ENV)
    assert out.returncode == 0, out.stderr
    return int(out.stdout)


def test_a_group_member_as_another_uid_syncs(
        accounts: Accounts, cache_640: str, etcd_client: Any) -> None:
    """Access through a supplementary group (what the kernel checks on the socket file,
    as on the segments)."""
    target = put(etcd_client, b"/elsewhere/" + secrets.token_hex(4).encode(), b"x")
    assert _sync_as(accounts.member, cache_640) >= target


def test_mode_644_any_user_syncs(accounts: Accounts, etcd_session: EtcdServer,
                                 etcd_client: Any) -> None:
    with _writer(etcd_session, "644", []) as name:
        assert stat_mode(_sync.path(name)) == 0o666
        target = put(etcd_client, b"/elsewhere/" + secrets.token_hex(4).encode(), b"x")
        assert _sync_as(accounts.outsider, name) >= target


# Binds NAME's former abstract request address, says so, and holds it until killed.
_SQUAT = r"""
import socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(b"\0shmcache." + sys.argv[1].encode() + b".sync")
print("bound", flush=True)
time.sleep(600)
"""


def test_a_squatter_on_the_abstract_name_does_not_take_sync_away(
        accounts: Accounts, etcd_session: EtcdServer, etcd_client: Any) -> None:
    """Any user may bind an abstract address. Readers used to send their requests there
    first, so a process that bound the name before the writer started swallowed them and
    every sync() timed out; they now use only the socket file."""
    name = f"t-{secrets.token_hex(4)}"
    squat = subprocess.Popen(accounts.outsider.argv(sys.executable, "-c", _SQUAT, name),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/",
                             env=CHILD_ENV)
    try:
        assert squat.stdout is not None
        assert squat.stdout.readline() == b"bound\n", squat.stderr.read() if squat.stderr else ""
        w = WriterProcess(name, etcd_session.endpoint,
                          b"/t/" + secrets.token_hex(8).encode() + b"/", extra=["--mode", "644"])
        try:
            w.start()
            with shmcache.Reader(name) as r:
                target = etcd_current_revision(etcd_client)
                assert r.sync(timeout=5) >= target
        finally:
            w.close()
    finally:
        squat.kill()
        squat.communicate(timeout=60)


def test_the_socket_file_appears_only_with_its_final_mode(
        cache_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """bind_path sets the mode and group before the file is at its public name (it binds in
    a private directory and renames): a peer that connects while the mode is the umask's
    keeps sending after a chmod, so there must be no such moment."""
    public = _sync.path(cache_name)
    at_chmod: list[int | None] = []
    real_chmod = os.chmod

    def chmod(p: Any, mode: int, *args: Any, **kw: Any) -> None:
        try:
            at_chmod.append(os.stat(public).st_mode & 0o777)
        except FileNotFoundError:
            at_chmod.append(None)
        real_chmod(p, mode, *args, **kw)

    monkeypatch.setattr(os, "chmod", chmod)
    old = os.umask(0)
    try:
        sock = _sync.bind_path(cache_name, 0o640, os.getgid())
    finally:
        os.umask(old)
    try:
        assert at_chmod == [None]  # it used to be there, mode 777, when chmod came
        st = os.stat(public)
        assert (st.st_mode & 0o777, st.st_gid) == (0o660, os.getgid())
    finally:
        sock.close()
        os.unlink(public)


def test_bind_path_leaves_no_directory_and_removes_leftovers(cache_name: str) -> None:
    """The private directory goes once the socket is in place, and one that a writer
    killed inside bind_path left is removed by the next (not one of a cache whose name
    merely starts with this one's)."""
    leftover = os.path.join(_sync.SHM_DIR, f".shmcache.{cache_name}.sync.killed_1")
    other = os.path.join(_sync.SHM_DIR, f".shmcache.{cache_name}.sync.b.sync.killed_2")
    for d in (leftover, other):
        os.mkdir(d, 0o700)
        open(os.path.join(d, "sock"), "w").close()
    sock = _sync.bind_path(cache_name, 0o600)
    try:
        assert stat_mode(_sync.path(cache_name)) == 0o600
        assert [e for e in os.listdir(_sync.SHM_DIR)
                if e.startswith(f".shmcache.{cache_name}.")] == [os.path.basename(other)]
    finally:
        sock.close()
        os.unlink(_sync.path(cache_name))
        shutil.rmtree(leftover, ignore_errors=True)
        shutil.rmtree(other, ignore_errors=True)
