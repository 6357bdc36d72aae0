"""Files planted in /dev/shm by another user, and locks held by processes that are not writers.

/dev/shm is world-writable and segment names are predictable. The writer (root here)
changes and removes only its own regular files, through descriptors opened without
following links; a link planted at a segment name is logged and left, and where it
blocks the cache (the control segment's name) every command says so in one line.
The writer's lock is a mode-600 lock file no reader can open: a reader that flocks
everything it can open on the cache keeps no writer out, and `status` and `rm` tell a
lock held by a process that is not the writer from a live writer.

Another uid comes from test_permissions' throwaway accounts (setpriv); etcd and the
writers run as root.
"""

from __future__ import annotations

import fcntl
import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import shmcache
from shmcache.format import layout
from shmcache.ipc import shm as _shm
from tests.etcdserver import EtcdServer
from tests.helpers import WriterProcess, put
from tests.test_permissions import CHILD_ENV, Account, Accounts
from tests.test_permissions import accounts as accounts  # the fixture, as-is


def _cli(*args: str, account: Account | None = None) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "shmcache", *args]
    return subprocess.run(account.argv(*argv) if account else argv, capture_output=True,
                          text=True, timeout=120, cwd="/", env=CHILD_ENV)


def _wait(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout}s: {what}")


def _stop_once_watching(w: WriterProcess, starts: int = 1) -> None:
    """Stop ``w`` once it opened its etcd watch (its ``starts``-th start on this log): the
    stray check has run by then (it runs once the state is current, before the watch)."""
    _wait(lambda: Path(w.log_path).read_text().count("INFO shmcache.writer: watching ")
          >= starts, 30, "the writer watches")
    w.terminate()


def _one_line(out: subprocess.CompletedProcess[str], cmd: str, code: int = 2) -> str:
    assert out.returncode == code, (out.returncode, out.stdout, out.stderr)
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"shmcache {cmd}: "), out.stderr
    return lines[0]


def _plant_link(account: Account, target: Path, seg_name: str) -> str:
    """A symbolic link at segment ``seg_name``'s /dev/shm path, made by ``account``."""
    path = _shm.SHM_DIR + seg_name
    subprocess.run(account.argv("ln", "-s", str(target), path), check=True,
                   capture_output=True, timeout=60, cwd="/")
    assert os.lstat(path).st_uid == account.uid
    return path


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    """A root-owned mode-600 file, what a planted link would point the writer at."""
    p = tmp_path / "secret"
    p.write_text("root only\n")
    p.chmod(0o600)
    return p


@pytest.fixture
def serve(etcd_session: EtcdServer, cache_name: str, unique_prefix: bytes
          ) -> Iterator[Callable[..., WriterProcess]]:
    """Start writers of ``cache_name`` (one key put first); every one is closed after."""
    made: list[WriterProcess] = []
    client = etcd_session.client()
    put(client, unique_prefix + b"k1", b"v1")

    def start(*extra: str, wait: bool = True) -> WriterProcess:
        w = WriterProcess(cache_name, etcd_session.endpoint, unique_prefix,
                          extra=["--mode", "644", *extra])
        made.append(w)
        return w.start(wait=wait)

    try:
        yield start
    finally:
        for w in made:
            w.close()
        client.close()


# -- 4. files are opened, never followed --------------------------------------------------


def test_a_link_planted_at_a_stray_segment_name_is_left_alone_and_logged(
        accounts: Accounts, cache_name: str, secret: Path,
        serve: Callable[..., WriterProcess]) -> None:
    """The writer (root, mode 644) used to chmod the link's target to 644 and then unlink
    the link as a stray segment; now the target keeps its mode and owner, the link stays
    and the log names it once."""
    before = os.stat(secret)
    link = _plant_link(accounts.outsider, secret, layout.snapshot_name(cache_name, 999))
    w = serve()
    _stop_once_watching(w)
    after = os.stat(secret)
    assert (stat.S_IMODE(after.st_mode), after.st_uid, after.st_gid) == (
        0o600, before.st_uid, before.st_gid)
    assert os.path.islink(link) and os.readlink(link) == str(secret)
    log = w.log()
    warning = (f"leaving {link} alone: it is a symbolic link owned by user "
               f"{accounts.outsider.name} (uid {accounts.outsider.uid}) to '{secret}'")
    assert log.count(warning) == 1, log
    # A restart does not touch it either, and `shmcache rm` (the operator) removes it.
    _stop_once_watching(serve(), starts=2)
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600 and os.path.islink(link)
    out = _cli("rm", cache_name)
    assert out.returncode == 0 and layout.snapshot_name(cache_name, 999) in out.stdout, out
    assert not os.path.lexists(link)


def test_another_users_file_at_a_segment_name_is_not_chmodded_or_removed(
        accounts: Accounts, cache_name: str, serve: Callable[..., WriterProcess]) -> None:
    """A regular file another user made at a ring name: the writer neither changes its mode
    (it used to chmod and chown every entry) nor unlinks it as a stray."""
    path = _shm.SHM_DIR + layout.ring_name(cache_name, 77)
    subprocess.run(accounts.outsider.argv("sh", "-c", f"umask 077; echo x > {path}"),
                   check=True, capture_output=True, timeout=60, cwd="/")
    w = serve()
    _stop_once_watching(w)
    st = os.lstat(path)
    assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o600, accounts.outsider.uid)
    assert "it is a regular file owned by user" in w.log()


def test_a_link_at_the_control_segment_name_is_one_line_for_writer_and_readers(
        accounts: Accounts, cache_name: str, secret: Path,
        serve: Callable[..., WriterProcess]) -> None:
    """It used to be a raw `OSError: Too many levels of symbolic links`: now `serve` (exit 1,
    the writer failed), the reader commands (exit 2) and Reader() refuse in one line
    (SegmentPermissionError) naming the link and its owner, and nothing follows it."""
    cname = layout.control_name(cache_name)
    _plant_link(accounts.outsider, secret, cname)
    w = serve(wait=False)
    assert w.proc is not None
    w.proc.wait(timeout=60)
    line = next((ln for ln in w.log().splitlines() if ln.startswith("shmcache serve: ")), "")
    assert w.proc.returncode == 1, w.log()
    owner = f"a symbolic link owned by user {accounts.outsider.name}"
    assert cname in line and owner in line and "shmcache rm" in line, w.log()
    assert "Traceback" not in w.log()
    for cmd in (["status", cache_name], ["get", cache_name, "/k"], ["check", cache_name]):
        assert owner in _one_line(_cli(*cmd), cmd[0])
    with pytest.raises(shmcache.SegmentPermissionError) as ei:
        shmcache.Reader(cache_name)
    assert ei.value.segment == cname and ei.value.uid == accounts.outsider.uid
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600


def test_a_fifo_at_the_control_segment_name_cannot_hang_a_reader(
        accounts: Accounts, cache_name: str) -> None:
    """A FIFO another user made at the control segment's name: opening it read-only used to
    block until someone opened it for writing, hanging every reader at attach; now it is
    refused at once, in one line."""
    path = _shm.SHM_DIR + layout.control_name(cache_name)
    subprocess.run(accounts.outsider.argv("mkfifo", "-m", "644", path), check=True,
                   capture_output=True, timeout=60, cwd="/")
    out = subprocess.run([sys.executable, "-m", "shmcache", "get", cache_name, "/k"],
                         capture_output=True, text=True, timeout=30)
    assert f"is a FIFO owned by user {accounts.outsider.name}" in _one_line(out, "get")
    with pytest.raises(shmcache.SegmentPermissionError, match="is a FIFO"):
        shmcache.Reader(cache_name)


def test_a_link_at_the_lock_file_name_stops_the_writer_and_rm_removes_it(
        accounts: Accounts, cache_name: str, secret: Path,
        serve: Callable[..., WriterProcess]) -> None:
    """The writer never opens, chmods or locks through a link at its lock file's name: it
    refuses in one line naming it; `shmcache rm` removes the link, and the writer starts."""
    link = _plant_link(accounts.outsider, secret, layout.lock_name(cache_name))
    w = serve(wait=False)
    assert w.proc is not None
    w.proc.wait(timeout=60)
    assert w.proc.returncode == 1, w.log()
    line = next((ln for ln in w.log().splitlines() if ln.startswith("shmcache serve: ")), "")
    assert f"{layout.lock_name(cache_name)} is a symbolic link owned by user " \
           f"{accounts.outsider.name}" in line, w.log()
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
    out = _cli("rm", cache_name)
    assert out.returncode == 0 and not os.path.lexists(link), out
    serve()


# -- 5. only a writer can hold the writer's lock ------------------------------------------

# Runs as a reader's uid: opens every entry of the cache it can and flocks it, exclusively
# where it can, then prints what it holds and sleeps until killed.
_SQUAT = r"""
import fcntl, os, sys, time
held = []
for e in sorted(os.listdir("/dev/shm")):
    if not e.startswith("shmcache." + sys.argv[1] + "."):
        continue
    try:
        fd = os.open("/dev/shm/" + e, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        continue
    for op in (fcntl.LOCK_EX, fcntl.LOCK_SH):
        try:
            fcntl.flock(fd, op | fcntl.LOCK_NB)
            held.append(e)
            break
        except OSError:
            pass
print(" ".join(held), flush=True)
time.sleep(3600)
"""


def test_a_reader_that_locks_all_it_can_open_cannot_keep_a_writer_out(
        accounts: Accounts, cache_name: str, serve: Callable[..., WriterProcess]) -> None:
    """A process of a reader's uid flocks every entry of the cache it can open (it used to
    get the control segment's, the writer's lock); after the writer stops, a new writer
    starts and serves, `status` reports no stuck lock and `rm` removes the cache."""
    first = serve()
    first.terminate()
    squat = subprocess.Popen(
        accounts.outsider.argv(sys.executable, "-c", _SQUAT, cache_name),
        stdout=subprocess.PIPE, text=True, cwd="/", env=CHILD_ENV)
    try:
        assert squat.stdout is not None
        held = squat.stdout.readline().split()
        assert f"shmcache.{cache_name}.ctl" in held, held  # it can lock what it can read
        assert f"shmcache.{cache_name}.lock" not in held, held
        second = serve()  # wait_ready: published and claimed by this process
        with shmcache.Reader(cache_name) as r:
            assert r.get(r.status().prefix + b"k1") is not None
        out = _cli("status", cache_name)  # (ready or not yet: either way it shows the cache)
        assert out.returncode in (0, 1) and "writer lock" not in out.stdout, out
        assert f"pid {second.pid} alive" in out.stdout, out
        assert json.loads(_cli("status", cache_name, "--json").stdout)["writer_lock"] is None
        second.terminate()
        out = _cli("rm", cache_name)
        assert out.returncode == 0 and layout.control_name(cache_name) in out.stdout, out
        assert layout.lock_name(cache_name) in out.stdout
        assert _shm.list_segments(cache_name) == []
        assert not os.path.lexists(_shm.SHM_DIR + layout.lock_name(cache_name))
    finally:
        squat.kill()
        squat.wait(timeout=30)


def test_the_lock_file_is_the_writers_alone(
        accounts: Accounts, cache_name: str, serve: Callable[..., WriterProcess]) -> None:
    """Mode 600, owned by the writer's user, whatever the segments' mode; another uid
    cannot open it."""
    serve()
    path = _shm.SHM_DIR + layout.lock_name(cache_name)
    st = os.lstat(path)
    assert stat.S_ISREG(st.st_mode) and (stat.S_IMODE(st.st_mode), st.st_uid) == (0o600, 0)
    probe = subprocess.run(accounts.member.argv("cat", path), capture_output=True, text=True,
                           timeout=60, cwd="/")
    assert probe.returncode != 0 and "Permission denied" in probe.stderr


# Holds the writer lock as a child the holder forked would: the parent takes the lock and
# exits, the child keeps the inherited descriptor (and so the lock).
_FORKED_HOLDER = r"""
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
if os.fork() == 0:
    print(os.getpid(), flush=True)
    time.sleep(3600)
os._exit(0)
"""


def test_status_and_rm_tell_a_stuck_lock_from_a_live_writer(
        cache_name: str, serve: Callable[..., WriterProcess]) -> None:
    """With the writer running, `rm` names it as the running writer. After it stops, a
    process that kept the lock (a forked child) is reported by `status`, `rm` and a new
    `serve` as a stuck lock naming that process, not as a running writer; once it is
    gone the writer starts."""
    w = serve()
    line = _one_line(_cli("rm", cache_name), "rm")
    assert f"has a running writer (pid {w.pid})" in line and "stuck lock" not in line
    w.terminate()
    holder = subprocess.Popen(
        [sys.executable, "-c", _FORKED_HOLDER, _shm.SHM_DIR + layout.lock_name(cache_name)],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None
    child = int(holder.stdout.readline())
    holder.wait(timeout=30)
    try:
        out = _cli("status", cache_name)
        assert out.returncode in (0, 1), out  # (no writer: not ready, where status says so)
        row = next((ln for ln in out.stdout.splitlines() if ln.startswith("writer lock")), "")
        assert f"held by pid {child} (" in row and "a stuck lock" in row, out.stdout
        assert "not by its recorded writer (none)" in row, row  # a clean stop cleared it
        doc = json.loads(_cli("status", cache_name, "--json").stdout)
        assert doc["writer_lock"] == row.split(None, 2)[2], (doc, row)
        line = _one_line(_cli("rm", cache_name), "rm")
        assert f"held by pid {child} (" in line and "a stuck lock" in line, line
        assert "has a running writer" not in line and "Stop the process" in line, line
        assert layout.control_name(cache_name) in _shm.list_segments(cache_name)
        refused = serve(wait=False)
        assert refused.proc is not None
        refused.proc.wait(timeout=60)
        assert refused.proc.returncode == 1 and f"held by pid {child} (" in refused.log()
    finally:
        os.kill(child, 9)
    _wait(lambda: not os.path.exists(f"/proc/{child}"), 30, "the holder is gone")
    serve()
    assert "writer lock" not in _cli("status", cache_name).stdout


def test_a_cache_of_an_earlier_version_is_taken_over(
        cache_name: str, serve: Callable[..., WriterProcess]) -> None:
    """Segments an earlier writer left (no lock file): a new writer takes them over and
    resumes; a live earlier writer (it flocks the control segment and is recorded there)
    is refused, one a reader merely locked is not."""
    w = serve()
    w.terminate()
    os.unlink(_shm.SHM_DIR + layout.lock_name(cache_name))
    resumed = serve()
    # (ready once it claims the cache, which comes before it resumes)
    _wait(lambda: f"resumed cache {cache_name!r}" in resumed.log(), 30, "the writer resumes")
    # The running writer also holds the control segment's lock, for earlier tools.
    ctl = os.open(_shm.SHM_DIR + layout.control_name(cache_name), os.O_RDONLY)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(ctl, fcntl.LOCK_SH | fcntl.LOCK_NB)
    finally:
        os.close(ctl)
    # As an earlier writer would be seen: the lock file gone, the control segment locked
    # by the live recorded writer.
    os.unlink(_shm.SHM_DIR + layout.lock_name(cache_name))
    refused = serve(wait=False)
    assert refused.proc is not None
    refused.proc.wait(timeout=60)
    assert refused.proc.returncode == 1  # the writer failed: another holds the cache
    assert f"already has a running writer (pid {resumed.pid}, an earlier" in refused.log()
    line = _one_line(_cli("rm", cache_name), "rm")
    assert f"has a running writer (pid {resumed.pid})" in line
