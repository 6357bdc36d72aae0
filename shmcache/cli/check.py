"""``shmcache check``: walk every segment of a cache and check every invariant."""

from __future__ import annotations

from ..errors import CorruptSegmentError, NotFoundError, ShmCacheError
from ..format import codec as _codec
from ..format import control, layout, ring
from ..format.indexseg import IndexSegment
from ..format.snapshot import Snapshot
from ..ipc import control_reader
from ..ipc import shm as _shm
from .output import plural


def check_cache(name: str) -> tuple[list[str], list[str]]:
    """Returns ``(facts, problems)``: what was verified, and every violation found.
    NotFoundError if there is no cache ``name`` (not a violation: nothing to check).

    Runs against a live writer too: when a check finds a problem and the
    control block has moved meanwhile (a snapshot replaced, the ring lapped
    what was being read), it starts over on the new block, up to five times,
    so a writer doing its job is never reported as a violation.
    """
    _shm.validate_name(name)
    cname = layout.control_name(name)
    seg = _shm.open_readonly(cname)
    if seg is None:
        raise NotFoundError(f"no shmcache named {name!r} on this host (no segment {cname})",
                            name=name)
    try:
        for _attempt in range(5):
            try:
                control.check_header(seg.buf, seg.size, cname)
                b = control.read_block(seg.buf, name=cname)
                if b is None:
                    return [], ["the control block's seqlock stays odd (writer died "
                                "mid-publish?)"]
                control.validate_block(b, cname)
            except ShmCacheError as exc:
                return [], [str(exc)]
            facts, problems = _check_block(name, seg, b)
            if not problems or control.read_block(seg.buf, name=cname) == b:
                return facts, problems
        return facts, problems
    finally:
        seg.close()


def _check_block(name: str, seg: _shm.Segment, b: control.Block) -> tuple[list[str], list[str]]:
    facts: list[str] = [
        f"control: epoch {b.epoch}, revision {b.revision}, oldest watchable "
        f"{b.compact_revision}, ring gen {b.ring_gen} [{b.ring_tail}, {b.ring_head}) of "
        f"{b.ring_capacity}, snapshot #{b.snap_seq} at revision {b.snap_revision}, "
        f"checksum ok, etcd cluster {b.cluster_id:x}"]
    problems: list[str] = []
    _check_ring(name, seg, b, facts, problems)
    _check_snapshot(name, b, facts, problems)
    if b.ovl_seq:
        _check_snapshot(name, b, facts, problems, overlay=True)
    if b.index_defs_len:
        _check_indexes(name, seg, b, facts, problems)
    known = {layout.control_name(name), layout.ring_name(name, b.ring_gen),
             layout.snapshot_name(name, b.snap_seq), layout.index_name(name, b.snap_seq),
             layout.overlay_name(name, b.ovl_seq)}
    strays = [s for s in _shm.list_segments(name) if s not in known]
    if control_reader.writer_alive(seg.buf):
        # A live writer creates the next snapshot (or ring generation) before it
        # publishes it, and unlinks the one it replaced just after: neither is a crash.
        pid = control.writer_identity(seg.buf)[0]
        building = [s for s in strays if _generation(name, s, b) > 0]
        replaced = [s for s in strays if _generation(name, s, b) < 0]
        if building:
            facts.append(f"being built by the writer (pid {pid}), not published yet: "
                         f"{', '.join(building)}")
        if replaced:
            facts.append(f"replaced, being removed by the writer (pid {pid}): "
                         f"{', '.join(replaced)}")
        strays = [s for s in strays if s not in building and s not in replaced]
    if strays:
        facts.append(f"segments not referenced (left by a crash, removed by the next writer): "
                     f"{', '.join(strays)}")
    return facts, problems


def _generation(name: str, seg_name: str, b: control.Block) -> int:
    """+1: a snapshot or ring newer than the published one; -1: older; 0: neither."""
    for base, current in ((layout.snapshot_name(name, 0)[:-1], b.snap_seq),
                          (layout.index_name(name, 0)[:-1], b.snap_seq),
                          (layout.overlay_name(name, 0)[:-1], b.ovl_seq),
                          (layout.ring_name(name, 0)[:-1], b.ring_gen)):
        tail = seg_name[len(base):]
        if seg_name.startswith(base) and tail.isdigit():
            n = int(tail)
            return (n > current) - (n < current)
    return 0


def _check_ring(name: str, seg: _shm.Segment, b: control.Block, facts: list[str],
                problems: list[str]) -> None:
    rseg = _shm.open_readonly(layout.ring_name(name, b.ring_gen))
    if rseg is None:
        problems.append(f"ring segment generation {b.ring_gen} is missing")
        return
    try:
        ring.check_ring_header(rseg.buf, rseg.size, rseg.name, b.ring_gen, b.ring_capacity)
        n = 0
        boundaries = {b.ring_tail, b.ring_head}
        tail = control_reader.ControlReader(seg).tail  # (not closed here: seg is the caller's)
        try:
            # The one ring iterator (stamps, lengths, CRCs, revision order up to the
            # published revision), then each payload decoded in full.
            for pos, rev, nxt, payload in ring.iter_records(
                    rseg.buf, b.ring_capacity, b.ring_tail, b.ring_head, tail,
                    max_revision=b.revision, name=rseg.name):
                _codec.decode(payload, rev, rseg.name)
                if n == 0 and rev <= b.compact_revision:
                    problems.append(f"oldest record revision {rev} is not above the oldest "
                                    f"watchable revision {b.compact_revision}")
                boundaries.update((pos, nxt))
                n += 1
        except ring.Lapped:
            problems.append("the writer overwrote the ring while it was checked")
        except CorruptSegmentError as exc:
            problems.append(f"ring record: {exc}")
        else:
            if b.snap_seq and b.snap_ring_pos >= b.ring_tail and \
                    b.snap_ring_pos not in boundaries:
                problems.append(f"snapshot ring position {b.snap_ring_pos} is not a record "
                                f"boundary")
            facts.append(f"ring: {plural(n, 'record')} verified (stamps, CRCs, order, payloads)")
    except ShmCacheError as exc:
        problems.append(str(exc))
    finally:
        rseg.close()


def _check_snapshot(name: str, b: control.Block, facts: list[str], problems: list[str],
                    overlay: bool = False) -> None:
    """The snapshot segment, or (``overlay``) the overlay segment, against the block."""
    what, seq, revision, size = (("overlay segment", b.ovl_seq, b.ovl_revision, b.ovl_size)
                                 if overlay else
                                 ("snapshot", b.snap_seq, b.snap_revision, b.snap_size))
    if seq == 0:
        problems.append("no snapshot published yet")
        return
    sseg = _shm.open_readonly((layout.overlay_name if overlay else layout.snapshot_name)(
        name, seq))
    if sseg is None:
        problems.append(f"{what} #{seq} is missing")
        return
    try:
        snap = Snapshot(sseg.name, sseg.buf, sseg.size,
                        layout.KIND_OVERLAY if overlay else layout.KIND_SNAPSHOT)
        found = []
        if snap.revision != revision or snap.epoch != b.epoch or sseg.size != size:
            found.append(f"{what} says revision {snap.revision} epoch {snap.epoch} size "
                         f"{sseg.size}, control says {revision} epoch {b.epoch} size {size}")
        found.extend(snap.check())
        if found:
            problems.extend(f"{what} #{seq}: {x}" if overlay else x for x in found)
        else:  # only a segment that passed every check is reported as verified
            facts.append(f"{what}: {plural(snap.count, 'key')} verified (CRCs, order, index, hash table)")
        snap.close()
    except ShmCacheError as exc:
        problems.append(str(exc))
    finally:
        sseg.close()


def _check_indexes(name: str, seg: _shm.Segment, b: control.Block, facts: list[str],
                   problems: list[str]) -> None:
    """The index segment of the published snapshot: it matches the snapshot and the
    definitions, passes ``IndexSegment.check``, and every posting's key is in the
    snapshot (a run read through the snapshot, as by_index reads it)."""
    iname = layout.index_name(name, b.snap_seq)
    iseg = _shm.open_readonly(iname)
    if iseg is None:
        problems.append(f"index segment #{b.snap_seq} is missing")
        return
    sseg = _shm.open_readonly(layout.snapshot_name(name, b.snap_seq))
    try:
        defs = control_reader.ControlReader(seg).index_defs(b)
        ix = IndexSegment(iname, iseg.buf, iseg.size)
        if (ix.snap_seq, ix.revision, ix.epoch, ix.count) != (
                b.snap_seq, b.snap_revision, b.epoch, len(defs)):
            problems.append(f"index segment says snapshot #{ix.snap_seq}, revision "
                            f"{ix.revision}, epoch {ix.epoch}, {ix.count} indexes; control "
                            f"says #{b.snap_seq}, {b.snap_revision}, {b.epoch}, {len(defs)}")
            return
        found = ix.check()
        postings = 0
        if not found and sseg is not None:
            snap = Snapshot(sseg.name, sseg.buf, sseg.size)
            try:
                for i in range(ix.count):
                    for value, _count in ix.values(i):
                        postings += len(ix.run_items(i, value, None, -1, {}, snap))
            except CorruptSegmentError as exc:
                found.append(str(exc))
            snap.close()
        problems.extend(f"index segment #{b.snap_seq}: {x}" for x in found)
        if not found:
            facts.append(f"indexes: {', '.join(n for n, _ in defs)}: "
                         f"{plural(postings, 'posting')} verified (checks, order, keys in the snapshot)")
        ix.close()
    except ShmCacheError as exc:
        problems.append(str(exc))
    finally:
        iseg.close()
        if sseg is not None:
            sseg.close()
