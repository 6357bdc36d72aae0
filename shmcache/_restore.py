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

from sortedcontainers import SortedDict

from . import _codec, _shm, control, layout, ring, snapshot
from .errors import CorruptSegmentError

log = logging.getLogger("shmcache.writer")

KV = tuple[bytes, int, int, int, int]  # value, create_revision, mod_revision, version, lease



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


def load(name: str, prefix: bytes, ctl_seg: _shm.Segment, index_defs: bytes) -> Restored | str:
    """The state the segments hold, or the reason they cannot be resumed.

    Every record a reader can reach, [tail, head), is validated first (stamp,
    CRC, revision order): the ones after the snapshot rebuild the state, so a
    bad one there means a relist; a bad one before the snapshot only costs
    history, so the tail moves up to the snapshot (watches from before it get
    CompactedError, as after any lap).
    """
    buf = ctl_seg.buf
    b = control.read_block(buf, spins=10)
    if b is None:
        return "the control block was left mid-publish"
    if b.snap_seq == 0:
        return "no snapshot was published"
    try:
        control.validate_block(b, ctl_seg.name)
        served = control.read_prefix(buf, b.prefix_len)
        if served != prefix:
            return (f"the cache was serving prefix {_codec.key_text(served)!r}, "
                    f"not {_codec.key_text(prefix)!r}")
        if control.read_index_defs(buf, b.index_defs_len) != index_defs:
            return "the index definitions changed (the indexes are rebuilt in a new epoch)"
        rname = layout.ring_name(name, b.ring_gen)
        opened = _shm.open_writable(rname)
        if opened is None:
            return f"ring segment {rname} is missing"
        rseg, rfd = opened
        os.close(rfd)
        ring.check_ring_header(rseg.buf, rseg.size, rseg.name, b.ring_gen, b.ring_capacity)
        sname = layout.snapshot_name(name, b.snap_seq)
        sseg = _shm.open_readonly(sname)
        if sseg is None:
            return f"snapshot segment {sname} is missing"
        snap = snapshot.Snapshot(sseg.name, sseg.buf, sseg.size)
        try:
            kv, delta, tail, compact = _rebuild(b, rseg, snap)
        except BaseException:
            snap.close()
            sseg.close()
            raise
    except (CorruptSegmentError, ring.Lapped, ring.TornRecord, OSError, ValueError) as exc:
        return str(exc) or type(exc).__name__
    return Restored(b, rseg, (sseg, snap), kv, delta, tail, compact)


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
