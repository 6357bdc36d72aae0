"""What one Reader sees of a cache: the live snapshot and delta segment, mapped in place,
plus its private recent changes.

The delta segment, when the writer has published one, holds every key changed
after the snapshot up to its revision; the recent changes hold the events
published after it (ring records [OVL_RING_POS, RING_HEAD), or [SNAP_RING_POS,
RING_HEAD) without one). So what a Reader decodes and keeps is bounded by the
writer's delta segment cadence, not by the write history or the number of keys
(docs/design.md, "The reader's view").

Concurrency contract: ``advance`` runs under the owning Reader's lock (in a
call's thread, or in the process's janitor thread moving an idle Reader off
superseded segments: shmcache/reader/janitor.py); ``layers`` (recent changes,
snapshot, delta segment) is replaced whole, so a lock-free ``get`` in another
thread reads a matching set; the recent changes' dict is never modified while it
is the live one. ``close`` unmaps every segment the View ever mapped that is still
mapped (old rings that watches read, old snapshots a list still walks): the
owning Reader calls it once no call is in flight (lifetime). A child forked
while another thread was inside ``advance`` calls ``reset`` (the half-moved
view is thrown away and rebuilt from the block at the next refresh).
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import weakref
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple, NoReturn, TypeVar

from sortedcontainers import SortedDict

from ..errors import CompactedError, CorruptSegmentError, NotFoundError
from ..format import codec as _codec
from ..format import control, layout, ring
from ..format.indexseg import IndexSegment
from ..format.snapshot import Snapshot
from ..ipc import control_reader
from ..ipc import shm as _shm
from ..types import KeyValue
from . import history as _history
from . import pages as _pages
from .recentindex import RecentIndex


def range_end(prefix: bytes) -> bytes | None:
    """Exclusive upper bound of the keys under ``prefix``; None for "no bound".

    etcd spells "no bound" b"\\0" (the range end of b"" and of all-0xff prefixes).
    """
    if not prefix:
        return None
    end = layout.prefix_range_end(prefix)
    return None if end == b"\0" else end


T = TypeVar("T")
_MISSING: Any = object()
# Undos (what changed after a revision) a View keeps: a few listings paged at once.
_UNDOS = 4


class Layers(NamedTuple):
    """What a read of the current state looks at, newest first; replaced whole."""

    recent: SortedDict  # the private recent changes: key -> KeyValue, None if deleted
    snapshot: Snapshot | None
    delta: Snapshot | None  # the delta segment, if the writer published one


def lookup(layers: Layers, key: bytes, keys_only: bool = False) -> KeyValue | None:
    """``key`` now, in a view's layers: the recent changes first, then the delta
    segment (an entry of version 0 there is a deletion), then the snapshot.
    ``keys_only``: no value is copied from a segment (the recent changes' are in
    memory already, and returned as they are)."""
    recent, snap, delta = layers
    kv: KeyValue | None = recent.get(key, _MISSING)
    if kv is not _MISSING:
        return kv
    if delta is not None:
        kv = delta.get(key, keys_only)
        if kv is not None:
            return kv if kv.version else None
    assert snap is not None
    return snap.get(key, keys_only)


class Retry(Exception):
    """The writer moved on while we read (snapshot replaced, ring lapped): read the block again."""


class View:
    """The snapshot, delta segment, recent changes and ring position of one Reader, moved
    forward by ``advance``."""

    def __init__(self, cache: str, ctl: control_reader.ControlReader) -> None:
        self.cache = cache
        self.control = ctl
        self.block: control.Block | None = None
        self.epoch = -1
        self.prefix = b""
        self.prefix_end: bytes | None = None
        self.ring: _shm.Segment | None = None
        self.ring_gen = -1
        self.snap: Snapshot | None = None
        self.snap_seq = 0
        self.delta: Snapshot | None = None  # the delta segment (KIND_OVERLAY), if any
        self.delta_seq = 0
        self.recent: SortedDict = SortedDict()
        # Double-buffered (see _next_recent): the spare and the changes it lacks.
        self.spare: SortedDict | None = None
        self.spare_pending: list[tuple[bytes, KeyValue | None]] = []
        self.layers = Layers(self.recent, None, None)
        # Revision and position of every record after the snapshot (for watches
        # and past-revision reads), and the position read up to.
        self.rec_revs: list[int] = []
        self.rec_pos: list[int] = []
        self.pos = 0
        # Secondary indexes: the epoch's definitions, the index segment of the
        # snapshot (mapped on first use) and the index of the recent changes.
        self.index_defs: tuple[tuple[str, str], ...] = ()
        self.iseg: IndexSegment | None = None
        self.recent_index: RecentIndex | None = None
        # What changed after the revisions recently read at (pages of a listing).
        self.undos: list[_history.Undo] = []
        # Every mapping and buffer export made, weakly: close() unmaps what is left.
        self._mapped: list[weakref.ref[Any]] = []

    def indexes(self) -> IndexSegment:
        """The index segment of the live snapshot (Retry if it was replaced meanwhile)."""
        seg = self.iseg
        if seg is not None and seg.snap_seq == self.snap_seq:
            return seg
        b, snap = self.block, self.snap
        assert b is not None and snap is not None
        name = layout.index_name(self.cache, self.snap_seq)
        mapped = self._map(b, name)
        try:
            seg = IndexSegment(name, mapped.buf, mapped.size)
        except BaseException:
            mapped.close()
            raise
        self._track(seg.memview)  # (its export: the mapping cannot close before it)
        if (seg.snap_seq, seg.revision, seg.epoch, seg.count) != (
                self.snap_seq, snap.revision, snap.epoch, len(self.index_defs)):
            if self.control.block() == b:
                raise CorruptSegmentError(
                    f"index segment (snapshot {seg.snap_seq}, revision {seg.revision}, "
                    f"{seg.count} indexes) does not match its snapshot", segment=name)
            raise Retry()
        self.iseg = seg
        return seg

    def decode_token(self, token: str, bound: bytes) -> tuple[int, bytes | None]:
        """(revision, last key) of a continue token of this cache, epoch and listing
        (``bound``: its prefix); ValueError otherwise (see pages.decode)."""
        assert self.block is not None
        return _pages.decode(token, self.cache, bound, self.epoch, self.block.compact_revision)

    def with_retry(self, read: Callable[[], T], refresh: Callable[[], None]) -> T:
        """``read()``, again after a refresh if the writer replaced what it reads."""
        for _attempt in range(50):
            try:
                return read()
            except Retry:
                refresh()
        raise Retry()

    def changed(self, start: bytes, end: bytes | None, n: int, keys_only: bool = False,
                shard: tuple[int, int] | None = None) -> list[tuple[bytes, KeyValue | None]]:
        """The first ``n`` (-1: all) keys in [start, end) changed since the snapshot, with
        their KeyValue now (None: deleted), in key order: the delta segment's, and the
        recent changes over them. O(log + n). ``keys_only``, ``shard``: as for
        ``Snapshot.range_list``. Call under the Reader's lock."""
        recent = self.recent
        keys: Iterable[bytes] = (recent.irange(minimum=start) if end is None
                                 else recent.irange(start, end, inclusive=(True, False)))
        keys = _history.of_shard(keys, shard)
        if n >= 0:
            keys = itertools.islice(keys, n)
        mine = [(k, recent[k]) for k in keys]
        if keys_only:
            mine = [(k, kv if kv is None else _history.strip(kv)) for k, kv in mine]
        if self.delta is None:
            return mine
        shared = [(kv.key, kv if kv.version else None)
                  for kv in self.delta.range_list(start, end, n, keys_only, shard)]
        if not mine or not shared:
            return mine or shared
        newer = dict(mine)
        out = list(heapq.merge([x for x in shared if x[0] not in newer], mine, key=_history.key_of))
        return out if n < 0 else out[:n]

    def page(self, start: bytes, end: bytes | None, want: int, keys_only: bool = False,
             shard: tuple[int, int] | None = None) -> list[KeyValue]:
        """The first ``want`` (-1: all) KeyValues in [start, end) now (``keys_only``,
        ``shard``: as for ``Snapshot.range_list``). Call under the Reader's lock.

        Two sorted streams, the snapshot's entries and the changes since it (those
        up to the last snapshot key read), each read in chunks of ``want + 16``:
        the merge is exact up to the smaller of the two last keys read, so the
        stream that ends first is read further (doubling) until the merge holds
        ``want`` keys. A page costs O(want + the changes among its keys + log),
        however many keys changed elsewhere.
        """
        snap = self.snap
        assert snap is not None
        n = m = -1 if want < 0 else want + 16
        while True:
            base = snap.range_list(start, end, n, keys_only, shard)
            b_last = None if n < 0 or len(base) < n else base[-1].key
            # Only the changes up to the last snapshot key read can be placed.
            ch = self.changed(start, end if b_last is None else b_last + b"\0", m, keys_only,
                              shard)
            c_last = None if m < 0 or len(ch) < m else ch[-1][0]
            bound = (c_last if b_last is None else b_last if c_last is None
                     else min(b_last, c_last))
            out = apply_changes(base, ch, bound)
            if bound is None or len(out) >= want:
                return out if want < 0 else out[:want]
            if b_last is not None and (c_last is None or b_last <= c_last):
                n *= 2
            if c_last is not None and (b_last is None or c_last <= b_last):
                m *= 2

    # -- for past-revision reads and watches (under the Reader's lock) ----------

    def undo(self, revision: int, current: int) -> _history.Undo:
        """What changed after ``revision`` (see history.Undo), read up to the view's
        position; CompactedError / FutureRevisionError outside the window. The last
        few are kept, so the pages of one listing decode each record once."""
        b = self.block
        assert b is not None and self.ring is not None
        _history.check_window(self.cache, revision, current, b.compact_revision)
        undos = self.undos
        for u in undos:
            if (u.revision, u.ring_gen, u.epoch) == (revision, self.ring_gen, self.epoch):
                undos.remove(u)
                break
        else:
            u = _history.Undo(revision, self.ring_gen, self.epoch, self.pos if revision == current
                              else self.position_after(revision))
        # Most recent last; the ones left behind by the window or by a new ring go first.
        undos[:] = [x for x in undos[-(_UNDOS - 1):] if x.revision >= b.compact_revision
                    and (x.ring_gen, x.epoch) == (self.ring_gen, self.epoch)]
        u.extend(self.cache, self.control, self.ring, b, self.pos)
        undos.append(u)
        return u

    def position_after(self, since: int) -> int:
        """A ring position at or before the first record with revision > since (never after it)."""
        b, seg = self.block, self.ring
        assert b is not None and seg is not None
        return _history.position_after(self.control, seg, b, self.rec_revs, self.rec_pos,
                                       self.pos, since)

    def get_at(self, key: bytes, revision: int, current: int) -> KeyValue | None:
        """``key`` as etcd had it at ``revision`` (within the window)."""
        was = self.undo(revision, current).prev.get(key, _MISSING)
        if was is not _MISSING:
            return was[0]  # type: ignore[no-any-return]
        return lookup(self.layers, key)

    def watch_start(self, since: int | None) -> tuple[control.Block, _shm.Segment, int, int]:
        """(block, ring, position, since) for a watch from ``since`` (None: from now)."""
        b, seg = self.block, self.ring
        assert b is not None and seg is not None
        if since is None:
            return b, seg, self.pos, b.revision
        if since < b.compact_revision:
            raise CompactedError(
                f"cache {self.cache!r} no longer holds the events after revision "
                f"{since}; the oldest since_revision it can serve is "
                f"{b.compact_revision}", compact_revision=b.compact_revision)
        return b, seg, self.position_after(since), since

    def superseded(self, b: control.Block) -> bool:
        """Whether block ``b`` replaced a segment the view maps (unlinked: pinned till we move)."""
        now = (self.snap_seq, self.delta_seq, self.ring_gen)
        return self.snap is not None and (b.snap_seq, b.ovl_seq, b.ring_gen) != now

    def close(self) -> None:
        """Unmap every segment still mapped. Call only once nothing reads them (their
        buffer exports first: a mapping with an export cannot be closed)."""
        refs, self._mapped = self._mapped, []
        live = [x for x in (r() for r in refs) if x is not None]
        for x in live:
            if isinstance(x, memoryview):
                try:
                    x.release()
                except (BufferError, ValueError):
                    pass  # a slice of it is still alive somewhere: unmapped when it dies
        for x in live:
            if not isinstance(x, memoryview):
                try:
                    x.close()
                except (BufferError, ValueError):
                    pass
        self.snap = self.delta = self.iseg = None
        self.ring = None
        self.layers = Layers(self.recent, None, None)

    def reset(self) -> None:
        """Forget the position and the layers (kept mapped until dropped): the next
        ``advance`` rebuilds the whole view from its block."""
        self.epoch = -1
        self.snap_seq = self.delta_seq = 0
        self.ring_gen = -1
        self.spare, self.spare_pending = None, []
        self.undos = []

    def _track(self, x: Any) -> None:
        mapped = self._mapped
        if len(mapped) >= 64:  # drop the references to what was collected meanwhile
            mapped[:] = [r for r in mapped if r() is not None]
        mapped.append(weakref.ref(x))

    def _map(self, b: control.Block, name: str) -> _shm.Segment:
        """Map segment ``name`` that block ``b`` points at (Retry or an error if it is gone)."""
        seg = _shm.open_readonly(name)
        if seg is None:
            self._missing(b, name)
        self._track(seg.buf)
        return seg

    def _open_ring(self, b: control.Block) -> _shm.Segment:
        """The ring segment block ``b`` points at (the one mapped already, if it is that one)."""
        if b.ring_gen == self.ring_gen and self.ring is not None:
            return self.ring
        name = layout.ring_name(self.cache, b.ring_gen)
        seg = self._map(b, name)
        try:
            ring.check_ring_header(seg.buf, seg.size, name, b.ring_gen, b.ring_capacity)
        except BaseException:
            seg.close()
            raise
        return seg

    def _missing(self, b: control.Block, name: str) -> NoReturn:
        """A segment the block points at is gone: replaced meanwhile (retry) or removed (error)."""
        if self.control.block() == b:
            raise CorruptSegmentError(
                f"segment {name} that the control segment points at is missing",
                segment=self.control.name,
                hint="Was it removed by hand? Restarting the writer republishes the cache")
        raise Retry()

    def advance(self, b: control.Block) -> None:
        """Move the view to block ``b``: read the new ring records, then swap the result in.

        Nothing the view holds changes until every new record has been read and
        found intact (ring.iter_records): a lapped or corrupt ring leaves the
        view exactly as it was, and a lock-free ``get`` sees the old view or the
        new one, never a mixture.
        """
        if b.snap_seq == 0:
            if not self.control.writer_alive():
                raise NotFoundError(
                    f"cache {self.cache!r} has no snapshot and no writer is running (its "
                    f"writer stopped before it loaded the range from etcd)", name=self.cache,
                    hint="Start its writer (`shmcache serve NAME ...`), or remove it with "
                         "`shmcache rm NAME`")
            raise NotFoundError(f"cache {self.cache!r} has no snapshot yet: its writer is "
                                f"still loading", name=self.cache,
                                hint="Pass Reader(name, timeout=...) to wait for it")
        prefix, defs = self.prefix, self.index_defs
        if b.epoch != self.epoch or b.prefix_len != len(prefix):
            found = self.control.definitions(b)
            if found is None:
                raise Retry()  # published meanwhile: they may be another epoch's
            prefix, defs = found
        if b.ovl_seq and defs:
            # The recent changes' index (by_index) is built from ring records; a writer with
            # secondary indexes publishes no delta segments.
            raise CorruptSegmentError("delta segment in a cache with secondary indexes",
                                      segment=self.control.name)
        ring_seg = self._open_ring(b)
        fresh = (prefix != self.prefix or b.epoch != self.epoch or ring_seg is not self.ring
                 or b.snap_seq != self.snap_seq or self.snap is None)
        snap = self._open_snapshot(b) if fresh else self.snap
        assert snap is not None
        # A new delta segment (or a new snapshot) starts the recent changes afresh:
        # it holds only the records after that segment.
        restart = fresh or b.ovl_seq != self.delta_seq
        delta = self.delta
        if restart:
            delta = self._open_delta(b) if b.ovl_seq else None
            start = b.ovl_ring_pos if b.ovl_seq else b.snap_ring_pos
            last_rev = b.ovl_revision if b.ovl_seq else b.snap_revision
        else:
            start = self.pos
            last_rev = self.rec_revs[-1] if self.rec_revs else (
                b.ovl_revision if b.ovl_seq else snap.revision)
        changes: list[tuple[bytes, KeyValue | None]] = []
        ix_changes: list[tuple[bytes, Any, Any]] = []
        revs: list[int] = []
        positions: list[int] = []
        try:
            for pos, rev, _nxt, payload in ring.iter_records(
                    ring_seg.buf, b.ring_capacity, start, b.ring_head,
                    self.control.tail, after_revision=last_rev,
                    max_revision=b.revision, name=ring_seg.name):
                for ev, ix, pix in _codec.decode_indexed(payload, rev, ring_seg.name):
                    changes.append((ev.kv.key, ev.kv if ev.type == "PUT" else None))
                    if defs:
                        ix_changes.append((ev.kv.key, ix, pix))
                revs.append(rev)
                positions.append(pos)
        except ring.Lapped:
            raise Retry() from None
        # Everything read is intact: commit.
        if restart:
            recent: SortedDict = SortedDict()
            for key, kv in changes:
                recent[key] = kv
            self.spare, self.spare_pending = None, []
            self.rec_revs, self.rec_pos = revs, positions
            self.delta, self.delta_seq = delta, b.ovl_seq
        if fresh:
            self.prefix = prefix
            self.prefix_end = range_end(prefix)
            self.ring = ring_seg  # the old mapping is dropped, not closed: a Watch may hold it
            self.ring_gen = b.ring_gen
            # The old snapshot and its index segment are dropped, not closed: a running
            # list() may still hold them (the new index segment is mapped on first use).
            self.snap, self.snap_seq, self.iseg = snap, b.snap_seq, None
            self.index_defs = defs
            self.recent_index = RecentIndex(len(defs)) if defs else None
        elif not restart:
            recent = self._next_recent(changes)
            self.rec_revs.extend(revs)
            self.rec_pos.extend(positions)
        if self.recent_index is not None:
            for key, ix, pix in ix_changes:
                self.recent_index.apply(key, ix, pix)
        self.recent = recent
        self.layers = Layers(recent, snap, delta)
        self.pos = b.ring_head
        self.epoch = b.epoch

    def _open_snapshot(self, b: control.Block) -> Snapshot:
        name = layout.snapshot_name(self.cache, b.snap_seq)
        return self._open_layer(b, name, layout.KIND_SNAPSHOT, b.snap_revision, b.snap_size)

    def _open_delta(self, b: control.Block) -> Snapshot:
        name = layout.overlay_name(self.cache, b.ovl_seq)
        return self._open_layer(b, name, layout.KIND_OVERLAY, b.ovl_revision, b.ovl_size)

    def _open_layer(self, b: control.Block, name: str, kind: int, revision: int,
                    size: int) -> Snapshot:
        """Map the snapshot or delta segment block ``b`` names and check it against ``b``."""
        seg = self._map(b, name)
        try:
            layer = Snapshot(name, seg.buf, seg.size, kind)
        except BaseException:
            seg.close()
            raise
        self._track(layer.memview)  # (its export: the mapping cannot close before it)
        if layer.revision != revision or layer.epoch != b.epoch or seg.size != size:
            layer.close()
            if self.control.block() == b:
                raise CorruptSegmentError(
                    f"revision {layer.revision}/epoch {layer.epoch}/size {seg.size} does not "
                    f"match the control segment ({revision}/{b.epoch}/{size})", segment=name)
            raise Retry()
        return layer

    def _next_recent(self, changes: list[tuple[bytes, KeyValue | None]]) -> SortedDict:
        """The live recent changes with ``changes`` applied, built aside from the dict
        readers use.

        Two dicts alternate: the spare (the one replaced at the last refresh)
        first catches up with the changes it lacks, then takes the new ones, and
        becomes the live one. A ``get`` that picked up the old live dict just
        before the swap keeps reading a state that does not change under it
        until the next refresh. Each change is applied twice; one copy is made
        per snapshot, at the first refresh after it.
        """
        if not changes:
            return self.recent
        spare = self.spare
        if spare is None:
            spare = self.recent.copy()
        else:
            for key, kv in self.spare_pending:
                spare[key] = kv
        for key, kv in changes:
            spare[key] = kv
        self.spare, self.spare_pending = self.recent, changes
        return spare


def apply_changes(base: list[KeyValue], changes: list[tuple[bytes, KeyValue | None]],
                  bound: bytes | None) -> list[KeyValue]:
    """``base`` (sorted KeyValues) with ``changes`` (sorted (key, KeyValue or None)) applied:
    a change replaces the entry of its key or adds one, None removes it; only keys up to
    ``bound`` (None: all). O(len(base)) at C speed plus O(log) per change."""
    keys: list[bytes] = list(map(_history.key_of, base))
    if bound is not None:
        cut = bisect.bisect_right(keys, bound)
        if cut < len(keys):
            del keys[cut:]
            base = base[:cut]
        changes = changes[:bisect.bisect_right(changes, bound, key=_history.key_of)]
    if not changes:
        return base
    out: list[KeyValue] = []
    pos = 0
    for k, kv in changes:
        i = bisect.bisect_left(keys, k, pos)
        out.extend(base[pos:i])
        if i < len(keys) and keys[i] == k:
            i += 1  # replaced (or removed)
        if kv is not None:
            out.append(kv)
        pos = i
    out.extend(base[pos:])
    return out
