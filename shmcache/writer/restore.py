"""Resuming a cache from the segments a previous writer left (docs/design.md,
"Writer restart without relist").

``load`` validates everything a reader can reach before the writer trusts it:
the block, the prefix, the ring header, every record in [tail, head) (with the
same ring.iter_records the readers use) and the snapshot, and rebuilds the
state from the snapshot plus the records after it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sortedcontainers import SortedDict

from ..errors import CorruptSegmentError
from ..format import codec as _codec
from ..format import control, layout, ring, snapshot
from ..ipc import shm as _shm
from . import faults as _faults
from .delta_segments import DELTA_BYTES, NO_DELTA, publish_snapshot
from .snapbuild import KV

if TYPE_CHECKING:
    from .control_writer import ControlWriter
    from .delta_segments import DeltaSegments
    from .segments import CacheSegments

log = logging.getLogger("shmcache.writer")




@dataclass
class Restored:
    """What a resumed writer continues from."""

    block: control.Block
    ring_seg: _shm.Segment
    base: tuple[_shm.Segment, snapshot.Snapshot]
    kv: SortedDict
    delta: dict[bytes, KV | None]
    tail: int  # the ring tail to continue with: above the block's if history was damaged
    compact: int  # the oldest watchable revision that goes with that tail

    def close(self) -> None:
        """Unmap what was loaded (a restore that did not go through)."""
        self.base[1].close()
        self.base[0].close()
        self.ring_seg.close()


def load(name: str, prefix: bytes, ctl_seg: _shm.Segment, index_defs: bytes) -> Restored | str:
    """The state the segments hold, or the reason they cannot be resumed.

    Every record a reader can reach, [tail, head), is validated first (stamp,
    CRC, revision order): the ones after the snapshot rebuild the state, so a
    bad one there means a relist; a bad one before the snapshot only costs
    history, so the tail moves up to the snapshot (watches from before it get
    CompactedError, as after any lap).
    """
    buf = ctl_seg.buf
    try:
        b = control.read_block(buf, spins=10, name=ctl_seg.name)
    except CorruptSegmentError as exc:  # (REVISION raised by hand fails it: never resumed past)
        return str(exc)
    if b is None:
        return "the control block was left mid-publish"
    if b.snap_seq == 0:
        return "no snapshot was published"
    opened: list[_shm.Segment | snapshot.Snapshot] = []  # closed unless all goes well
    try:
        control.validate_block(b, ctl_seg.name)
        served = control.read_prefix(buf, b.prefix_len)
        if served != prefix:
            return (f"the cache was serving prefix {_codec.key_text(served)!r}, "
                    f"not {_codec.key_text(prefix)!r}")
        if control.read_index_defs(buf, b.index_defs_len) != index_defs:
            return "the index definitions changed (the indexes are rebuilt in a new epoch)"
        rname = layout.ring_name(name, b.ring_gen)
        got = _shm.open_writable(rname)
        if got is None:
            return f"ring segment {rname} is missing"
        rseg, rfd = got
        os.close(rfd)
        opened.append(rseg)
        ring.check_ring_header(rseg.buf, rseg.size, rseg.name, b.ring_gen, b.ring_capacity)
        sname = layout.snapshot_name(name, b.snap_seq)
        sseg = _shm.open_readonly(sname)
        if sseg is None:
            return f"snapshot segment {sname} is missing"
        opened.append(sseg)
        snap = snapshot.Snapshot(sseg.name, sseg.buf, sseg.size)
        opened.append(snap)
        kv, delta, tail, compact = _rebuild(b, rseg, snap)
        restored = Restored(b, rseg, (sseg, snap), kv, delta, tail, compact)
        opened = []
        return restored
    except (CorruptSegmentError, ring.Lapped, ring.TornRecord, OSError, ValueError) as exc:
        return str(exc) or type(exc).__name__
    finally:
        for obj in reversed(opened):
            obj.close()


def _rebuild(b: control.Block, rseg: _shm.Segment, snap: snapshot.Snapshot,
             ) -> tuple[SortedDict, dict[bytes, KV | None], int, int]:
    """The state at ``b.revision`` from the snapshot and the records after it, and the
    (tail, compact revision) that leave no damaged record within readers' reach."""
    if snap.revision != b.snap_revision or snap.epoch != b.epoch:
        raise CorruptSegmentError(f"snapshot is at revision {snap.revision} epoch "
                                  f"{snap.epoch}, the control segment says "
                                  f"{b.snap_revision} epoch {b.epoch}")
    kv: SortedDict = SortedDict()
    delta: dict[bytes, KV | None] = {}
    tail, compact = b.ring_tail, b.compact_revision
    cap = b.ring_capacity
    for e in snap.range(b"", None):
        kv[e.key] = (e.value, e.create_revision, e.mod_revision, e.version, e.lease)
    try:
        for _rec in ring.iter_records(rseg.buf, cap, b.ring_tail, b.snap_ring_pos,
                                      lambda: b.ring_tail, max_revision=b.snap_revision,
                                      name=rseg.name):
            pass
    except CorruptSegmentError as exc:
        log.warning("ring history before the snapshot is damaged (%s); dropping "
                    "the events up to revision %d", exc, b.snap_revision)
        tail, compact = b.snap_ring_pos, b.snap_revision
    for _pos, rev, _nxt, payload in ring.iter_records(
            rseg.buf, cap, b.snap_ring_pos, b.ring_head, lambda: tail,
            after_revision=b.snap_revision, max_revision=b.revision, name=rseg.name):
        for ev in _codec.decode(payload, rev, rseg.name):
            if ev.type == "PUT":
                t = (ev.kv.value, ev.kv.create_revision, ev.kv.mod_revision,
                     ev.kv.version, ev.kv.lease)
                kv[ev.kv.key] = delta[ev.kv.key] = t
            else:
                kv.pop(ev.kv.key, None)
                delta[ev.kv.key] = None
    return kv, delta, tail, compact


def resume(name: str, prefix: bytes, segs: CacheSegments, ctl: ControlWriter,
           delta_segments: DeltaSegments | None) -> Restored | str:
    """Load the segments a previous writer left, for the publisher to continue from
    (Publisher.restore takes what this returns over); else why not.

    ``load`` says what is validated. The previous writer's delta segment is
    not trusted: it is withdrawn (readers decode the records since the
    snapshot meanwhile) and a new one is built from the restored changes at
    once. That publish comes before the publisher takes anything over: if it
    raises, the publisher is as before the call and what was loaded is unmapped.
    """
    assert segs.ctl_seg is not None
    got = load(name, prefix, segs.ctl_seg, ctl.index_defs)
    if isinstance(got, str):
        return got
    b = got.block
    updates = dict(NO_DELTA)
    if got.tail != b.ring_tail:
        updates.update({layout.B_RING_TAIL: got.tail, layout.B_COMPACT_REVISION: got.compact})
    try:
        _faults.point("restore")
        publish_snapshot(delta_segments, ctl, name, updates, b.snap_seq, got.delta,
                         DELTA_BYTES, (b.revision, b.epoch, b.ring_head), wake=False)
    except BaseException:
        got.close()
        raise
    return got
