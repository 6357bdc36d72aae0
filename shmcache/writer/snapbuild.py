"""One snapshot in the making, built beside the watch loop (see docs/design.md, "Snapshots")."""

from __future__ import annotations

import gc
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from sortedcontainers import SortedDict

from ..errors import CorruptSegmentError
from ..format import indexseg, layout, ring, snapshot
from ..ipc import shm as _shm
from . import control_writer
from . import faults as _faults
from .delta_segments import NO_DELTA, DeltaSegments, publish_snapshot

if TYPE_CHECKING:
    from .indexer import Indexer
    from .segments import CacheSegments

log = logging.getLogger("shmcache.writer")

KV = tuple[bytes, int, int, int, int]  # value, create_revision, mod_revision, version, lease


def freeze_gc() -> None:
    """Keep the cyclic GC from walking the state: a full collection visits every
    tracked object, and with millions of keys that is a pause of tens of ms in the
    watch loop. The state holds no reference cycles (refcounting frees it), so
    moving what exists now into the permanent generation loses nothing."""
    gc.collect()
    gc.freeze()


def close_all(*objs: Any) -> None:
    for obj in objs:
        obj.close()


def unmap(base: tuple[_shm.Segment, snapshot.Snapshot] | None, background: bool) -> None:
    """Unmap a base snapshot. ``background``: in a short-lived thread, for a base that
    may be the last mapping of an unlinked segment, whose pages the unmap frees: munmap
    releases the GIL, but freeing a large snapshot's pages would hold up the watch
    thread (docs/design.md, "Snapshots")."""
    if base is None:
        return
    seg, snap = base
    if background:
        threading.Thread(target=close_all, args=(snap, seg), name="shmcache-unmap",
                         daemon=True).start()
    else:
        close_all(snap, seg)


class SnapshotBuild:
    """One snapshot in the making: its inputs frozen at the publisher's current revision.

    Made by the publisher on the writer's watch thread (``SnapshotPublishing._new_build``
    freezes the inputs and starts its counts afresh), which then runs ``run()`` itself
    or in a thread of its own. A build from the live snapshot (the base) takes the
    changes since it (the publisher starts a new delta), so freezing costs
    nothing however large the state; a full build (no base: after a relist)
    copies the state's keys and values. ``run()`` touches only these frozen
    inputs and its own new segment, and never the control segment: the watch
    thread publishes the result (Publisher.publish_build), so readers see
    snapshots in order and only complete ones.
    """

    def __init__(self, *, seq: int, cache: str, mode: int, group: int | str | None,
                 at: tuple[int, int, int], base: snapshot.Snapshot | None,
                 changes: dict[bytes, KV | None] | None, keys: list[bytes],
                 values: list[KV | None], plan: snapshot.Plan,
                 pairs: list[list[tuple[bytes, bytes]]] | None, bytes_since: int) -> None:
        self.seq = seq
        self.cache = cache
        self.name = layout.snapshot_name(cache, seq)
        self.mode, self.group = mode, group
        self.revision, self.epoch, self.ring_pos = at
        self.base = base
        self.full = base is None
        self.changes = changes  # a build from the base: the changes since it (the delta)
        self.keys, self.values = keys, values  # a whole-state build: the state's items
        self.plan = plan
        self.pairs = pairs  # the index segment goes with the snapshot, at the same revision
        self.bytes_since = bytes_since  # what a failed build gives back to the cadence
        self.seg: _shm.Segment | None = None
        self.error: BaseException | None = None
        self.seconds = 0.0
        self.done = threading.Event()

    def run(self) -> None:
        t0 = time.monotonic()
        try:
            _shm.unlink(self.name)
            self.seg = _shm.create(self.name, self.plan.total, self.mode, self.group)
            _faults.point("snapshot")  # created, not filled (the publisher unlinks it)
            if self.changes is not None:
                self.keys = sorted(self.changes)
                self.values = [self.changes[k] for k in self.keys]
            snapshot.write(self.seg.buf, self.plan, self.revision, self.epoch, self.keys,
                           self.values, self.base)
            if self.pairs is not None:
                self._write_indexes()
        except Exception as exc:  # reported by the watch thread (Publisher.finish_build)
            self.error = exc
        finally:
            if self.seg is not None:
                self.seg.close()  # here, not on the watch thread: unmapping takes a while
            self.keys, self.values, self.pairs = [], [], None if self.pairs is None else []
            self.seconds = time.monotonic() - t0
            self.done.set()

    def _write_indexes(self) -> None:
        assert self.pairs is not None
        name = layout.index_name(self.cache, self.seq)
        _shm.unlink(name)
        size, fill = indexseg.build(self.pairs, self.seq, self.revision, self.epoch)
        seg = _shm.create(name, size, self.mode, self.group)
        try:
            _faults.point("index")  # created, not filled
            fill(seg.buf)
        finally:
            seg.close()

    def report(self, stats: dict[str, Any]) -> None:
        """Gauges of the last publish, for the metrics, and the log line."""
        stats["snapshot_seconds"] = self.seconds
        stats["snapshot_seconds_total"] += self.seconds
        stats["snapshot_keys"] = self.plan.count
        stats["snapshot_bytes"] = self.plan.total
        log.info("snapshot published: revision %d, %d keys, %d bytes, built in %.1f ms (%s)",
                 self.revision, self.plan.count, self.plan.total, self.seconds * 1000,
                 "whole state" if self.full else f"{len(self.changes or ())} changes")


class SnapshotPublishing:
    """The publisher's snapshot side: builds (``SnapshotBuild``) started, finished, failed
    and published. Publisher (publisher.py) is the one subclass and holds the state these
    read; every method runs on the writer's thread (see its concurrency contract)."""

    segs: CacheSegments
    name: str
    indexer: Indexer | None
    stats: dict[str, Any]
    snapshot_interval: float
    snapshot_bytes: int
    ring: ring.RingWriter | None
    kv: SortedDict
    delta: dict[bytes, KV | None]
    data_len: int
    base: tuple[_shm.Segment, snapshot.Snapshot] | None
    delta_segments: DeltaSegments | None
    revision: int
    epoch: int
    snap_seq: int
    snap_ring_pos: int
    bytes_since_snapshot: int
    last_snapshot: float
    _build: SnapshotBuild | None

    @property
    def ctl(self) -> control_writer.ControlWriter:
        assert self.segs.ctl is not None
        return self.segs.ctl

    def _new_build(self) -> SnapshotBuild:
        """Freeze the inputs of a snapshot of the current state, and start the delta and
        the cadence's counts afresh: they count from this build on."""
        assert self.ring is not None
        changes: dict[bytes, KV | None] | None = None
        keys: list[bytes] = []
        values: list[KV | None] = []
        if self.base is None:
            # (Iterating the SortedDict and looking values up in it, both in C: its
            # keys(), values() and items() views iterate in Python, ~3x slower.)
            keys = list(self.kv)
            live: list[KV] = list(map(self.kv.__getitem__, keys))
            values = list(live)
            # Recounted here (O(keys), like the copy above): a whole-state build
            # never depends on the running count being right.
            self.data_len = sum(map(snapshot.entry_span, keys, [v[0] for v in live]))
        else:
            changes = self.delta
        self.delta = {}
        b = SnapshotBuild(
            seq=self.snap_seq + 1, cache=self.name, mode=self.segs.mode, group=self.segs.group,
            at=(self.revision, self.epoch, self.ring.head),
            base=self.base[1] if self.base is not None else None, changes=changes,
            keys=keys, values=values, plan=snapshot.Plan.of(len(self.kv), self.data_len),
            pairs=self.indexer.freeze() if self.indexer is not None else None,
            bytes_since=self.bytes_since_snapshot)
        self.bytes_since_snapshot = 0
        self.last_snapshot = time.monotonic()
        return b

    def _publish_snapshot(self, extra: dict[int, int] | None = None,
                          prefix: bytes | None = None, fault: str = "snapshot_publish") -> None:
        """Build a snapshot of the current state now and point the control segment at it.

        For the paths that cannot wait (a new epoch, a new ring, the ring about
        to overwrite events newer than the live snapshot): a build already
        running in the background is finished first, then a new one runs in
        this thread. On failure nothing is published and the build's changes
        stay in the delta.
        """
        if self._build is not None:
            self._finish_build(self._build, wait=True)
        b = self._new_build()
        b.run()
        if b.error is not None and not b.full and not isinstance(b.error, OSError):
            # (Not for an OSError: a full /dev/shm fails a whole-state build as well.)
            self._build_failed(b, b.error)
            self._close_base()
            b = self._new_build()  # from the whole state
            b.run()
        if b.error is not None:
            self._build_failed(b, b.error)
            raise b.error
        self._publish_build(b, extra, prefix, fault)

    def _maybe_snapshot(self) -> None:
        if self._build is not None:
            self._finish_build(self._build, raise_error=True)
            return
        if self.bytes_since_snapshot and (
                self.bytes_since_snapshot >= self.snapshot_bytes
                or time.monotonic() - self.last_snapshot >= self.snapshot_interval):
            if self.base is None:
                self._publish_snapshot()  # a whole-state build: no base to start from
                return
            self._build = self._new_build()
            threading.Thread(target=self._build.run, name="shmcache-snapshot",
                             daemon=True).start()

    def _finish_build(self, b: SnapshotBuild, wait: bool = False,
                      raise_error: bool = False) -> None:
        """Publish the background build if it is done (or wait for it). A failed one is
        dropped (and its error raised with ``raise_error``)."""
        if wait:
            b.done.wait()
        elif not b.done.is_set():
            return
        self._build = None
        if b.error is not None:
            self._build_failed(b, b.error)
            if raise_error:
                raise b.error
        else:
            self._publish_build(b)

    def _build_failed(self, b: SnapshotBuild, error: BaseException) -> None:
        """Drop a failed build; its changes go back to the delta (the base is unchanged)."""
        self._discard_build(b)
        log.warning("snapshot build at revision %d failed: %s", b.revision, error)
        if b.changes is not None:
            b.changes.update(self.delta)
            self.delta = b.changes
        self.bytes_since_snapshot += b.bytes_since
        if isinstance(error, CorruptSegmentError):
            self._close_base()  # the next build starts from the whole state

    def _discard_build(self, b: SnapshotBuild) -> None:
        if b.seg is not None:  # (run() has unmapped it)
            _shm.unlink(b.name)
            _shm.unlink(layout.index_name(self.name, b.seq))

    def _drop_build(self) -> None:
        """Wait for a background build and throw it away unpublished."""
        if self._build is not None:
            self._build.done.wait()
            self._discard_build(self._build)
            self._build = None

    def _close_base(self, background: bool = False) -> None:
        """Unmap the base snapshot (see snapbuild.unmap); the next build is then a
        whole-state one (which starts a new delta)."""
        base, self.base = self.base, None
        unmap(base, background)

    def _publish_build(self, b: SnapshotBuild, extra: dict[int, int] | None = None,
                       prefix: bytes | None = None, fault: str = "snapshot_publish") -> None:
        """Point the control segment at a finished snapshot and make it the next base.

        Whatever fails before the control segment is written drops the build
        (``_build_failed``) and raises; nothing after it raises.
        """
        assert self.ring is not None and b.seg is not None
        old = self.snap_seq
        # The head goes out with the snapshot: records appended but not yet
        # published (mid-response) are part of the state the snapshot holds.
        updates = {layout.B_SNAP_SEQ: b.seq, layout.B_SNAP_REVISION: b.revision,
                   layout.B_SNAP_SIZE: b.plan.total, layout.B_SNAP_RING_POS: b.ring_pos,
                   layout.B_KEY_COUNT: len(self.kv), layout.B_RING_HEAD: self.ring.head,
                   layout.B_REVISION: self.revision, **NO_DELTA}
        if extra:
            updates.update(extra)
        try:
            _faults.point(fault)  # filled, not published
            # The changes after the snapshot are those since its build started.
            publish_snapshot(self.delta_segments, self.ctl, self.name, updates, b.seq, self.delta,
                             self.bytes_since_snapshot,
                             (self.revision, self.epoch, self.ring.head), prefix=prefix)
        except BaseException as exc:
            self._build_failed(b, exc)
            raise
        self.snap_seq = b.seq
        self.snap_ring_pos = b.ring_pos
        self.stats["snapshots"] += 1
        if old and old != b.seq:
            # Readers that mapped it keep their mapping; new readers use the new one.
            # Unlinked while the base still maps it: unlinking the last reference
            # frees hundreds of MB with the GIL held (posix_ipc), unmapping does
            # not hold it, so the pages are freed by _close_base below, off this thread.
            _shm.unlink(layout.snapshot_name(self.name, old))
            _shm.unlink(layout.index_name(self.name, old))
        self._close_base(background=True)
        self.segs.track(b.name)
        if b.pairs is not None:
            self.segs.track(layout.index_name(self.name, b.seq))
        try:
            sseg = _shm.open_readonly(b.name)
            if sseg is not None:  # (None: removed by hand; the next build is a whole-state one)
                self.base = (sseg, snapshot.Snapshot(sseg.name, sseg.buf, sseg.size))
        except Exception as exc:  # published all the same: the next build is a whole-state one
            log.warning("cannot map the snapshot just published as the next base: %s", exc)
        b.report(self.stats)
