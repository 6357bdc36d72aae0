"""Reads at a past revision, and where in the ring a revision's events start.

Every ring record carries each event's prev_kv, and the ring holds every event
after ``COMPACT_REVISION`` (oldest_watchable_revision). So the value of a key
at revision R is the prev_kv of its first event after R if it has one (None:
it did not exist), else its current value. Nothing is copied but the keys that
changed after R (docs/design.md, "Reads at a past revision").

Pure functions over what the caller passes (a ControlReader, a ring mapping, a
control block, positions); the Reader calls them under its lock.
"""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING, Any

from . import _codec, layout, ring
from .errors import CompactedError, FutureRevisionError

if TYPE_CHECKING:
    from . import _shm
    from .control import Block, ControlReader
    from .types import KeyValue


def check_window(name: str, revision: int, current: int, compact: int) -> None:
    """FutureRevisionError above ``current``, CompactedError below ``compact``."""
    if revision > current:
        raise FutureRevisionError(
            f"revision {revision} is above cache {name!r}'s current revision {current}")
    if revision < compact:
        raise CompactedError(
            f"cache {name!r} no longer holds the history at revision {revision}; the "
            f"oldest it can serve is {compact}", compact_revision=compact)


def changes_after(cache: str, ctl: ControlReader, seg: _shm.Segment, b: Block, start: int,
                  stop: int, revision: int, indexed: bool = False) -> dict[bytes, Any]:
    """key -> its KeyValue (None: absent) at ``revision``, for every key changed after it,
    from the records in [start, stop). CompactedError if the ring laps them meanwhile.
    ``indexed``: key -> (KeyValue or None, its index values at ``revision``)."""
    undo: dict[bytes, Any] = {}
    try:
        for _pos, rev, _nxt, payload in ring.iter_records(
                seg.buf, b.ring_capacity, start, stop, ctl.tail, name=seg.name):
            if rev > revision:
                for ev, _ix, pix in _codec.decode_indexed(payload, rev, seg.name):
                    if ev.kv.key not in undo:
                        undo[ev.kv.key] = (ev.prev_kv, pix) if indexed else ev.prev_kv
    except ring.Lapped:
        b2 = ctl.block() or b
        raise CompactedError(
            f"the history of cache {cache!r} at revision {revision} was overwritten "
            f"while it was read", compact_revision=b2.compact_revision) from None
    return undo


def apply_undo(items: dict[bytes, KeyValue], undo: dict[bytes, KeyValue | None],
               start: bytes, end: bytes | None) -> list[KeyValue]:
    """The current ``items`` of [start, end) taken back to the revision of ``undo``, sorted."""
    for key, kv in undo.items():
        if key >= start and (end is None or key < end):
            if kv is None:
                items.pop(key, None)
            else:
                items[key] = kv
    return [items[k] for k in sorted(items)]


def position_after(ctl: ControlReader, seg: _shm.Segment, b: Block, rec_revs: list[int],
                   rec_pos: list[int], pos: int, since: int) -> int:
    """A ring position at or before the first record with revision > ``since`` (never after).

    From ``rec_revs``/``rec_pos`` (the records the Reader has read and checked:
    those after the overlay segment, or after the snapshot without one) when
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
