"""The writer's publishing side: state, ring appends, head publishing, snapshots, epochs, restore.

It knows nothing of etcd: it is fed plain batches, ``(revision, [event tuples])``
(see codec.EventTuple), relists ``(revision, items)`` and progress revisions,
and turns them into the cache's segments. tests/test_publisher.py drives it
with synthetic batches and checks the result with a Reader.

Concurrency contract: every method runs on the thread that runs the writer,
except ``published_revision()`` and ``set_etcd_down_since()`` (any thread) and the
snapshot builds it starts on their own threads (see snapbuild). Threads that
wait for the published revision to move (consistent reads) wait on
``revision_moved``.

The failure contract is in the Publisher docstring.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from sortedcontainers import SortedDict

from ..format import codec as _codec
from ..format import layout, ring, snapshot
from ..ipc import shm as _shm
from . import faults as _faults
from . import restore as _restore
from .delta_segments import TOMBSTONE, DeltaSegments
from .indexer import Indexer
from .segments import CacheSegments
from .snapbuild import KV, SnapshotBuild, SnapshotPublishing, freeze_gc

if TYPE_CHECKING:
    from collections.abc import Iterable

log = logging.getLogger("shmcache.writer")



class Publisher(SnapshotPublishing):
    """The state of one cache and the segments it is published in.

    Failure contract (docs/design.md, "Publishing is a transaction"): any method
    that writes shared memory or creates a segment (``apply``, ``publish_head``,
    ``progress``, ``reset``, ``switch_ring``, ``maybe_snapshot``, ``restore``) may
    raise: OSError (ENOSPC: /dev/shm is full) or anything unexpected. When it does,
    readers see the last state published before the failure, nothing half made is
    visible or left in /dev/shm, and the publisher's own state is consistent:

    - ``revision``: every batch at or below it is appended to the ring and applied
      to the state, none above it is touched. ``apply`` works in whole revisions:
      after it raises, call it again with the batches above ``revision``. Before
      raising it publishes what it appended (if that publish fails too, the next
      successful ``apply``/``publish_head``/``progress`` publishes it);
      ``published_revision()`` is what readers see. Never call ``progress`` with a
      revision whose events were not applied.
    - ``reset`` raising leaves the previous epoch (state, revision, segments)
      as it was: relist again later. ``restore`` raising leaves nothing adopted:
      call it again, or relist (a ring resize it cannot do after resuming is
      logged and retried by ``maybe_snapshot``, which raises its error).
      ``switch_ring`` (called by ``apply`` when a revision does not fit the ring)
      raising leaves readers on the old ring; the next ``apply`` of that revision
      tries again.
    - ``maybe_snapshot`` raises the error of a snapshot build that failed; the
      build is dropped (its changes kept) and the next call retries when the
      cadence says so. Delta segment builds that fail are retried at the next
      call. A failed build of either kind unlinks what it made.

    Each step has a fault point (faults.py), and tests/test_publish_faults.py fails
    each one with ENOSPC and with an unexpected error.
    """

    def __init__(self, segs: CacheSegments, *, ring_size: int, snapshot_interval: float,
                 snapshot_bytes: int, stats: dict[str, Any],
                 indexer: Indexer | None = None) -> None:
        self.segs = segs
        self.indexer = indexer  # None: the cache has no secondary indexes
        self.name = segs.name
        self.prefix = segs.prefix
        self.ring_size = ring_size
        self.snapshot_interval = snapshot_interval
        self.snapshot_bytes = snapshot_bytes
        self.stats = stats
        self.ring: ring.RingWriter | None = None
        self._ring_seg: _shm.Segment | None = None
        self.kv: SortedDict = SortedDict()
        # Snapshots are built from the live one (the base, mapped read-only) plus
        # the changes since it (the delta), in a thread, so the watch loop keeps
        # publishing while a large snapshot is written (see SnapshotBuild).
        self.delta: dict[bytes, KV | None] = {}
        self.data_len = 0  # bytes self.kv takes in a snapshot's data area
        self.base: tuple[_shm.Segment, snapshot.Snapshot] | None = None
        self._build: SnapshotBuild | None = None
        self.revision = 0
        self.epoch = 0
        self.etcd_revision = 0  # the newest revision seen from etcd (saw_etcd_revision)
        self.snap_seq = 0
        self.snap_ring_pos = 0
        self.bytes_since_snapshot = 0
        self.last_snapshot = 0.0
        self._head_unpublished = False
        self._resize_to: int | None = None  # a ring size restore() could not switch to
        self.revision_moved = threading.Condition()
        # Delta segments (not with secondary indexes: readers build the recent changes'
        # index from ring records); made by attach().
        self.delta_segments: DeltaSegments | None = None

    # -- starting ------------------------------------------------------------------

    def attach(self) -> bool:
        """Take the cache (CacheSegments.attach) and apply mode and group; True if it existed."""
        existed = self.segs.attach()
        # Continue the numbering: a fresh snapshot must never reuse the name the
        # control segment (and attached readers) still point at.
        self.snap_seq = self.ctl.get(layout.B_SNAP_SEQ)
        self.segs.apply_permissions()
        if self.indexer is None:
            self.delta_segments = DeltaSegments(self.segs, self.stats)
        return existed

    def restore(self) -> str | None:
        """Resume from the segments a previous writer left; None if it did, else why not
        (see restore.resume). Then switch to a ring of ``ring_size`` if it has another
        size; if that fails, ``maybe_snapshot`` tries again."""
        got = _restore.resume(self.name, self.prefix, self.segs, self.ctl, self.delta_segments)
        if isinstance(got, str):
            return got
        self._take_over(got)
        if self.ring is not None and self.ring.capacity != self.ring_size:
            try:
                self._resize(self.ring_size)
            except Exception as exc:
                log.warning("cannot switch to a ring of %d bytes now (%s); will retry",
                            self.ring_size, exc)
        return None

    def _take_over(self, got: _restore.Restored) -> None:
        """Continue from what ``restore.resume`` loaded (its delta segment is published)."""
        b = got.block
        self._ring_seg = got.ring_seg
        self.ring = ring.RingWriter(got.ring_seg.buf, b.ring_capacity, b.ring_gen)
        self.ring.restore(b.ring_head, got.tail)
        self.segs.track(got.ring_seg.name)
        self.kv = got.kv
        self.delta = got.delta
        self.data_len = sum(snapshot.entry_span(k, v[0]) for k, v in got.kv.items())
        self.base = got.base
        if self.indexer is not None:
            self.indexer.reset(got.kv.items())
        freeze_gc()
        self.revision = b.revision
        self.epoch = b.epoch
        self.snap_seq = b.snap_seq
        self.snap_ring_pos = b.snap_ring_pos
        self.last_snapshot = time.monotonic()
        log.info("resumed cache %r at revision %d (epoch %d, %d keys)", self.name,
                 self.revision, self.epoch, len(got.kv))
        self.ctl.publish({})  # wake readers: the writer is back

    # -- rings and epochs ----------------------------------------------------------

    def _new_ring(self, capacity: int) -> tuple[_shm.Segment, ring.RingWriter]:
        """Create (not publish) the next ring generation."""
        return self.segs.create_ring(self.ctl.get(layout.B_RING_GEN) + 1, capacity)

    def switch_ring(self, capacity: int, reason: str) -> None:
        """Continue in a new ring generation of ``capacity`` bytes, in the same epoch.

        The old ring is sealed at its head (ring.RingWriter.seal): watches that
        still read it finish it and continue in the new one, so no watch loses
        an event. The new ring's history begins at the current revision: a
        snapshot of the current state is published with it. If the new ring or
        its snapshot cannot be made, nothing is published, the new segment is
        unlinked, the seal withdrawn, and the writer goes on with the old ring.
        """
        assert self.ring is not None and self._ring_seg is not None
        if self._build is not None:
            self._finish_build(self._build, wait=True)  # it points into the old ring
        old, old_seg = self.ring, self._ring_seg
        seg, self.ring = self._new_ring(capacity)
        self._ring_seg = seg
        old.seal(self.revision)  # read only once the control segment points past it
        try:
            self._publish_snapshot({
                layout.B_RING_TAIL: 0, layout.B_RING_GEN: self.ring.generation,
                layout.B_RING_CAPACITY: capacity, layout.B_COMPACT_REVISION: self.revision})
        except BaseException:
            old.unseal()
            self.ring, self._ring_seg = old, old_seg
            seg.close()
            _shm.unlink(seg.name)
            raise
        old_seg.close()
        _shm.unlink(old_seg.name)
        log.info("ring log replaced at revision %d: generation %d -> %d, %d -> %d bytes; "
                 "watches continue into it (%s)", self.revision, old.generation,
                 self.ring.generation, old.capacity, capacity, reason)

    def saw_etcd_revision(self, revision: int) -> None:
        """etcd answered at ``revision`` (the feed tells; published with the next block)."""
        self.etcd_revision = max(self.etcd_revision, revision)

    def reset(self, revision: int, items: Iterable[tuple[bytes, KV]], reason: str) -> None:
        """Start a new epoch at ``revision`` holding ``items`` (a relist): fresh snapshot,
        empty ring history. If it raises, the previous epoch goes on as it was."""
        self.saw_etcd_revision(revision)
        first_ring = self.ring is None
        if first_ring:
            self._ring_seg, self.ring = self._new_ring(self.ring_size)  # published below
        assert self.ring is not None and self._ring_seg is not None
        self._drop_build()  # of the old epoch: never to be published
        self._close_base()
        before = self.kv, self.revision, self.epoch
        self.kv = SortedDict(items)  # (its size is counted by the whole-state build below)
        if self.indexer is not None:
            self.indexer.reset(self.kv.items())
        freeze_gc()
        self.revision = revision
        self.epoch = self.ctl.get(layout.B_EPOCH) + 1
        head = self.ring.head
        try:
            self._publish_snapshot({
                layout.B_SYNC_REVISION: min(self.ctl.get(layout.B_SYNC_REVISION), revision),
                layout.B_EPOCH: self.epoch, layout.B_REVISION: revision,
                layout.B_COMPACT_REVISION: revision,
                layout.B_RING_HEAD: head, layout.B_RING_TAIL: head,
                layout.B_RING_GEN: self.ring.generation,
                layout.B_RING_CAPACITY: self.ring.capacity,
                layout.B_ETCD_REVISION: max(self.etcd_revision, revision)},
                prefix=self.prefix, fault="epoch")
        except BaseException:
            self.kv, self.revision, self.epoch = before
            if self.indexer is not None:
                self.indexer.reset(self.kv.items())
            if first_ring:  # never published: not left behind
                self._ring_seg.close()
                _shm.unlink(self._ring_seg.name)
                self._ring_seg = self.ring = None
            raise
        self.ring.forget_history()
        self._head_unpublished = False
        self.stats["relists"] += 1
        old_gen = self.ring.generation - 1
        if old_gen > 0:
            _shm.unlink(layout.ring_name(self.name, old_gen))
        log.info("history reset to epoch %d at revision %d: %s", self.epoch, revision, reason)

    # -- snapshots -------------------------------------------------------------------

    def maybe_snapshot(self) -> None:
        """Publish a finished background build (raising its error if it failed: the next
        call retries); start one when the cadence says so. Then the same for the delta
        segment (and a ring resize a restore could not do)."""
        if self._resize_to is not None and self.ring is not None:
            size, self._resize_to = self._resize_to, None
            self._resize(size)
        self._maybe_snapshot()
        if self.delta_segments is not None and self.ring is not None and not self._head_unpublished:
            self.delta_segments.maybe_build(self.revision, self.epoch, self.ring.head)

    def _resize(self, size: int) -> None:
        """Switch to a ring of the configured size; on failure, again at the next call."""
        try:
            self.switch_ring(size, f"the ring size setting is {size} bytes")
        except BaseException:
            self._resize_to = size
            raise

    # -- applying events -------------------------------------------------------------

    def apply(self, batches: Iterable[tuple[int, list[_codec.EventTuple]]]) -> None:
        """Append one ring record per revision, apply it to the state, then publish the head.

        Revisions must be increasing and above ``revision`` (the feed checks).
        A missing prev_kv (etcd leaves it out when it can no longer read the
        revision before the event, compacted while the watch caught up) is
        filled from the state, which holds that value exactly; past-revision
        reads depend on it. On failure (see the class docstring) the revisions
        appended before it are published and ``revision`` is the last of them.
        """
        try:
            for revision, batch in batches:
                self._flush(revision, batch)
        except Exception:
            try:
                self.publish_head()
            except Exception as exc:  # the next publish carries them
                log.debug("publishing the head after a failed append failed too: %s", exc)
            raise
        self.publish_head()

    def _flush(self, revision: int, batch: list[_codec.EventTuple]) -> None:
        # Appended before it is applied: appending may first publish a snapshot,
        # which must hold exactly the state at the previous revision. Nothing below
        # _append raises, so a revision is either appended and applied or neither.
        if _faults.FAULTS and not (batch := _faults.drop_event(batch)):
            return
        kv, indexer = self.kv, self.indexer
        for i, ev in enumerate(batch):
            if ev[7] is None:
                old = kv.get(ev[1])
                if old is not None:
                    batch[i] = ev = (*ev[:7], (ev[1], *old))
            if indexer is not None:  # index values go into the record beside the event
                batch[i] = (*ev[:8],
                            (indexer.values(ev[1], ev[2]) or None) if ev[0] == 0 else None,
                            indexer.current(ev[1]))
        self._append(revision, _codec.encode(batch), len(batch))
        delta = self.delta
        # (the changes since the last delta segment build: its next build's input)
        next_delta = (self.delta_segments.changes if self.delta_segments is not None
                      else {})
        span = snapshot.entry_span
        for typ, key, value, create, mod, version, lease, _prev, *ix in batch:
            if indexer is not None:
                indexer.commit(key, ix[0])
            old = kv.get(key)
            if old is not None:
                self.data_len -= span(key, old[0])
            if typ == 0:
                kv[key] = delta[key] = next_delta[key] = (value, create, mod, version, lease)
                self.data_len += span(key, value)
            elif old is not None:
                del kv[key]
                delta[key] = None
                next_delta[key] = TOMBSTONE
        self.revision = revision

    def _append(self, revision: int, payload: bytes, n_events: int) -> None:
        """Write one record; publish first what it needs (a snapshot, the tail). Readers
        see it with the next head publish. Each step either happens whole or not."""
        assert self.ring is not None
        ring_writer = self.ring
        if not ring_writer.fits(len(payload)):
            cap = self.ring_size
            while ring_writer.record_size(len(payload)) > cap // 4:
                cap *= 2
            # The record cannot go into this ring: continue in a larger one. Watches
            # read on through the seal, so they see no gap and no CompactedError.
            self.switch_ring(cap, f"a {len(payload)}-byte revision needs a {cap}-byte ring")
            ring_writer = self.ring
        # A plan: nothing is dropped until the tail is published.
        placement = ring_writer.place(len(payload))
        if placement.end - ring_writer.capacity > self.snap_ring_pos:
            if self._build is not None:
                self._finish_build(self._build, wait=True)
            if placement.end - ring_writer.capacity > self.snap_ring_pos:
                # Writing would overwrite events newer than the live snapshot, and then
                # readers could not rebuild the current state: republish first.
                self._publish_snapshot()
        faults = _faults.FAULTS
        if placement.evict:
            updates = {layout.B_RING_TAIL: placement.new_tail}
            if placement.compact_revision is not None:
                updates[layout.B_COMPACT_REVISION] = placement.compact_revision
            if faults:
                _faults.point("tail")
            # The tail moves before the bytes are overwritten: a reader that re-reads
            # it after copying knows whether its copy can be torn.
            self.ctl.publish(updates, wake=False)
            ring_writer.drop(placement)
        ring_writer.write(placement, revision, payload,
                          (lambda: _faults.point("append")) if faults else None)
        self.bytes_since_snapshot += len(payload)
        if self.delta_segments is not None:
            self.delta_segments.appended(len(payload))
        stats = self.stats
        stats["events"] += n_events
        stats["records"] += 1
        stats["bytes"] += len(payload)
        self._head_unpublished = True

    def publish_head(self) -> None:
        """Make every appended record visible and wake the readers: once per watch response.

        A response that catches up a backlog carries many revisions; publishing
        them together costs one seqlock write and one FUTEX_WAKE instead of one per
        record, and readers still see whole revisions only.
        """
        if not self._head_unpublished:
            return
        assert self.ring is not None
        if _faults.FAULTS:
            _faults.point("head")
        self.ctl.publish({layout.B_RING_HEAD: self.ring.head, layout.B_REVISION: self.revision,
                          layout.B_KEY_COUNT: len(self.kv),
                          layout.B_ETCD_REVISION: max(self.etcd_revision, self.revision)})
        self._head_unpublished = False
        with self.revision_moved:
            self.revision_moved.notify_all()

    def progress(self, revision: int) -> None:
        """Publish that the state is exact at ``revision`` (confirmed by the feed), no record;
        with the head of records not published yet, if any."""
        if revision <= self.revision:
            return
        updates = {layout.B_REVISION: revision,
                   layout.B_ETCD_REVISION: max(self.etcd_revision, revision)}
        if self._head_unpublished:
            assert self.ring is not None
            updates.update({layout.B_RING_HEAD: self.ring.head, layout.B_KEY_COUNT: len(self.kv)})
        _faults.point("progress")
        self.ctl.publish(updates)
        self.revision = revision
        self._head_unpublished = False
        with self.revision_moved:
            self.revision_moved.notify_all()

    # -- any thread ------------------------------------------------------------------

    def published_revision(self) -> int:
        """What readers see (``revision`` runs ahead of it while a response is appended)."""
        return self.ctl.get(layout.B_REVISION)

    def set_etcd_down_since(self, unix_time: float | None) -> None:
        if self.segs.ctl is not None:
            self.ctl.set_etcd_down_since(int(unix_time * 1e9) if unix_time is not None else 0)

    # -- stopping ---------------------------------------------------------------------

    def close(self, *, removed_under_us: bool, remove: bool) -> None:
        """Drop the unpublished build, unmap, release the cache.

        ``removed_under_us``: the control segment was unlinked while this writer
        ran; only the segments it created since are unlinked. ``remove``: unlink
        every segment of the cache (``remove_on_close``).
        """
        self._drop_build()  # unpublished: of no use to the next writer
        self._close_base()
        if self.delta_segments is not None:
            self.delta_segments.close()
        if removed_under_us:
            self.segs.unlink_own()
        if self._ring_seg is not None:
            self._ring_seg.close()
        self.segs.close(remove=remove and not removed_under_us)
