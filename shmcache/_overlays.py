"""The writer's overlay segments: every key changed after the live snapshot, republished often.

Without them a Reader that attaches decodes every ring record since the
snapshot into a private overlay: up to ``snapshot_bytes`` (16 MiB by default)
of records, hundreds of milliseconds and tens of MB per process right after a
burst of writes. With them the writer publishes, each time
``OVERLAY_BYTES`` of records have accumulated, a segment in the snapshot's
layout (kind KIND_OVERLAY) holding the current KeyValue of every key changed
since the snapshot, deletions as entries of version 0; a Reader maps it in
place and decodes only the records after it (docs/design.md, "Overlay
segments").

A new overlay segment is the previous one merged with the changes since it
(``snapshot.write`` with the previous one as its base: entries are copied as
they are, in C without the GIL), built in a thread beside the watch loop, and
published by that thread as soon as it is done, if the snapshot it belongs to
is still the live one: so a fresh Reader benefits at once, even when no more
events come to wake the watch loop. A snapshot publish resets the set (the
control block's overlay fields go to 0 in the same publish).

Concurrency contract: ``lock`` orders the two publishers of overlay fields: a
build thread publishes its segment under it, and the watch thread publishes a
snapshot (with the overlay fields at 0) under it (``switch``), so no reader sees
a snapshot paired with an overlay segment of another. ``changes`` and
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

from . import _shm, layout, snapshot

if TYPE_CHECKING:
    from ._segments import CacheSegments

log = logging.getLogger("shmcache.writer")

KV5 = tuple[bytes, int, int, int, int]  # value, create_revision, mod_revision, version, lease
# A deleted key in an overlay segment: etcd never reports a live key with version 0.
TOMBSTONE: KV5 = (b"", 0, 0, 0, 0)
# Records (payload bytes) published after the overlay segment before the next one
# is built: what an attaching Reader decodes at most, beside the builds' cost.
OVERLAY_BYTES = 128 << 10


class OverlayBuild:
    """One overlay segment in the making: the previous one plus ``changes``; made under
    ``Overlays.lock`` on the watch thread, run in its own thread."""

    def __init__(self, ov: Overlays, revision: int, epoch: int, ring_pos: int) -> None:
        self.ov = ov
        self.seq = ov.seq + 1
        ov.seq = self.seq  # numbers are never reused, even by a build thrown away
        self.name = layout.overlay_name(ov.cache, self.seq)
        self.mode, self.group = ov.segs.mode, ov.segs.group
        self.revision, self.epoch, self.ring_pos = revision, epoch, ring_pos
        self.snap_seq = ov.snap_seq
        self.changes = ov.changes
        self.base = ov.base
        # The result's size: every key changed since the snapshot, with its span.
        spans, data_len = ov.spans, ov.data_len
        for key, kv in self.changes.items():
            new = snapshot.entry_span(key, kv[0])
            data_len += new - spans.get(key, 0)
            spans[key] = new
        ov.data_len = data_len
        self.plan = snapshot.Plan.of(len(spans), data_len)
        self.done = threading.Event()

    def run(self) -> None:
        t0 = time.monotonic()
        error: BaseException | None = None
        created = False
        try:
            _shm.unlink(self.name)
            seg = _shm.create(self.name, self.plan.total, self.mode, self.group)
            created = True
            try:
                keys = sorted(self.changes)
                values: list[KV5 | None] = [self.changes[k] for k in keys]
                snapshot.write(seg.buf, self.plan, self.revision, self.epoch, keys, values,
                               self.base[1] if self.base is not None else None,
                               kind=layout.KIND_OVERLAY)
            finally:
                seg.close()
        except Exception as exc:
            error = exc
        try:
            self.ov.finish(self, error, time.monotonic() - t0, created)
        finally:
            self.done.set()


class Overlays:
    """The overlay segments of one cache (see the module docstring)."""

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
        self.build: OverlayBuild | None = None
        self._retired: list[tuple[_shm.Segment, snapshot.Snapshot]] = []

    # -- the watch thread ---------------------------------------------------------------

    def switch(self, publish: Callable[[], None], snap_seq: int,
               since_snapshot: dict[bytes, KV5 | None], bytes_since: int,
               at: tuple[int, int, int]) -> None:
        """Run ``publish`` (a snapshot publish that sets the overlay fields to 0) and start
        over from snapshot ``snap_seq``, whose changes since are ``since_snapshot``.

        A build still running belongs to the old snapshot: it throws its result away.
        The first segment of the new snapshot is started at once, at ``at`` (revision,
        epoch, ring head: what ``publish`` publishes), rather than at the next watch
        response: a large snapshot takes seconds to build, and the changes meanwhile
        would otherwise be decoded by every Reader that attaches until then.
        """
        with self.lock:
            publish()
            old, self.published = self.published, 0
            self.snap_seq = snap_seq
            self._retire_base()
            self.changes = {k: (v if v is not None else TOMBSTONE)
                            for k, v in since_snapshot.items()}
            self.spans, self.data_len = {}, 0
            self.bytes_since = bytes_since
        if old:
            _shm.unlink(layout.overlay_name(self.cache, old))
        self.maybe_build(*at)

    def maybe_build(self, revision: int, epoch: int, ring_head: int) -> None:
        """Start a build once ``OVERLAY_BYTES`` of records came since the last one; call
        after the head is published (the build is exact at ``revision``)."""
        if self.bytes_since < OVERLAY_BYTES or not self.changes:
            return
        with self.lock:
            if self.build is not None or self.snap_seq < 0:
                return
            b = self.build = OverlayBuild(self, revision, epoch, ring_head)
            self.changes, self.bytes_since = {}, 0
        threading.Thread(target=b.run, name="shmcache-overlay", daemon=True).start()

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

    def finish(self, b: OverlayBuild, error: BaseException | None, seconds: float,
               created: bool) -> None:
        """Publish build ``b`` if its snapshot is still the live one; else throw it away."""
        old = 0
        with self.lock:
            self.build = None
            if error is not None or b.snap_seq != self.snap_seq:
                if created:
                    _shm.unlink(b.name)
                if error is not None and b.snap_seq == self.snap_seq:
                    # Its changes are gone from ``changes``: none until the next snapshot
                    # (readers decode the records after the last one published).
                    log.warning("overlay segment build at revision %d failed: %s; none "
                                "until the next snapshot", b.revision, error)
                    self.snap_seq = -1
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
        log.debug("overlay segment %d published: revision %d, %d keys, %d bytes, %.1f ms",
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


# The block fields that say "no overlay segment", published with every snapshot.
NONE: dict[int, int] = {layout.B_OVL_SEQ: 0, layout.B_OVL_REVISION: 0, layout.B_OVL_SIZE: 0,
                        layout.B_OVL_RING_POS: 0}
