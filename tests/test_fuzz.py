"""Fuzzing everything a reader trusts: damaged snapshot, ring and control segments, and record payloads.

Shared memory is untrusted input for readers. Each test takes a valid segment,
damages it (bit flips, byte overwrites, truncation, and length/offset/count
fields overwritten with adversarial values: 0, 2**32-1, 2**63, 2**64-1, the
field's own offset, offsets just inside and outside the segment), optionally
re-signs the checksums the way a hostile writer could, and reads it back
through the entry points readers use, in a bytes, bytearray or mmap buffer.

The guarantee under test: a read returns data equal to the original (damage in
unused bytes), or raises CorruptSegmentError / ring.TornRecord; never
IndexError, struct.error, ZeroDivisionError, MemoryError, RecursionError, and
never hangs. Where checksums were not re-signed, a read never fabricates data:
everything returned is something the writer wrote, and Snapshot.check() reports
any damage that changes an answer.

Hypothesis runs derandomized with bounded examples, so the run is reproducible
and takes a few seconds.
"""

from __future__ import annotations

import dataclasses
import mmap
import struct
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shmcache import CorruptSegmentError
from shmcache.format import codec as _codec
from shmcache.format import control, layout, ring
from shmcache.format.snapshot import HEADER_SIZE, Snapshot, build
from shmcache.ipc import control_reader
from shmcache.writer import control_writer

FUZZ = settings(max_examples=250, derandomize=True, database=None, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

pytestmark = pytest.mark.timeout(60)  # a hang is a failure, not a stuck CI job

ADVERSARIAL = [0, 1, 7, 8, 31, 32, 33, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63,
               2**64 - 1]


# --------------------------------------------------------------------------------------
# damage


@dataclass(frozen=True)
class Field:
    """A length, offset, count or stamp a reader parses: where it is, its width, telling values."""

    off: int
    size: int
    extra: tuple[int, ...] = ()


def damage_strategy(n: int, fields: list[Field]) -> st.SearchStrategy[list[tuple[Any, ...]]]:
    flip = st.tuples(st.just("flip"), st.integers(0, 8 * n - 1))
    byte = st.tuples(st.just("byte"), st.integers(0, n - 1), st.integers(0, 255))
    word = st.sampled_from(fields).flatmap(
        lambda f: st.tuples(st.just("word"), st.just(f),
                            st.sampled_from(ADVERSARIAL + list(f.extra) + [f.off])))
    return st.lists(st.one_of(flip, byte, word, word), min_size=1, max_size=4)


def apply_damage(data: bytes, damage: list[tuple[Any, ...]]) -> bytearray:
    out = bytearray(data)
    for d in damage:
        if d[0] == "flip":
            out[d[1] // 8] ^= 1 << (d[1] % 8)
        elif d[0] == "byte":
            out[d[1]] = d[2]
        else:
            f, value = d[1], d[2]
            if f.off + f.size <= len(out):
                out[f.off:f.off + f.size] = (value % (1 << 8 * f.size)).to_bytes(f.size, "little")
    return out


def changed(a: bytes, b: bytes) -> set[int]:
    return {i for i in range(min(len(a), len(b))) if a[i] != b[i]}


@contextmanager
def as_buffer(kind: str, data: bytes) -> Iterator[Any]:
    """The damaged bytes as the buffer type a reader may hold (mmap: a real segment's type)."""
    if kind == "bytes":
        yield bytes(data)
    elif kind == "bytearray":
        yield bytearray(data)
    else:
        m = mmap.mmap(-1, max(len(data), 1))
        m[:len(data)] = data
        try:
            yield m if len(data) else memoryview(m)[:0]
        finally:
            try:
                m.close()
            except BufferError:  # a failing read left a view behind; its error is reported
                pass


buffer_kinds = st.sampled_from(["bytes", "bytearray", "mmap"])


def maybe_cut(n: int, low: int = 1) -> st.SearchStrategy[int | None]:
    """Truncate the segment to a length in [low, n) one time in five."""
    return st.integers(0, 4).flatmap(lambda c: st.integers(low, n - 1) if c == 0 else st.none())


# --------------------------------------------------------------------------------------
# snapshot segments


@dataclass
class SnapBase:
    raw: bytes
    kvs: dict[bytes, Any]  # key -> KeyValue
    fields: list[Field]
    unused: set[int]  # bytes no reader interprets
    padding: set[int]  # the entries' alignment bytes: among the unused, but under the body CRC
    entry_offs: list[int]
    probes: list[bytes]
    prefixes: list[bytes]
    table: tuple[int, int]  # [start, end) of the hash table


def snap_base(data: dict[bytes, bytes]) -> SnapBase:
    items = [(k, (data[k], i + 1, 50 + i, 1, 0)) for i, k in enumerate(sorted(data))]
    size, fill = build(items, len(items), 100, 1)
    buf = bytearray(size)
    fill(buf)
    raw = bytes(buf)
    snap = Snapshot("base", raw, size)
    kvs = {kv.key: kv for kv in snap.range(b"", None)}
    offs = [snap.offset(i) for i in range(snap.count)]
    valid = [HEADER_SIZE, snap.hash_off, snap.data_off, size, size - 8, size - 48, size + 8]
    valid += offs
    fields = [Field(8, 4), Field(12, 4)] + [Field(o, 8, tuple(valid)) for o in range(16, 88, 8)]
    fields += [Field(88, 4), Field(92, 4)]
    fields += [Field(HEADER_SIZE + 8 * i, 8, tuple(valid)) for i in range(snap.count)]
    for i in range(snap.slots):
        word, off = layout.SNAP_SLOT.unpack_from(raw, snap.hash_off + 16 * i)
        if off or i < 2:  # occupied slots, and two slots that may be empty
            # hash +-1, a flipped check bit, the hash without its check word
            extra = (word + 1, word - 1, word ^ 1 << 32, word & 0xFFFFFFFF)
            fields.append(Field(snap.hash_off + 16 * i, 8, extra))
            fields.append(Field(snap.hash_off + 16 * i + 8, 8, tuple(valid)))
    unused = set(range(layout.SNAP_HEADER.size, HEADER_SIZE))
    padding: set[int] = set()
    for off in offs:
        _crc, klen, vlen, *_ = layout.SNAP_ENTRY.unpack_from(raw, off)
        end = off + 48 + klen + vlen
        padding |= set(range(end, layout.align8(end)))
        big = (size - off, size - off - 48, 2**32 - 48)
        fields += [Field(off, 4), Field(off + 4, 4, big), Field(off + 8, 4, big),
                   Field(off + 12, 4)] + [Field(off + 16 + 8 * j, 8) for j in range(4)]
    probes = list(kvs) + [b"", b"\x01", b"/a/zz", b"k\x00", b"\xff\xff\xff"]
    prefixes = [b"", b"/a/", b"/a/1", b"\xff", b"k"]
    table = (snap.hash_off, snap.data_off)
    snap.close()
    return SnapBase(raw, kvs, fields, unused | padding, padding, offs, probes, prefixes, table)


SNAP_BASES = [
    snap_base({}),
    snap_base({b"k": b"v"}),
    snap_base({b"\x00": b"", b"\xff\xff": b"max", b"": b"root", b"k": b"x" * 100,
               **{b"/a/%d" % i: b"v" * i for i in range(8)}}),
]


def resign_snapshot(buf: bytearray, base: SnapBase) -> None:
    """Recompute every checksum over the damaged bytes, as a hostile writer could."""
    n = len(buf)
    for off in base.entry_offs:
        if off + 12 <= n:
            _crc, klen, vlen = struct.unpack_from("<III", buf, off)
            end = min(off + 48 + klen + vlen, n)
            buf[off:off + 4] = zlib.crc32(buf[off + 4:end]).to_bytes(4, "little")
    hdr = layout.SNAP_HEADER.unpack_from(base.raw, 0)
    index_off, hash_off, data_off, data_len = hdr[6], hdr[7], hdr[9], hdr[10]
    body = zlib.crc32(buf[data_off:data_off + data_len])
    body = zlib.crc32(buf[hash_off:data_off], zlib.crc32(buf[index_off:hash_off], body))
    buf[88:92] = body.to_bytes(4, "little")
    buf[92:96] = zlib.crc32(buf[:92]).to_bytes(4, "little")


def read_snapshot(buf: Any, size: int, base: SnapBase) -> tuple[list[str], dict[Any, Any]] | None:
    """Everything a reader does with a snapshot; CorruptSegmentError from any step is recorded."""
    try:
        snap = Snapshot("fuzz", buf, size)
    except CorruptSegmentError:
        return None
    results: dict[Any, Any] = {}
    try:
        problems = snap.check()
        for k in base.probes:
            try:
                results["get", k] = snap.get(k)
            except CorruptSegmentError:
                results["get", k] = "corrupt"
        for p in base.prefixes:
            end = layout.prefix_range_end(p) if p else None
            end = None if end == b"\0" else end
            out = []
            try:
                for kv in snap.range(p, end):
                    out.append(kv)
                    assert len(out) <= snap.count
            except CorruptSegmentError:
                out.append("corrupt")
            results["range", p] = out
            try:  # the walk behind Reader.list (C speedups or Python)
                results["range_list", p] = snap.range_list(p, end)
            except CorruptSegmentError:
                results["range_list", p] = ["corrupt"]
            if "corrupt" not in out and "corrupt" not in results["range_list", p]:
                assert results["range_list", p] == out
            try:
                results["bisect", p] = snap.bisect(p)
            except CorruptSegmentError:
                results["bisect", p] = "corrupt"
    finally:
        snap.close()
    return problems, results


CLEAN = [read_snapshot(b.raw, len(b.raw), b) for b in SNAP_BASES]


@FUZZ
@given(data=st.data(), which=st.integers(0, len(SNAP_BASES) - 1), kind=buffer_kinds,
       resign=st.booleans())
def test_damaged_snapshot(data: st.DataObject, which: int, kind: str, resign: bool) -> None:
    """Snapshot(), get(), range(), bisect() and check() on a damaged snapshot segment."""
    base = SNAP_BASES[which]
    damage = data.draw(damage_strategy(len(base.raw), base.fields), label="damage")
    buf = apply_damage(base.raw, damage)
    if resign:
        resign_snapshot(buf, base)
    cut = data.draw(maybe_cut(len(buf), 1), label="truncate")
    if cut is not None:
        del buf[cut:]
    with as_buffer(kind, bytes(buf)) as b:
        got = read_snapshot(b, len(buf), base)
    clean = CLEAN[which]
    assert clean is not None and clean[0] == []
    hit = changed(base.raw, bytes(buf))
    if hit <= base.unused and cut is None:
        # Only unused bytes were hit: same answers, and nothing reported except that
        # damaged padding fails the body CRC (which covers the whole data area).
        assert got is not None and got[1] == clean[1]
        padding_hit = bool(hit & base.padding) and not resign
        assert got[0] == (["fuzz: body checksum mismatch"] if padding_hit else [])
        return
    if got is None or resign:
        return  # refused to open; or a hostile writer, whose valid-looking data is its own
    problems, results = got
    for (op, arg), value in results.items():
        # Nothing fabricated: every entry returned is one the writer wrote.
        if op == "get":
            assert value in (None, "corrupt", base.kvs.get(arg, None))
        elif op in ("range", "range_list"):
            assert all(v == "corrupt" or v in base.kvs.values() for v in value)
    if not problems:
        assert results == clean[1]  # check() passes only if every answer is the original
    if len(damage) == 1 and cut is None:
        assert_no_false_miss(base, bytes(buf), results)
        assert_exact_or_corrupt(clean[1], results)


def assert_exact_or_corrupt(clean: dict[Any, Any], results: dict[Any, Any]) -> None:
    """One damage anywhere (a flipped bit, a byte, a field overwritten) never changes an
    answer silently: each read is the original or raises. Every key a read compares is
    in an entry whose checksum was verified first: the probe's on a hash match, the
    binary search's answer, the walk's end test (issue 19: a flipped key byte was a
    miss, a short list, a search landing past keys)."""
    for q, want in clean.items():
        got = results[q]
        if q[0] == "range":  # a generator: what it yielded before it met the damage
            assert got == want or (got[-1:] == ["corrupt"] and got[:-1] == want[:len(got) - 1]), q
        else:
            assert got in (want, "corrupt", ["corrupt"]), q


def assert_no_false_miss(base: SnapBase, buf: bytes, results: dict[Any, Any]) -> None:
    """One damage confined to the hash table never turns a hit into a miss: get() raises.

    Each slot's check word covers its hash and offset and an empty slot is all
    zeros, so a single flipped bit, byte or word in the table is caught on the
    probe that reaches it (zeroing a whole slot takes two overwrites).
    """
    lo, hi = base.table
    if len(buf) != len(base.raw) or buf[:lo] != base.raw[:lo] or buf[hi:] != base.raw[hi:]:
        return
    for key, kv in base.kvs.items():
        assert results["get", key] in (kv, "corrupt"), key


def test_snapshot_header_claiming_huge_counts() -> None:
    """A re-signed header claiming 2**63 entries (or an index past the end) is refused at open."""
    base = SNAP_BASES[2]
    for field_off, value in [(32, 2**63), (32, 2**64 - 1), (56, 2**63), (64, 2**64 - 8),
                             (72, 2**63), (80, 2**64 - 1), (40, 0), (48, 8)]:
        buf = bytearray(base.raw)
        struct.pack_into("<Q", buf, field_off, value)
        buf[92:96] = zlib.crc32(buf[:92]).to_bytes(4, "little")
        with pytest.raises(CorruptSegmentError, match="inconsistent"):
            Snapshot("s", bytes(buf), len(buf))


# --------------------------------------------------------------------------------------
# ring segments


CAP = 512


@dataclass
class RingBase:
    raw: bytes
    head: int
    tail: int
    clean: dict[int, tuple[int, int, int, bytes | None]]  # pos -> read_record result
    fields: list[Field]


def ring_base() -> RingBase:
    buf = bytearray(layout.RING_DATA + CAP)
    ring.RingWriter.init_segment(buf, 2, CAP)
    w = ring.RingWriter(buf, CAP, 2)
    sizes = [10, 60, 0, 150, 30, 90, 5, 120, 70, 40, 100, 20, 140, 35, 80]
    for rev, n in enumerate(sizes * 3, start=10):
        ev = (0, b"/k/%d" % rev, b"v" * n, 1, rev, 1, 0, (b"/k/%d" % rev, b"o", 1, 2, 1, 0))
        payload = _codec.encode([ev])
        pl = w.place(len(payload))
        w.drop(pl)  # (a plan: the writer forgets what it overwrites, then writes)
        w.write(pl, rev, payload)
    clean = {}
    pos = w.tail
    kinds = set()
    while pos < w.head:
        r = ring.read_record(buf, CAP, pos)
        clean[pos] = r
        kinds.add(r[0])
        pos = r[2]
    assert layout.REC_KIND_PAD in kinds or 0 in kinds  # the live window wraps
    assert w.head - w.tail > CAP // 2
    pos_extra = (w.tail, w.head, w.head + CAP, CAP, CAP - 32, CAP - 31, 2**63)
    fields = [Field(8, 4), Field(12, 4), Field(16, 8), Field(24, 8, (CAP * 2, 0))]
    for pos, (kind, _rev, nxt, _payload) in clean.items():
        if kind == 0:
            continue  # an end-of-lap skip: no header there
        base = layout.RING_DATA + pos % CAP
        room = CAP - pos % CAP
        fields += [
            Field(base, 8, pos_extra + (pos - CAP, pos + CAP, nxt)),  # stamp
            Field(base + 8, 8, (_rev - 1, _rev + 1)),  # revision
            Field(base + 16, 4, (room - 32, room - 31, room, CAP, nxt - pos)),  # length
            Field(base + 20, 2, (1, 2, 3)),  # kind
            Field(base + 22, 2), Field(base + 24, 4), Field(base + 28, 4),
        ]
    return RingBase(bytes(buf), w.head, w.tail, clean, fields)


RING = ring_base()


def resign_ring(buf: bytearray) -> None:
    """Recompute every live record's CRC over its (possibly damaged) header and claimed payload."""
    for pos, c in RING.clean.items():
        if c[0] == 0:
            continue
        base = layout.RING_DATA + pos % CAP
        length = struct.unpack_from("<I", buf, base + 16)[0]
        end = min(base + 32 + length, len(buf))
        crc = zlib.crc32(bytes(buf[base + 32:end]), zlib.crc32(bytes(buf[base:base + 20])))
        if struct.unpack_from("<H", buf, base + 20)[0] == layout.REC_KIND_PAD:
            crc = zlib.crc32(bytes(buf[base:base + 20]))
        struct.pack_into("<I", buf, base + 24, crc)


def read_ring(buf: Any, cap: int, tail: int, head: int, trusted: bool) -> None:
    """A reader's pass from tail to head (records, payloads), plus peek_revision and walk."""
    pos = tail
    while pos < head:
        try:
            kind, rev, nxt, payload = ring.read_record(buf, cap, pos)
        except ring.TornRecord:
            break
        assert nxt > pos  # always progress: the loop cannot spin
        if trusted and pos not in RING.clean:
            assert (kind, payload) == (0, None)  # an unaligned position: only a skip reads nothing
        elif trusted:
            # No re-signing: whatever passes stamp + CRC is exactly what was written.
            c = RING.clean[pos]
            assert (kind, rev, nxt) == c[:3]
            assert (payload is None and c[3] is None) or bytes(payload) == c[3]  # type: ignore[arg-type]
        if payload is not None:
            try:
                events = _codec.decode(payload, rev, "fuzz")
            except CorruptSegmentError:
                pass
            else:
                assert all(e.revision == rev for e in events)
        pos = nxt
    for pos in list(RING.clean)[:6]:
        try:
            kind, _rev, nxt = ring.peek_revision(buf, cap, pos)
        except ring.TornRecord:
            continue
        assert nxt > pos and kind in (0, layout.REC_KIND_EVENTS, layout.REC_KIND_PAD)
    try:
        steps = sum(1 for _ in ring.walk(buf, cap, tail, head))
        assert steps <= cap // 8 + 2
    except CorruptSegmentError:
        pass


@FUZZ
@given(data=st.data(), kind=buffer_kinds, resign=st.booleans(),
       cap=st.sampled_from([CAP] * 6 + [CAP * 2, CAP // 2, 64, 24]))
def test_damaged_ring(data: st.DataObject, kind: str, resign: bool, cap: int) -> None:
    """read_record / peek_revision / walk / decode over a damaged ring, at the right or a wrong capacity."""
    damage = data.draw(damage_strategy(len(RING.raw), RING.fields), label="damage")
    buf = apply_damage(RING.raw, damage)
    if resign:
        resign_ring(buf)
    cut = data.draw(maybe_cut(len(buf), 1), label="truncate")
    if cut is not None:
        del buf[cut:]
    with as_buffer(kind, bytes(buf)) as b:
        read_ring(b, cap, RING.tail, RING.head, trusted=not resign and cap == CAP)


@FUZZ
@given(start=st.sampled_from([0, RING.tail, RING.tail + 1, RING.tail + 8, RING.head, 2**63]),
       stop=st.sampled_from([0, RING.head, RING.head + 1, RING.head + CAP, RING.tail + 10 * CAP,
                             2**63, 2**64 - 1]),
       kind=buffer_kinds)
def test_ring_walk_with_adversarial_positions(start: int, stop: int, kind: str) -> None:
    """Positions a damaged control block could publish: unaligned, past the head, far laps."""
    with as_buffer(kind, RING.raw) as b:
        read_ring(b, CAP, start, stop, trusted=True)


def test_ring_on_a_short_mmap() -> None:
    """A ring mmap shorter than the promised capacity: reads past its end are torn, not errors."""
    for cut in (1, 40, layout.RING_DATA + 16, layout.RING_DATA + 100, len(RING.raw) - 1):
        with as_buffer("mmap", RING.raw[:cut]) as b:
            read_ring(b, CAP, RING.tail, RING.head, trusted=True)


@FUZZ
@given(data=st.data(), kind=buffer_kinds)
def test_damaged_ring_header(data: st.DataObject, kind: str) -> None:
    """check_ring_header accepts only the header the control block promised."""
    cap = layout.MIN_RING_CAPACITY
    raw = bytearray(layout.RING_DATA + cap)
    ring.RingWriter.init_segment(raw, 3, cap)
    fields = [Field(8, 4, (2,)), Field(12, 4, (1, 3)), Field(16, 8, (2, 4)),
              Field(24, 8, (cap + 8, cap - 8, cap * 2, 0))]
    damage = data.draw(damage_strategy(layout.RING_DATA, fields), label="damage")
    buf = apply_damage(bytes(raw), damage)
    cut = data.draw(maybe_cut(len(buf), 1), label="truncate")
    if cut is not None:
        del buf[cut:]
    with as_buffer(kind, bytes(buf)) as b:
        try:
            ring.check_ring_header(b, len(buf), "/r.3", 3, cap)
        except CorruptSegmentError:
            return
    assert layout.RING_HEADER.unpack_from(buf, 0) == layout.RING_HEADER.unpack_from(raw, 0)


# --------------------------------------------------------------------------------------
# control segments


def control_base() -> tuple[bytes, control.Block]:
    m = mmap.mmap(-1, layout.CONTROL_SIZE)
    try:
        control_writer.ControlWriter.initialise(m, b"/app/")
        cw = control_writer.ControlWriter(m)
        cw.claim()
        cw.publish({layout.B_EPOCH: 1, layout.B_REVISION: 120, layout.B_COMPACT_REVISION: 100,
                    layout.B_RING_HEAD: 70_000, layout.B_RING_TAIL: 10_000,
                    layout.B_RING_GEN: 2, layout.B_RING_CAPACITY: 65_536, layout.B_SNAP_SEQ: 3,
                    layout.B_SNAP_REVISION: 110, layout.B_SNAP_SIZE: 4096,
                    layout.B_SNAP_RING_POS: 60_000, layout.B_KEY_COUNT: 10,
                    layout.B_ETCD_REVISION: 125, layout.B_SYNC_STARTED: 7,
                    layout.B_SYNC_DONE: 6, layout.B_SYNC_REVISION: 118})
        del cw
        raw = bytes(m)
    finally:
        m.close()
    block = control.read_block(raw)
    assert block is not None
    control.validate_block(block, "base")
    return raw, block


CTL, CTL_BLOCK = control_base()
_CTL_EXTRA = (65_536, 65_528, 65_544, 2**40, 2**40 + 8, 10_000, 70_000, 135_536, 2048, 2049,
              4096, 120, 121, 3, 6, 7, 8, 118)
CTL_FIELDS = [Field(0, 8), Field(8, 4, (0, 2)), Field(12, 4, (2, 3)), Field(16, 8, (3, 5))]
CTL_FIELDS += [Field(o, 8) for o in range(24, 64, 8)]
CTL_FIELDS += [Field(layout.C_BLOCK + 8 * i, 8, _CTL_EXTRA) for i in range(layout.BLOCK_FIELDS)]
CTL_FIELDS += [Field(layout.C_PREFIX, 8), Field(layout.C_CLUSTER_ID, 8),
               Field(layout.C_BLOCK_CRC, 8)]
# Bytes the block's checksum covers: damage to any of them is refused, never served.
CTL_COVERED = (set(range(layout.C_BLOCK, layout.C_BLOCK + 8 * layout.BLOCK_FIELDS))
               | set(range(layout.C_PREFIX, layout.C_PREFIX + CTL_BLOCK.prefix_len))
               | set(range(layout.C_CLUSTER_ID, layout.CONTROL_SIZE)))
# Bytes whose damage must not change what a reader gets from the block.
CTL_USED = set(range(24)) | CTL_COVERED


def read_control(buf: Any, size: int) -> control.Block | None:
    """check_header, read_block, validate_block, then every read the validated block allows."""
    try:
        control.check_header(buf, size, "/ctl")
    except CorruptSegmentError:
        return None
    try:
        b = control.read_block(buf, spins=5)
    except CorruptSegmentError:
        return None
    if b is None:
        assert struct.unpack_from("<Q", buf, layout.C_SEQ)[0] & 1  # only while SEQ is odd
        return None
    control.writer_identity(buf)
    control_reader.writer_alive(buf)
    try:
        control.validate_block(b, "/ctl")
    except CorruptSegmentError:
        return None
    # Validated: every bound a reader relies on holds.
    assert b.ring_tail <= b.ring_head
    assert len(control.read_prefix(buf, b.prefix_len)) == b.prefix_len <= layout.MAX_PREFIX_LEN
    if b.snap_seq:
        cap = b.ring_capacity
        assert layout.MIN_RING_CAPACITY <= cap <= layout.MAX_RING_CAPACITY and cap % 8 == 0
        assert b.ring_head - b.ring_tail <= cap and b.snap_ring_pos <= b.ring_head
        # The ring reads this block leads to fail cleanly (here on an empty ring).
        for pos in (b.ring_tail, b.snap_ring_pos, b.ring_head):
            try:
                ring.read_record(b"", cap, pos)
                ring.peek_revision(b"", cap, pos)
            except ring.TornRecord:
                pass
        try:
            list(ring.walk(b"", cap, b.ring_tail, b.ring_head))
        except CorruptSegmentError:
            pass
    return b


@FUZZ
@given(data=st.data(), kind=buffer_kinds)
def test_damaged_control(data: st.DataObject, kind: str) -> None:
    """A damaged control segment is refused, or yields a block whose every later read is bounded."""
    damage = data.draw(damage_strategy(len(CTL), CTL_FIELDS), label="damage")
    buf = apply_damage(CTL, damage)
    cut = data.draw(maybe_cut(len(buf), 1), label="truncate")
    if cut is not None:
        del buf[cut:]
    with as_buffer(kind, bytes(buf)) as b:
        got = read_control(b, len(buf))
    if cut is None and not changed(CTL, bytes(buf)) & CTL_USED:
        assert got == CTL_BLOCK  # heartbeat, pid, reserved bytes: the block is intact
    if changed(CTL, bytes(buf)) & CTL_COVERED:
        assert got is None  # the checksum fails (or the header or SEQ refuse it first)


@pytest.mark.parametrize("snap_seq", [0, 1])
def test_zero_ring_capacity(snap_seq: int) -> None:
    """Regression: capacity 0 with a published snapshot is refused (read_record would divide by it)."""
    b = control.Block(2, 1, 5, 0, 64, 0, 1, 0, snap_seq, 5, 4096, 0, 1, 5, 0, 0, 0, 0, 0,
                      0, 0, 0, 0, 0)
    if snap_seq:
        with pytest.raises(CorruptSegmentError, match="capacity"):
            control.validate_block(b, "/ctl")
    else:
        control.validate_block(b, "/ctl")  # the zeroed block of a writer still starting


@pytest.mark.parametrize(("started", "done", "revision", "ok"), [
    (0, 0, 0, True),  # no sync round yet
    (7, 6, 118, True),  # one round in flight
    (7, 7, 120, True),  # every round done, at the block's revision
    (6, 7, 118, False),  # more rounds done than started
    (7, 7, 121, False),  # synced past the published revision
    (0, 2**64 - 1, 0, False),
])
def test_sync_counters_are_validated(started: int, done: int, revision: int, ok: bool) -> None:
    """validate_block: SYNC_DONE <= SYNC_STARTED and SYNC_REVISION <= REVISION."""
    b = dataclasses.replace(CTL_BLOCK, sync_started=started, sync_done=done,
                            sync_revision=revision)
    assert b.revision == 120
    if ok:
        control.validate_block(b, "/ctl")
    else:
        with pytest.raises(CorruptSegmentError, match="sync rounds"):
            control.validate_block(b, "/ctl")


def test_seqlock_held_forever_returns_none_promptly() -> None:
    """A writer that died with SEQ odd: read_block gives up (None) instead of spinning forever."""
    import time

    buf = bytearray(CTL)
    struct.pack_into("<Q", buf, layout.C_SEQ, 7)
    t0 = time.monotonic()
    assert control.read_block(buf) is None
    assert time.monotonic() - t0 < 5


# --------------------------------------------------------------------------------------
# record payloads


PAYLOADS = [
    _codec.encode([(0, b"/k", b"v", 1, 5, 1, 0, None)]),
    _codec.encode([(1, b"/k", b"", 0, 5, 0, 0, (b"/k", b"old", 1, 4, 3, 7))]),
    _codec.encode([(0, b"/k/%d" % i, b"x" * i, 1, 5, 1, 2**40, None) for i in range(12)]),
]


@FUZZ
@given(data=st.data(), which=st.integers(0, len(PAYLOADS) - 1))
def test_damaged_payload(data: st.DataObject, which: int) -> None:
    """decode() of a damaged (but CRC-passing, e.g. hostile) payload: valid events or CorruptSegmentError."""
    raw = PAYLOADS[which]
    fields = [Field(i, 1, (0xC1, 0xDD, 0xC6, 0xDF, 0xC7, 0x91, 0x90, 0xC3, 0xCA))
              for i in range(len(raw))]
    damage = data.draw(damage_strategy(len(raw), fields), label="damage")
    buf = apply_damage(raw, damage)
    cut = data.draw(maybe_cut(len(buf), 0), label="truncate")
    if cut is not None:
        del buf[cut:]
    try:
        events = _codec.decode(bytes(buf), 5, "fuzz")
    except CorruptSegmentError:
        return
    for e in events:
        assert e.type in ("PUT", "DELETE") and e.revision == 5 == e.kv.mod_revision
        assert type(e.kv.key) is bytes and type(e.kv.value) is bytes
    if not changed(raw, bytes(buf)) and cut is None:
        assert events == _codec.decode(raw, 5)


# --------------------------------------------------------------------------------------
# every parsed field, every adversarial value (exhaustive, single overwrites)


def single_overwrites(fields: list[Field]) -> Iterator[tuple[Field, int]]:
    for f in fields:
        for value in sorted(set(ADVERSARIAL) | set(f.extra) | {f.off}):
            yield f, value


@pytest.mark.parametrize("which", range(len(SNAP_BASES)))
def test_every_snapshot_field_overwrite(which: int) -> None:
    """Each length/offset/count field of a snapshot set to each adversarial value, plain and re-signed."""
    base = SNAP_BASES[which]
    for f, value in single_overwrites(base.fields):
        for resign in (False, True):
            buf = apply_damage(base.raw, [("word", f, value)])
            if resign:
                resign_snapshot(buf, base)
            got = read_snapshot(bytes(buf), len(buf), base)
            if got is not None and not resign and not got[0]:
                assert got == CLEAN[which], (f, value)
            if got is not None and not resign and base.table[0] <= f.off < base.table[1]:
                assert_no_false_miss(base, bytes(buf), got[1])


@pytest.mark.parametrize("which", range(1, len(SNAP_BASES)))
def test_every_single_byte_flip_of_a_snapshot_is_exact_or_corrupt(which: int) -> None:
    """Every byte of the segment flipped (one bit, and all eight): each read is the original
    answer or raises (exact-or-corrupt, assert_exact_or_corrupt). Before issue 19's fix,
    a flipped key byte made get() of that key a silent miss, a key flipped to sort past a
    range's end cut the range short, and bisect() trusted the keys it compared."""
    base = SNAP_BASES[which]
    clean = CLEAN[which]
    assert clean is not None
    for off in range(len(base.raw)):
        for mask in (0x01, 0xFF):
            buf = bytearray(base.raw)
            buf[off] ^= mask
            got = read_snapshot(bytes(buf), len(buf), base)
            if got is not None:
                assert_exact_or_corrupt(clean[1], got[1])


def test_every_ring_field_overwrite() -> None:
    """Each stamp/revision/length/kind field of every live record set to each adversarial value."""
    for f, value in single_overwrites(RING.fields):
        for resign in (False, True):
            buf = apply_damage(RING.raw, [("word", f, value)])
            if resign:
                resign_ring(buf)
            read_ring(bytes(buf), CAP, RING.tail, RING.head, trusted=not resign)


def test_every_control_field_overwrite() -> None:
    """Each control word and block field set to each adversarial value."""
    for f, value in single_overwrites(CTL_FIELDS):
        buf = bytes(apply_damage(CTL, [("word", f, value)]))
        got = read_control(buf, len(buf))
        if not changed(CTL, buf) & CTL_USED:
            assert got == CTL_BLOCK, (f, value)


@pytest.fixture(autouse=True, params=["c", "python"])
def _implementation(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test here runs against the C speedups and the pure-Python reference."""
    from shmcache.format import snapshot as _snapshot_module

    if request.param == "c" and _snapshot_module._speedups is None:
        pytest.skip("shmcache.format._speedups was not built")
    monkeypatch.setattr(_snapshot_module, "USE_SPEEDUPS", request.param == "c")
