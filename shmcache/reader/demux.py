"""The per-process watch demultiplexer: each ring record decoded once, each watch handed its events.

Without it every Watch walks and decodes every record itself, so a process with
N watches pays N times per event (and N threads wake on every publish). A
Reader has one Demux per process. Watches join it once they have caught up on
their own (shmcache/reader/watch.py); from then on one RingCursor reads each new
record, decodes it once, and appends each event to the queues of the watches
it matches, found through an index of watches by prefix (one dict lookup per
distinct prefix length), by (prefix, shard) (one crc32 of the key, then one
lookup per distinct (prefix length, shard count): a process's sharded watch
costs what an unsharded one on its share of the keys does) and by (secondary
index, value). Only the watches that got events are woken.

Who advances it: a daemon thread per (Reader, process), asleep on the writer's
futex word while watches are joined (it exits about 0.5 s after the last one
leaves), and any ``Watch.poll`` that finds the word moved, so that a poll right
after ``Reader.wait(rev)`` sees the events up to ``rev`` without waiting for
the thread.

Semantics are those of a Watch reading the ring itself: events in order, none
skipped or repeated, and CompactedError when the ring overwrites a record the
watch has not read. A joined watch has "read" a record once it has taken every
event queued from it; until then it is cut off, alone, as soon as the writer's
tail passes the record's position (a record of a ring the writer has since
sealed counts as position 0 of the new one, where a watch reading on its own
would go on). So what a watch may hold unread is bounded by the ring it would
read, whatever the ring's size or the number of events in a revision. A lap of
the demultiplexer itself, or a history reset, ends every joined watch with
CompactedError after the events queued before it.

Each joined watch reads an Inbox the demultiplexer made for it and alone
writes: its queue of events, its error, where it resumes. The Watch holds its
inbox, the demultiplexer only a weak reference to it, so a watch dropped
without close() is forgotten.

Concurrency contract: every field of the Demux and of its inboxes is guarded
by ``Demux.lock``, except ``Inbox.close`` (one store, by ``leave_soon``); wake-ups
go through each inbox's Bell (ipc/futex.py) and, for
asyncio, one ``call_soon_threadsafe`` per event loop per batch. ``leave_soon``
never waits for the lock (``Watch.close`` may run in a signal handler that
interrupted its holder): a closed watch it could not remove is skipped and
dropped by the next sweep. The thread counts itself in its Reader's uses
(lifetime) while it runs, and ends when the Reader closes.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
import zlib
from typing import TYPE_CHECKING, Any

from ..errors import ShmCacheError
from ..format import codec as _codec
from ..format import ring
from ..format.indexspec import vals
from ..ipc import shm as _shm
from ..ipc.futex import Bell
from ..types import Event
from .cursor import SEALED, Record, RingCursor
from .history import in_shard
from .perprocess import PerReader

if TYPE_CHECKING:
    import asyncio

    from .owner import ReaderHandle

__all__ = ["Demux", "Inbox", "demux_of"]

# FUTEX_WAIT slice of the thread: bounds how long a missed wake or a closed
# Reader goes unnoticed.
_SLICE = 0.5
# The thread exits after this long without joined watches.
_IDLE_EXIT = 0.5
_crc32 = zlib.crc32
# (prefix length[, shard count]) -> (prefix[, shard]) -> watches.
_Tables = dict[Any, dict[Any, list["weakref.ref[Inbox]"]]]



class Inbox:
    """A joined watch's side of the demultiplexer: what it matches, the events queued for
    it, the error that ends it, where it would resume alone (in a forked child).

    Made by ``Demux.join``, changed through its methods by the Demux under its lock,
    read by the Watch through ``Demux.take`` (and, in a forked child, directly: no
    other thread there).
    """

    __slots__ = ("prefix", "index", "shard", "events", "error", "after", "saved", "futures",
                 "ready", "closed", "__weakref__")

    def __init__(self, prefix: bytes, index: tuple[int, bytes] | None, cursor: RingCursor,
                 shard: tuple[int, int] | None = None) -> None:
        self.prefix = prefix
        self.index = index
        self.shard = shard  # (i, n): only keys with crc32(key) % n == i
        self.events: list[Event] = []
        self.error: BaseException | None = None
        self.after = cursor.revision  # events at or below it were read before joining
        self.saved: RingCursor = cursor  # the position after the last take
        self.futures: list[asyncio.Future[None]] = []
        self.ready = Bell()  # rung when events or an error arrive, and by leave_soon
        self.closed = False

    def close(self) -> None:
        """No more events for it (one store: safe without the lock)."""
        self.closed = True

    def drain(self, cursor: RingCursor | None) -> list[Event]:
        """Hand out the queued events and note ``cursor`` as where it would resume alone."""
        out, self.events = self.events, []
        if cursor is not None and self.error is None:
            self.saved = cursor.copy()
        return out

    def end(self, error: BaseException, *, drop_queued: bool = False) -> None:
        """End the watch with ``error``, raised once the queue is read (``drop_queued``:
        at once, its queued events being lost with a lapped record)."""
        if drop_queued:
            self.events = []
        self.error = error

    def take_futures(self) -> list[asyncio.Future[None]]:
        futs, self.futures = self.futures, []
        return futs


def _resolve_all(futs: list[asyncio.Future[None]]) -> None:
    for fut in futs:
        if not fut.done():
            fut.set_result(None)


class Demux:
    """Reads each record once for every joined Watch of one Reader in one process."""

    def __init__(self, reader: ReaderHandle) -> None:
        self.pid = os.getpid()
        self.lock = threading.Lock()
        self._reader = reader
        self._ctl = reader.control
        self._name = reader.name
        self.cursor: RingCursor | None = None
        self._seen = -1  # futex word before the last advance
        # prefix length -> prefix -> watches; (index position, value) -> watches. Weak
        # references: a watch dropped without close() (a loop left with break) is
        # forgotten, not fed forever; the thread sweeps the dead ones out.
        self._by_len: _Tables = {}
        # (prefix length, shard count n) -> (prefix, shard i) -> sharded watches.
        self._by_shard: _Tables = {}
        self._by_ix: dict[tuple[int, bytes], list[weakref.ref[Inbox]]] = {}
        self._count = 0
        # id(watch) -> (its reference, ring position of the oldest record it has unread
        # events of) for every watch with a non-empty queue, in order of position: a
        # watch enters when its queue fills from empty, which happens in ring order.
        self._unread: dict[int, tuple[weakref.ref[Inbox], int]] = {}
        self._thread: threading.Thread | None = None
        # Counters, for tests and the curious: records decoded, events handed out.
        self.records = 0
        self.delivered = 0
        self.loop_calls = 0

    # -- joining and leaving (a Watch, under no lock of its own) --------------------

    def join(self, prefix: bytes, index: tuple[int, bytes] | None,
             cursor: RingCursor, shard: tuple[int, int] | None = None) -> Inbox | None:
        """Register a watch of ``prefix`` (and ``index``) whose own ``cursor`` has read
        everything up to its revision.

        Its inbox if it joined: from now on it receives every matching event above
        ``cursor.revision``. None if the demultiplexer has already passed
        events the watch has not read: it reads on by itself and tries again.
        """
        with self.lock:
            if self.cursor is None:
                self.cursor = cursor.copy()
                self._seen = -1
            else:
                self._advance()
                c = self.cursor
                if c is None or c.epoch != cursor.epoch or c.revision > cursor.revision:
                    return None  # (None: the advance failed every watch; retry afresh)
            w = Inbox(prefix, index, cursor, shard)
            refs = self._refs(w, create=True)
            assert refs is not None
            refs.append(weakref.ref(w))
            self._count += 1
            if self._thread is None:
                t = threading.Thread(target=self._run, daemon=True,
                                     name=f"shmcache-watch-{self._name}")
                self._thread = t
                t.start()
            return w

    def leave(self, w: Inbox) -> None:
        with self.lock:
            self._remove(w)

    def leave_soon(self, w: Inbox) -> None:
        """Close ``w`` (a poll waiting on it returns) and ``leave`` if the lock is free now;
        otherwise the next sweep drops it. Takes no lock it would wait for: a Watch's
        close() may run in a signal handler that interrupted the lock's holder."""
        w.close()
        if self.lock.acquire(blocking=False):
            try:
                self._remove(w)
            finally:
                self.lock.release()
        w.ready.ring()

    def _refs(self, w: Inbox, create: bool) -> list[weakref.ref[Inbox]] | None:
        """The list of ``w``'s table that holds (or will hold) its reference."""
        if w.index is not None:
            return self._by_ix.setdefault(w.index, []) if create else self._by_ix.get(w.index)
        outer: _Tables
        okey: Any
        ikey: Any
        if w.shard is None:
            outer, okey, ikey = self._by_len, len(w.prefix), w.prefix
        else:
            outer, okey, ikey = self._by_shard, (len(w.prefix), w.shard[1]), (w.prefix, w.shard[0])
        if create:
            return outer.setdefault(okey, {}).setdefault(ikey, [])
        table = outer.get(okey)
        return table.get(ikey) if table is not None else None

    def _remove(self, w: Inbox) -> None:
        self._unread.pop(id(w), None)
        refs = self._refs(w, create=False)
        for ref in refs or ():
            if ref() is w:
                refs.remove(ref)  # type: ignore[union-attr]
                self._count -= 1
                break
        self._prune()

    def _prune(self) -> None:
        """Drop dead references, closed watches and empty entries."""
        for outer in (self._by_len, self._by_shard):
            for length, table in list(outer.items()):
                for prefix, refs in list(table.items()):
                    live = [r for r in refs if _open(r)]
                    self._count -= len(refs) - len(live)
                    if live:
                        table[prefix] = live
                    else:
                        del table[prefix]
                if not table:
                    del outer[length]
        for key, refs in list(self._by_ix.items()):
            live = [r for r in refs if _open(r)]
            self._count -= len(refs) - len(live)
            if live:
                self._by_ix[key] = live
            else:
                del self._by_ix[key]
        for i, (ref, _pos) in list(self._unread.items()):
            if ref() is None:
                del self._unread[i]

    def _watches(self) -> list[Inbox]:
        refs = [r for t in self._by_len.values() for rs in t.values() for r in rs]
        refs += [r for t in self._by_shard.values() for rs in t.values() for r in rs]
        refs += [r for rs in self._by_ix.values() for r in rs]
        return [w for w in (r() for r in refs) if w is not None]

    def joined_count(self) -> int:
        """Watches joined now (those dropped without close() count until swept)."""
        with self.lock:
            return self._count

    def async_waiter_count(self) -> int:
        """asyncio futures waiting for a joined watch's events."""
        with self.lock:
            return sum(len(w.futures) for w in self._watches())

    def thread(self) -> threading.Thread | None:
        with self.lock:
            return self._thread

    # -- a joined Watch's reads ---------------------------------------------------------

    def take(self, w: Inbox) -> tuple[list[Event], int]:
        """The events queued for ``w`` (advancing first if the writer published), [] if
        none, and the revision the watch has now read up to (0: unknown).

        Raises the watch's error (CompactedError...) once its queue is empty.
        """
        with self.lock:
            if self._ctl.word() != self._seen:
                self._advance()
            if w.events:
                self._unread.pop(id(w), None)
            elif w.error is not None:
                raise w.error
            w.ready.clear()
            c = self.cursor
            # (where it resumes in a forked child: Watch._rejoin)
            out = w.drain(c)
            return out, c.revision if c is not None and w.error is None else 0

    def add_async(self, w: Inbox, fut: asyncio.Future[None]) -> bool:
        """Resolve ``fut`` when ``w`` has events or an error; False if it has some already,
        or if the Reader is closed (the thread may have woken its waiters already: the
        caller's next read raises instead of waiting for a wake that will not come)."""
        with self.lock:
            if w.events or w.error is not None or self._reader._life.closed:
                return False
            w.futures.append(fut)
            return True

    def discard_async(self, w: Inbox, fut: asyncio.Future[None]) -> None:
        with self.lock:
            if fut in w.futures:
                w.futures.remove(fut)

    # -- reading and handing out --------------------------------------------------------

    def _advance(self) -> None:
        """Read what the writer published and queue each event for its watches (under lock)."""
        c = self.cursor
        if c is None:
            return
        self._seen = self._ctl.word()
        old = c.ring
        try:
            records = c.read()
            if c.ring is not old:
                self._left_ring(old)
            if records:
                self._dispatch(records, c.ring.name)
            if self._unread:
                self._cut_overwritten(c)
        except ShmCacheError as exc:
            # A lap of our own cursor, a history reset, damage: every joined watch
            # gets the error once it has read what was queued before it.
            watches = self._watches()
            for w in watches:
                w.end(exc)
            self._by_len.clear()
            self._by_shard.clear()
            self._by_ix.clear()
            self._unread.clear()
            self._count = 0
            self.cursor = None
            self._notify(watches)

    def _left_ring(self, old: _shm.Segment) -> None:
        """The cursor followed the writer from ring ``old`` (sealed) to a new one.

        Watches whose unread records were overwritten before the seal are cut
        off; the others' records can no longer be overwritten, and they go on
        as a watch reading on its own would: at position 0 of the new ring.
        """
        seal = ring.read_seal(old.buf)
        if seal is not None:
            self._cut_below(seal[0])
        self._unread = {i: (ref, 0) for i, (ref, _pos) in self._unread.items()}

    def _cut_overwritten(self, c: RingCursor) -> None:
        """Cut off the watches whose oldest unread record the writer's tail has passed."""
        first = next(iter(self._unread.values()))[1]
        if first >= self._ctl.tail():
            return  # the usual case: one load
        b = self._ctl.block()
        if b is not None and b.epoch == c.epoch and b.ring_gen == c.ring_gen:
            self._cut_below(b.ring_tail)
        # (else the writer moved on: the next advance follows it, and judges by the seal)

    def _cut_below(self, tail: int) -> None:
        """Cut off the watches with unread records below ring position ``tail``."""
        behind = []
        for i, (_ref, pos) in self._unread.items():
            if pos >= tail:
                break  # in position order: the rest are intact
            behind.append(i)
        cut = []
        for i in behind:
            w = self._unread.pop(i)[0]()
            if w is not None:
                # Its record was overwritten before it read it: as if the ring had
                # lapped it. The others go on.
                w.end(w.saved.lapped(), drop_queued=True)
                self._remove(w)
                cut.append(w)
        self._notify(cut)

    def _dispatch(self, records: list[Record], where: str) -> None:
        by_len = list(self._by_len.items())
        by_shard = list(self._by_shard.items())
        by_ix = self._by_ix
        touched: dict[int, Inbox] = {}
        n = 0
        for rev, payload, pos in records:
            # (decode_indexed: decode() would strip the same tuples of their index values)
            decoded = _codec.decode_indexed(payload, rev, where)
            self.records += 1
            if pos == SEALED:
                pos = 0  # see _left_ring
            for ev, ix, pix in decoded:
                key = ev.kv.key
                for length, table in by_len:
                    refs = table.get(key[:length])
                    if refs is not None:
                        for ref in refs:
                            w = ref()
                            if w is not None and rev > w.after and not w.closed:
                                self._queue(w, ref, ev, pos, touched)
                                n += 1
                if by_shard:
                    h = _crc32(key)
                    for (length, count), stable in by_shard:
                        refs = stable.get((key[:length], h % count))
                        if refs is not None:
                            for ref in refs:
                                w = ref()
                                if w is not None and rev > w.after and not w.closed:
                                    self._queue(w, ref, ev, pos, touched)
                                    n += 1
                if by_ix:
                    n += self._dispatch_indexed(ev, key, rev, pos, ix, pix, touched)
        self.delivered += n
        self._notify(list(touched.values()))

    def _dispatch_indexed(self, ev: Event, key: bytes, rev: int, pos: int, ix: Any, pix: Any,
                          touched: dict[int, Inbox]) -> int:
        n = 0
        seen: set[int] = set()
        for (i, value), refs in self._by_ix.items():
            if value in vals(ix, i) or value in vals(pix, i):
                for ref in refs:
                    w = ref()
                    if w is not None and rev > w.after and key.startswith(w.prefix) \
                            and id(w) not in seen and not w.closed and (
                                w.shard is None or in_shard(key, w.shard)):
                        seen.add(id(w))
                        self._queue(w, ref, ev, pos, touched)
                        n += 1
        return n

    def _queue(self, w: Inbox, ref: weakref.ref[Inbox], ev: Event, pos: int,
               touched: dict[int, Inbox]) -> None:
        """Append ``ev``, of the record at ring position ``pos``, to ``w``'s queue."""
        if not w.events:
            # Its oldest unread record from now on. pop first: the id of a watch that
            # died with events queued may be reused, and the entry must move to the end.
            self._unread.pop(id(w), None)
            self._unread[id(w)] = (ref, pos)
        w.events.append(ev)
        touched[id(w)] = w

    def _notify(self, watches: list[Inbox]) -> None:
        by_loop: dict[Any, list[asyncio.Future[None]]] = {}
        for w in watches:
            w.ready.ring()
            if w.futures:
                for fut in w.take_futures():
                    by_loop.setdefault(fut.get_loop(), []).append(fut)
        for loop, futs in by_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve_all, futs)
                self.loop_calls += 1
            except RuntimeError:
                pass  # that loop is closed: nobody waits there any more

    # -- the thread ------------------------------------------------------------------------

    def _run(self) -> None:
        ctl, life = self._ctl, self._reader._life
        try:
            life.enter()  # the mappings stay while this thread reads and sleeps
        except ShmCacheError:
            self._stopped()  # closed before it started
            return
        try:
            idle_since: float | None = None
            pruned = time.monotonic()
            while True:
                with self.lock:
                    if life.closed:
                        return  # woken by close(): every joined watch's next read raises
                    now = time.monotonic()
                    if now - pruned >= _SLICE:
                        pruned = now
                        self._prune()  # watches dropped without close(), or closed
                    if not self._count:
                        idle_since = idle_since or now
                        if now - idle_since >= _IDLE_EXIT:
                            self._thread = None  # under the lock: a join starts another
                            return
                    else:
                        idle_since = None
                    word = ctl.word()
                    if word != self._seen:
                        self._advance()
                    word = self._seen
                ctl.wait(word, _SLICE)
        except ShmCacheError:
            if not life.closed:
                raise
        finally:
            self._stopped()
            life.exit()  # the last use out after close() unmaps

    def _stopped(self) -> None:
        """The thread ends (closed Reader, or an unexpected error): the joined watches
        still advance when they poll (take); wake them so that they do, or raise."""
        with self.lock:
            if self._thread is threading.current_thread():
                self._thread = None
                self._notify(self._watches())


_DEMUXES: PerReader[Demux] = PerReader(Demux)


def _open(ref: weakref.ref[Inbox]) -> bool:
    w = ref()
    return w is not None and not w.closed


def demux_of(reader: ReaderHandle) -> Demux:
    """The demultiplexer of ``reader``'s watches in this process (made on first use)."""
    return _DEMUXES.get(reader)
