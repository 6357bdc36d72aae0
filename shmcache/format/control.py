"""The control segment: the seqlock-protected published block, heartbeat, writer identity, prefix.

Concurrency contract: one writer stores; any number of readers load. The block
(epoch, revision, ring positions, snapshot pointer, ...) is published under a
seqlock: the writer makes SEQ odd, stores the block, makes SEQ even, then wakes
every waiter with one FUTEX_WAKE on SEQ's low 32 bits. A reader reads SEQ, the
block, SEQ again, and retries if SEQ was odd or changed. On x86-64 (TSO) stores
and loads are not reordered with each other, so this needs no fences; on weaker
architectures the ring records and snapshots validate themselves, and a reader
that cannot get a consistent block keeps answering from the last one it had.
The block, the prefix, the index definitions and the cluster id are covered by
one crc32 (layout.C_BLOCK_CRC) stored inside the seqlock: a block that fails it
while SEQ stays put was damaged, and is a CorruptSegmentError, never served.
"""

from __future__ import annotations

import struct
import time
import zlib
from dataclasses import dataclass
from typing import Any

from ..errors import (
    CorruptSegmentError,
)
from . import layout

_Q = struct.Struct("<Q")
_BLOCK = layout.BLOCK
TAIL_OFF = layout.C_BLOCK + 8 * layout.B_RING_TAIL
BLOCK_END = layout.C_BLOCK + _BLOCK.size
_CLUSTER_END = layout.C_CLUSTER_ID + 8
_crc32 = zlib.crc32


@dataclass(frozen=True)
class Block:
    """One consistent copy of the published block."""

    seq: int
    epoch: int
    revision: int
    compact_revision: int
    ring_head: int
    ring_tail: int
    ring_gen: int
    ring_capacity: int
    snap_seq: int
    snap_revision: int
    snap_size: int
    snap_ring_pos: int
    key_count: int
    etcd_revision: int
    prefix_len: int
    sync_started: int
    sync_done: int
    sync_revision: int
    index_defs_len: int
    ovl_seq: int
    ovl_revision: int
    ovl_size: int
    ovl_ring_pos: int
    cluster_id: int  # the etcd cluster the epoch was loaded from (0: unknown)


def epoch_crc(prefix: bytes, defs: bytes, cluster: bytes) -> int:
    """The checksum's start: what changes only with the epoch (see layout.C_BLOCK_CRC)."""
    return _crc32(cluster, _crc32(defs, _crc32(prefix)))


def check_header(buf: Any, size: int, name: str) -> None:
    """Validate magic, version and size of a control segment; raises CorruptSegmentError."""
    if size < layout.CONTROL_SIZE:
        raise CorruptSegmentError(f"control segment is {size} bytes, expected "
                                  f"{layout.CONTROL_SIZE}", segment=name)
    magic, version, kind = layout.HEAD.unpack_from(buf, 0)
    if magic == b"\0" * 8:
        raise CorruptSegmentError("control segment is not initialised yet", segment=name,
                                  hint="The writer is starting; retry in a moment")
    if magic != layout.MAGIC[layout.KIND_CONTROL] or kind != layout.KIND_CONTROL:
        raise CorruptSegmentError(f"bad control magic {magic!r}", segment=name)
    layout.check_version(version, "control segment", name)


def read_block(buf: Any, spins: int = 200, name: str = "control segment") -> Block | None:
    """A consistent copy of the block, or None if the writer held the seqlock throughout.

    None happens when a writer died (or was stopped) between its two SEQ stores;
    callers keep using the block they had. A copy whose checksum fails is read
    again (a torn read, where loads may be reordered); failing twice at the same
    SEQ it is damage: CorruptSegmentError naming segment ``name``.
    """
    unpack_q = _Q.unpack_from
    failed_at = -1
    for i in range(spins):
        s1 = unpack_q(buf, layout.C_SEQ)[0]
        if s1 & 1:
            if i > 50:
                time.sleep(0.00005)
            continue
        raw = buf[layout.C_BLOCK:BLOCK_END]
        cluster = buf[layout.C_CLUSTER_ID:_CLUSTER_END]
        crc = unpack_q(buf, layout.C_BLOCK_CRC)[0]
        fields = _BLOCK.unpack(raw)
        # (Lengths bounded: a damaged one must fail the checksum, not read elsewhere.)
        prefix = buf[layout.C_PREFIX:layout.C_PREFIX + min(fields[layout.B_PREFIX_LEN],
                                                           layout.MAX_PREFIX_LEN)]
        defs = buf[layout.C_INDEX_DEFS:layout.C_INDEX_DEFS + min(
            fields[layout.B_INDEX_DEFS_LEN], layout.MAX_INDEX_DEFS_LEN)]
        if unpack_q(buf, layout.C_SEQ)[0] != s1:
            continue
        if _crc32(raw, epoch_crc(prefix, defs, cluster)) == crc:
            return Block(s1, *fields, *_Q.unpack(cluster))
        if failed_at == s1:
            raise CorruptSegmentError(
                f"the published block (SEQ {s1}) fails its checksum: the block, prefix, "
                f"index definitions or cluster id were changed by something other than "
                f"the writer", segment=name,
                hint="Restarting the writer relists the cache into a new epoch")
        failed_at = s1
    return None


def validate_block(b: Block, name: str) -> None:
    """Reject blocks no writer could have published (bounds every later read)."""
    problems = []
    if b.ring_tail > b.ring_head:
        problems.append(f"ring tail {b.ring_tail} above head {b.ring_head}")
    if b.ring_capacity and b.ring_head - b.ring_tail > b.ring_capacity:
        problems.append(f"ring head {b.ring_head} - tail {b.ring_tail} exceeds capacity "
                        f"{b.ring_capacity}")
    # Once a snapshot is published a ring exists, and ring.read_record(buf, 0, pos)
    # would divide by a capacity of 0.
    if (b.ring_capacity or b.snap_seq) and (
            b.ring_capacity % 8 or b.ring_capacity > layout.MAX_RING_CAPACITY
            or b.ring_capacity < layout.MIN_RING_CAPACITY):
        problems.append(f"bad ring capacity {b.ring_capacity}")
    if b.snap_seq and b.snap_ring_pos > b.ring_head:
        problems.append(f"snapshot ring position {b.snap_ring_pos} above head {b.ring_head}")
    if b.ovl_seq and not (b.snap_revision <= b.ovl_revision <= b.revision
                          and b.snap_ring_pos <= b.ovl_ring_pos <= b.ring_head):
        problems.append(f"delta segment at revision {b.ovl_revision}, ring position "
                        f"{b.ovl_ring_pos} outside the snapshot's {b.snap_revision}/"
                        f"{b.snap_ring_pos} .. {b.revision}/{b.ring_head}")
    if b.snap_revision > b.revision:
        problems.append(f"snapshot revision {b.snap_revision} above revision {b.revision}")
    if b.compact_revision > b.revision:
        problems.append(f"compact revision {b.compact_revision} above revision {b.revision}")
    if b.sync_done > b.sync_started or b.sync_revision > b.revision:
        problems.append(f"sync rounds done {b.sync_done} / started {b.sync_started} / revision "
                        f"{b.sync_revision} inconsistent with revision {b.revision}")
    if b.prefix_len > layout.MAX_PREFIX_LEN:
        problems.append(f"prefix length {b.prefix_len} above {layout.MAX_PREFIX_LEN}")
    if b.index_defs_len > layout.MAX_INDEX_DEFS_LEN:
        problems.append(f"index definitions length {b.index_defs_len} above "
                        f"{layout.MAX_INDEX_DEFS_LEN}")
    if problems:
        raise CorruptSegmentError("; ".join(problems), segment=name)


def read_prefix(buf: Any, length: int) -> bytes:
    data: bytes = buf[layout.C_PREFIX:layout.C_PREFIX + length]
    return data


def read_index_defs(buf: Any, length: int) -> bytes:
    """The published index definitions (msgpack; indexspec.decode_defs reads them)."""
    data: bytes = buf[layout.C_INDEX_DEFS:layout.C_INDEX_DEFS + length]
    return data


def writer_identity(buf: Any) -> tuple[int, int, int]:
    """(pid, start time in clock ticks, heartbeat monotonic ns)."""
    pid = _Q.unpack_from(buf, layout.C_WRITER_PID)[0]
    start = _Q.unpack_from(buf, layout.C_WRITER_START)[0]
    hb = _Q.unpack_from(buf, layout.C_HEARTBEAT)[0]
    return pid, start, hb


def etcd_down_since(buf: Any) -> float | None:
    """Unix time since which the writer has failed to reach etcd, or None while it reaches it."""
    ns: int = _Q.unpack_from(buf, layout.C_ETCD_DOWN_SINCE)[0]
    return ns / 1e9 if ns else None


def etcd_reached(buf: Any) -> bool:
    """Whether the running writer has reached etcd since it started (FLAG_ETCD_REACHED)."""
    return bool(_Q.unpack_from(buf, layout.C_FLAGS)[0] & layout.FLAG_ETCD_REACHED)


def publish_failure(buf: Any, spins: int = 100) -> tuple[str | None, float | None]:
    """(the last publish error's text, Unix time since which publishing fails), or
    (None, None) while publishing works.

    The text is taken only when the head word (length, crc32) is the same before
    and after the copy and the crc matches: a text the writer is replacing is
    retried, never shown torn. After ``spins`` failed tries (a writer replacing
    its text without pause) the text is ``"(being updated)"``.
    """
    ns: int = _Q.unpack_from(buf, layout.C_PUBLISH_FAILING_SINCE)[0]
    if not ns:
        return None, None
    text = "(being updated)"
    for _ in range(spins):
        head: int = _Q.unpack_from(buf, layout.C_PUBLISH_ERROR)[0]
        length, crc = head & 0xFFFFFFFF, head >> 32
        if length > layout.MAX_PUBLISH_ERROR_LEN:
            continue
        data = bytes(buf[layout.PUBLISH_ERROR_TEXT:layout.PUBLISH_ERROR_TEXT + length])
        if _Q.unpack_from(buf, layout.C_PUBLISH_ERROR)[0] == head and zlib.crc32(data) == crc:
            text = data.decode("utf-8", "replace")
            break
    return text, ns / 1e9


def epoch_crc_in(buf: Any, fields: list[int]) -> int:
    """epoch_crc of the prefix, definitions and cluster id in ``buf`` (lengths bounded)."""
    return epoch_crc(
        buf[layout.C_PREFIX:layout.C_PREFIX + min(fields[layout.B_PREFIX_LEN],
                                                  layout.MAX_PREFIX_LEN)],
        buf[layout.C_INDEX_DEFS:layout.C_INDEX_DEFS + min(fields[layout.B_INDEX_DEFS_LEN],
                                                          layout.MAX_INDEX_DEFS_LEN)],
        buf[layout.C_CLUSTER_ID:_CLUSTER_END])
