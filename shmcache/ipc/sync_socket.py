"""The consistent-read request channel: readers ask, the writer confirms through the control segment.

Readers cannot write any segment, so a sync request travels as one datagram
on a Unix socket file beside the segments (``/dev/shm/shmcache.NAME.sync``),
whose mode and group are the segments' with each read bit made read+write:
the kernel lets only a process that may read the cache send to it. The
datagram carries nothing: it only says "someone is waiting". The answer is
published in the control block: the writer counts rounds started and done,
and a round that *started* after a reader's request covers it
(``Reader.sync``). Many requests that arrive while a round runs share the
next round, and rounds start at most ``ROUNDS_PER_SECOND`` times a second, so
any number of ``sync()`` calls (or a reader flooding the socket) cost etcd at
most that many range reads a second.
"""

from __future__ import annotations

from ..format import layout

REQUEST = b"s"

SHM_DIR = "/dev/shm"


def path(name: str) -> str:
    """The socket file beside the segments: reachable from any network namespace that
    shares the directory (a container with the same /dev/shm volume)."""
    return SHM_DIR + layout.sync_socket_name(name)
