"""Reads at a past revision, and where in the ring a revision's events start.

Every ring record carries each event's prev_kv, and the ring holds every event
after ``COMPACT_REVISION`` (oldest_watchable_revision). So the value of a key
at revision R is the prev_kv of its first event after R if it has one (None:
it did not exist), else its current value. Nothing is copied but the keys that
changed after R (docs/design.md, "Reads at a past revision").

An ``Undo`` holds what changed after one revision, read once and extended as
the Reader reads on, so the pages of one listing at one revision each cost
O(page), and ``past_page`` reads a page of a range at that revision. The rest
are pure functions over what the caller passes (a ControlReader, a ring mapping,
a control block, positions); the Reader calls everything here under its lock.
"""

from __future__ import annotations

import bisect
import heapq
import operator
import zlib
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from sortedcontainers import SortedList

from ..errors import CompactedError, FutureRevisionError
from ..format import codec as _codec
from ..format import layout, ring
from ..format.indexspec import IxVals, vals
from ..types import KeyValue, kv_new

if TYPE_CHECKING:
    from ..format.control import Block
    from ..ipc import shm as _shm
    from ..ipc.control_reader import ControlReader

# The key of a KeyValue or of a (key, value) pair, at C speed (sort and merge keys).
key_of: Any = operator.itemgetter(0)
_crc32 = zlib.crc32


def in_shard(key: bytes, shard: tuple[int, int]) -> bool:
    """Whether ``key`` belongs to shard ``(i, n)``: ``zlib.crc32(key) % n == i``, part of the
    format (docs/format.md, "Shards"): every host and language computes the same."""
    return _crc32(key) % shard[1] == shard[0]


def of_shard(keys: Iterable[bytes], shard: tuple[int, int] | None) -> Iterator[bytes]:
    """The keys of ``keys`` in ``shard`` (None: all of them), lazily."""
    if shard is None:
        return iter(keys)
    i, n = shard
    return (k for k in keys if _crc32(k) % n == i)


def strip(kv: KeyValue) -> KeyValue:
    """``kv`` with an empty value (a keys-only read)."""
    return kv_new(KeyValue, (kv[0], b"", kv[2], kv[3], kv[4], kv[5]))


def check_window(name: str, revision: int, current: int, compact: int) -> None:
    """FutureRevisionError above ``current``, CompactedError below ``compact``."""
    if revision > current:
        raise FutureRevisionError(
            f"revision {revision} is above cache {name!r}'s current revision {current}")
    if revision < compact:
        raise CompactedError(
            f"cache {name!r} no longer holds the history at revision {revision}; the "
            f"oldest it can serve is {compact}", compact_revision=compact)


class Undo:
    """The keys changed after ``revision``, each with its KeyValue (None: absent) and index
    values at ``revision`` (the prev_kv and prev index values of its first event after
    it), from the ring records up to position ``pos``.

    A View keeps a few of these: consecutive pages of one listing read at one
    revision, so each record is decoded once per process and the next page only
    reads the records that arrived since (``extend``). Range and per-index-value
    lookups are binary searches (the sorted keys are made on first use and kept up
    to date), so a page costs O(page + log changes), not O(changes since the
    revision). Memory: O(keys changed since ``revision``), as the ring bounds.
    Not thread-safe: used under the Reader's lock.
    """

    __slots__ = ("revision", "ring_gen", "epoch", "pos", "prev", "_sorted", "_by_value")

    def __init__(self, revision: int, ring_gen: int, epoch: int, pos: int) -> None:
        self.revision, self.ring_gen, self.epoch, self.pos = revision, ring_gen, epoch, pos
        self.prev: dict[bytes, tuple[KeyValue | None, IxVals | None]] = {}
        self._sorted: SortedList | None = None
        self._by_value: dict[tuple[int, bytes], SortedList] = {}

    def extend(self, cache: str, ctl: ControlReader, seg: _shm.Segment, b: Block,
               stop: int) -> None:
        """Read the records in [pos, stop): each key's first event after ``revision``.
        CompactedError if the ring laps them meanwhile (the Undo is then unchanged)."""
        if stop == self.pos:
            return
        new: dict[bytes, tuple[KeyValue | None, IxVals | None]] = {}
        prev, revision = self.prev, self.revision
        try:
            for _pos, rev, _nxt, payload in ring.iter_records(
                    seg.buf, b.ring_capacity, self.pos, stop, ctl.tail, name=seg.name):
                if rev > revision:
                    for ev, _ix, pix in _codec.decode_indexed(payload, rev, seg.name):
                        k = ev.kv.key
                        if k not in prev and k not in new:
                            new[k] = (ev.prev_kv, pix)
        except ring.Lapped:
            b2 = ctl.block() or b
            raise CompactedError(
                f"the history of cache {cache!r} at revision {revision} was overwritten "
                f"while it was read", compact_revision=b2.compact_revision) from None
        prev.update(new)
        self.pos = stop
        if self._sorted is not None:
            self._sorted.update(new)
        for (i, value), keys in self._by_value.items():
            keys.update(k for k, (_kv, pix) in new.items() if value in vals(pix, i))

    def keys_in(self, start: bytes, last: bytes | None, end: bytes | None) -> Iterator[bytes]:
        """The changed keys in [start, last], or [start, end) when ``last`` is None (end
        None: no bound), in order."""
        if self._sorted is None:
            self._sorted = SortedList(self.prev)
        return _irange(self._sorted, start, last, end)

    def keys_with(self, i: int, value: bytes, start: bytes,
                  last: bytes | None) -> Iterator[bytes]:
        """As ``keys_in`` (no end), for the keys that had ``value`` in index ``i`` then."""
        keys = self._by_value.get((i, value))
        if keys is None:
            keys = self._by_value[i, value] = SortedList(
                k for k, (_kv, pix) in self.prev.items() if value in vals(pix, i))
        return _irange(keys, start, last, None)


def _irange(keys: SortedList, start: bytes, last: bytes | None,
            end: bytes | None) -> Iterator[bytes]:
    if last is not None:
        return keys.irange(start, last)  # type: ignore[no-any-return]
    return keys.irange(start, end, inclusive=(True, False))  # type: ignore[no-any-return]


def past_page(now: Callable[[int], list[KeyValue]], undo: Undo,
              added: Callable[[bytes | None], Iterator[bytes]], want: int,
              keys_only: bool = False) -> list[KeyValue]:
    """The first ``want`` items (-1: all) of a range as it was at ``undo.revision``.

    ``now(n)``: the first ``n`` items of the range now (-1: all), in key order.
    ``added(last)``: the changed keys up to ``last`` (None: all) that belonged to
    the range at the revision, in order. The range then is the current items whose
    key did not change, plus those keys' earlier KeyValues. Each changed key hides
    at most one current item, so the current range is read in growing chunks until
    the merge of the two holds ``want`` items at or before the last key read: the
    page costs O(want + the changes among its keys), whatever its offset.
    ``keys_only``: the earlier KeyValues with empty values too (``now`` gives them so).
    """
    prev = undo.prev
    n = want + 16 if want >= 0 else -1
    while True:
        cur = now(n)
        complete = n < 0 or len(cur) < n
        last = None if complete else cur[-1].key
        keep = [kv for kv in cur if kv.key not in prev]
        old = [kv for kv in (prev[k][0] for k in added(last)) if kv is not None]
        if keys_only:
            old = [strip(kv) for kv in old]
        out = list(heapq.merge(keep, old, key=key_of)) if old else keep
        if complete or len(out) >= want:
            return out if want < 0 else out[:want]
        n *= 2


def position_after(ctl: ControlReader, seg: _shm.Segment, b: Block, rec_revs: list[int],
                   rec_pos: list[int], pos: int, since: int) -> int:
    """A ring position at or before the first record with revision > ``since`` (never after).

    From ``rec_revs``/``rec_pos`` (the records the Reader has read and checked:
    those after the delta segment, or after the snapshot without one) when
    ``since`` is at or after their start; otherwise by walking record headers,
    from the snapshot's position when ``since`` is at or after the snapshot (the
    writer keeps those records intact), else from the tail. Headers are only a
    hint there: the Watch validates every record it reads.
    """
    if since >= (b.ovl_revision if b.ovl_seq else b.snap_revision):
        i = bisect.bisect_right(rec_revs, since)
        return rec_pos[i] if i < len(rec_pos) else pos
    for _attempt in range(10):
        tail = ctl.tail()
        start = max(tail, b.snap_ring_pos) if since >= b.snap_revision else tail
        p = start
        try:
            while p < b.ring_head:
                kind, rev, nxt = ring.peek_revision(seg.buf, b.ring_capacity, p)
                if kind == layout.REC_KIND_EVENTS and rev > since:
                    break
                p = nxt
        except ring.TornRecord:
            continue
        # The headers read are intact if the tail did not pass where the walk began (in a
        # full ring the tail moves with every write: comparing it with the tail read
        # before would fail the walk whenever the writer is busy).
        if ctl.tail() <= start:
            return p
    return ctl.tail()
