"""The byte formats as constants: names, prefix ranges, hash table sizing, struct sizes and golden bytes.

The golden-byte tests pin the exact bytes the writer produces for fixed inputs.
If one fails, the on-disk (in-/dev/shm) format changed: either the change was an
accident, or FORMAT_VERSION must be bumped, docs/format.md updated and the
golden bytes below replaced on purpose.
"""

from __future__ import annotations

import mmap
import os
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import shmcache
from shmcache.format import control, layout, ring, snapshot
from shmcache.ipc import shm as _shm
from shmcache.writer import control_writer

FAST = settings(max_examples=200, derandomize=True, database=None, deadline=None)


# --------------------------------------------------------------------------------------
# prefix_range_end


@pytest.mark.parametrize(
    ("prefix", "end"),
    [
        (b"", b"\0"),  # the whole keyspace: etcd's "every key" convention
        (b"a", b"b"),
        (b"/app/", b"/app0"),
        (b"\x00", b"\x01"),
        (b"ab\xfe", b"ab\xff"),
        (b"a\xff", b"b"),  # trailing 0xff bytes are dropped, then the last byte incremented
        (b"a\xff\xff", b"b"),
        (b"a\xfe\xff", b"a\xff"),
        (b"\xff", b"\0"),  # nothing left to increment: no upper bound, as etcd does it
        (b"\xff\xff\xff", b"\0"),
    ],
)
def test_prefix_range_end(prefix: bytes, end: bytes) -> None:
    """prefix_range_end is etcd's GetPrefixRangeEnd, byte for byte."""
    assert layout.prefix_range_end(prefix) == end


def test_prefix_range_end_does_not_modify_its_argument() -> None:
    """The prefix is copied, not incremented in place (bytearray arguments stay intact)."""
    p = bytearray(b"ab\xff")
    layout.prefix_range_end(p)  # type: ignore[arg-type]
    assert p == bytearray(b"ab\xff")


@FAST
@given(prefix=st.binary(min_size=1, max_size=4), key=st.binary(max_size=6))
def test_prefix_range_end_bounds_exactly_the_keys_with_the_prefix(prefix: bytes, key: bytes) -> None:
    """For a prefix with a non-0xff byte, ``prefix <= key < end`` iff key starts with prefix.

    Keys are drawn near the prefix (prefix + suffix) half the time so both sides
    of the boundary are exercised.
    """
    end = layout.prefix_range_end(prefix)
    if end == b"\0":  # all 0xff: no upper bound, every key >= prefix matches
        assert prefix.strip(b"\xff") == b""
        assert (key >= prefix) == key.startswith(prefix)
        return
    for k in (key, prefix + key, prefix[:-1] + key):
        assert (prefix <= k < end) == k.startswith(prefix), (prefix, k, end)


# --------------------------------------------------------------------------------------
# hash_slots_for, align8


@pytest.mark.parametrize(
    ("count", "slots"),
    [(0, 8), (1, 8), (4, 8), (5, 16), (8, 16), (9, 32), (1000, 2048), (1024, 2048), (1025, 4096)],
)
def test_hash_slots_for(count: int, slots: int) -> None:
    """A power of two, at least 8, keeping the load factor at or below 1/2."""
    assert layout.hash_slots_for(count) == slots


@FAST
@given(st.integers(min_value=0, max_value=1 << 24))
def test_hash_slots_for_is_the_smallest_power_of_two_at_half_load(count: int) -> None:
    """slots is a power of two >= max(8, 2*count), and half of it would not be."""
    slots = layout.hash_slots_for(count)
    assert slots & (slots - 1) == 0
    assert slots >= 8 and slots >= 2 * count
    assert slots == 8 or slots // 2 < 2 * count


@pytest.mark.parametrize(("n", "aligned"), [(0, 0), (1, 8), (7, 8), (8, 8), (9, 16), (32, 32)])
def test_align8(n: int, aligned: int) -> None:
    """align8 rounds up to a multiple of 8."""
    assert layout.align8(n) == aligned


# --------------------------------------------------------------------------------------
# names


@pytest.mark.parametrize(
    "name", ["a", "Z", "0", "my-cache", "my_cache.v2", "A.b-C_d.9", "x" * 64, "-", "."]
)
def test_valid_names(name: str) -> None:
    """1 to 64 characters of [A-Za-z0-9._-] are accepted and returned unchanged."""
    assert _shm.validate_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "x" * 65,  # one too many
        "a b",
        "a/b",  # would escape the /dev/shm namespace
        "/a",
        "a\n",  # fullmatch: a trailing newline does not sneak past "$"
        "a\x00",
        "caf\u00e9",  # letters outside ASCII
        "\u0661",  # an Arabic-Indic digit: str.isdigit() but not [0-9]
        "a*",
        b"abc",  # not a str
        None,
        5,
    ],
)
def test_invalid_names(name: object) -> None:
    """Anything else raises InvalidNameError, which is also a ValueError and a ShmCacheError."""
    with pytest.raises(shmcache.InvalidNameError) as info:
        _shm.validate_name(name)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, shmcache.ShmCacheError)
    assert "[A-Za-z0-9._-]" in str(info.value)  # the hint says what is allowed


def test_name_length_boundary() -> None:
    """64 characters is the limit: 64 passes, 65 fails."""
    assert _shm.validate_name("n" * 64)
    with pytest.raises(ValueError):
        _shm.validate_name("n" * 65)


def test_segment_names() -> None:
    """Segment names derive from the cache name: one control, a ring per generation, a snapshot per seq."""
    assert layout.control_name("c1") == "/shmcache.c1.ctl"
    assert layout.ring_name("c1", 3) == "/shmcache.c1.ring.3"
    assert layout.snapshot_name("c1", 17) == "/shmcache.c1.snap.17"


def test_longest_segment_name_is_a_valid_posix_shm_name() -> None:
    """The longest possible name has one leading slash and fits NAME_MAX (255) in /dev/shm."""
    name = "n" * 64
    for seg in (layout.control_name(name), layout.ring_name(name, 2**64 - 1),
                layout.snapshot_name(name, 2**64 - 1)):
        assert seg.startswith("/") and "/" not in seg[1:]
        assert len(seg) - 1 <= 255


def _touch(directory: str, *segments: str) -> None:
    for seg in segments:
        open(os.path.join(directory, seg.lstrip("/")), "wb").close()


def test_list_segments_finds_the_derived_names(tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """list_segments and list_caches parse exactly the names layout derives, and nothing else."""
    monkeypatch.setattr(_shm, "SHM_DIR", str(tmp_path))
    mine = [layout.control_name("c"), layout.ring_name("c", 1), layout.ring_name("c", 12),
            layout.snapshot_name("c", 4)]
    _touch(str(tmp_path), *mine)
    # Other caches, other programs, semaphores:
    _touch(str(tmp_path), layout.control_name("cc"), layout.ring_name("cc", 1),
           "/shmcache.c.other", "/sem.shmcache.c.ctl", "/unrelated")
    assert _shm.list_segments("c") == sorted(mine)
    assert _shm.list_caches() == ["c", "cc"]


def test_list_segments_ignores_caches_whose_name_extends_this_one(
        tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: segments of cache ``c.ring`` or ``c.snap`` are not segments of cache ``c``.

    Names may contain dots; matching only the first dotted component after
    ``shmcache.c.`` let ``shmcache.remove("c")`` unlink another cache's segments.
    """
    monkeypatch.setattr(_shm, "SHM_DIR", str(tmp_path))
    theirs = [layout.control_name("c.ring"), layout.ring_name("c.ring", 1),
              layout.snapshot_name("c.snap", 1), layout.control_name("c.ctl")]
    _touch(str(tmp_path), layout.control_name("c"), layout.ring_name("c", 2), *theirs)
    assert _shm.list_segments("c") == [layout.control_name("c"), layout.ring_name("c", 2)]
    assert _shm.list_segments("c.ring") == [layout.control_name("c.ring"),
                                            layout.ring_name("c.ring", 1)]


# --------------------------------------------------------------------------------------
# struct sizes and offsets


def test_struct_sizes() -> None:
    """Sizes every reader and writer depend on; a change here is a format change."""
    assert layout.HEAD.size == 16
    assert layout.RECORD.size == 32
    assert layout.RING_HEADER.size == 32 <= layout.RING_DATA == 64
    assert layout.SNAP_ENTRY.size == 48
    assert layout.SNAP_SLOT.size == 16
    assert layout.SNAP_INDEX_ENTRY.size == 8
    assert layout.SNAP_HEADER.size == 96 <= snapshot.HEADER_SIZE == 128
    assert layout.SNAP_HEADER_CRC_SPAN == 92
    assert layout.BLOCK.size == 22 * 8 == 176
    assert layout.CONTROL_SIZE == 4096


def test_record_crc_span_covers_stamp_revision_and_length() -> None:
    """The record CRC covers [0, 20): stamp (Q), revision (Q), length (I); kind starts at 20."""
    assert layout.REC_CRC_SPAN == 8 + 8 + 4
    assert layout.RECORD.format == "<QQIHHII"


def test_control_offsets() -> None:
    """Control words are 8-byte aligned, distinct, and the block and prefix fit the segment."""
    words = [layout.C_SEQ, layout.C_HEARTBEAT, layout.C_WRITER_PID, layout.C_WRITER_START,
             layout.C_CREATED, layout.C_FLAGS]
    assert words == [16, 24, 32, 40, 48, 56]
    assert all(w % 8 == 0 for w in words)
    assert layout.HEAD.size <= layout.C_SEQ
    assert layout.C_FLAGS + 8 <= layout.C_BLOCK == 64
    assert layout.C_BLOCK + layout.BLOCK.size <= layout.C_PREFIX == 1024
    assert layout.C_PREFIX + layout.MAX_PREFIX_LEN <= layout.C_INDEX_DEFS == 3072
    # The cluster id and the block's checksum end the segment, after the definitions.
    assert layout.C_INDEX_DEFS + layout.MAX_INDEX_DEFS_LEN == layout.C_CLUSTER_ID == 4080
    assert layout.C_CLUSTER_ID + 8 == layout.C_BLOCK_CRC == layout.CONTROL_SIZE - 8


def test_block_field_indices() -> None:
    """The block's fields in order; each is the index of a '<Q' word at C_BLOCK + 8*index."""
    assert [layout.B_EPOCH, layout.B_REVISION, layout.B_COMPACT_REVISION, layout.B_RING_HEAD,
            layout.B_RING_TAIL, layout.B_RING_GEN, layout.B_RING_CAPACITY, layout.B_SNAP_SEQ,
            layout.B_SNAP_REVISION, layout.B_SNAP_SIZE, layout.B_SNAP_RING_POS,
            layout.B_KEY_COUNT, layout.B_ETCD_REVISION, layout.B_PREFIX_LEN,
            layout.B_SYNC_STARTED, layout.B_SYNC_DONE, layout.B_SYNC_REVISION,
            layout.B_INDEX_DEFS_LEN, layout.B_OVL_SEQ, layout.B_OVL_REVISION,
            layout.B_OVL_SIZE, layout.B_OVL_RING_POS] == list(range(22))
    assert layout.BLOCK.format == "<22Q"
    assert layout.BLOCK_FIELDS == 22 == len(layout.BLOCK.unpack(bytes(layout.BLOCK.size)))
    # The Block dataclass carries seq, all 22 fields in order, then the cluster id.
    names = list(control.Block.__dataclass_fields__)
    assert names[0] == "seq" and len(names) == 24 and names[-1] == "cluster_id"
    assert names[1 + layout.B_RING_TAIL] == "ring_tail"
    assert names[1 + layout.B_PREFIX_LEN] == "prefix_len"
    assert names[1 + layout.B_SYNC_STARTED:] == ["sync_started", "sync_done", "sync_revision",
                                                 "index_defs_len", "ovl_seq", "ovl_revision",
                                                 "ovl_size", "ovl_ring_pos", "cluster_id"]


def test_magics_and_kinds() -> None:
    """Each segment kind has its own 8-byte magic."""
    assert layout.MAGIC == {1: b"SHMC.CTL", 2: b"SHMC.RNG", 3: b"SHMC.SNP", 4: b"SHMC.IDX",
                            5: b"SHMC.OVL"}
    assert (layout.KIND_CONTROL, layout.KIND_RING, layout.KIND_SNAPSHOT,
            layout.KIND_INDEX, layout.KIND_OVERLAY) == (1, 2, 3, 4, 5)
    assert (layout.REC_KIND_EVENTS, layout.REC_KIND_PAD) == (1, 2)
    assert (layout.EVENT_PUT, layout.EVENT_DELETE) == (0, 1)
    assert layout.FORMAT_VERSION == 4


# --------------------------------------------------------------------------------------
# golden bytes


def test_golden_ring_header_and_record() -> None:
    """A ring of capacity 256, generation 7, holding one record (revision 0x1122, b"hello")."""
    cap = 256
    buf = bytearray(layout.RING_DATA + cap)
    ring.RingWriter.init_segment(buf, 7, cap)
    w = ring.RingWriter(buf, cap, 7)
    w.write(w.place(5), 0x1122, b"hello")
    assert buf[:layout.RING_DATA].hex() == (
        "53484d432e524e47"  # magic "SHMC.RNG"
        "04000000"  # format version 4
        "02000000"  # kind: ring
        "0700000000000000"  # generation 7
        "0001000000000000"  # capacity 256
        + "00" * 32  # unused up to RING_DATA
    )
    assert buf[layout.RING_DATA:layout.RING_DATA + 40].hex() == (
        "0000000000000000"  # position stamp 0
        "2211000000000000"  # revision 0x1122
        "05000000"  # payload length 5
        "0100"  # kind: events
        "0000"  # flags
        "6917bae1"  # crc32 of header bytes [0, 20) then the payload
        "00000000"  # reserved
        "68656c6c6f"  # b"hello"
        "000000"  # padding to 8 bytes
    )
    assert zlib.crc32(b"hello", zlib.crc32(bytes(buf[64:84]))) == 0xE1BA1769
    assert (w.head, w.tail) == (40, 0)


def test_golden_snapshot() -> None:
    """A one-key snapshot: key b"k", value b"v", create 1, mod 2, version 3, lease 4; revision 9, epoch 2."""
    size, fill = snapshot.build([(b"k", (b"v", 1, 2, 3, 4))], 1, revision=9, epoch=2)
    assert size == 320
    buf = bytearray(size)
    fill(buf)
    assert buf[:128].hex() == (
        "53484d432e534e50"  # magic "SHMC.SNP"
        "04000000"  # format version 4
        "03000000"  # kind: snapshot
        "0900000000000000"  # revision 9
        "0200000000000000"  # epoch 2
        "0100000000000000"  # count 1
        "8000000000000000"  # index_off 128
        "8800000000000000"  # hash_off 136
        "0800000000000000"  # hash_slots 8
        "0801000000000000"  # data_off 264
        "3800000000000000"  # data_len 56
        "4001000000000000"  # total_size 320
        "dd5f2369"  # body crc32 (data, then index, then hash table)
        "0347f7c7"  # header crc32 of bytes [0, 92)
        + "00" * 32  # unused up to HEADER_SIZE
    )
    assert buf[128:136].hex() == "0801000000000000"  # index[0] -> the entry at 264
    # Hash slot: (crc32(key) | slot_check(crc32(key), offset) << 32, offset), at slot
    # crc32(key) & 7; every other slot is empty (all zeros).
    h = zlib.crc32(b"k")
    assert h == 0x0862575D
    slot = h & 7
    assert slot == 5
    # slot_check by hand: fold = h ^ (off & 0xffffffff) ^ (off >> 32) ^ 0x5bd1e995, then
    # fold * 0x9e3779b1 mod 2**32.
    fold = 0x0862575D ^ 0x108 ^ 0 ^ 0x5BD1E995
    assert fold == 0x53B3BFC0
    assert (fold * 0x9E3779B1) & 0xFFFFFFFF == 0x872953C0 == layout.slot_check(h, 264)
    table = bytes(buf[136:264])
    assert table == bytes(16 * slot) + bytes.fromhex(
        "5d576208"  # crc32(b"k")
        "c0532987"  # slot_check(crc32(b"k"), 264)
        "0801000000000000"  # the entry at 264
    ) + bytes(16 * (7 - slot))
    assert buf[264:320].hex() == (
        "b2164530"  # entry crc32 of bytes [4, 50)
        "01000000"  # key length 1
        "01000000"  # value length 1
        "00000000"  # flags
        "0100000000000000"  # create_revision 1
        "0200000000000000"  # mod_revision 2
        "0300000000000000"  # version 3
        "0400000000000000"  # lease 4
        "6b76"  # b"k" b"v"
        "000000000000"  # padding to 8 bytes
    )
    assert zlib.crc32(bytes(buf[268:314])) == 0x304516B2
    body = zlib.crc32(table, zlib.crc32(bytes(buf[128:136]), zlib.crc32(bytes(buf[264:320]))))
    assert body == 0x69235FDD  # data area, then index, then hash table
    assert zlib.crc32(bytes(buf[:92])) == 0xC7F74703


def test_golden_control_segment() -> None:
    """initialise() then two publishes: the head, seqlock word, block, prefix, cluster id and
    checksum bytes."""
    m = mmap.mmap(-1, layout.CONTROL_SIZE)
    try:
        control_writer.ControlWriter.initialise(m, b"/app/")
        assert m[:16].hex() == "53484d432e43544c" "04000000" "01000000"  # "SHMC.CTL", v4, control
        assert m[64:240] == bytes(13 * 8) + b"\x05" + bytes(8 * 8 + 7)  # only PREFIX_LEN is set
        # No cluster yet; crc32 of b"/app/", no definitions, 8 zero bytes, the block.
        assert m[4080:4096].hex() == "0000000000000000" "fa79d19200000000"
        assert zlib.crc32(b"/app/" + bytes(8) + m[64:240]) == 0x92D179FA
        assert control.read_block(m) == control.Block(0, *[0] * 13, 5, *[0] * 8, 0)
        cw = control_writer.ControlWriter(m)
        cw.publish({i: i + 1 for i in range(22) if i != layout.B_PREFIX_LEN})
        assert m[layout.C_SEQ:layout.C_SEQ + 8].hex() == "0200000000000000"  # even: published once
        expected = [i + 1 for i in range(22)]
        expected[layout.B_PREFIX_LEN] = 5  # set by initialise(), kept by publish()
        assert m[64:240].hex() == "".join(v.to_bytes(8, "little").hex() for v in expected)
        assert m[64:240].hex() == (
            "0100000000000000"  # 64  EPOCH, first, at C_BLOCK
            "0200000000000000"  # 72  REVISION
            "0300000000000000"  # 80  COMPACT_REVISION
            "0400000000000000"  # 88  RING_HEAD
            "0500000000000000"  # 96  RING_TAIL
            "0600000000000000"  # 104 RING_GEN
            "0700000000000000"  # 112 RING_CAPACITY
            "0800000000000000"  # 120 SNAP_SEQ
            "0900000000000000"  # 128 SNAP_REVISION
            "0a00000000000000"  # 136 SNAP_SIZE
            "0b00000000000000"  # 144 SNAP_RING_POS
            "0c00000000000000"  # 152 KEY_COUNT
            "0d00000000000000"  # 160 ETCD_REVISION
            "0500000000000000"  # 168 PREFIX_LEN (len(b"/app/"))
            "0f00000000000000"  # 176 SYNC_STARTED
            "1000000000000000"  # 184 SYNC_DONE
            "1100000000000000"  # 192 SYNC_REVISION
            "1200000000000000"  # 200 INDEX_DEFS_LEN (no prefix passed: the defs are not written)
            "1300000000000000"  # 208 OVL_SEQ
            "1400000000000000"  # 216 OVL_REVISION
            "1500000000000000"  # 224 OVL_SIZE
            "1600000000000000"  # 232 OVL_RING_POS
        )
        assert m[1024:1030] == b"/app/\0"
        assert m[240:1024] == bytes(784)  # nothing else between the block and the prefix
        # INDEX_DEFS_LEN 18 (never written here) puts 18 zero bytes in the checksum.
        assert m[4080:4096].hex() == "0000000000000000" "59701b6200000000"
        assert zlib.crc32(b"/app/" + bytes(18 + 8) + m[64:240]) == 0x621B7059
        assert control.read_block(m) == control.Block(2, *expected, 0)
        b = control.read_block(m)
        assert b is not None
        assert (b.prefix_len, b.sync_started, b.sync_done, b.sync_revision) == (5, 15, 16, 17)
        # A new epoch's publish (a prefix given) stores its cluster id with it.
        cw.set_cluster_id(0xCDF818194E3A8C32)
        cw.publish({layout.B_EPOCH: 2}, prefix=b"/app/")
        assert m[layout.C_SEQ:layout.C_SEQ + 8].hex() == "0400000000000000"
        assert m[4080:4096].hex() == "328c3a4e1918f8cd" "46172a4400000000"
        assert zlib.crc32(b"/app/" + m[4080:4088] + m[64:240]) == 0x442A1746
        b = control.read_block(m)
        assert b is not None and (b.epoch, b.index_defs_len, b.cluster_id) == (
            2, 0, 0xCDF818194E3A8C32)
        del cw
    finally:
        m.close()
