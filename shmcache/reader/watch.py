"""Watch: an ordered stream of a Reader's events under a prefix, read from the ring."""

from __future__ import annotations

import collections
import os
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from ..format import codec as _codec
from ..format.indexspec import vals
from ..types import Event
from . import demux as _demux
from .cursor import Record, RingCursor
from .history import in_shard
from .view import range_end

if TYPE_CHECKING:

    from .owner import ReaderHandle

__all__ = ["Watch"]


class Watch:
    """An ordered stream of events; see ``Reader.watch``.

    Iterate it (blocks until events arrive) or ``poll(timeout)``. Never skips,
    repeats or reorders an event: if the writer overwrote events this watch had
    not read yet, or reset its history, the next read raises CompactedError.
    A Watch belongs to one thread at a time; ``close()`` may be called from any
    thread or a signal handler (it takes no lock): a ``poll`` waiting in another
    thread returns at once. Closing its Reader makes every read raise
    ShmCacheError("Reader for NAME is closed").

    How it reads: first on its own, from its start revision up to what the
    writer has published (catching up); then it joins its Reader's
    demultiplexer (shmcache/reader/demux.py), which decodes each new record once for
    every watch of the process and queues this watch's events for it. A joined
    watch gets CompactedError once the ring overwrites a record holding one of
    its queued, unread events, as a watch reading on its own would.
    """

    def __init__(self, reader: ReaderHandle, prefix: bytes, since_revision: int | None,
                 index: tuple[str, bytes | str] | None = None,
                 shard: tuple[int, int] | None = None) -> None:
        self._reader = reader
        # (i, n): only the keys with crc32(key) % n == i (validated by Reader.watch).
        self.shard = shard
        # (position, value) of the index filter: events whose kv or prev_kv has the value.
        self._index = reader._index_filter(index)
        # Block, ring and position come together from one view of the Reader: a
        # refresh in between would make the watch skip events or read one ring
        # at a position meant for another.
        self.prefix, b, seg, pos, since = reader._watch_start(prefix, since_revision)
        self._end = range_end(self.prefix)
        # Reading on its own: this cursor. Joined: None, and the fields below.
        self._cursor: RingCursor | None = RingCursor(reader, b, seg, pos, since)
        self._demux: _demux.Demux | None = None
        self._inbox: _demux.Inbox | None = None  # the demultiplexer's, read through take()
        self._error: BaseException | None = None  # the inbox's, kept by a forked child
        self.revision = max(since, 0)
        self._pending: collections.deque[Event] = collections.deque()
        self._closed = False

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop. Idempotent; any thread, or a signal handler: takes no lock (the
        demultiplexer drops a closed watch itself when its lock is busy)."""
        self._closed = True
        d, inbox = self._demux, self._inbox
        if d is not None and inbox is not None and d.pid == os.getpid():
            d.leave_soon(inbox)  # (rings its Bell: a poll waiting in another thread returns)

    @property
    def closed(self) -> bool:
        """True once ``close()`` was called (the Reader's close ends reads with an error)."""
        return self._closed

    @property
    def joined(self) -> bool:
        """True once this watch is fed by its Reader's demultiplexer (it has caught up)."""
        return self._demux is not None

    def __iter__(self) -> Iterator[Event]:
        while not self._closed:
            if not self._pending:
                self._pending.extend(self.poll(timeout=0.5))
                continue
            yield self._pending.popleft()

    def _matching(self, records: list[Record], where: str) -> list[Event]:
        """This watch's events in ``records`` (reading on its own)."""
        prefix, end, index, shard = self.prefix, self._end, self._index, self.shard
        found: list[Event] = []
        for rev, payload, _pos in records:
            if index is None:
                for ev in _codec.decode(payload, rev, where):
                    k = ev.kv.key
                    if k >= prefix and (end is None or k < end) and (
                            shard is None or in_shard(k, shard)):
                        found.append(ev)
            else:
                i, value = index
                for ev, ix, pix in _codec.decode_indexed(payload, rev, where):
                    k = ev.kv.key
                    if k >= prefix and (end is None or k < end) and (
                            value in vals(ix, i) or value in vals(pix, i)) and (
                            shard is None or in_shard(k, shard)):
                        found.append(ev)
        return found

    def _rejoin(self) -> None:
        """In a child forked after this watch joined: read on alone from the last take.

        The queued events were not handed out yet; they are read again from the
        ring, so none is lost or repeated.
        """
        inbox = self._inbox
        assert inbox is not None
        self._demux = self._inbox = None
        if inbox.error is not None:
            self._error = inbox.error
            return
        c = inbox.saved.copy()
        c.since = max(c.since, inbox.after)
        c.revision = max(c.revision, c.since)
        self._cursor = c

    def _read(self) -> list[Event]:
        self._reader._check_read()
        d, inbox = self._demux, self._inbox
        if d is not None and inbox is not None:
            if d.pid == os.getpid():
                events, revision = d.take(inbox)
                self.revision = max(self.revision, revision)
                return events
            self._rejoin()
        if self._error is not None:
            raise self._error
        c = self._cursor
        assert c is not None
        records = c.read()
        events = self._matching(records, c.ring.name) if records else []
        self.revision = max(self.revision, c.revision)
        if not self._closed:
            d = _demux.demux_of(self._reader)
            inbox = d.join(self.prefix, self._index, c, self.shard)
            if inbox is not None:
                self._cursor = None
                self._demux, self._inbox = d, inbox
                if self._closed:  # close() ran meanwhile, before there was an inbox to close
                    d.leave_soon(inbox)
        return events

    def poll(self, timeout: float | None = 0.0) -> list[Event]:
        """Events available now, waiting up to ``timeout`` seconds for the first; [] on timeout.

        Waiting costs no CPU: on its own, the watch sleeps on the writer's futex
        word; joined, on an event the demultiplexer sets when it queues events
        for this watch.
        """
        if self._pending:
            out = list(self._pending)
            self._pending.clear()
            return out
        r = self._reader
        ctl = r.control
        deadline = None if timeout is None else time.monotonic() + timeout
        life = r._life
        life.enter()  # the ring and the word stay mapped until this poll returns
        try:
            while not self._closed:
                word = ctl.word()
                events = self._read()
                if events:
                    return events
                remaining = 0.5 if deadline is None else deadline - time.monotonic()
                if remaining <= 0:
                    return []
                inbox = self._inbox
                if inbox is not None:
                    inbox.ready.wait(min(remaining, 0.5))
                else:
                    ctl.wait(word, min(remaining, 0.5))
            return []
        finally:
            life.exit()
