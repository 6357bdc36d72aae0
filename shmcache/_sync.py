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
import socket

REQUEST = b"s"


def address(name: str) -> bytes:
    return b"\0shmcache." + name.encode() + b".sync"


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
        self._addr = address(name)
        self._sock: socket.socket | None = None

    def request(self) -> bool:
        """Send one request; False if no writer is listening."""
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._sock.setblocking(False)
        try:
            self._sock.sendto(REQUEST, self._addr)
        except (BlockingIOError, InterruptedError):
            return True  # the writer's queue is full: a round is coming anyway
        except OSError as exc:
            if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
                return False
            raise
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
