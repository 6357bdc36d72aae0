"""A reader's end of the consistent-read channel (ipc/sync_socket.py describes it): one
datagram asks for a round; the answer is read from the control block."""

from __future__ import annotations

import errno
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import TimeoutError
from ..ipc.sync_socket import REQUEST, path

if TYPE_CHECKING:
    from ..ipc.control_reader import ControlReader


class Client:
    """A reader's end: fire-and-forget requests."""

    def __init__(self, name: str) -> None:
        self.name = name
        # The socket file only: its mode admits exactly the cache's readers, while
        # anyone may bind an abstract address and swallow the requests sent there.
        self._addr = path(name)
        self._sock: socket.socket | None = None

    def request(self) -> bool:
        """Send one request; False if no writer is listening at the socket file."""
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._sock.setblocking(False)
        try:
            self._sock.sendto(REQUEST, self._addr)
        except (BlockingIOError, InterruptedError):
            return True  # the writer's queue is full: a round is coming anyway
        except OSError as exc:
            if exc.errno in (errno.ECONNREFUSED, errno.ENOENT, errno.EACCES):
                return False
            raise
        return True

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
