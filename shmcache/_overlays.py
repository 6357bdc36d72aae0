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
published by the watch thread once done, if the snapshot it belongs to is
still the live one. A snapshot publish resets the set (the control block's
overlay fields go to 0 in the same publish).

Concurrency contract: every method runs on the writer's watch thread; a build
touches only its frozen inputs and its own new segment.
"""

from __future__ import annotations

import logging
import threading
import time
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
    """One overlay segment in the making: the previous one plus ``changes``."""

    def __init__(self, ov: Overlays, revision: int, epoch: int, ring_pos: int) -> None:
        self.seq = ov.seq + 1
        self.name = layout.overlay_name(ov.cache, self.seq)
        self.mode, self.group = ov.segs.mode, ov.segs.group
        self.revision, self.epoch, self.ring_pos = revision, epoch, ring_pos
        self.snap_seq = ov.snap_seq
        self.changes = ov.changes
        self.base = ov.base[1] if ov.base is not None else None
        # The result's size: every key changed since the snapshot, with its span.
        spans, data_len = ov.spans, ov.data_len
        for key, kv in self.changes.items():
            new = snapshot.entry_span(key, kv[0])
            data_len += new - spans.get(key, 0)
            spans[key] = new
        ov.data_len = data_len
        self.plan = snapshot.Plan.of(len(spans), data_len)
        self.seg: _shm.Segment | None = None
        self.error: BaseException | None = None
        self.seconds = 0.0
        self.done = threading.Event()

    def run(self) -> None:
        t0 = time.monotonic()
        try:
            _shm.unlink(self.name)
            self.seg = _shm.create(self.name, self.plan.total, self.mode, self.group)
            keys = sorted(self.changes)
            values: list[KV5 | None] = [self.changes[k] for k in keys]
            snapshot.write(self.seg.buf, self.plan, self.revision, self.epoch, keys, values,
                           self.base, kind=layout.KIND_OVERLAY)
        except Exception as exc:  # reported by the watch thread (Overlays.maybe_publish)
            self.error = exc
        finally:
            if self.seg is not None:
                self.seg.close()
            self.seconds = time.monotonic() - t0
            self.done.set()


class Overlays:
    """The overlay segments of one cache (see the module docstring)."""

    def __init__(self, segs: CacheSegments, stats: dict[str, Any]) -> None:
        self.segs = segs
        self.cache = segs.name
        self.stats = stats
        assert segs.ctl is not None
        self.ctl = segs.ctl
        self.seq = self.ctl.get(layout.B_OVL_SEQ)  # numbering continues across writers
        self.published = self.seq if self.ctl.get(layout.B_OVL_SEQ) else 0
        self.snap_seq = 0  # the snapshot the changes below are relative to
        # The keys changed since the last build started (or the snapshot), and the
        # span of every key changed since the snapshot as the next segment holds it.
        self.changes: dict[bytes, KV5] = {}
        self.spans: dict[bytes, int] = {}
        self.data_len = 0
        self.bytes_since = 0
        self.base: tuple[_shm.Segment, snapshot.Snapshot] | None = None
        self.build: OverlayBuild | None = None
        self._pending_unlink = 0

    # -- the watch thread's hooks -------------------------------------------------------

    def restart(self, snap_seq: int, since_snapshot: dict[bytes, KV5 | None],
                bytes_since: int) -> None:
        """The live snapshot is now ``snap_seq``; ``since_snapshot`` the changes after it.

        Call right after publishing a snapshot (whose publish zeroed the overlay
        fields) or after resuming: the next segment is built from these alone.
        """
        self._drop_build()
        self._unmap_base()
        if self.published and self.ctl.get(layout.B_OVL_SEQ) != self.published:
            _shm.unlink(layout.overlay_name(self.cache, self.published))
            self.published = 0
        self.snap_seq = snap_seq
        self.changes = {k: (v if v is not None else TOMBSTONE) for k, v in since_snapshot.items()}
        self.spans, self.data_len = {}, 0
        self.bytes_since = bytes_since

    def maybe_publish(self, revision: int, epoch: int, ring_head: int) -> dict[int, int] | None:
        """Finish a done build (its block fields, to publish) or start one when due."""
        b = self.build
        if b is not None:
            if not b.done.is_set():
                return None
            self.build = None
            if b.error is not None or b.snap_seq != self.snap_seq:
                self._discard(b)
                if b.error is not None and b.snap_seq == self.snap_seq:
                    # Its changes would be lost from the next build: none until the next
                    # snapshot (readers read the records after the last one published).
                    log.warning("overlay segment build at revision %d failed: %s; none "
                                "until the next snapshot", b.revision, b.error)
                    self.snap_seq = -1
                return None
            return self._published(b)
        if self.bytes_since >= OVERLAY_BYTES and self.changes and self.snap_seq >= 0:
            self.bytes_since = 0
            self.build = OverlayBuild(self, revision, epoch, ring_head)
            self.changes = {}
            threading.Thread(target=self.build.run, name="shmcache-overlay",
                             daemon=True).start()
        return None

    def _published(self, b: OverlayBuild) -> dict[int, int]:
        """Make ``b`` the base of the next build; the block fields that publish it.

        The caller publishes them (with the ring head), then calls ``after_publish``.
        """
        self._unmap_base()
        sseg = _shm.open_readonly(b.name)
        if sseg is not None:  # (None: removed by hand; the next build starts over)
            self.base = (sseg, snapshot.Snapshot(sseg.name, sseg.buf, sseg.size,
                                                 layout.KIND_OVERLAY))
        else:
            self.spans, self.data_len = {}, 0
        self.segs.track(b.name)
        self.seq = b.seq
        self.stats["overlays"] = self.stats.get("overlays", 0) + 1
        self._pending_unlink = self.published
        self.published = b.seq
        log.debug("overlay segment %d published: revision %d, %d keys, %d bytes, %.1f ms",
                  b.seq, b.revision, b.plan.count, b.plan.total, b.seconds * 1000)
        return {layout.B_OVL_SEQ: b.seq, layout.B_OVL_REVISION: b.revision,
                layout.B_OVL_SIZE: b.plan.total, layout.B_OVL_RING_POS: b.ring_pos}

    def after_publish(self) -> None:
        """Unlink the overlay segment the last publish replaced (readers keep their maps)."""
        old, self._pending_unlink = self._pending_unlink, 0
        if old:
            _shm.unlink(layout.overlay_name(self.cache, old))

    def close(self) -> None:
        self._drop_build()
        self._unmap_base()

    # -- internals ------------------------------------------------------------------------

    def _discard(self, b: OverlayBuild) -> None:
        if b.seg is not None:
            _shm.unlink(b.name)

    def _drop_build(self) -> None:
        if self.build is not None:
            self.build.done.wait()
            self._discard(self.build)
            self.build = None

    def _unmap_base(self) -> None:
        base, self.base = self.base, None
        if base is not None:
            base[1].close()
            base[0].close()


# The block fields that say "no overlay segment", published with every snapshot.
NONE: dict[int, int] = {layout.B_OVL_SEQ: 0, layout.B_OVL_REVISION: 0, layout.B_OVL_SIZE: 0,
                        layout.B_OVL_RING_POS: 0}
