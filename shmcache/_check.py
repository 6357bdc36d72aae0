"""``shmcache check``: walk every segment of a cache and verify every invariant."""

from __future__ import annotations

from . import _codec, _shm, control, layout, ring
from .errors import CorruptSegmentError, ShmCacheError
from .snapshot import Snapshot


def check_cache(name: str) -> tuple[list[str], list[str]]:
    """Returns ``(facts, problems)``: what was verified, and every violation found."""
    _shm.validate_name(name)
    facts: list[str] = []
    problems: list[str] = []
    cname = layout.control_name(name)
    seg = _shm.open_readonly(cname)
    if seg is None:
        return facts, [f"no control segment {cname}: no cache named {name!r}"]
    try:
        control.check_header(seg.buf, seg.size, cname)
        b = control.read_block(seg.buf)
        if b is None:
            return facts, ["the control block's seqlock stays odd (writer died mid-publish?)"]
        control.validate_block(b, cname)
    except ShmCacheError as exc:
        return facts, [str(exc)]
    facts.append(f"control: epoch {b.epoch}, revision {b.revision}, oldest watchable "
                 f"{b.compact_revision}, ring gen {b.ring_gen} [{b.ring_tail}, {b.ring_head}) of "
                 f"{b.ring_capacity}, snapshot #{b.snap_seq} at revision {b.snap_revision}")
    rseg = _shm.open_readonly(layout.ring_name(name, b.ring_gen))
    if rseg is None:
        problems.append(f"ring segment generation {b.ring_gen} is missing")
    else:
        try:
            ring.check_ring_header(rseg.buf, rseg.size, rseg.name, b.ring_gen, b.ring_capacity)
            last = 0
            n = 0
            snap_pos_seen = b.snap_ring_pos == b.ring_head or b.snap_ring_pos <= b.ring_tail
            for kind, rev, pos, _nxt in ring.walk(rseg.buf, b.ring_capacity, b.ring_tail,
                                                  b.ring_head):
                if pos == b.snap_ring_pos:
                    snap_pos_seen = True
                if kind != layout.REC_KIND_EVENTS:
                    continue
                try:
                    _k, rev2, _n, payload = ring.read_record(rseg.buf, b.ring_capacity, pos)
                    assert payload is not None
                    _codec.decode(payload, rev2, rseg.name)
                except (ring.TornRecord, CorruptSegmentError) as exc:
                    problems.append(f"ring record at {pos}: {exc}")
                    continue
                if rev <= last:
                    problems.append(f"ring record at {pos} has revision {rev} after {last}")
                if rev > b.revision:
                    problems.append(f"ring record at {pos} has revision {rev} above the "
                                    f"published {b.revision}")
                if n == 0 and rev <= b.compact_revision:
                    problems.append(f"oldest record revision {rev} is not above the oldest "
                                    f"watchable revision {b.compact_revision}")
                last = rev
                n += 1
            if not snap_pos_seen:
                problems.append(f"snapshot ring position {b.snap_ring_pos} is not a record "
                                f"boundary")
            facts.append(f"ring: {n} records verified (stamps, CRCs, order, payloads)")
        except ShmCacheError as exc:
            problems.append(str(exc))
        rseg.close()
    sseg = _shm.open_readonly(layout.snapshot_name(name, b.snap_seq))
    if b.snap_seq == 0:
        problems.append("no snapshot published yet")
    elif sseg is None:
        problems.append(f"snapshot segment #{b.snap_seq} is missing")
    else:
        try:
            snap = Snapshot(sseg.name, sseg.buf, sseg.size)
            if snap.revision != b.snap_revision or snap.epoch != b.epoch:
                problems.append(f"snapshot says revision {snap.revision} epoch {snap.epoch}, "
                                f"control says {b.snap_revision} epoch {b.epoch}")
            problems.extend(snap.check())
            facts.append(f"snapshot: {snap.count} keys verified (CRCs, order, index, hash table)")
            snap.close()
        except ShmCacheError as exc:
            problems.append(str(exc))
        sseg.close()
    known = {cname, layout.ring_name(name, b.ring_gen), layout.snapshot_name(name, b.snap_seq)}
    strays = [s for s in _shm.list_segments(name) if s not in known]
    if strays:
        facts.append(f"segments not referenced (left by a crash, removed by the next writer): "
                     f"{', '.join(strays)}")
    seg.close()
    return facts, problems
