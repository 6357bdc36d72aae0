"""The writer's end of the consistent-read channel (ipc/sync_socket.py describes it): the
socket file it binds, the round budget, and the sync thread's Server."""

from __future__ import annotations

import logging
import os
import re
import select
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..format import layout
from ..ipc.sync_socket import SHM_DIR, path

if TYPE_CHECKING:
    from .control_writer import ControlWriter

log = logging.getLogger("shmcache.writer")

# Rounds start at most ROUND_BURST at once, then ROUNDS_PER_SECOND a second: each
# costs etcd one count-only Range (and, on an idle range, a few progress
# requests). Callers that ask less often than that never wait for the budget;
# past it, a caller waits at most 1/ROUNDS_PER_SECOND longer for its round.
ROUNDS_PER_SECOND = 100
ROUND_BURST = 20
# Datagrams read per wake-up at most: a sender that refills the queue as fast as
# it is read cannot keep the sync thread from starting the round.
DRAIN_LIMIT = 256


def socket_mode(mode: int) -> int:
    """The socket file's mode for segments of ``mode``: sending needs write permission,
    so each read bit becomes read+write (0600 -> 0600, 0640 -> 0660, 0644 -> 0666)."""
    return mode | ((mode & 0o044) >> 1)


def bind_path(name: str, mode: int, gid: int | None = None) -> socket.socket:
    """The writer's end: a datagram socket file that only the segments' readers may send to.

    The kernel checks write permission on the file when a peer sends to it by
    name or connects: exactly who may read the cache (owner, group with
    supplementary groups, others) may ask for a consistent read. The socket is
    bound inside a directory of the writer's alone, given its mode and group
    there, and renamed into place: a peer that connected while the file still
    had the umask's mode would keep sending after a chmod. A stale file (a
    writer that was killed) is replaced by the rename; only the lock holder
    gets here, so it is never a live writer's.
    """
    remove_leftovers(name)
    private = tempfile.mkdtemp(prefix=_private_prefix(name), dir=SHM_DIR)  # mode 0700
    tmp = os.path.join(private, "sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(tmp)
        sock.setblocking(False)
        os.chmod(tmp, socket_mode(mode))
        if gid is not None:
            os.chown(tmp, -1, gid)
        os.rename(tmp, path(name))
    except BaseException:
        sock.close()
        _unlink_quietly(tmp)
        raise
    finally:
        try:
            os.rmdir(private)
        except OSError:
            pass
    return sock


def _private_prefix(name: str) -> str:
    return f".shmcache.{name}.sync."


# What mkdtemp appends: 8 of [a-z0-9_], so a cache named "a" never takes the
# directory of one named "a.sync.b".
_PRIVATE_SUFFIX_RE = re.compile(r"[a-z0-9_]{8}")


def remove_leftovers(name: str) -> None:
    """Remove the private directories of ``bind_path`` that a writer killed inside it left:
    only this user's own directories, holding nothing but the socket."""
    prefix = _private_prefix(name)
    try:
        entries = os.listdir(SHM_DIR)
    except OSError:
        return
    for entry in entries:
        if not (entry.startswith(prefix) and _PRIVATE_SUFFIX_RE.fullmatch(entry[len(prefix):])):
            continue
        d = os.path.join(SHM_DIR, entry)
        try:
            st = os.lstat(d)
            if st.st_uid == os.geteuid() and stat.S_ISDIR(st.st_mode):
                _unlink_quietly(os.path.join(d, "sock"))
                os.rmdir(d)
        except OSError:
            pass


def _unlink_quietly(p: str) -> None:
    try:
        os.unlink(p)
    except OSError:
        pass


def drain(sock: socket.socket, limit: int = DRAIN_LIMIT) -> int:
    """Read the queued requests, at most ``limit``; returns how many there were."""
    n = 0
    while n < limit:
        try:
            sock.recv(64)
        except (BlockingIOError, InterruptedError):
            return n
        n += 1
    return n


class RoundBudget:
    """How many sync rounds may start now: a token bucket of ``burst`` rounds that
    refills at ``per_second``. Used by the sync thread alone (no lock)."""

    def __init__(self, per_second: float = ROUNDS_PER_SECOND, burst: int = ROUND_BURST,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.per_second = per_second
        self.burst = burst
        self.clock = clock
        self._tokens = float(burst)
        self._at = clock()

    def delay(self) -> float:
        """Seconds until a round may start; 0 when one may start now."""
        now = self.clock()
        self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.per_second)
        self._at = now
        return 0.0 if self._tokens >= 1 else (1 - self._tokens) / self.per_second

    def spend(self) -> None:
        """A round starts (after ``delay()`` returned 0)."""
        self._tokens -= 1


class Server:
    """The writer's end: one round at a time, on a thread of its own (``run``).

    A round publishes SYNC_STARTED (no wake), learns etcd's current revision R
    with a linearizable read issued after the requests arrived (so R covers
    every write that completed before those ``sync()`` calls), waits until
    the published revision reaches R (an idle range gets there through
    progress notifications, double-confirmed by the feed), then publishes
    SYNC_DONE and SYNC_REVISION = R with a wake.

    Rounds start within a ``RoundBudget``; requests that arrive while a round
    runs or the budget is spent wait in the socket and share the next round,
    so a caller is never starved by other senders, however many datagrams
    they send: the first round that starts after its request covers it.
    ``close`` only after ``run`` returned (the writer sets ``stopped`` and
    joins the thread).
    """

    def __init__(self, sock: socket.socket, ctl: ControlWriter,
                 current_revision: Callable[[], int], request_progress: Callable[[], None],
                 published_revision: Callable[[], int], revision_moved: threading.Condition,
                 stopped: threading.Event, stats: dict[str, Any],
                 describe: Callable[[BaseException], str] = str,
                 budget: RoundBudget | None = None) -> None:
        self.sock = sock
        self.ctl = ctl
        self.current_revision = current_revision
        self.request_progress = request_progress
        self.published_revision = published_revision
        self.revision_moved = revision_moved
        self.stopped = stopped
        self.stats = stats
        self.describe = describe
        self.budget = budget if budget is not None else RoundBudget()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                ready, _, _ = select.select([self.sock], [], [], 0.25)
            except (OSError, ValueError):
                return
            if not ready:
                continue
            delay = self.budget.delay()
            if delay > 0:
                if self.stopped.wait(delay):
                    return
                continue  # the requests are still queued: select returns at once
            if not drain(self.sock):
                continue
            self.budget.spend()
            self.stats["sync_requests"] += 1
            # Requests that arrive from here on are served by the next round.
            started = self.ctl.get(layout.B_SYNC_STARTED) + 1
            self.ctl.publish({layout.B_SYNC_STARTED: started}, wake=False)
            try:
                target = self.round()
            except Exception as exc:  # etcd down: readers time out and retry
                log.warning("sync round %d failed: %s", started, self.describe(exc))
                continue
            if target is not None:
                self.stats["sync_rounds"] += 1
                self.ctl.publish({layout.B_SYNC_DONE: started, layout.B_SYNC_REVISION: target})

    def close(self) -> None:
        self.sock.close()

    def round(self, timeout: float = 10.0) -> int | None:
        """etcd's current revision once the cache has reached it; None on timeout or stop."""
        target = self.current_revision()
        deadline = time.monotonic() + timeout
        published = self.published_revision
        with self.revision_moved:
            while published() < target and not self.stopped.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    log.warning("sync: cache stuck at revision %d below etcd's %d",
                                published(), target)
                    return None
                self.request_progress()
                self.revision_moved.wait(min(remaining, 0.5))
        return target if published() >= target else None
