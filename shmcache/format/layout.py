"""Byte formats of the control, ring and snapshot segments as named constants; pure, no I/O.

Every multi-byte integer is little-endian. Control words that another process
reads while the writer may be storing them are aligned 8-byte fields: the
writer stores each with one 8-byte copy (control_writer._store; not
``struct.pack_into``, which zeroes the field first) and readers load it with
``unpack_from('<Q')``, a single load on CPython/x86-64 (docs/design.md, "Facts
this design relies on"), so a reader never sees half of a word. Nothing beyond that is
assumed: records carry a position stamp and a CRC so a torn or overwritten read
is detected on any architecture. docs/format.md is the prose version of this
module; keep them in step.
"""

from __future__ import annotations

import re
import struct
from typing import Final

from ..errors import VersionMismatchError

# 2: ring events may carry index values; index segments; index definitions in
# the control segment (B_INDEX_DEFS_LEN, C_INDEX_DEFS).
# 3: delta segments (the keys changed since the snapshot, B_OVL_*), so a reader
# decodes only the ring records after the delta segment; the block grew to 22
# words and the two fixed words after it moved.
# 4: the published block carries a checksum (C_BLOCK_CRC) and the etcd cluster
# id the state was loaded from (C_CLUSTER_ID), both at the end of the segment;
# the index definitions' room shrank by their 16 bytes.
FORMAT_VERSION: Final = 4

def check_version(version: int, what: str, name: str) -> None:
    """VersionMismatchError unless a segment's header ``version`` is FORMAT_VERSION
    (``what``: "ring segment", "snapshot", ...; ``name``: the segment)."""
    if version != FORMAT_VERSION:
        raise VersionMismatchError(
            f"{what} has format version {version}, this shmcache reads version "
            f"{FORMAT_VERSION}", segment=name, found=version, expected=FORMAT_VERSION)


# --- names -----------------------------------------------------------------

NAME_RE: Final = re.compile(r"[A-Za-z0-9._-]{1,64}")
SEGMENT_PREFIX: Final = "/shmcache."


def control_name(name: str) -> str:
    return f"{SEGMENT_PREFIX}{name}.ctl"


def ring_name(name: str, generation: int) -> str:
    return f"{SEGMENT_PREFIX}{name}.ring.{generation}"


def snapshot_name(name: str, seq: int) -> str:
    return f"{SEGMENT_PREFIX}{name}.snap.{seq}"


def overlay_name(name: str, seq: int) -> str:
    """The delta segment: the keys changed since the live snapshot, at B_OVL_REVISION
    (see B_OVL_SEQ; the format calls its kind KIND_OVERLAY)."""
    return f"{SEGMENT_PREFIX}{name}.ovl.{seq}"


def index_name(name: str, seq: int) -> str:
    """The secondary indexes that go with snapshot ``seq`` (same revision)."""
    return f"{SEGMENT_PREFIX}{name}.idx.{seq}"


def sync_socket_name(name: str) -> str:
    """The consistent-read socket's file next to the segments (in /dev/shm on Linux)."""
    return f"{SEGMENT_PREFIX}{name}.sync"


def lock_name(name: str) -> str:
    """The writer's lock file next to the segments: mode 600, flock'ed by the running writer."""
    return f"{SEGMENT_PREFIX}{name}.lock"


# --- common segment header ---------------------------------------------------
# Every segment starts with: magic (8 bytes), format version (u32), kind (u32).

HEAD: Final = struct.Struct("<8sII")
KIND_CONTROL: Final = 1
KIND_RING: Final = 2
KIND_SNAPSHOT: Final = 3
KIND_INDEX: Final = 4
KIND_OVERLAY: Final = 5
MAGIC: Final = {KIND_CONTROL: b"SHMC.CTL", KIND_RING: b"SHMC.RNG", KIND_SNAPSHOT: b"SHMC.SNP",
                KIND_INDEX: b"SHMC.IDX", KIND_OVERLAY: b"SHMC.OVL"}

# --- control segment ---------------------------------------------------------

CONTROL_SIZE: Final = 4096
MAX_PREFIX_LEN: Final = 2048

# Offsets of the single-word fields. SEQ is a seqlock: the writer makes it odd,
# stores the published block, then makes it even. Its low 32 bits double as the
# futex word readers sleep on (little-endian, so the low half is at SEQ itself).
C_SEQ: Final = 16
C_HEARTBEAT: Final = 24  # CLOCK_MONOTONIC ns of the writer's last heartbeat (outside the seqlock)
C_WRITER_PID: Final = 32
C_WRITER_START: Final = 40  # writer's start time, clock ticks since boot (/proc/PID/stat field 22)
C_CREATED: Final = 48  # CLOCK_REALTIME ns when the segment was created
C_FLAGS: Final = 56  # bit 0: the writer closed cleanly
# CLOCK_REALTIME ns since which the writer has failed to reach etcd; 0 while it
# is connected (or never tried). A single word outside the seqlock, like the
# heartbeat.
C_ETCD_DOWN_SINCE: Final = 240
# Inode of the writer's PID namespace (/proc/self/ns/pid), 0 if unknown. A reader
# in another PID namespace (another container) cannot see the writer's pid in
# /proc and judges it by its heartbeat instead.
C_WRITER_PIDNS: Final = 248
# CLOCK_REALTIME ns since which the writer has failed to publish (a full /dev/shm:
# ENOSPC), 0 while publishing works. Outside the seqlock, like ETCD_DOWN_SINCE.
C_PUBLISH_FAILING_SINCE: Final = 256
# The last publish error's text: a head word, length (low 32 bits) and crc32 of
# the text (high 32 bits), then up to MAX_PUBLISH_ERROR_LEN bytes of UTF-8 text
# at C_PUBLISH_ERROR + 8. A reader takes the text only when the head word is
# the same before and after its copy and the crc matches, so it never shows a
# torn text. Version 3 readers that predate these words ignore the bytes (they
# were zero), so the format version did not change.
C_PUBLISH_ERROR: Final = 264
PUBLISH_ERROR_TEXT: Final = C_PUBLISH_ERROR + 8
MAX_PUBLISH_ERROR_LEN: Final = 752
# A writer whose heartbeat (every 0.25 s) is older than this counts as gone, for
# readers that cannot see its pid.
HEARTBEAT_DEAD_SECONDS: Final = 2.0

# The published block, read as one unit between two reads of SEQ.
C_BLOCK: Final = 64
BLOCK: Final = struct.Struct("<22Q")
BLOCK_FIELDS: Final = 22
(
    B_EPOCH,
    B_REVISION,
    B_COMPACT_REVISION,
    B_RING_HEAD,
    B_RING_TAIL,
    B_RING_GEN,
    B_RING_CAPACITY,
    B_SNAP_SEQ,
    B_SNAP_REVISION,
    B_SNAP_SIZE,
    B_SNAP_RING_POS,
    B_KEY_COUNT,
    B_ETCD_REVISION,
    B_PREFIX_LEN,
    B_SYNC_STARTED,  # consistent-read rounds the writer has started (Reader.sync)
    B_SYNC_DONE,  # ... and completed: the cache then held every write up to B_SYNC_REVISION
    B_SYNC_REVISION,
    B_INDEX_DEFS_LEN,  # bytes of index definitions at C_INDEX_DEFS (0: no indexes)
    # The delta segment: every key changed after the live snapshot, up to
    # B_OVL_REVISION (0: none; the changes are all in the ring after SNAP_RING_POS).
    B_OVL_SEQ,
    B_OVL_REVISION,
    B_OVL_SIZE,
    B_OVL_RING_POS,  # ring head when it was built: the records after it are newer
) = range(22)

C_PREFIX: Final = 1024  # the key prefix the writer serves, B_PREFIX_LEN bytes
# The secondary index definitions, msgpack [[name, spec], ...], B_INDEX_DEFS_LEN
# bytes. Like the prefix they change only with the epoch.
C_INDEX_DEFS: Final = 3072
MAX_INDEX_DEFS_LEN: Final = 1008
# The id of the etcd cluster the epoch's state was loaded from (etcd's response
# header cluster_id; 0: unknown). Changes only with the epoch, under the seqlock.
C_CLUSTER_ID: Final = 4080
# crc32 (low 32 bits of the word) of, in this order: the prefix (B_PREFIX_LEN
# bytes at C_PREFIX), the index definitions (B_INDEX_DEFS_LEN bytes at
# C_INDEX_DEFS), C_CLUSTER_ID's 8 bytes and the block (BLOCK.size bytes at
# C_BLOCK). Stored under the seqlock with them: a block that fails it while SEQ
# stays the same was damaged, not torn.
C_BLOCK_CRC: Final = 4088
FLAG_CLEAN_EXIT: Final = 1
# Set once the running writer has reached etcd (claim() clears it): a restarted
# writer serving its predecessor's snapshot is not current until then.
FLAG_ETCD_REACHED: Final = 2

# --- ring segment ------------------------------------------------------------

RING_HEADER: Final = struct.Struct("<8sIIQQ")  # magic, version, kind, generation, capacity
RING_DATA: Final = 64  # data area starts here; capacity bytes follow
# The seal: written once, when the writer moves on to the next ring generation
# in the same epoch (the ring grew, or a restart changed its size): sealed = 1,
# the final tail and head of this generation, and the revision at that head,
# where the next generation's history begins. A watch that still has this ring
# mapped reads on to that head and continues in the next generation, so a
# change of ring costs it no events. In space version 1 left zero.
RING_SEAL: Final = struct.Struct("<QQQQ")  # sealed flag, final tail, final head, revision
RING_SEAL_OFF: Final = 32
MIN_RING_CAPACITY: Final = 64 * 1024
MAX_RING_CAPACITY: Final = 1 << 40

# A record: header then payload, padded to 8 bytes. Records never wrap: when the
# space left before the end of the data area is smaller than a record, the writer
# writes a PAD record (or, if fewer than RECORD.size bytes are left, nothing) and
# continues at the start of the next lap.
RECORD: Final = struct.Struct("<QQIHHII")  # pos stamp, revision, length, kind, flags, crc, reserved
REC_KIND_EVENTS: Final = 1
REC_KIND_PAD: Final = 2
REC_CRC_SPAN: Final = 20  # the CRC covers header bytes [0, 20) then the payload

# Event tuples inside a record payload (msgpack array of these):
#   [type, key, value, create_revision, mod_revision, version, lease, prev]
# where prev is nil or [key, value, create_revision, mod_revision, version, lease].
# A cache with secondary indexes appends [..., ix, prev_ix]: per index (in
# definition order) the array of the kv's index values, and the same for prev;
# nil when the key has no value in any index.
EVENT_PUT: Final = 0
EVENT_DELETE: Final = 1
MAX_RECORD_EVENTS: Final = 1 << 24


def align8(n: int) -> int:
    return (n + 7) & ~7


# --- snapshot segment --------------------------------------------------------

# magic, version, kind, revision, epoch, count, index_off, hash_off, hash_slots,
# data_off, data_len, total_size, body crc32, header crc32
SNAP_HEADER: Final = struct.Struct("<8sIIQQQQQQQQQII")
SNAP_HEADER_CRC_SPAN: Final = SNAP_HEADER.size - 4
SNAP_INDEX_ENTRY: Final = struct.Struct("<Q")  # absolute offset of an entry, sorted by key
# A hash slot: (crc32(key) | slot_check(crc32(key), offset) << 32, absolute entry offset).
# An empty slot is all zeros; an occupied one has a non-zero offset. The check
# word makes a flipped bit in a slot an error instead of a silent miss.
SNAP_SLOT: Final = struct.Struct("<QQ")


def slot_check(h: int, off: int) -> int:
    """32-bit check of a hash slot's (hash, offset); any single flipped bit changes it.

    xor folds the inputs, and multiplying by an odd constant modulo 2**32 is a
    bijection, so every change of the folded value changes the result.
    """
    return ((h ^ (off & 0xFFFFFFFF) ^ (off >> 32) ^ 0x5BD1E995) * 0x9E3779B1) & 0xFFFFFFFF
# Entry: crc32 of bytes [4, 48 + key_len + value_len), key_len, value_len, flags,
# create_revision, mod_revision, version, lease, then key and value bytes.
SNAP_ENTRY: Final = struct.Struct("<IIIIqqqq")
MAX_KEY_LEN: Final = 1 << 20
MAX_VALUE_LEN: Final = 1 << 31


def hash_slots_for(count: int) -> int:
    """Power-of-two table size keeping the load factor at or below 1/2."""
    slots = 8
    while slots < 2 * count:
        slots <<= 1
    return slots


def prefix_range_end(prefix: bytes) -> bytes:
    """etcd's range end for a prefix: the prefix with its last non-0xff byte incremented.

    b"" (the whole keyspace) maps to b"\\0", etcd's "every key" convention.
    """
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"


# --- index segment -----------------------------------------------------------
# One per snapshot (index_name(name, seq)), at the snapshot's revision. Header,
# then per index a directory entry, its value table (sorted by value) and its
# postings (per value a run of keys, sorted by key); then the value bytes and
# the key bytes, which table entries address relative to their area's start.

# magic, version, kind, snap_seq, revision, epoch, n_indexes, values_off,
# values_len, keys_off, keys_len, total_size, body crc32, header crc32 (which
# covers the directory too: the bytes [IDX_HEADER_SIZE, values table of index 0))
IDX_HEADER: Final = struct.Struct("<8sIIQQQQQQQQQII")
IDX_HEADER_CRC_SPAN: Final = IDX_HEADER.size - 4
IDX_HEADER_SIZE: Final = 128
IDX_DIR: Final = struct.Struct("<QQQQ")  # value table offset, values, postings offset, postings
# A value: offset in the value area, length, check, first posting, postings.
# check = idx_check(value bytes, the other four fields): a flipped bit in the
# entry or its value is an error, not a wrong answer.
IDX_VALUE: Final = struct.Struct("<QIIQQ")
# A posting: key offset in the key area, key length, crc32 of the key (a damaged
# posting or key byte is an error, not another key).
IDX_POSTING: Final = struct.Struct("<QII")
