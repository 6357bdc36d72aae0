"""The writer's delta segments: every key changed after the live snapshot, republished often.

Without them a Reader that attaches decodes every ring record since the
snapshot into its private recent changes: up to ``snapshot_bytes`` (16 MiB by default)
of records, hundreds of milliseconds and tens of MB per process right after a
burst of writes. With them the writer publishes, each time
``DELTA_BYTES`` of records have accumulated, a segment in the snapshot's
layout (kind KIND_OVERLAY) holding the current KeyValue of every key changed
since the snapshot, deletions as entries of version 0; a Reader maps it in
place and decodes only the records after it (docs/design.md, "Delta
segments").

A new delta segment is the previous one merged with the changes since it
(``snapshot.write`` with the previous one as its base: entries are copied as
they are, in C without the GIL), built in a thread beside the watch loop, and
published by that thread as soon as it is done, if the snapshot it belongs to
is still the live one: so a fresh Reader benefits at once, even when no more
events come to wake the watch loop. A snapshot publish resets the set (the
control block's OVL_* fields go to 0 in the same publish).

Concurrency contract: ``lock`` orders the two publishers of the OVL_* fields: a
build thread publishes its segment under it, and the watch thread publishes a
snapshot (with the OVL_* fields at 0) under it (``switch``), so no reader sees
a snapshot paired with a delta segment of another. ``changes`` and
``bytes_since`` belong to the watch thread; a running build reads only its
frozen inputs, its base (never unmapped while a build uses it) and its own new
segment.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..format import layout, snapshot
from ..ipc import shm as _shm
from . import faults as _faults

if TYPE_CHECKING:
    from .control_writer import ControlWriter
    from .segments import CacheSegments

log = logging.getLogger("shmcache.writer")

KV5 = tuple[bytes, int, int, int, int]  # value, create_revision, mod_revision, version, lease
# A deleted key in a delta segment: etcd never reports a live key with version 0.
TOMBSTONE: KV5 = (b"", 0, 0, 0, 0)
# Records (payload bytes) published after the delta segment before the next one
# is built: what an attaching Reader decodes at most, beside the builds' cost.
DELTA_BYTES = 128 << 10


def plan_of(changes: dict[bytes, KV5], spans: dict[bytes, int],
            data_len: int) -> tuple[snapshot.Plan, int]:
    """The plan of the segment holding ``spans``'s keys updated by ``changes`` (``spans``
    is updated in place), and its data length."""
    for key, kv in changes.items():
        new = snapshot.entry_span(key, kv[0])
        data_len += new - spans.get(key, 0)
        spans[key] = new
    return snapshot.Plan.of(len(spans), data_len), data_len


def write_segment(name: str, plan: snapshot.Plan, revision: int, epoch: int,
                  changes: dict[bytes, KV5], base: snapshot.Snapshot | None, mode: int,
                  group: int | str | None) -> None:
    """Create delta segment ``name``: ``base``'s entries with ``changes`` over them."""
    _shm.unlink(name)
    seg = _shm.create(name, plan.total, mode, group)
    try:
        _faults.point("overlay")  # created, not filled
        keys = sorted(changes)
        values: list[KV5 | None] = [changes[k] for k in keys]
        snapshot.write(seg.buf, plan, revision, epoch, keys, values, base,
                       kind=layout.KIND_OVERLAY)
    finally:
        seg.close()


class DeltaBuild:
    """One delta segment in the making: the previous one plus ``changes``; made under
    ``DeltaSegments.lock`` on the watch thread, run in its own thread."""

    def __init__(self, ov: DeltaSegments, seq: int, at: tuple[int, int, int], plan: snapshot.Plan,
                 changes: dict[bytes, KV5], bytes_since: int) -> None:
        self.ov = ov  # told when the build is done (DeltaSegments.finish)
        self.seq = seq
        self.name = layout.overlay_name(ov.cache, seq)
        self.mode, self.group = ov.segs.mode, ov.segs.group
        self.revision, self.epoch, self.ring_pos = at
        self.snap_seq = ov.snap_seq
        self.changes = changes
        self.bytes_since = bytes_since
        self.base = ov.base
        self.plan = plan
        self.done = threading.Event()

    def run(self) -> None:
        t0 = time.monotonic()
        error: BaseException | None = None
        try:
            write_segment(self.name, self.plan, self.revision, self.epoch, self.changes,
                          self.base[1] if self.base is not None else None, self.mode,
                          self.group)
        except Exception as exc:
            error = exc
        try:
            self.ov.finish(self, error, time.monotonic() - t0)
        finally:
            self.done.set()


class DeltaSegments:
    """The delta segments of one cache (see the module docstring)."""

    def __init__(self, segs: CacheSegments, stats: dict[str, Any]) -> None:
        self.segs = segs
        self.cache = segs.name
        self.stats = stats
        assert segs.ctl is not None
        self.ctl = segs.ctl
        self.lock = threading.Lock()
        self.seq = self.ctl.get(layout.B_OVL_SEQ)  # numbering continues across writers
        self.published = self.seq
        self.snap_seq = 0  # the snapshot the changes below are relative to (-1: none now)
        # The keys changed since the last build started (or the snapshot), and the
        # span of every key changed since the snapshot as the next segment holds it.
        self.changes: dict[bytes, KV5] = {}
        self.spans: dict[bytes, int] = {}
        self.data_len = 0
        self.bytes_since = 0
        self.base: tuple[_shm.Segment, snapshot.Snapshot] | None = None
        self.build: DeltaBuild | None = None
        # A build that failed: its changes go back into ``changes`` on the watch thread.
        self.failed: DeltaBuild | None = None
        self._retired: list[tuple[_shm.Segment, snapshot.Snapshot]] = []

    # -- the watch thread ---------------------------------------------------------------

    def switch(self, publish: Callable[[dict[int, int]], None], snap_seq: int,
               since_snapshot: dict[bytes, KV5 | None], bytes_since: int,
               at: tuple[int, int, int]) -> None:
        """Publish a new snapshot, ``snap_seq``, with the first delta segment of its own,
        and start over from it.

        ``publish(extra)`` publishes the snapshot's block fields updated with
        ``extra``: the first delta segment's fields, or 0s. That segment holds
        ``since_snapshot`` (the changes made while the snapshot was built, at
        ``at`` = revision, epoch, ring head: what ``publish`` publishes) and is
        built here, before the publish, when they are at least ``DELTA_BYTES``
        of records: a large snapshot takes seconds to build, and without it every
        Reader attaching meanwhile would decode those records. (It costs the watch
        loop the build, once per snapshot: a copy in C without the GIL.) A build
        still running belongs to the old snapshot: it throws its result away.
        """
        changes = {k: (v if v is not None else TOMBSTONE) for k, v in since_snapshot.items()}
        spans: dict[bytes, int] = {}
        first: tuple[int, snapshot.Plan] | None = None
        if bytes_since >= DELTA_BYTES and changes:
            with self.lock:
                self.seq += 1
                seq = self.seq
            plan, data_len = plan_of(changes, spans, 0)
            name = layout.overlay_name(self.cache, seq)
            try:
                write_segment(name, plan, at[0], at[1], changes, None, self.segs.mode,
                              self.segs.group)
                first = (seq, plan)
                self.segs.track(name)
            except Exception as exc:  # the snapshot goes out without one
                _shm.unlink(name)
                log.warning("delta segment build at revision %d failed: %s", at[0], exc)
        with self.lock:
            if first is None:
                publish(dict(NO_DELTA))
            else:
                publish({layout.B_OVL_SEQ: first[0], layout.B_OVL_REVISION: at[0],
                         layout.B_OVL_SIZE: first[1].total, layout.B_OVL_RING_POS: at[2]})
            old, self.published = self.published, first[0] if first else 0
            self.snap_seq = snap_seq
            self.failed = None  # its changes are in the snapshot
            self._retire_base()
            self.spans, self.data_len = {}, 0
            self.changes, self.bytes_since = changes, bytes_since
            if first is not None:
                sseg = _shm.open_readonly(layout.overlay_name(self.cache, first[0]))
                if sseg is not None:
                    self.base = (sseg, snapshot.Snapshot(sseg.name, sseg.buf, sseg.size,
                                                         layout.KIND_OVERLAY))
                    self.spans, self.data_len = spans, data_len
                    self.changes, self.bytes_since = {}, 0
        if old:
            _shm.unlink(layout.overlay_name(self.cache, old))
        self.maybe_build(*at)

    def appended(self, size: int) -> None:
        """``size`` bytes of records were appended (the cadence counts them)."""
        self.bytes_since += size

    def maybe_build(self, revision: int, epoch: int, ring_head: int) -> None:
        """Start a build once ``DELTA_BYTES`` of records came since the last one; call
        after the head is published (the build is exact at ``revision``). A build that
        failed is retried: its changes come back first."""
        if self.failed is not None:
            with self.lock:
                f, self.failed = self.failed, None
            if f is not None:
                f.changes.update(self.changes)  # (later changes win)
                self.changes, self.bytes_since = f.changes, self.bytes_since + f.bytes_since
        if self.bytes_since < DELTA_BYTES or not self.changes:
            return
        with self.lock:
            if self.build is not None or self.snap_seq < 0:
                return
            self.seq += 1  # numbers are never reused, even by a build thrown away
            plan, self.data_len = plan_of(self.changes, self.spans, self.data_len)
            b = self.build = DeltaBuild(self, self.seq, (revision, epoch, ring_head), plan,
                                          self.changes, self.bytes_since)
            self.changes, self.bytes_since = {}, 0
        threading.Thread(target=b.run, name="shmcache-delta", daemon=True).start()

    def close(self) -> None:
        with self.lock:
            self.snap_seq = -1  # a running build throws its result away
            b = self.build
        if b is not None:
            b.done.wait()
        with self.lock:
            self._retire_base()
            self._close_retired()

    # -- the build thread ----------------------------------------------------------------

    def finish(self, b: DeltaBuild, error: BaseException | None, seconds: float) -> None:
        """Publish build ``b`` if its snapshot is still the live one; else throw it away."""
        old = 0
        with self.lock:
            self.build = None
            if error is not None or b.snap_seq != self.snap_seq:
                _shm.unlink(b.name)  # (made or half made; nothing if creating it failed)
                if error is not None and b.snap_seq == self.snap_seq:
                    # Readers decode the records after the last one published meanwhile.
                    log.warning("delta segment build at revision %d failed: %s; retrying",
                                b.revision, error)
                    self.failed = b
                self._close_retired()
                return
            sseg = _shm.open_readonly(b.name)
            if sseg is None:  # removed by hand: publish nothing, start over
                self.spans, self.data_len = {}, 0
                self._retire_base()
            else:
                self.ctl.publish({layout.B_OVL_SEQ: b.seq, layout.B_OVL_REVISION: b.revision,
                                  layout.B_OVL_SIZE: b.plan.total,
                                  layout.B_OVL_RING_POS: b.ring_pos}, wake=False)
                self.segs.track(b.name)
                old, self.published = self.published, b.seq
                self._retire_base()
                self.base = (sseg, snapshot.Snapshot(sseg.name, sseg.buf, sseg.size,
                                                     layout.KIND_OVERLAY))
                self.stats["overlays"] = self.stats.get("overlays", 0) + 1
            self._close_retired()
        if old:
            _shm.unlink(layout.overlay_name(self.cache, old))  # readers keep their maps
        log.debug("delta segment %d published: revision %d, %d keys, %d bytes, %.1f ms",
                  b.seq, b.revision, b.plan.count, b.plan.total, seconds * 1000)

    # -- internals (under the lock) -------------------------------------------------------

    def _retire_base(self) -> None:
        """Drop the base: unmapped at once, or once the running build no longer reads it."""
        if self.base is not None:
            self._retired.append(self.base)
            self.base = None
        if self.build is None:
            self._close_retired()

    def _close_retired(self) -> None:
        for seg, snap in self._retired:
            snap.close()
            seg.close()
        self._retired = []


# The block fields that say "no delta segment", published with every snapshot.
NO_DELTA: dict[int, int] = {layout.B_OVL_SEQ: 0, layout.B_OVL_REVISION: 0,
                            layout.B_OVL_SIZE: 0, layout.B_OVL_RING_POS: 0}


def publish_snapshot(delta_segments: DeltaSegments | None, ctl: ControlWriter, cache: str,
                     updates: dict[int, int], snap_seq: int,
                     changes: dict[bytes, KV5 | None], bytes_since: int,
                     at: tuple[int, int, int], **publish_kw: Any) -> None:
    """Publish a snapshot's block fields ``updates`` (NO_DELTA's zeros among them): with its
    first delta segment (``DeltaSegments.switch``: ``changes``, ``bytes_since`` and ``at``
    as it takes them), or, for a writer without delta segments (one with secondary
    indexes), as they are, unlinking the delta segment a previous writer left."""
    if delta_segments is not None:
        delta_segments.switch(lambda fields: ctl.publish({**updates, **fields}, **publish_kw),
                              snap_seq, changes, bytes_since, at)
        return
    stale = ctl.get(layout.B_OVL_SEQ)
    ctl.publish(updates, **publish_kw)
    if stale:
        _shm.unlink(layout.overlay_name(cache, stale))
