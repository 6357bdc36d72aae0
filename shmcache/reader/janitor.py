"""Janitor: one thread per process that moves idle Readers off the segments the writer replaced.

The writer unlinks a snapshot, delta or index segment (or a ring) once it has
published its successor, but the pages stay in /dev/shm for as long as some
process maps them. A Reader moves to the new segments at its next call; one that
makes no calls would pin the old ones for good, and /dev/shm would fill with
superseded snapshots (docs/operations.md, "Size the ring and /dev/shm"). Every
``INTERVAL`` seconds this thread hands each open Reader of the process to
``release`` (``Upkeep._release_superseded``, mixed into Reader), which moves
it to the published segments when the writer replaced one of them.

Concurrency contract: ``start`` may be called from any thread; the thread runs
while the process has an open Reader and exits after the first round that finds
none (the next ``start`` makes a new one). Threads do not survive ``fork()``: the
Reader's fork hook calls ``after_fork`` in the child, which starts one there when
Readers were inherited. ``release`` runs in this thread and must count itself in
its Reader's uses (lifetime); an exception it raises is the Reader's own to
report at its next call, so it is logged here and the round goes on.

``pinned_bytes`` counts what processes still map after the writer unlinked it
(``Status.pinned_bytes``, ``shmcache status``).
"""

from __future__ import annotations

import logging
import os
import re
import struct
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from ..format import layout

if TYPE_CHECKING:
    from ..ipc.control_reader import ControlReader
    from .lifetime import Lifetime
    from .view import View

__all__ = ["INTERVAL", "Janitor", "Upkeep", "pinned_bytes"]

log = logging.getLogger("shmcache")

# Seconds between rounds: an idle Reader releases a superseded segment within
# about this long (docs/operations.md budgets /dev/shm with it).
INTERVAL = 1.0

T = TypeVar("T")
_Q = struct.Struct("<Q")


class Janitor(Generic[T]):
    """Calls ``release(x)`` for every ``x`` in ``members()`` each ``interval`` seconds."""

    def __init__(self, members: Callable[[], list[T]], release: Callable[[T], None],
                 interval: float = INTERVAL) -> None:
        self._members = members
        self._release = release
        self.interval = interval
        self._lock = threading.Lock()
        self._pid = 0  # the process whose thread is running (0: none)

    def start(self) -> None:
        """Make sure this process's thread runs (idempotent)."""
        with self._lock:
            if self._pid == os.getpid():
                return
            self._pid = os.getpid()
        threading.Thread(target=self._run, name="shmcache-janitor", daemon=True).start()

    def after_fork(self) -> None:
        """In a forked child, after its Readers were made usable: the parent's thread is
        not here; start one if Readers were inherited."""
        self._lock = threading.Lock()  # (another thread may have held it at fork time)
        self._pid = 0
        if self._members():
            self.start()

    def _run(self) -> None:
        pid = os.getpid()
        while True:
            time.sleep(self.interval)
            with self._lock:
                members = self._members()
                if not members or self._pid != pid:
                    if self._pid == pid:
                        self._pid = 0  # (under the lock: a start() now makes a new thread)
                    return
            for x in members:
                try:
                    self._release(x)
                except Exception as exc:  # noqa: BLE001 (the thread must outlive any Reader)
                    log.debug("shmcache janitor: %r: %s", x, exc)
            del members, x  # hold no Reader while asleep: a dropped one is unmapped at once


class Upkeep:
    """What the janitor thread does to one Reader (mixed into Reader)."""

    _life: Lifetime
    _lock: threading.RLock
    _cbuf: Any
    _seq: int
    _control: ControlReader
    _view: View

    def _catch_up(self) -> None: ...  # (Reader's)

    def _release_superseded(self) -> None:
        """The janitor's call (janitor; any thread): when the writer replaced a segment
        the view maps and no call holds the lock (a busy Reader moves itself), move the
        view to the published block. The old segments are dropped, not closed: one a
        call is still reading stays mapped until that call lets go. Counted in like a
        call; a stale writer is no reason to keep old segments (no staleness check)."""
        life = self._life
        if life.closed:
            return
        life.enter()
        try:
            if _Q.unpack_from(self._cbuf, layout.C_SEQ)[0] == self._seq:
                return
            b = self._control.block()
            if b is None or not self._view.superseded(b) or not self._lock.acquire(blocking=False):
                return
            try:
                self._catch_up()
            finally:
                self._lock.release()
        finally:
            life.exit()



def pinned_bytes(name: str) -> int:
    """Bytes of cache ``name``'s segments that the writer has unlinked and a process still
    maps, each segment counted once: from the /proc/PID/maps this process may read (another
    user's only as root). Costs a read of every process's maps (a few ms per 100)."""
    tag = f"{layout.SEGMENT_PREFIX}{name}.".encode()
    unlinked = re.compile(re.escape(tag) + rb"(?:ring|snap|idx|ovl)\.[0-9]+ \(deleted\)$")
    sizes: dict[bytes, int] = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/maps", "rb") as f:
                maps = f.read()
        except OSError:
            continue  # gone meanwhile, or not ours to read
        if tag not in maps:
            continue
        mine: dict[bytes, int] = {}  # (a segment may be mapped more than once)
        for line in maps.splitlines():
            m = unlinked.search(line)
            if m is not None:
                lo, _, hi = line.partition(b" ")[0].partition(b"-")
                mine[m[0]] = mine.get(m[0], 0) + int(hi, 16) - int(lo, 16)
        for seg, size in mine.items():
            sizes[seg] = max(sizes.get(seg, 0), size)
    return sum(sizes.values())
