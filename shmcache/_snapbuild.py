"""One snapshot in the making, built beside the watch loop (see docs/design.md, "Snapshots")."""

from __future__ import annotations

import gc
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from . import _faults, _shm, indexseg, layout, snapshot

if TYPE_CHECKING:
    from ._publisher import KV, Publisher

log = logging.getLogger("shmcache.writer")


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
    may be the last mapping of an unlinked segment, whose pages the unmap frees
    (70 ms for 377 MB: munmap releases the GIL, but it would hold up the watch thread)."""
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

    Made on the writer's watch thread, which then runs ``run()`` itself or in a
    thread of its own. A build from the live snapshot (the base) takes the
    changes since it (the publisher starts a new delta), so freezing costs
    nothing however large the state; a full build (no base: after a relist)
    copies the state's keys and values. ``run()`` touches only these frozen
    inputs and its own new segment, and never the control segment: the watch
    thread publishes the result (Publisher.publish_build), so readers see
    snapshots in order and only complete ones.
    """

    def __init__(self, p: Publisher) -> None:
        assert p.ring is not None
        self.seq = p.snap_seq + 1
        self.cache = p.name
        self.name = layout.snapshot_name(p.name, self.seq)
        self.mode, self.group = p.segs.mode, p.segs.group
        self.revision, self.epoch, self.ring_pos = p.revision, p.epoch, p.ring.head
        self.base = p.base[1] if p.base is not None else None
        self.full = self.base is None
        self.changes: dict[bytes, KV | None] | None = None
        self.keys: list[bytes] = []
        self.values: list[KV | None] = []
        if self.full:
            self.keys, self.values = list(p.kv.keys()), list(p.kv.values())
            p.delta = {}
            # Recounted here (O(keys), like the copy above): a whole-state build
            # never depends on the running count being right.
            p.data_len = sum(snapshot.entry_span(k, v[0]) for k, v in p.kv.items())
        else:
            self.changes, p.delta = p.delta, {}
        self.plan = snapshot.Plan.of(len(p.kv), p.data_len)
        # The index segment goes with the snapshot, at the same revision.
        self.pairs = p.indexer.freeze() if p.indexer is not None else None
        self.bytes_since, p.bytes_since_snapshot = p.bytes_since_snapshot, 0
        p.last_snapshot = time.monotonic()
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
