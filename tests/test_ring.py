"""The ring log on a tiny in-memory ring: placement, wrap-around, padding, eviction, lap detection.

Capacities of a few hundred bytes force every record to wrap, pad and evict
within a handful of appends. After every append an invariant checker verifies
the whole segment (sortedcontainers-style): the chain from tail to head, every
record's stamp/CRC/revision, head - tail <= capacity, which records were
evicted and the compact revision reported for them.
"""

from __future__ import annotations

import mmap
import random
import struct
import zlib
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shmcache import CorruptSegmentError
from shmcache.format import layout, ring
from shmcache.format.ring import RingWriter, TornRecord

DATA = layout.RING_DATA
REC = layout.RECORD
EVENTS = layout.REC_KIND_EVENTS
PAD = layout.REC_KIND_PAD


def make_ring(capacity: int, generation: int = 1) -> tuple[bytearray, RingWriter]:
    buf = bytearray(DATA + capacity)
    RingWriter.init_segment(buf, generation, capacity)
    return buf, RingWriter(buf, capacity, generation)


def payload_of(rev: int, n: int) -> bytes:
    """Deterministic, revision-specific payload bytes (so a stale copy never looks current)."""
    return (rev.to_bytes(8, "little") * (n // 8 + 1))[:n]


@dataclass
class Model:
    """Everything ever appended, independent of RingWriter's own bookkeeping."""

    capacity: int
    appended: list[tuple[int, int, bytes]] = field(default_factory=list)  # (pos, rev, payload)
    boundaries: list[int] = field(default_factory=lambda: [0])  # every chain boundary, ascending


def append(w: RingWriter, model: Model, rev: int, payload: bytes) -> ring.Placement:
    """Place and write one record, checking the placement against the model first."""
    before = list(w.records)
    pl = w.place(len(payload))
    size = RingWriter.record_size(len(payload))
    cap = w.capacity
    room = cap - w.head % cap
    # Placement: in the current lap if it fits, else at the next lap start.
    if size <= room:
        assert (pl.start, pl.pad_at) == (w.head, None)
    else:
        assert pl.start == w.head + room
        assert pl.pad_at == (w.head if room >= REC.size else None)
    assert pl.end == pl.start + size
    # Eviction: exactly the records whose first byte is about to be overwritten, and
    # compact_revision is the revision of the last of them. Placing is a plan only:
    # the records go when the record is written.
    low = pl.end - cap
    evicted = [r for r in before if r[0] < low]
    assert pl.evict == len(evicted)
    assert list(w.records) == before
    evicted_events = [r for r in evicted if r[1]]  # revision 0: a padding/skip entry
    assert pl.compact_revision == (evicted_events[-1][1] if evicted_events else None)
    head = w.head
    store(w, pl, rev, payload)
    skip = [(head, 0)] if pl.start != head else []
    assert list(w.records) == before[len(evicted):] + skip + [(pl.start, rev)]
    model.appended.append((pl.start, rev, payload))
    if pl.start != model.boundaries[-1]:
        model.boundaries.append(pl.start)  # after a pad or an end-of-lap skip
    model.boundaries.append(pl.end)
    return pl


def store(w: RingWriter, pl: ring.Placement, rev: int, payload: bytes) -> None:
    """What the writer does once it has published the placement's tail: drop, then write."""
    w.drop(pl)
    w.write(pl, rev, payload)


def check_invariants(buf: object, w: RingWriter, model: Model) -> None:
    """Everything a reader relies on, verified against the model after an append."""
    cap = w.capacity
    head, tail = w.head, w.tail
    assert 0 <= tail <= head
    assert head - tail <= cap
    # The tail is the first chain boundary whose bytes are intact: not past any intact
    # boundary (a snapshot's ring position is one), not below head - capacity.
    assert tail == min(b for b in model.boundaries if b >= head - cap)
    # The chain from tail lands exactly on head, and its EVENTS records are the
    # events in `records` (entries with revision 0, where kept, are padding/skips).
    chain = list(ring.walk(buf, cap, tail, head))
    events = [(p, r) for p, r in w.records if r]
    assert [(pos, rev) for kind, rev, pos, _ in chain if kind == EVENTS] == events
    assert {p for p, r in w.records if not r} <= {p for k, _r, p, _n in chain if k != EVENTS}
    for kind, _rev, pos, nxt in chain:
        assert nxt > pos
        if kind != EVENTS:
            assert nxt % cap == 0  # padding and skips only ever end a lap
    # `records` holds exactly the appended records at or above the tail.
    live = [(p, r) for p, r, _ in model.appended if p >= tail]
    assert events == live
    assert all(p >= tail for p, _ in w.records)
    # Every live record reads back intact, revisions strictly increasing.
    by_pos = {p: (r, pl) for p, r, pl in model.appended}
    last = -1
    for pos, rev in events:
        kind, got_rev, nxt, payload = ring.read_record(buf, cap, pos)
        assert (kind, got_rev, payload) == (EVENTS, rev, by_pos[pos][1])
        assert nxt == pos + RingWriter.record_size(len(payload))
        assert rev > last
        last = rev
    # Records below the tail: gone from `records`; reading one either fails (lapped)
    # or, where its bytes happen to survive, returns exactly what was written.
    for pos, rev, data in model.appended:
        if pos >= tail:
            continue
        try:
            kind, got_rev, _nxt, payload = ring.read_record(buf, cap, pos)
        except TornRecord:
            continue
        assert (kind, got_rev, payload) == (EVENTS, rev, data)


def run_random(capacity: int, seed: int, steps: int, big: bool = False) -> None:
    rnd = random.Random(seed)
    buf, w = make_ring(capacity)
    model = Model(capacity)
    max_payload = capacity // 2 // 8 * 8 - REC.size  # the largest record that fits()
    rev = 0
    for _ in range(steps):
        rev += rnd.randint(1, 3)
        if big:
            n = rnd.randint(max_payload // 2, max_payload)
        else:
            n = rnd.choice([0, 1, 7, 8, 9, rnd.randint(0, max_payload)])
        assert w.fits(n)
        append(w, model, rev, payload_of(rev, n))
        check_invariants(buf, w, model)
    # A restarted writer rebuilds the same bookkeeping from the segment.
    w2 = RingWriter(buf, capacity, 1)
    w2.restore(w.head, w.tail)
    assert list(w2.records) == list(w.records)


@pytest.mark.parametrize("capacity", [256, 264, 512, 1000, 4096])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_appends_keep_invariants(capacity: int, seed: int) -> None:
    """Seeded random sizes; the invariant checker runs after every append."""
    run_random(capacity, seed, steps=250 if capacity < 4096 else 400)


@pytest.mark.parametrize("capacity", [256, 512, 4096])
def test_random_big_records_keep_invariants(capacity: int) -> None:
    """Records between a quarter and a half of the capacity: padding and eviction on every lap."""
    run_random(capacity, seed=capacity, steps=200, big=True)


@settings(max_examples=150, derandomize=True, database=None, deadline=None)
@given(
    capacity=st.sampled_from([256, 320, 1024]),
    sizes=st.lists(st.integers(min_value=0, max_value=96), min_size=1, max_size=60),
)
def test_any_size_sequence_keeps_invariants(capacity: int, sizes: list[int]) -> None:
    """Hypothesis-chosen payload sizes (shrinks to a minimal failing sequence)."""
    buf, w = make_ring(capacity)
    model = Model(capacity)
    for rev, n in enumerate(sizes, start=1):
        n = min(n, capacity // 2 // 8 * 8 - REC.size)
        append(w, model, rev, payload_of(rev, n))
        check_invariants(buf, w, model)


def test_invariants_on_an_mmap() -> None:
    """The same checks with the ring in an anonymous mmap (what a real segment is)."""
    cap = 512
    m = mmap.mmap(-1, DATA + cap)
    try:
        RingWriter.init_segment(m, 1, cap)
        w = RingWriter(m, cap, 1)
        model = Model(cap)
        rnd = random.Random(5)
        for rev in range(1, 120):
            append(w, model, rev, payload_of(rev, rnd.randint(0, 150)))
            check_invariants(m, w, model)
    finally:
        m.close()


# --------------------------------------------------------------------------------------
# the tail never passes intact bytes (regression)


def test_tail_does_not_skip_intact_padding() -> None:
    """Regression: the tail stops at an intact padding record instead of jumping to the next lap.

    Capacity 256: records of 96 and 64 bytes put the head at 160 (a snapshot taken
    now records ring position 160). A 128-byte record does not fit the 96 bytes
    left: padding at 160, record at 256..384, which overwrites logical bytes below
    128 only. The writer checks ``end - capacity <= snapshot position`` and does
    not republish, so the tail must stay at or below 160; it used to become 256,
    and every reader starting from the snapshot retried until it gave up.
    """
    buf, w = make_ring(256)
    store(w, w.place(64), 1, payload_of(1, 64))
    store(w, w.place(32), 2, payload_of(2, 32))
    snap_pos = w.head
    assert snap_pos == 160
    pl = w.place(96)
    assert (pl.pad_at, pl.start, pl.end) == (160, 256, 384)
    assert pl.end - w.capacity <= snap_pos  # the writer's "no republish needed" test
    assert pl.compact_revision == 2
    assert pl.new_tail == 160
    store(w, pl, 3, payload_of(3, 96))
    assert w.tail <= snap_pos
    # A reader starting at the snapshot position finds an intact chain to the head.
    assert [(k, p) for k, _r, p, _n in ring.walk(buf, 256, snap_pos, w.head)] == [
        (PAD, 160), (EVENTS, 256)]


def test_tail_after_reset_stays_at_head() -> None:
    """After a history reset (records cleared, tail = head) the tail moves only when bytes are lost."""
    buf, w = make_ring(256)
    model = Model(256)
    for rev in range(1, 6):
        append(w, model, rev, payload_of(rev, 40))
    w.records.clear()
    w.tail = w.head  # what Writer._reset_history does
    pl = w.place(8)
    assert pl.new_tail == w.head and pl.compact_revision is None


# --------------------------------------------------------------------------------------
# exact boundaries


def fill_to(w: RingWriter, used: int, rev: int = 1) -> int:
    """Append records until exactly ``used`` bytes of the first lap are taken; returns next rev."""
    while w.head < used:
        size = min(w.capacity // 2, used - w.head)
        assert size >= REC.size and size % 8 == 0
        store(w, w.place(size - REC.size), rev, payload_of(rev, size - REC.size))
        rev += 1
    assert w.head == used
    return rev


def test_record_exactly_filling_the_lap() -> None:
    """A record whose size equals the room left is placed there: no padding, head lands on the lap end."""
    buf, w = make_ring(256)
    rev = fill_to(w, 128)
    pl = w.place(128 - REC.size)
    assert (pl.start, pl.end, pl.pad_at) == (128, 256, None)
    store(w, pl, rev, payload_of(rev, 96))
    assert ring.read_record(buf, 256, 128)[2] == 256
    pl = w.place(0)  # the next one starts the second lap at physical offset 0
    assert (pl.start, pl.pad_at) == (256, None)


@pytest.mark.parametrize(
    ("room", "size", "pad_len"),
    [
        (24, 32, None),  # fewer than 32 bytes left: implicit skip, nothing written
        (32, 32, "fits"),  # header-only record fills the room exactly
        (32, 40, 0),  # padding record of length 0
        (40, 48, 8),  # padding record with 8 bytes of body
        (40, 40, "fits"),
    ],
)
def test_room_at_the_end_of_a_lap(room: int, size: int, pad_len: object) -> None:
    """What the writer puts in the last ``room`` bytes and what a reader reads there."""
    cap = 256
    buf, w = make_ring(cap)
    rev = fill_to(w, cap - room)
    pl = w.place(size - REC.size)
    if pad_len == "fits":
        assert (pl.start, pl.pad_at) == (cap - room, None)
        store(w, pl, rev, payload_of(rev, size - REC.size))
        assert ring.read_record(buf, cap, cap - room)[:3] == (EVENTS, rev, cap)
        return
    assert pl.start == cap
    store(w, pl, rev, payload_of(rev, size - REC.size))
    got = ring.read_record(buf, cap, cap - room)
    if pad_len is None:
        assert pl.pad_at is None
        assert got == (0, 0, cap, None)  # the implicit skip
        assert ring.peek_revision(buf, cap, cap - room) == (0, 0, cap)
    else:
        assert pl.pad_at == cap - room
        assert got == (PAD, 0, cap, None)
        length = struct.unpack_from("<I", buf, DATA + cap - room + 16)[0]
        assert length == pad_len
        assert ring.peek_revision(buf, cap, cap - room) == (PAD, 0, cap)
    # The old head (any snapshot's ring position) is still at or above the tail.
    assert w.tail <= cap - room
    kinds = [k for k, *_ in ring.walk(buf, cap, cap - room, w.head)]
    assert kinds == [0 if pad_len is None else PAD, EVENTS]


def put_record(buf: bytearray, cap: int, pos: int, rev: int, kind: int, payload: bytes,
               length: int | None = None, stamp: int | None = None) -> None:
    """Hand-craft a record at any (even unaligned) position with a correct CRC."""
    length = len(payload) if length is None else length
    hdr = bytearray(REC.size)
    REC.pack_into(hdr, 0, pos if stamp is None else stamp, rev, length, kind, 0, 0, 0)
    crc = zlib.crc32(payload, zlib.crc32(bytes(hdr[:layout.REC_CRC_SPAN])))
    REC.pack_into(hdr, 0, pos if stamp is None else stamp, rev, length, kind, 0, crc, 0)
    base = DATA + pos % cap
    buf[base:base + REC.size] = hdr
    buf[base + REC.size:base + REC.size + len(payload)] = payload


@pytest.mark.parametrize("lap", [0, 3])
def test_room_31_32_33_on_the_read_side(lap: int) -> None:
    """read_record treats room < 32 as the skip (reading nothing) and parses a header from 32 on.

    Writer positions are 8-aligned so room is a multiple of 8; these unaligned
    positions can only come from a corrupt block, and must still be handled.
    """
    cap = 256
    buf = bytearray(DATA + cap)
    base = lap * cap
    # room 31: skip without touching the buffer (even an empty one).
    assert ring.read_record(b"", cap, base + cap - 31) == (0, 0, base + cap, None)
    assert ring.peek_revision(b"", cap, base + cap - 31) == (0, 0, base + cap)
    # room 32: a header-only padding record, or an empty EVENTS record, fills it.
    pos = base + cap - 32
    put_record(buf, cap, pos, 0, PAD, b"", length=0)
    assert ring.read_record(buf, cap, pos) == (PAD, 0, base + cap, None)
    put_record(buf, cap, pos, 9, EVENTS, b"")
    assert ring.read_record(buf, cap, pos) == (EVENTS, 9, base + cap, b"")
    # room 33: padding of length 1; an EVENTS header claiming 2 bytes does not fit.
    pos = base + cap - 33
    put_record(buf, cap, pos, 0, PAD, b"", length=1)
    assert ring.read_record(buf, cap, pos) == (PAD, 0, base + cap, None)
    put_record(buf, cap, pos, 9, EVENTS, b"xy")
    with pytest.raises(TornRecord, match="claims 2 bytes"):
        ring.read_record(buf, cap, pos)


def test_fits() -> None:
    """A record fits when it is at most half the capacity (room for a lap's padding)."""
    _buf, w = make_ring(256)
    assert w.fits(128 - REC.size)
    assert not w.fits(128 - REC.size + 1)
    assert RingWriter.record_size(0) == 32 and RingWriter.record_size(1) == 40


# --------------------------------------------------------------------------------------
# TornRecord


def one_record() -> tuple[bytearray, int, bytes]:
    buf, w = make_ring(256)
    store(w, w.place(10), 5, payload_of(5, 10))
    store(w, w.place(10), 6, payload_of(6, 10))
    return buf, 256, payload_of(5, 10)


def test_read_record_returns_the_record() -> None:
    """Sanity: the unmodified record reads back."""
    buf, cap, payload = one_record()
    assert ring.read_record(buf, cap, 0) == (EVENTS, 5, 48, payload)
    assert ring.peek_revision(buf, cap, 0) == (EVENTS, 5, 48)


@pytest.mark.parametrize("bit", [0, 7, 40, 79])
def test_flipped_payload_bit_is_torn(bit: int) -> None:
    """A single flipped payload bit fails the CRC; peek_revision (no CRC) still answers."""
    buf, cap, _ = one_record()
    buf[DATA + REC.size + bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(TornRecord, match="checksum"):
        ring.read_record(buf, cap, 0)
    assert ring.peek_revision(buf, cap, 0) == (EVENTS, 5, 48)


@pytest.mark.parametrize("offset", [8, 16, 24])  # revision, length, crc: all CRC-covered
def test_flipped_header_bit_is_torn(offset: int) -> None:
    """Flips in the revision, length or CRC fields are caught by the CRC."""
    buf, cap, _ = one_record()
    buf[DATA + offset] ^= 0x01
    with pytest.raises(TornRecord):
        ring.read_record(buf, cap, 0)


def test_flags_and_reserved_are_not_checked() -> None:
    """flags and reserved are outside the CRC and ignored: flipping them changes nothing."""
    buf, cap, payload = one_record()
    buf[DATA + 22] ^= 0xFF
    buf[DATA + 28] ^= 0xFF
    assert ring.read_record(buf, cap, 0) == (EVENTS, 5, 48, payload)


@pytest.mark.parametrize("stamp", [1, 8, 256, 2**63, 2**64 - 1])
def test_wrong_stamp_is_torn(stamp: int) -> None:
    """A stamp other than the position (e.g. the same slot one lap earlier or later) is torn."""
    buf, cap, _ = one_record()
    struct.pack_into("<Q", buf, DATA, stamp)
    with pytest.raises(TornRecord, match="stamp"):
        ring.read_record(buf, cap, 0)
    with pytest.raises(TornRecord, match="stamp"):
        ring.peek_revision(buf, cap, 0)


@pytest.mark.parametrize("length", [256 - 32 + 1, 2**31, 2**32 - 1])
def test_length_past_the_end_is_torn(length: int) -> None:
    """A length reaching past the lap's end is refused before any payload is read, even with a valid CRC."""
    buf, cap, _ = one_record()
    put_record(buf, cap, 0, 5, EVENTS, b"", length=length)
    with pytest.raises(TornRecord, match="only 224 fit"):
        ring.read_record(buf, cap, 0)
    with pytest.raises(TornRecord):
        ring.peek_revision(buf, cap, 0)


def test_length_exactly_to_the_end_is_read() -> None:
    """length == room - 32 is the largest accepted (the record then ends the lap)."""
    buf = bytearray(DATA + 256)
    put_record(buf, 256, 0, 5, EVENTS, b"z" * 224)
    assert ring.read_record(buf, 256, 0) == (EVENTS, 5, 256, b"z" * 224)


@pytest.mark.parametrize("kind", [0, 3, 0xFFFF])
def test_unknown_kind_is_torn(kind: int) -> None:
    """Only EVENTS and PAD records exist; any other kind is torn."""
    buf, cap, _ = one_record()
    struct.pack_into("<H", buf, DATA + 20, kind)
    with pytest.raises(TornRecord, match="unknown kind"):
        ring.read_record(buf, cap, 0)
    with pytest.raises(TornRecord, match="unknown kind"):
        ring.peek_revision(buf, cap, 0)


def test_padding_must_reach_the_lap_end() -> None:
    """A padding record whose length does not end the lap, or with a bad CRC, is torn."""
    buf = bytearray(DATA + 256)
    put_record(buf, 256, 200, 0, PAD, b"", length=8)  # room is 56: length must be 24
    with pytest.raises(TornRecord, match="padding"):
        ring.read_record(buf, 256, 200)
    put_record(buf, 256, 200, 0, PAD, b"", length=24)
    assert ring.read_record(buf, 256, 200) == (PAD, 0, 256, None)
    buf[DATA + 200 + 24] ^= 1  # crc
    with pytest.raises(TornRecord, match="padding"):
        ring.read_record(buf, 256, 200)


def test_overwritten_position_is_torn() -> None:
    """Lap detection: once a later lap overwrites a record, reading its old position raises TornRecord."""
    buf, w = make_ring(256)
    model = Model(256)
    first = append(w, model, 1, payload_of(1, 40))
    assert ring.read_record(buf, 256, first.start)[1] == 1
    rev = 2
    while w.tail <= first.start or w.head < first.start + 256 + REC.size:
        append(w, model, rev, payload_of(rev, 40))
        rev += 1
    with pytest.raises(TornRecord):
        ring.read_record(buf, 256, first.start)
    # The new record in the same physical slot reads fine at its own position.
    newer = [p for p, _r, _pl in model.appended if p % 256 == first.start % 256 and p > first.start]
    assert newer and ring.read_record(buf, 256, newer[-1])[0] == EVENTS


def test_short_buffer_is_torn_not_struct_error() -> None:
    """A segment shorter than the capacity promised (bytes and mmap) gives TornRecord, not struct.error."""
    buf, cap, _ = one_record()
    for short in (bytes(buf[:DATA + 20]), bytes(buf[:DATA + 40])):
        with pytest.raises(TornRecord):
            ring.read_record(short, cap, 0)
    m = mmap.mmap(-1, DATA + 40)  # slicing an mmap past its end returns short bytes
    try:
        m[:] = bytes(buf[:DATA + 40])
        with pytest.raises(TornRecord, match="checksum"):
            ring.read_record(m, cap, 0)  # header intact, payload cut short
        with pytest.raises(TornRecord, match="unreadable"):
            ring.read_record(m, cap, 48)
        with pytest.raises(TornRecord, match="unreadable"):
            ring.peek_revision(m, cap, 48)
    finally:
        m.close()


# --------------------------------------------------------------------------------------
# walk


def test_walk_reports_a_broken_chain_as_corrupt() -> None:
    """walk raises CorruptSegmentError when a header is torn or the chain misses the stop."""
    buf, cap, _ = one_record()
    assert [p for _k, _r, p, _n in ring.walk(buf, cap, 0, 96)] == [0, 48]
    with pytest.raises(CorruptSegmentError, match="overshoots"):
        list(ring.walk(buf, cap, 0, 50))
    with pytest.raises(CorruptSegmentError, match="overshoots"):
        list(ring.walk(buf, cap, 96, 0))  # start above stop
    with pytest.raises(CorruptSegmentError):
        list(ring.walk(buf, cap, 0, 2**63))  # runs into zeros: stamp 0 at position 96
    struct.pack_into("<Q", buf, DATA + 48, 7)
    with pytest.raises(CorruptSegmentError, match="stamp"):
        list(ring.walk(buf, cap, 0, 96))


def test_walk_is_bounded_on_a_self_consistent_loop() -> None:
    """Even a ring fully tiled with valid records ends the walk at the next lap's stamp mismatch."""
    cap = 256
    buf, w = make_ring(cap)
    for rev in range(1, 9):
        store(w, w.place(0), rev, b"")  # 8 header-only records: exactly one lap
    assert w.head == cap
    with pytest.raises(CorruptSegmentError):
        list(ring.walk(buf, cap, 0, 10 * cap))


def test_a_write_that_fails_changes_nothing_and_the_plan_is_placed_again() -> None:
    """Placing is a plan: a record whose write fails (a fault point raising after its
    payload or after its header) leaves head, tail and the records as they were, and
    the retry writes the same record at the same place."""
    buf, w = make_ring(256)
    for rev in range(1, 4):
        store(w, w.place(40), rev, payload_of(rev, 40))
    before = (w.head, w.tail, list(w.records))
    pl = w.place(100)  # overwrites the oldest records
    assert (pl.evict, pl.compact_revision) == (2, 2)

    def boom() -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        w.write(pl, 4, payload_of(4, 100), hook=boom)
    assert (w.head, w.tail, list(w.records)) == before
    assert w.place(100) == pl
    w.drop(pl)  # the tail was published: the overwritten records go, the rest stays
    assert w.tail == pl.new_tail and w.head == before[0]
    assert list(w.records) == before[2][2:]
    w.write(pl, 4, payload_of(4, 100))
    assert w.records[-1] == (pl.start, 4) and w.head == pl.end
    assert [r for _k, r, _p, _n in ring.walk(buf, 256, w.tail, w.head) if r] == [
        r for _p, r in w.records if r]
