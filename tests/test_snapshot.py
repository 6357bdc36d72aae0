"""Snapshot segments: build() lays out every key, Snapshot reads them in place, check() finds corruption.

Covers 0, 1 and 1000 keys, binary and empty keys, empty values, a 1 MiB value,
hash lookups (hits and misses), bisect/range for prefixes with etcd's
prefix_range_end semantics, header validation, damaged hash slots and sorted
index, and a hypothesis test that any dict of keys to values reads back exactly.
"""

from __future__ import annotations

import bisect
import mmap
import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shmcache import CorruptSegmentError, KeyValue, VersionMismatchError
from shmcache.format import layout, snapshot
from shmcache.format.snapshot import HEADER_SIZE, Snapshot, build

Meta = tuple[bytes, int, int, int, int]


def items_of(data: dict[bytes, bytes], revision: int = 100) -> list[tuple[bytes, Meta]]:
    """Sorted build() items; metadata derived from the key so every field is checked."""
    out = []
    for i, key in enumerate(sorted(data)):
        out.append((key, (data[key], 1 + i, revision - (i % 7), 1 + i % 3, i * 1000)))
    return out


def kv_of(key: bytes, meta: Meta) -> KeyValue:
    return KeyValue(key, *meta)


def make_bytes(data: dict[bytes, bytes], revision: int = 100, epoch: int = 3) -> bytes:
    items = items_of(data, revision)
    size, fill = build(items, len(items), revision, epoch)
    buf = bytearray(size)
    fill(buf)
    return bytes(buf)


def make(data: dict[bytes, bytes], revision: int = 100, epoch: int = 3) -> Snapshot:
    raw = make_bytes(data, revision, epoch)
    return Snapshot("/snap-test", raw, len(raw))


def expected(data: dict[bytes, bytes], revision: int = 100) -> list[KeyValue]:
    return [kv_of(k, m) for k, m in items_of(data, revision)]


def prefix_end(prefix: bytes) -> bytes | None:
    """How a caller turns a prefix into Snapshot.range()'s end: prefix_range_end's b"\\0" means no bound."""
    if not prefix:
        return None
    end = layout.prefix_range_end(prefix)
    return None if end == b"\0" else end


KEYS_1000 = {b"\x00": b"", b"\xff\xff": b"max", b"\xff": b"ff", b"\x00\x00": b"zz",
             **{b"/k/%04d" % i: b"v%d" % i for i in range(990)},
             **{b"/k/%04d\xff" % i: b"" for i in range(6)}}


# --------------------------------------------------------------------------------------
# sizes and counts


def test_empty_snapshot() -> None:
    """0 keys: a header, an 8-slot empty table, no index, no data; every read is a miss."""
    snap = make({})
    assert (snap.count, snap.slots, snap.size) == (0, 8, HEADER_SIZE + 8 * 16)
    assert snap.get(b"") is None and snap.get(b"x") is None
    assert list(snap.range(b"", None)) == []
    assert snap.bisect(b"\xff") == 0
    assert snap.check() == []


def test_one_key() -> None:
    """1 key: hit with every field, misses around it, range with and without bounds."""
    snap = make({b"key": b"value"}, revision=7, epoch=9)
    kv = KeyValue(b"key", b"value", 1, 7, 1, 0)
    assert (snap.revision, snap.epoch, snap.count) == (7, 9, 1)
    assert snap.get(b"key") == kv
    for miss in (b"", b"ke", b"key\x00", b"kez", b"KEY"):
        assert snap.get(miss) is None
    assert list(snap.range(b"", None)) == [kv]
    assert list(snap.range(b"key", b"key\x00")) == [kv]
    assert list(snap.range(b"key\x00", None)) == []
    assert list(snap.range(b"a", b"key")) == []  # end is exclusive
    assert snap.check() == []


def test_1000_keys_with_binary_keys() -> None:
    """1000 keys incl. b"\\x00", b"\\xff\\xff" and empty values: every key hits, order is bytewise."""
    snap = make(KEYS_1000)
    exp = expected(KEYS_1000)
    assert snap.count == 1000 and snap.slots == 2048
    for kv in exp:
        assert snap.get(kv.key) == kv
    assert list(snap.range(b"", None)) == exp
    assert [kv.key for kv in exp][:3] == [b"\x00", b"\x00\x00", b"/k/0000"]
    assert [kv.key for kv in exp][-2:] == [b"\xff", b"\xff\xff"]
    for miss in (b"", b"\x01", b"/k/", b"/k/0990", b"/k/0000\x00", b"\xff\xff\xff"):
        assert snap.get(miss) is None
    assert snap.check() == []


def test_empty_key() -> None:
    """The format allows an empty key (etcd does not): it sorts first and hits like any other."""
    snap = make({b"": b"root", b"a": b""})
    assert snap.get(b"") == KeyValue(b"", b"root", 1, 100, 1, 0)
    assert [kv.key for kv in snap.range(b"", None)] == [b"", b"a"]
    assert snap.check() == []


def test_large_values() -> None:
    """A 1 MiB value (and values spanning build()'s 1 MiB write chunks) read back intact."""
    big = bytes(range(256)) * 4096
    assert len(big) == 1 << 20
    data = {b"a": b"x" * 1000, b"big": big, b"big2": big[::-1] + b"!", b"z": b""}
    snap = make(data)
    assert snap.get(b"big").value == big  # type: ignore[union-attr]
    assert snap.get(b"big2").value == big[::-1] + b"!"  # type: ignore[union-attr]
    assert list(snap.range(b"", None)) == expected(data)
    assert snap.check() == []


def test_values_and_metadata_round_trip_extremes() -> None:
    """create/mod/version/lease use the full signed 64-bit range the entry format stores."""
    items = [(b"k", (b"", 2**63 - 1, 5, 2**63 - 1, 2**63 - 1)), (b"n", (b"v", 0, 0, 0, -1))]
    size, fill = build(items, 2, revision=5, epoch=0)
    buf = bytearray(size)
    fill(buf)
    snap = Snapshot("s", bytes(buf), size)
    assert snap.get(b"k") == KeyValue(b"k", b"", 2**63 - 1, 5, 2**63 - 1, 2**63 - 1)
    assert snap.get(b"n") == KeyValue(b"n", b"v", 0, 0, 0, -1)


def test_build_accepts_a_generator_and_checks_the_count() -> None:
    """items may be a one-shot iterable; a count that disagrees with it is a ValueError."""
    items = items_of({b"a": b"1", b"b": b"2"})
    size, fill = build(iter(items), 2, 1, 1)
    buf = bytearray(size)
    fill(buf)
    assert Snapshot("s", bytes(buf), size).get(b"b") is not None
    for wrong in (1, 3):
        size, fill = build(items, wrong, 1, 1)
        with pytest.raises(ValueError):
            fill(bytearray(max(size, 4096)))


def test_snapshot_over_an_mmap() -> None:
    """Reading from an mmap (a real segment) returns bytes copies that outlive the view."""
    raw = make_bytes(KEYS_1000)
    m = mmap.mmap(-1, len(raw))
    m[:] = raw
    snap = Snapshot("s", m, len(m))
    kv = snap.get(b"\xff\xff")
    items = list(snap.range(b"/k/01", b"/k/02"))
    assert snap.check() == []
    snap.close()
    m.close()
    assert kv == kv_of(b"\xff\xff", dict(items_of(KEYS_1000))[b"\xff\xff"])
    assert type(kv.key) is bytes and type(kv.value) is bytes  # type: ignore[union-attr]
    assert [k.key for k in items] == [b"/k/%04d" % i for i in range(100, 200)]


# --------------------------------------------------------------------------------------
# bisect and range


def test_bisect_matches_bisect_left() -> None:
    """bisect(key) is the index of the first key >= key, like bisect.bisect_left on the sorted keys."""
    snap = make(KEYS_1000)
    keys = sorted(KEYS_1000)
    probes = [b"", b"\x00", b"\x00\x00\x00", b"/", b"/k/0500", b"/k/0500\x00", b"/k/0005\xff",
              b"/k/0005\xff\x00", b"\xfe", b"\xff", b"\xff\xff", b"\xff\xff\xff"]
    for p in probes:
        assert snap.bisect(p) == bisect.bisect_left(keys, p), p


@pytest.mark.parametrize(
    "prefix", [b"", b"/", b"/k/", b"/k/00", b"/k/0005", b"/k/0005\xff", b"\x00", b"\xff",
               b"\xff\xff", b"/x", b"/k/1"],
)
def test_range_of_a_prefix(prefix: bytes) -> None:
    """range(prefix, end) with end from prefix_range_end yields exactly the keys with the prefix."""
    snap = make(KEYS_1000)
    got = [kv.key for kv in snap.range(prefix, prefix_end(prefix))]
    assert got == sorted(k for k in KEYS_1000 if k.startswith(prefix))


def test_prefix_range_end_of_an_all_ff_prefix_is_not_an_upper_bound() -> None:
    """prefix_range_end(b"\\xff") is b"\\0", meaning "no upper bound" (as in etcd).

    Passing it straight to range() as ``end`` finds nothing, because every key is
    >= b"\\0": callers must map it to None. (Reader.list() and Watch pass it
    straight through; reported, not fixed here since reader.py is not ours.)
    """
    snap = make(KEYS_1000)
    assert layout.prefix_range_end(b"\xff") == b"\0"
    assert list(snap.range(b"\xff", layout.prefix_range_end(b"\xff"))) == []
    assert [kv.key for kv in snap.range(b"\xff", None)] == [b"\xff", b"\xff\xff"]


def test_range_with_arbitrary_bounds() -> None:
    """start inclusive, end exclusive, end None unbounded; start > end gives nothing."""
    snap = make(KEYS_1000)
    keys = sorted(KEYS_1000)
    for start, end in [(b"/k/0100", b"/k/0105"), (b"\x00", b"\x00\x00"), (b"\xff", None),
                       (b"/k/0200", b"/k/0100"), (b"", b"\x00"), (b"", b"\x00\x01")]:
        want = [k for k in keys if k >= start and (end is None or k < end)]
        assert [kv.key for kv in snap.range(start, end)] == want


# --------------------------------------------------------------------------------------
# validation and check()


def test_header_validation() -> None:
    """A bad magic, version, header CRC, size or inconsistent header refuses to open."""
    raw = make_bytes({b"a": b"1", b"b": b"2"})
    with pytest.raises(CorruptSegmentError, match="smaller than a header"):
        Snapshot("s", raw[:100], 100)
    with pytest.raises(CorruptSegmentError, match="magic"):
        Snapshot("s", b"X" + raw[1:], len(raw))
    with pytest.raises(CorruptSegmentError, match="header checksum"):
        Snapshot("s", raw[:16] + b"\x01" + raw[17:], len(raw))  # revision changed
    with pytest.raises(CorruptSegmentError, match="inconsistent"):
        Snapshot("s", raw + bytes(8), len(raw) + 8)  # segment larger than the header says
    with pytest.raises(CorruptSegmentError, match="inconsistent"):
        Snapshot("s", raw[:-8], len(raw) - 8)
    bad = bytearray(raw)
    struct.pack_into("<I", bad, 8, 2)
    with pytest.raises(VersionMismatchError) as info:
        Snapshot("s", bytes(bad), len(bad))
    assert (info.value.found, info.value.expected) == (2, layout.FORMAT_VERSION)
    assert isinstance(info.value, CorruptSegmentError)
    # Unused header bytes [96, 128) are not covered by anything: changing them is harmless.
    ok = raw[:100] + b"\xaa" * 28 + raw[128:]
    assert Snapshot("s", ok, len(ok)).check() == []


def test_corrupt_entry_is_detected_on_read_and_by_check() -> None:
    """A flipped value byte: get/range raise CorruptSegmentError, check() reports it."""
    raw = bytearray(make_bytes({b"a": b"hello", b"b": b"world"}))
    snap = Snapshot("s", bytes(raw), len(raw))
    off = snap.offset(1)  # the entry for b"b"
    raw[off + 48 + 1 + 2] ^= 0x20  # inside b"world"
    snap = Snapshot("s", bytes(raw), len(raw))
    assert snap.get(b"a") is not None
    with pytest.raises(CorruptSegmentError, match="checksum"):
        snap.get(b"b")
    with pytest.raises(CorruptSegmentError, match="checksum"):
        list(snap.range(b"", None))
    problems = snap.check()
    assert any("body checksum" in p for p in problems)
    assert any("fails its checksum" in p for p in problems)


def test_check_reports_index_and_hash_table_damage() -> None:
    """Swapped index entries make a full range() raise; a zeroed hash slot is a silent miss.

    check() reports both.
    """
    raw = bytearray(make_bytes({b"a": b"1", b"b": b"2", b"c": b"3"}))
    snap = Snapshot("s", bytes(raw), len(raw))
    o0, o1 = snap.offset(0), snap.offset(1)
    swapped = bytearray(raw)
    struct.pack_into("<QQ", swapped, HEADER_SIZE, o1, o0)
    snap = Snapshot("s", bytes(swapped), len(swapped))
    with pytest.raises(CorruptSegmentError, match="sorted index is out of order"):
        list(snap.range(b"", None))
    problems = snap.check()
    assert any("out of order" in p for p in problems)
    assert any("body checksum" in p for p in problems)

    cleared = bytearray(raw)
    snap = Snapshot("s", bytes(cleared), len(cleared))
    for i in range(snap.slots):
        _word, off = layout.SNAP_SLOT.unpack_from(cleared, snap.hash_off + 16 * i)
        if off == o0:
            layout.SNAP_SLOT.pack_into(cleared, snap.hash_off + 16 * i, 0, 0)
    snap = Snapshot("s", bytes(cleared), len(cleared))
    # A slot zeroed as a whole is indistinguishable from an empty one: a false miss, not
    # an error (one flipped bit is caught: test_flipped_bit_in_a_hash_slot_is_never_...).
    assert snap.get(b"a") is None
    problems = snap.check()
    assert any("hash lookup of b'a'" in p for p in problems)
    assert any("hash table holds 2 entries" in p for p in problems)


def test_check_reports_mod_revision_above_the_snapshot() -> None:
    """An entry modified after the snapshot's revision is a problem."""
    items = [(b"a", (b"1", 1, 10, 1, 0))]
    size, fill = build(items, 1, revision=5, epoch=1)
    buf = bytearray(size)
    fill(buf)
    assert any("above the snapshot's 5" in p for p in Snapshot("s", bytes(buf), size).check())


def test_hash_table_without_empty_slot_is_corrupt() -> None:
    """A full hash table (impossible at load 1/2) makes a miss raise instead of probing forever."""
    raw = bytearray(make_bytes({b"a": b"1"}))
    snap = Snapshot("s", bytes(raw), len(raw))
    off = snap.offset(0)
    h = 12345  # no key here hashes to it; the slot's check word is correct for it
    word = h | layout.slot_check(h, off) << 32
    filled = 0
    for i in range(snap.slots):
        _word, o = layout.SNAP_SLOT.unpack_from(raw, snap.hash_off + 16 * i)
        if not o:
            layout.SNAP_SLOT.pack_into(raw, snap.hash_off + 16 * i, word, off)
            filled += 1
    assert filled == snap.slots - 1
    snap = Snapshot("s", bytes(raw), len(raw))
    assert snap.get(b"a") == KeyValue(b"a", b"1", 1, 100, 1, 0)  # every slot passes its check
    with pytest.raises(CorruptSegmentError, match="no empty slot"):
        snap.get(b"missing")
    # The same hash without its check word is caught at the first slot probed.
    for i in range(snap.slots):
        w, o = layout.SNAP_SLOT.unpack_from(raw, snap.hash_off + 16 * i)
        if w == word:
            layout.SNAP_SLOT.pack_into(raw, snap.hash_off + 16 * i, h, off)
    snap = Snapshot("s", bytes(raw), len(raw))
    with pytest.raises(CorruptSegmentError, match=r"hash slot \d+ fails its check"):
        snap.get(b"missing")


# Eight keys in 16 slots with collisions: k0, k18 and k30 hash to slot 15 (the chain
# wraps to slots 0 and 1), k5 to slot 0, k8 and k10 to slot 13.
SLOT_KEYS = {b"k0": b"a", b"k18": b"b", b"k30": b"", b"k5": b"d" * 9, b"k8": b"e", b"k10": b"f",
             b"k17": b"g", b"k1": b"h"}


def slot_table(snap: Snapshot) -> list[tuple[int, int]]:
    return [layout.SNAP_SLOT.unpack_from(snap.buf, snap.hash_off + 16 * i)
            for i in range(snap.slots)]


def test_hash_slot_words_carry_their_check() -> None:
    """Each occupied slot is (crc32(key) | slot_check(crc32(key), off) << 32, off); empty ones are zero."""
    snap = make(SLOT_KEYS)
    assert snap.slots == 16
    key_at = {snap.offset(i): kv.key for i, kv in enumerate(snap.range(b"", None))}
    displaced = 0
    for i, (word, off) in enumerate(slot_table(snap)):
        if not off:
            assert word == 0
            continue
        h = zlib.crc32(key_at[off])
        assert word == h | layout.slot_check(h, off) << 32
        displaced += (h & snap.mask) != i
    assert displaced >= 3  # probe chains, one of them wrapping past the last slot
    assert snap.check() == []


def test_slot_check_changes_with_every_single_bit() -> None:
    """slot_check(h, off) differs from the original for any one flipped bit of h (32) or off (64)."""
    for h, off in [(0, 0), (0x0862575D, 264), (0xFFFFFFFF, 2**64 - 8), (12345, 1 << 40)]:
        c = layout.slot_check(h, off)
        assert 0 <= c < 1 << 32
        for b in range(32):
            assert layout.slot_check(h ^ 1 << b, off) != c
        for b in range(64):
            assert layout.slot_check(h, off ^ 1 << b) != c


def test_flipped_bit_in_a_hash_slot_is_never_a_silent_miss() -> None:
    """One flipped bit anywhere in any slot (hash, check or offset part): a get() probing it raises.

    For an occupied slot, get() of its own key raises (no silent false miss); every
    other key still reads back or raises. For an empty slot, a miss whose probe
    starts there raises. check() reports the damage.
    """
    raw = make_bytes(SLOT_KEYS)
    snap = Snapshot("s", raw, len(raw))
    exp = {kv.key: kv for kv in expected(SLOT_KEYS)}
    key_at = {snap.offset(i): kv.key for i, kv in enumerate(snap.range(b"", None))}
    misses: dict[int, bytes] = {}  # slot -> an absent key whose probe starts there
    n = 0
    while len(misses) < snap.slots:
        k = b"miss%d" % n
        misses.setdefault(zlib.crc32(k) & snap.mask, k)
        n += 1
    for i, (_word, off) in enumerate(slot_table(snap)):
        victim = key_at[off] if off else misses[i]
        for bit in range(128):
            damaged = bytearray(raw)
            damaged[snap.hash_off + 16 * i + bit // 8] ^= 1 << bit % 8
            bad = Snapshot("s", bytes(damaged), len(damaged))
            with pytest.raises(CorruptSegmentError, match=rf"hash slot {i} "
                               r"(fails its check|is damaged \(empty with a hash\))"):
                bad.get(victim)
            for key, kv in exp.items():
                try:
                    got = bad.get(key)
                except CorruptSegmentError:
                    continue
                assert got == kv, (i, bit, key)
            problems = bad.check()
            assert any("body checksum" in p for p in problems), (i, bit)
            assert any(f"hash slot {i}" in p for p in problems), (i, bit, problems)


# --------------------------------------------------------------------------------------
# a damaged sorted index

RANGE_KEYS = {bytes([c]): b"v%c" % c for c in b"abcdefgh"}


def damaged_indexes() -> dict[str, bytes]:
    """Every swap of two index offsets, and every index entry pointed at another valid entry."""
    raw = make_bytes(RANGE_KEYS)
    snap = Snapshot("s", raw, len(raw))
    offs = [snap.offset(i) for i in range(snap.count)]
    out = {}
    for p in range(len(offs)):
        for q in range(len(offs)):
            if p == q:
                continue
            b = bytearray(raw)
            struct.pack_into("<Q", b, HEADER_SIZE + 8 * p, offs[q])
            out[f"index[{p}] -> entry {q}"] = bytes(b)
            if p < q:
                struct.pack_into("<Q", b, HEADER_SIZE + 8 * q, offs[p])
                out[f"swap {p} <-> {q}"] = bytes(b)
    return out


def test_range_over_a_damaged_sorted_index_raises() -> None:
    """Swapped or redirected index offsets make a full listing raise instead of listing wrongly.

    Every entry stays valid (its own CRC passes), so only the key order can tell:
    range() requires strictly increasing keys along its walk. check() reports it too.
    """
    cases = damaged_indexes()
    assert len(cases) == 8 * 7 + 8 * 7 // 2
    for what, raw in cases.items():
        snap = Snapshot("s", raw, len(raw))
        with pytest.raises(CorruptSegmentError, match="sorted index is out of order"):
            list(snap.range(b"", None))
        assert any("out of order" in p for p in snap.check()), what
    # Bounded ranges whose walk covers the damaged positions raise as well.
    raw = cases["swap 2 <-> 4"]  # index order: a b e d c f g h
    snap = Snapshot("s", raw, len(raw))
    for start, end in [(b"b", b"g"), (b"a", None), (b"b", b"f")]:
        with pytest.raises(CorruptSegmentError, match="sorted index is out of order"):
            list(snap.range(start, end))
    raw = cases["index[3] -> entry 2"]  # index order: a b c c e f g h
    snap = Snapshot("s", raw, len(raw))
    with pytest.raises(CorruptSegmentError, match="sorted index is out of order"):
        list(snap.range(b"b", b"h"))


def test_range_over_a_damaged_sorted_index_never_lists_wrongly() -> None:
    """The goal: range() either raises or returns exactly the right entries."""
    raw = damaged_indexes()["swap 0 <-> 1"]  # index order: b a c d e f g h
    snap = Snapshot("s", raw, len(raw))
    for start, end in [(b"a", b"b"), (b"b", None)]:
        want = [k for k in sorted(RANGE_KEYS) if k >= start and (end is None or k < end)]
        try:
            got = [kv.key for kv in snap.range(start, end)]
        except CorruptSegmentError:
            continue
        assert got == want, (start, end)  # today: [] and [c .. h]: a, then b, silently missing


# --------------------------------------------------------------------------------------
# hypothesis: any dict reads back exactly

keys = st.binary(max_size=12) | st.sampled_from([b"\x00", b"\xff", b"\xff\xff", b"a", b"a\xff"])


@settings(max_examples=150, derandomize=True, database=None, deadline=None)
@given(data=st.dictionaries(keys, st.binary(max_size=40), max_size=60),
       probes=st.lists(keys, max_size=8))
def test_any_dict_reads_back(data: dict[bytes, bytes], probes: list[bytes]) -> None:
    """get() equals dict.get, range(prefix) equals the filtered sorted dict, check() is clean."""
    snap = make(data)
    exp = {kv.key: kv for kv in expected(data)}
    assert snap.check() == []
    for k in list(data) + probes:
        assert snap.get(k) == exp.get(k)
    assert list(snap.range(b"", None)) == [exp[k] for k in sorted(exp)]
    for p in probes + [k[:2] for k in data]:
        got = [kv.key for kv in snap.range(p, prefix_end(p))]
        assert got == sorted(k for k in data if k.startswith(p))
        assert snap.bisect(p) == bisect.bisect_left(sorted(data), p)



@pytest.fixture(autouse=True, params=["c", "python"])
def _implementation(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test here runs against the C speedups and the pure-Python reference."""
    from shmcache.format import snapshot as _snapshot_module

    if request.param == "c" and _snapshot_module._speedups is None:
        pytest.skip("shmcache.format._speedups was not built")
    monkeypatch.setattr(_snapshot_module, "USE_SPEEDUPS", request.param == "c")


def test_range_list_equals_range_and_honours_limit() -> None:
    """range_list (the walk behind Reader.list) returns what range yields, up to limit."""
    data = {b"p/%03d" % i: b"v%d" % i for i in range(200)} | {b"q": b"", b"\x00": b"z"}
    raw = make_bytes(data)
    snap = Snapshot("s", raw, len(raw))
    for start, end in [(b"", None), (b"p/", b"p0"), (b"p/1", b"p/2"), (b"q", None), (b"r", None)]:
        full = list(snap.range(start, end))
        assert snap.range_list(start, end) == full
        for limit in (0, 1, 7, len(full), len(full) + 5):
            assert snap.range_list(start, end, limit) == full[:limit]


def test_range_list_over_a_damaged_index_raises_or_is_right() -> None:
    """Every single swap or redirect in the sorted index: range_list raises or is exact."""
    for name, raw in damaged_indexes().items():
        snap = Snapshot("s", raw, len(raw))
        for start, end in [(b"a", b"b"), (b"b", None), (b"", None), (b"c", b"f")]:
            want = [k for k in sorted(RANGE_KEYS) if k >= start and (end is None or k < end)]
            try:
                got = [kv.key for kv in snap.range_list(start, end)]
            except CorruptSegmentError:
                continue
            assert got == want, (name, start, end)


# --------------------------------------------------------------------------------------
# write(): the writer's build from the live snapshot (the base) plus the changes since

def meta(key: bytes, value: bytes) -> Meta:
    """Metadata that depends on the entry alone, so it survives a merge unchanged."""
    return (value, 1 + len(key), 1 + zlib.crc32(key) % 997, 1 + len(value), zlib.crc32(value))


def write_bytes(state: dict[bytes, bytes], changes: dict[bytes, bytes | None] | None = None,
                base: Snapshot | None = None, revision: int = 1000) -> bytes:
    """A snapshot of ``state`` written with snapshot.write, over ``base`` when given."""
    items = changes if changes is not None else state
    keys = sorted(items)
    values = [None if items[k] is None else meta(k, items[k]) for k in keys]  # type: ignore[arg-type]
    plan = snapshot.Plan.of(len(state), sum(snapshot.entry_span(k, v) for k, v in state.items()))
    buf = bytearray(plan.total)
    snapshot.write(buf, plan, revision, 3, keys, values, base)  # type: ignore[arg-type]
    return bytes(buf)


def merged(state: dict[bytes, bytes], changes: dict[bytes, bytes | None]) -> dict[bytes, bytes]:
    out = dict(state)
    for k, v in changes.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = v
    return out


@settings(max_examples=150, derandomize=True, database=None, deadline=None)
@given(state=st.dictionaries(keys, st.binary(max_size=40), max_size=60),
       changes=st.dictionaries(keys, st.none() | st.binary(max_size=40), max_size=30))
def test_write_over_a_base_equals_a_whole_build(state: dict[bytes, bytes],
                                                changes: dict[bytes, bytes | None]) -> None:
    """Base + changes (puts, updates, deletes, deletes of absent keys) gives, byte for byte,
    the segment a build of the merged state gives."""
    raw = write_bytes(state)
    base = Snapshot("/base", raw, len(raw))
    after = merged(state, changes)
    got = write_bytes(after, changes, base)
    assert got == write_bytes(after)
    snap = Snapshot("/merged", got, len(got))
    assert snap.check() == []
    assert [kv.key for kv in snap.range(b"", None)] == sorted(after)


def test_c_and_python_builds_are_byte_identical(monkeypatch: pytest.MonkeyPatch) -> None:
    if snapshot._speedups is None:
        pytest.skip("shmcache.format._speedups was not built")
    state = {b"/k/%05d" % i: b"v" * (i % 50) for i in range(3000)} | {b"": b"", b"\xff": b"x"}
    changes: dict[bytes, bytes | None] = {b"/k/%05d" % i: (None if i % 3 else b"new%d" % i)
                                          for i in range(0, 4000, 7)}
    out = {}
    for impl in (True, False):
        monkeypatch.setattr(snapshot, "USE_SPEEDUPS", impl)
        raw = write_bytes(state)
        out[impl] = (raw, write_bytes(merged(state, changes), changes,
                                      Snapshot("/base", raw, len(raw))))
    assert out[True] == out[False]


def test_write_over_a_corrupt_base_raises_corrupt_segment_error() -> None:
    state = {b"/k/%03d" % i: b"value %d" % i for i in range(100)}
    raw = bytearray(write_bytes(state))
    base = Snapshot("/base", raw, len(raw))
    off = base.offset(40)
    raw[off + layout.SNAP_ENTRY.size + 6] ^= 0x01  # a value byte: the entry's checksum fails
    changes: dict[bytes, bytes | None] = {b"/k/050": b"x"}
    with pytest.raises(CorruptSegmentError, match="/base.*checksum"):
        write_bytes(merged(state, changes), changes, base)


def test_write_checks_the_plan_and_the_order() -> None:
    state = {b"a": b"1", b"b": b"2"}
    raw = write_bytes(state)
    base = Snapshot("/base", raw, len(raw))
    # The plan says one entry too few: the build notices instead of overrunning.
    with pytest.raises(ValueError, match="outgrow|planned"):
        write_bytes({b"a": b"1"}, {b"c": b"3"}, base)
    # One entry too many planned: the segment would hold garbage at the end.
    with pytest.raises(ValueError, match="planned"):
        write_bytes({b"a": b"1", b"b": b"2", b"c": b"3", b"d": b""}, {b"c": b"3"}, base)
    plan = snapshot.Plan.of(2, 2 * snapshot.entry_span(b"a", b"1"))
    with pytest.raises(ValueError, match="sorted"):
        snapshot.write(bytearray(plan.total), plan, 1, 1, [b"b", b"a"],
                       [meta(b"b", b"1"), meta(b"a", b"1")])


def test_c_crc32_equals_zlib_at_every_length_alignment_and_start() -> None:
    """The C speedups' CRC-32 (PCLMULQDQ folding where the CPU has it, zlib for the
    rest) equals zlib.crc32 for every length up to 1 KiB, three alignments, and a
    continued CRC; and for 1 MiB."""
    if snapshot._speedups is None:
        pytest.skip("shmcache.format._speedups was not built")
    c_crc = snapshot._speedups.crc32
    data = bytes((i * 131 + 7) % 251 for i in range(1100))
    for n in range(0, 1025):
        for off in range(3):
            b = data[off:off + n]
            assert c_crc(b) == zlib.crc32(b), (n, off)
            assert c_crc(b, 0xDEADBEEF) == zlib.crc32(b, 0xDEADBEEF), (n, off)
    big = bytes(range(256)) * 4096
    assert c_crc(big) == zlib.crc32(big)
    assert c_crc(memoryview(big)[5:]) == zlib.crc32(big[5:])
