"""Watch: an ordered stream of a Reader's events under a prefix, read straight from the ring."""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from . import _codec, _shm, control, ring
from ._indexdef import vals
from ._view import range_end
from .errors import CompactedError
from .types import Event

if TYPE_CHECKING:
    from .reader import Reader

__all__ = ["Watch"]


class Watch:
    """An ordered stream of events; see ``Reader.watch``.

    Iterate it (blocks until events arrive) or ``poll(timeout)``. Never skips,
    repeats or reorders an event: if the writer overwrote events this watch had
    not read yet, or reset its history, the next read raises CompactedError.
    A Watch belongs to one thread at a time; ``close()`` may be called from any.
    """

    def __init__(self, reader: Reader, prefix: bytes, since_revision: int | None,
                 index: tuple[str, bytes | str] | None = None) -> None:
        self._reader = reader
        # (position, value) of the index filter: events whose kv or prev_kv has the value.
        self._index = reader._index_filter(index)
        self._ctl: control.ControlReader = reader.control
        # Block, ring and position come together from one view of the Reader: a
        # refresh in between would make the watch skip events or read one ring
        # at a position meant for another.
        self.prefix, b, self._ring, self._pos, since = reader._watch_start(prefix, since_revision)
        self._end = range_end(self.prefix)
        self._epoch = b.epoch
        self._ring_gen = b.ring_gen
        self._cap = b.ring_capacity
        self._since = since
        self._last_record = 0  # revision of the last record read, for order checks
        self.revision = max(since, 0)
        self._pending: collections.deque[Event] = collections.deque()
        self._closed = False

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._closed = True

    @property
    def closed(self) -> bool:
        """True once ``close()`` was called (the Reader's close ends reads with an error)."""
        return self._closed

    def __iter__(self) -> Iterator[Event]:
        while not self._closed:
            if not self._pending:
                self._pending.extend(self.poll(timeout=0.5))
                continue
            yield self._pending.popleft()

    def _lapped(self, b: control.Block | None = None) -> CompactedError:
        b = b or self._ctl.block()
        compact = b.compact_revision if b is not None else self._since + 1
        return CompactedError(
            f"watch on cache {self._reader.name!r} fell behind: events after revision "
            f"{self._since} were overwritten before it read them",
            compact_revision=max(compact, self._since + 1),
            hint="Use a larger --ring-size, or list again and watch from the list's revision")

    def _collect(self, seg: _shm.Segment, cap: int, stop: int, tail: Callable[[], int],
                 max_revision: int | None, events: list[Event]) -> None:
        """Append the matching events of the records from ``self._pos`` to ``stop``; commit.

        The watch's position moves only if every record read was intact
        (ring.iter_records raises Lapped or CorruptSegmentError otherwise).
        """
        prefix, end, index = self.prefix, self._end, self._index
        since, last = self._since, self._last_record
        found: list[Event] = []
        for _pos, rev, _nxt, payload in ring.iter_records(
                seg.buf, cap, self._pos, stop, tail, after_revision=last,
                max_revision=max_revision, name=seg.name):
            last = rev
            if rev > since:
                if index is None:
                    for ev in _codec.decode(payload, rev, seg.name):
                        k = ev.kv.key
                        if k >= prefix and (end is None or k < end):
                            found.append(ev)
                else:
                    i, value = index
                    for ev, ix, pix in _codec.decode_indexed(payload, rev, seg.name):
                        k = ev.kv.key
                        if k >= prefix and (end is None or k < end) and (
                                value in vals(ix, i) or value in vals(pix, i)):
                            found.append(ev)
                since = rev
        events.extend(found)
        self._pos = max(self._pos, stop)
        self._last_record = last
        self._since = since

    def _follow_ring(self, b: control.Block, events: list[Event]) -> None:
        """The writer moved to a new ring in the same epoch (it grew, or a restart resized it).

        Read on to the end of the old ring (the writer sealed it, see
        ring.read_seal; this watch's mapping of it stays valid), then continue
        at the start of the new one, whose history begins at
        ``b.compact_revision``. No event is lost or repeated; a watch that cannot
        reach that revision (the old ring lapped it, or was not sealed) gets
        CompactedError.
        """
        name = self._reader.name
        if self._since < b.compact_revision:
            seal = ring.read_seal(self._ring.buf)
            if seal is None:
                raise CompactedError(
                    f"cache {name!r} replaced its ring log; events after revision "
                    f"{self._since} are not all available", compact_revision=b.compact_revision)
            s_tail, s_head, s_revision = seal
            try:
                self._collect(self._ring, self._cap, s_head, lambda: s_tail, s_revision, events)
            except ring.Lapped:
                raise self._lapped(b) from None
            self._since = max(self._since, s_revision)
            if self._since < b.compact_revision:  # a second new ring came meanwhile
                raise CompactedError(
                    f"cache {name!r} replaced its ring log twice while this watch read; "
                    f"events after revision {self._since} are not all available",
                    compact_revision=b.compact_revision)
        rb, seg = self._reader._current_ring()
        if rb.epoch != self._epoch or self._since < rb.compact_revision:
            raise CompactedError(
                f"cache {name!r} replaced its ring log again while this watch read; events "
                f"after revision {self._since} are not all available",
                compact_revision=rb.compact_revision)
        # A new ring's first record is at position 0; if it has lapped already, the
        # read that follows says so.
        self._ring, self._ring_gen, self._cap = seg, rb.ring_gen, rb.ring_capacity
        self._pos = 0
        self._last_record = self._since

    def _read_available(self) -> list[Event]:
        self._reader._check_read()
        ctl = self._ctl
        b = ctl.block()
        if b is None:
            return []
        if b.epoch != self._epoch:
            raise CompactedError(
                f"cache {self._reader.name!r} reset its history (epoch {self._epoch} -> "
                f"{b.epoch}); events after revision {self._since} are not all available",
                compact_revision=b.compact_revision)
        control.validate_block(b, ctl.name)
        events: list[Event] = []
        if b.ring_gen != self._ring_gen:
            self._follow_ring(b, events)
            b = ctl.block()
            if b is None or b.ring_gen != self._ring_gen:
                return events  # moved on again: the next read follows it
            control.validate_block(b, ctl.name)
        try:
            self._collect(self._ring, self._cap, b.ring_head, ctl.tail, b.revision, events)
        except ring.Lapped:
            if events:
                return events  # delivered first; the next read reports the lap
            raise self._lapped() from None
        self.revision = max(self.revision, b.revision)
        return events

    def poll(self, timeout: float | None = 0.0) -> list[Event]:
        """Events available now, waiting up to ``timeout`` seconds for the first; [] on timeout.

        Waiting sleeps on the writer's futex word: no CPU while idle, woken by the
        publish that brings new events.
        """
        if self._pending:
            out = list(self._pending)
            self._pending.clear()
            return out
        r = self._reader
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._closed:
            r._check_open()  # a closed Reader has unmapped the word waited on
            word = self._ctl.word()
            events = self._read_available()
            if events:
                return events
            remaining = 0.5 if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                return []
            self._ctl.wait(word, min(remaining, 0.5))
        return []
