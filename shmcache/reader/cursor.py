"""RingCursor: a position in a cache's ring log that reads whole records and follows ring switches.

One cursor is owned by one consumer at a time: a Watch catching up on its own,
or the per-process demultiplexer (shmcache/reader/demux.py) under its lock. It never
decodes: it hands out ``(revision, payload)`` pairs, so the demultiplexer can
decode each record once for every watch of the process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import CompactedError
from ..format import control, ring
from ..ipc import control_reader
from ..ipc import shm as _shm

if TYPE_CHECKING:
    from .owner import ReaderHandle

__all__ = ["SEALED", "Record", "RingCursor"]

# (revision, msgpack payload, position). position: where the record starts in the
# cursor's ring (``RingCursor.ring`` after the read that returned it), or SEALED for a
# record read through the seal of a ring the writer has left and never overwrites.
Record = tuple[int, bytes, int]
SEALED = -1


class RingCursor:
    """Where a reader of the ring stands: every record with a revision <= ``revision`` is
    behind it, and records at or below ``since`` are skipped, not returned.

    ``read()`` returns the records published since the last call and moves on,
    or raises CompactedError (the ring lapped the cursor, the writer reset its
    history, or replaced its ring in a way the cursor cannot follow) or
    CorruptSegmentError. Not thread-safe.
    """

    __slots__ = ("reader", "ctl", "epoch", "ring", "ring_gen", "cap", "pos", "since",
                 "last_record", "revision")

    def __init__(self, reader: ReaderHandle, b: control.Block, seg: _shm.Segment, pos: int,
                 since: int) -> None:
        self.reader = reader
        self.ctl: control_reader.ControlReader = reader.control
        self.epoch = b.epoch
        self.ring = seg
        self.ring_gen = b.ring_gen
        self.cap = b.ring_capacity
        self.pos = pos
        self.since = since  # revision of the last record taken (or the start)
        self.last_record = 0  # revision of the last record read, for order checks
        self.revision = max(since, 0)  # every record up to here has been read

    def copy(self) -> RingCursor:
        c = RingCursor.__new__(RingCursor)
        c.reader, c.ctl, c.epoch, c.ring, c.ring_gen = (
            self.reader, self.ctl, self.epoch, self.ring, self.ring_gen)
        c.cap, c.pos, c.since, c.last_record, c.revision = (
            self.cap, self.pos, self.since, self.last_record, self.revision)
        return c

    def lapped(self, b: control.Block | None = None) -> CompactedError:
        b = b or self.ctl.block()
        compact = b.compact_revision if b is not None else self.since + 1
        return CompactedError(
            f"watch on cache {self.reader.name!r} fell behind: events after revision "
            f"{self.since} were overwritten before it read them",
            compact_revision=max(compact, self.since + 1),
            hint="Use a larger --ring-size, or list again and watch from the list's revision")

    def _collect(self, seg: _shm.Segment, cap: int, stop: int, tail: Callable[[], int],
                 max_revision: int | None, out: list[Record], sealed: bool = False) -> None:
        """Append the records from ``self.pos`` to ``stop`` above ``since``; then move on.

        The position moves only if every record read was intact
        (ring.iter_records raises Lapped or CorruptSegmentError otherwise).
        ``sealed``: the ring is one the writer has left (its records get SEALED).
        """
        since, last = self.since, self.last_record
        found: list[Record] = []
        for pos, rev, _nxt, payload in ring.iter_records(
                seg.buf, cap, self.pos, stop, tail, after_revision=last,
                max_revision=max_revision, name=seg.name):
            last = rev
            if rev > since:
                found.append((rev, payload, SEALED if sealed else pos))
                since = rev
        out.extend(found)
        self.pos = max(self.pos, stop)
        self.last_record = last
        self.since = since

    def _follow_ring(self, b: control.Block, out: list[Record]) -> None:
        """The writer moved to a new ring in the same epoch (it grew, or a restart resized it).

        Read on to the end of the old ring (the writer sealed it, see
        ring.read_seal; this cursor's mapping of it stays valid), then continue
        at the start of the new one, whose history begins at
        ``b.compact_revision``. No record is lost or repeated; a cursor that
        cannot reach that revision (the old ring lapped it, or was not sealed)
        gets CompactedError.
        """
        name = self.reader.name
        if self.since < b.compact_revision:
            seal = ring.read_seal(self.ring.buf)
            if seal is None:
                raise CompactedError(
                    f"cache {name!r} replaced its ring log; events after revision "
                    f"{self.since} are not all available", compact_revision=b.compact_revision)
            s_tail, s_head, s_revision = seal
            try:
                self._collect(self.ring, self.cap, s_head, lambda: s_tail, s_revision, out,
                              sealed=True)
            except ring.Lapped:
                raise self.lapped(b) from None
            self.since = max(self.since, s_revision)
            if self.since < b.compact_revision:  # a second new ring came meanwhile
                raise CompactedError(
                    f"cache {name!r} replaced its ring log twice while this watch read; "
                    f"events after revision {self.since} are not all available",
                    compact_revision=b.compact_revision)
        rb, seg = self.reader._current_ring()
        if rb.epoch != self.epoch or self.since < rb.compact_revision:
            raise CompactedError(
                f"cache {name!r} replaced its ring log again while this watch read; events "
                f"after revision {self.since} are not all available",
                compact_revision=rb.compact_revision)
        # A new ring's first record is at position 0; if it has lapped already, the
        # read that follows says so.
        self.ring, self.ring_gen, self.cap = seg, rb.ring_gen, rb.ring_capacity
        self.pos = 0
        self.last_record = self.since

    def read(self) -> list[Record]:
        """The records published since the last read (``[]`` if none)."""
        ctl = self.ctl
        b = ctl.block()
        if b is None:
            return []
        if b.epoch != self.epoch:
            raise CompactedError(
                f"cache {self.reader.name!r} reset its history (epoch {self.epoch} -> "
                f"{b.epoch}); events after revision {self.since} are not all available",
                compact_revision=b.compact_revision)
        control.validate_block(b, ctl.name)
        out: list[Record] = []
        if b.ring_gen != self.ring_gen:
            self._follow_ring(b, out)
            b = ctl.block()
            if b is None or b.ring_gen != self.ring_gen:
                return out  # moved on again: the next read follows it
            control.validate_block(b, ctl.name)
        try:
            self._collect(self.ring, self.cap, b.ring_head, ctl.tail, b.revision, out)
        except ring.Lapped:
            if out:
                return out  # delivered first; the next read reports the lap
            raise self.lapped() from None
        self.revision = max(self.revision, b.revision)
        return out
