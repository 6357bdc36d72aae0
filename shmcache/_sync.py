"""The consistent-read request channel: readers ask, the writer confirms through the control segment.

Readers cannot write any segment, so a sync request travels as one datagram
on an abstract Unix socket (``\\0shmcache.NAME.sync``; no file, gone with the
writer). The datagram carries nothing: it only says "someone is waiting". The
answer is published in the control block: the writer counts rounds started
and done, and a round that *started* after a reader's request covers it
(``Reader.sync``). Many requests that arrive while a round runs share the next
round, so concurrent ``sync()`` calls cost etcd one range read and two progress
requests per round, not per caller.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import layout
from .errors import TimeoutError

if TYPE_CHECKING:
    from .control import ControlReader, ControlWriter

log = logging.getLogger("shmcache.writer")

REQUEST = b"s"


SHM_DIR = "/dev/shm"


def address(name: str) -> bytes:
    return b"\0shmcache." + name.encode() + b".sync"


def path(name: str) -> str:
    """The socket file beside the segments: reachable from any network namespace that
    shares the directory (a container with the same /dev/shm volume), unlike the
    abstract address, which exists per network namespace."""
    return SHM_DIR + layout.sync_socket_name(name)


def bind_path(name: str, mode: int, gid: int | None = None) -> socket.socket:
    """The writer's second end: a datagram socket file with the segments' readers' access.

    Sending needs write permission on the file, so each read bit of ``mode`` becomes
    read+write (0644 -> 0666, 0640 -> 0660): whoever may read the cache may ask for
    a consistent read. A stale file (a writer that was killed) is replaced; only the
    lock holder gets here, so it is never a live writer's.
    """
    p = path(name)
    try:
        os.unlink(p)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(p)
        sock.setblocking(False)
        os.chmod(p, mode | ((mode & 0o044) >> 1))
        if gid is not None:
            os.chown(p, -1, gid)
    except BaseException:
        sock.close()
        raise
    return sock


def bind(name: str) -> socket.socket:
    """The writer's end; raises OSError(EADDRINUSE) if another process holds the name."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(address(name))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def drain(sock: socket.socket) -> int:
    """Read every queued request; returns how many there were."""
    n = 0
    while True:
        try:
            sock.recv(64)
        except (BlockingIOError, InterruptedError):
            return n
        n += 1


class Client:
    """A reader's end: fire-and-forget requests."""

    def __init__(self, name: str) -> None:
        self.name = name
        # The abstract address first (no file to check), then the socket file: the
        # only one that reaches a writer in another network namespace (container).
        self._addrs: list[bytes | str] = [address(name), path(name)]
        self._sock: socket.socket | None = None

    def request(self) -> bool:
        """Send one request; False if no writer is listening at either address."""
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._sock.setblocking(False)
        for addr in self._addrs:
            try:
                self._sock.sendto(REQUEST, addr)
            except (BlockingIOError, InterruptedError):
                return True  # the writer's queue is full: a round is coming anyway
            except OSError as exc:
                if exc.errno in (errno.ECONNREFUSED, errno.ENOENT, errno.EACCES):
                    continue
                raise
            if addr is not self._addrs[0]:
                self._addrs.reverse()  # this one works from here: try it first next time
            return True
        return False

    def confirm(self, ctl: ControlReader, reached: Callable[[], int], timeout: float) -> int:
        """One consistent read (Reader.sync): request a round, wait until a round that
        started after the request is done and ``reached()`` (the reader's revision
        after a refresh) is at its revision; returns that revision. The caller is
        counted in the uses of ``ctl``'s owner (a Reader): a close() meanwhile wakes
        the wait here, which then raises the closed error."""
        deadline = time.monotonic() + timeout
        b = ctl.block()
        while b is None:  # the writer is inside a publish (or stopped in one)
            ctl.check_open()
            if time.monotonic() >= deadline:
                raise TimeoutError(f"the writer of cache {self.name!r} is stuck inside a "
                                   f"publish; cannot confirm a consistent read")
            time.sleep(0.001)
            b = ctl.block()
        # A round that starts after our request covers it: the one after every
        # round already started (a running round may have read etcd's revision
        # before this call).
        need = b.sync_started + 1
        sent = time.monotonic()
        if not self.request():
            raise TimeoutError(f"cache {self.name!r} has no running writer to confirm a "
                               f"consistent read", hint="Check `shmcache status NAME`")
        while True:
            word = ctl.word()
            b = ctl.block()
            if b is not None and b.sync_done >= need:
                revision = reached()
                if revision >= b.sync_revision:
                    return revision
            now = time.monotonic()
            if now >= deadline:
                raise TimeoutError(f"the writer of cache {self.name!r} did not confirm a "
                                   f"consistent read within {timeout}s")
            if now - sent > 1.0:  # the writer may have restarted and lost the request
                sent = now
                self.request()
            ctl.wait(word, min(deadline - now, 0.25))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class Server:
    """The writer's end: one round at a time, on a thread of its own (``run``).

    A round publishes SYNC_STARTED (no wake), learns etcd's current revision R
    with a linearizable read issued after the requests arrived (so R covers
    every write that completed before those ``sync()`` calls), waits until
    the published revision reaches R (an idle range gets there through
    progress notifications, double-confirmed by the feed), then publishes
    SYNC_DONE and SYNC_REVISION = R with a wake.
    """

    def __init__(self, socks: list[socket.socket], ctl: ControlWriter,
                 current_revision: Callable[[], int], request_progress: Callable[[], None],
                 published_revision: Callable[[], int], revision_moved: threading.Condition,
                 stopped: threading.Event, stats: dict[str, Any],
                 describe: Callable[[BaseException], str] = str) -> None:
        self.socks = socks
        self.ctl = ctl
        self.current_revision = current_revision
        self.request_progress = request_progress
        self.published_revision = published_revision
        self.revision_moved = revision_moved
        self.stopped = stopped
        self.stats = stats
        self.describe = describe

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                ready, _, _ = select.select(self.socks, [], [], 0.25)
            except (OSError, ValueError):
                return
            if not ready or not sum(drain(sock) for sock in ready):
                continue
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
