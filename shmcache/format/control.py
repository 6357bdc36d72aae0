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

import os
import struct
import threading
import time
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import (
    CorruptSegmentError,
    NotFoundError,
    ShmCacheError,
    StaleError,
    VersionMismatchError,
)
from ..ipc import futex as _futex
from ..ipc import shm as _shm
from ..ipc.liveness import pid_namespace, process_start_ticks
from ..types import Status
from . import layout
from .indexspec import decode_defs

if TYPE_CHECKING:
    from ..reader.lifetime import Lifetime

_Q = struct.Struct("<Q")
_BLOCK = layout.BLOCK
_TAIL_OFF = layout.C_BLOCK + 8 * layout.B_RING_TAIL
_BLOCK_END = layout.C_BLOCK + _BLOCK.size
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
    if version != layout.FORMAT_VERSION:
        raise VersionMismatchError(
            f"control segment has format version {version}, this shmcache reads version "
            f"{layout.FORMAT_VERSION}", segment=name, found=version,
            expected=layout.FORMAT_VERSION)


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
        raw = buf[layout.C_BLOCK:_BLOCK_END]
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
        problems.append(f"overlay segment at revision {b.ovl_revision}, ring position "
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
    """The published index definitions (msgpack; _indexdef.decode_defs reads them)."""
    data: bytes = buf[layout.C_INDEX_DEFS:layout.C_INDEX_DEFS + length]
    return data


def writer_identity(buf: Any) -> tuple[int, int, int]:
    """(pid, start time in clock ticks, heartbeat monotonic ns)."""
    pid = _Q.unpack_from(buf, layout.C_WRITER_PID)[0]
    start = _Q.unpack_from(buf, layout.C_WRITER_START)[0]
    hb = _Q.unpack_from(buf, layout.C_HEARTBEAT)[0]
    return pid, start, hb


def writer_liveness(buf: Any) -> tuple[bool, str]:
    """(alive, how it was judged): "pid" when the writer's PID namespace is ours (same pid
    and start time in /proc, not a zombie), "heartbeat" when the writer runs in another
    one (a container: its pid means nothing here), then alive while its heartbeat is
    younger than HEARTBEAT_DEAD_SECONDS."""
    pid, start, hb = writer_identity(buf)
    if pid <= 0 or pid > 1 << 22:
        return False, "pid"
    ns = _Q.unpack_from(buf, layout.C_WRITER_PIDNS)[0]
    if ns and ns != pid_namespace():
        age = (time.monotonic_ns() - hb) / 1e9 if hb else float("inf")
        return age < layout.HEARTBEAT_DEAD_SECONDS, "heartbeat"
    return process_start_ticks(pid) == start, "pid"


def writer_alive(buf: Any) -> bool:
    """Whether the process recorded as the writer still runs (see writer_liveness)."""
    return writer_liveness(buf)[0]


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


def _epoch_crc_in(buf: Any, fields: list[int]) -> int:
    """epoch_crc of the prefix, definitions and cluster id in ``buf`` (lengths bounded)."""
    return epoch_crc(
        buf[layout.C_PREFIX:layout.C_PREFIX + min(fields[layout.B_PREFIX_LEN],
                                                  layout.MAX_PREFIX_LEN)],
        buf[layout.C_INDEX_DEFS:layout.C_INDEX_DEFS + min(fields[layout.B_INDEX_DEFS_LEN],
                                                          layout.MAX_INDEX_DEFS_LEN)],
        buf[layout.C_CLUSTER_ID:_CLUSTER_END])


class ControlReader:
    """A reader's read-only handle on a control segment: the block, the tail, the futex word.

    Concurrency contract: every method may be called from any thread. Given its
    owner's ``life`` (a Reader's _lifetime.Lifetime), ``wait`` counts itself in
    for the whole sleep, so the word it sleeps on stays mapped, and ``closed``
    is the owner's state; the owner calls ``close()`` (the unmap) only once no
    use is in flight, and the other methods must not be called after it.
    """

    def __init__(self, seg: Any, life: Lifetime | None = None) -> None:
        self._seg = seg
        self.name: str = seg.name
        self.buf: Any = seg.buf
        self.addr = _futex.address_of(seg.buf, layout.C_SEQ)
        self._life = life
        self._unmapped = False

    @property
    def closed(self) -> bool:
        """True once the owner is closed (the mapping may still be in use by calls in flight)."""
        life = self._life
        return life.closed if life is not None else self._unmapped

    @classmethod
    def open(cls, cache_name: str, timeout: float = 0.0,
             life: Lifetime | None = None) -> ControlReader:
        """Map cache ``cache_name``'s control segment read-only and check its header.

        Waits up to ``timeout`` seconds for a segment that does not exist yet or
        is still all zeros (a writer initialising it); bytes that are there but
        wrong raise CorruptSegmentError at once, as they will not fix themselves.
        """
        cname = layout.control_name(cache_name)
        deadline = time.monotonic() + timeout
        while True:
            seg = _shm.open_readonly(cname)
            if seg is not None:
                try:
                    check_header(seg.buf, seg.size, cname)
                    return cls(seg, life)
                except CorruptSegmentError:
                    # Decided before close(): the map is gone after.
                    initialising = seg.size >= layout.CONTROL_SIZE and \
                        seg.buf[:8] == b"\0" * 8
                    seg.close()
                    if time.monotonic() >= deadline or not initialising:
                        raise
            elif time.monotonic() >= deadline:
                raise NotFoundError(f"no shmcache named {cache_name!r} on this host "
                                    f"(no segment {cname})", name=cache_name)
            time.sleep(0.02)

    def seq(self) -> int:
        """SEQ: it changes with every publish (odd while one is in progress)."""
        v: int = _Q.unpack_from(self.buf, layout.C_SEQ)[0]
        return v

    def word(self) -> int:
        """The futex word: SEQ's low 32 bits. Read it, check for news, then ``wait(word)``."""
        v: int = _Q.unpack_from(self.buf, layout.C_SEQ)[0]
        return v & 0xFFFFFFFF

    def tail(self) -> int:
        """RING_TAIL loaded alone (lap detection: see ring.iter_records)."""
        v: int = _Q.unpack_from(self.buf, _TAIL_OFF)[0]
        return v

    def block(self, spins: int = 200) -> Block | None:
        """read_block: None while a publish is stuck, CorruptSegmentError if damaged."""
        return read_block(self.buf, spins, self.name)

    def wait(self, word: int, timeout: float | None) -> None:
        """Sleep until the writer publishes (SEQ's word differs from ``word``), ``wake()``
        or ``timeout``. Counted in the owner's uses while asleep: the word stays mapped;
        raises the owner's closed error if it is closed already."""
        life = self._life
        if life is None:
            _futex.wait(self.addr, word, timeout)
            return
        with life:
            _futex.wait(self.addr, word, timeout)

    def check_open(self) -> None:
        """Raise the owner's closed error once it is closed (a loop that does not wait)."""
        if self._life is not None:
            self._life.check()

    def wake(self) -> None:
        """Wake every thread asleep in ``wait`` on this cache's word, in every process
        (the others see nothing new and sleep again). One syscall and no lock: safe in
        a signal handler."""
        _futex.wake_all(self.addr)

    def prefix(self, length: int) -> bytes:
        """The prefix bytes now (see ``definitions`` for the prefix of a given block)."""
        return read_prefix(self.buf, length)

    def index_defs(self, b: Block) -> tuple[tuple[str, str], ...]:
        """(name, spec) of every secondary index, read now (see ``definitions``)."""
        try:
            return decode_defs(read_index_defs(self.buf, b.index_defs_len))
        except ValueError:
            raise CorruptSegmentError("index definitions do not decode",
                                      segment=self.name) from None

    def definitions(self, b: Block) -> tuple[bytes, tuple[tuple[str, str], ...]] | None:
        """Block ``b``'s prefix and index definitions, read as part of ``b``: None if the
        writer has published since ``b`` (the bytes may belong to another epoch: read
        the block again). They lie outside the block, and the writer changes them only
        under the seqlock, so SEQ unchanged since ``b`` vouches for them."""
        prefix = read_prefix(self.buf, b.prefix_len)
        raw = read_index_defs(self.buf, b.index_defs_len)
        if self.seq() != b.seq:
            return None
        try:
            return prefix, decode_defs(raw)
        except ValueError:
            raise CorruptSegmentError("index definitions do not decode",
                                      segment=self.name) from None

    def writer_identity(self) -> tuple[int, int, int]:
        return writer_identity(self.buf)

    def writer_alive(self) -> bool:
        return writer_alive(self.buf)

    def etcd_down_since(self) -> float | None:
        return etcd_down_since(self.buf)

    def etcd_reached(self) -> bool:
        return etcd_reached(self.buf)

    def publish_failure(self) -> tuple[str | None, float | None]:
        return publish_failure(self.buf)

    def status(self, cache: str, fallback: Block | None) -> Status:
        """Reader.status(): the block now (or ``fallback`` while a publish is stuck)."""
        for _attempt in range(50):
            b = self.block()
            defs = self.definitions(b) if b is not None else None
            if defs is not None:
                break
        else:
            b = fallback
            defs = (read_prefix(self.buf, b.prefix_len), ()) if b is not None else None
        if b is None or defs is None:
            raise ShmCacheError(f"cache {cache!r} has not published its state yet")
        prefix, index_defs = defs
        pid, _start, hb = self.writer_identity()
        alive, how = writer_liveness(self.buf)
        error, failing_since = self.publish_failure() if alive else (None, None)
        return Status(
            name=cache, prefix=prefix, writer_pid=pid, writer_alive=alive,
            heartbeat_age=(time.monotonic_ns() - hb) / 1e9 if hb else None,
            revision=b.revision, etcd_revision=b.etcd_revision, epoch=b.epoch,
            oldest_watchable_revision=b.compact_revision, snapshot_revision=b.snap_revision,
            key_count=b.key_count, ring_capacity=b.ring_capacity,
            ring_used=b.ring_head - b.ring_tail, format_version=layout.FORMAT_VERSION,
            etcd_unreachable_since=self.etcd_down_since() if alive else None, liveness=how,
            indexes=dict(index_defs), publish_error=error,
            publish_failing_since=failing_since, cluster_id=b.cluster_id)

    def check_stale(self, cache: str, max_staleness: float) -> None:
        """StaleError if the last heartbeat is older than ``max_staleness`` s or the writer
        exited. The heartbeat alone decides (no /proc lookup on the read path): a dead,
        stopped or cleanly exited writer stops beating, and pid 0 marks a clean exit."""
        pid, _start, hb = self.writer_identity()
        age = (time.monotonic_ns() - hb) / 1e9 if hb else float("inf")
        if age > max_staleness or pid == 0:
            raise StaleError(
                f"cache {cache!r} is stale: writer pid {pid} "
                f"{'alive' if self.writer_alive() else 'not running'}, "
                f"last heartbeat {age:.1f}s ago (max_staleness={max_staleness}s)", age=age)

    def close(self) -> None:
        """Unmap (the owner's release: nothing uses the mapping any more)."""
        self._unmapped = True
        self._seg.close()


def _store(buf: Any, offset: int, value: int) -> None:
    """One 8-byte store of ``value`` at ``offset`` that readers in other processes see
    whole: never a mix of old and new bytes, and never 0 on the way.

    ``struct.pack_into`` is not that: CPython zeroes the field before it packs it
    (``s_pack_internal``'s memset), so a reader in another process loads 0 in
    between (measured: about 5% of the loads of a word rewritten in a loop).
    An 8-byte slice assignment is one memcpy, which glibc performs with
    whole-word moves on x86-64.
    """
    buf[offset:offset + 8] = value.to_bytes(8, "little")


class ControlWriter:
    """The writer's handle on its control segment.

    ``publish`` is thread-safe (the publishing thread and the sync thread both
    call it); ``heartbeat`` is a single store and safe from any thread.
    """

    def __init__(self, buf: Any) -> None:
        self.buf = buf
        self.futex_addr = _futex.address_of(buf, layout.C_SEQ)
        seq = _Q.unpack_from(buf, layout.C_SEQ)[0]
        if seq & 1:  # a previous writer died inside publish()
            seq += 1
            _store(buf, layout.C_SEQ, seq)
        self.seq = seq
        self.fields = list(_BLOCK.unpack_from(buf, layout.C_BLOCK))
        # Published with the prefix (each new epoch): _indexdef.encode_defs.
        self.index_defs = b""
        # The cluster the published epoch was loaded from, and the one the next
        # epoch will be (set_cluster_id).
        self.cluster_id: int = _Q.unpack_from(buf, layout.C_CLUSTER_ID)[0]
        self._next_cluster_id = self.cluster_id
        self._epoch_crc = _epoch_crc_in(buf, self.fields)
        # The publishing thread and the sync thread both publish.
        self._lock = threading.Lock()

    @staticmethod
    def initialise(buf: Any, prefix: bytes, seq: int = 0) -> None:
        """Lay out a zero-filled control segment; magic goes in last."""
        _store(buf, layout.C_SEQ, seq)
        _store(buf, layout.C_CREATED, time.time_ns())
        buf[layout.C_PREFIX:layout.C_PREFIX + len(prefix)] = prefix
        fields = [0] * layout.BLOCK_FIELDS
        fields[layout.B_PREFIX_LEN] = len(prefix)
        _BLOCK.pack_into(buf, layout.C_BLOCK, *fields)
        _Q.pack_into(buf, layout.C_BLOCK_CRC,
                     _crc32(buf[layout.C_BLOCK:_BLOCK_END], _epoch_crc_in(buf, fields)))
        layout.HEAD.pack_into(buf, 0, layout.MAGIC[layout.KIND_CONTROL], layout.FORMAT_VERSION,
                              layout.KIND_CONTROL)

    def claim(self) -> None:
        """Record this process as the writer (pid + start time so a reused pid fools nobody)."""
        pid = os.getpid()
        _store(self.buf, layout.C_WRITER_PID, 0)
        _store(self.buf, layout.C_WRITER_START, process_start_ticks(pid) or 0)
        _store(self.buf, layout.C_WRITER_PIDNS, pid_namespace())
        _store(self.buf, layout.C_WRITER_PID, pid)
        _store(self.buf, layout.C_FLAGS, 0)
        _store(self.buf, layout.C_ETCD_DOWN_SINCE, 0)
        self.set_publish_error(None)
        self.heartbeat()

    def release(self) -> None:
        _store(self.buf, layout.C_FLAGS, layout.FLAG_CLEAN_EXIT)
        _store(self.buf, layout.C_ETCD_DOWN_SINCE, 0)
        self.set_publish_error(None)
        _store(self.buf, layout.C_WRITER_PID, 0)
        self.wake()

    def heartbeat(self) -> None:
        # A single aligned 8-byte store outside the seqlock: it must not make
        # readers' "nothing changed" fast path miss on every beat.
        _store(self.buf, layout.C_HEARTBEAT, time.monotonic_ns())

    def set_etcd_down_since(self, unix_ns: int) -> None:
        """Record since when etcd is unreachable (0: reachable). A single store, any thread."""
        _store(self.buf, layout.C_ETCD_DOWN_SINCE, unix_ns)

    def set_etcd_reached(self) -> None:
        """Record that this writer has reached etcd (FLAG_ETCD_REACHED). Writer thread only."""
        flags = _Q.unpack_from(self.buf, layout.C_FLAGS)[0]
        _store(self.buf, layout.C_FLAGS, flags | layout.FLAG_ETCD_REACHED)

    def set_publish_error(self, text: str | None, since_ns: int = 0) -> None:
        """Record the last publish error and since when publishing fails (CLOCK_REALTIME
        ns), or clear both (``None``). One thread only (the writer's): readers check
        the text against its head word (see publish_failure), so it needs no lock.

        The time goes in last when set and first when cleared: a reader that sees
        a time finds the text of that failure.
        """
        buf = self.buf
        if text is None:
            _store(buf, layout.C_PUBLISH_FAILING_SINCE, 0)
            _store(buf, layout.C_PUBLISH_ERROR, 0)
            return
        data = text.encode("utf-8", "replace")[:layout.MAX_PUBLISH_ERROR_LEN]
        data = data.decode("utf-8", "ignore").encode()  # not cut inside a character
        head = len(data) | zlib.crc32(data) << 32
        if _Q.unpack_from(buf, layout.C_PUBLISH_ERROR)[0] != head:
            buf[layout.PUBLISH_ERROR_TEXT:layout.PUBLISH_ERROR_TEXT + len(data)] = data
            _store(buf, layout.C_PUBLISH_ERROR, head)
        _store(buf, layout.C_PUBLISH_FAILING_SINCE, since_ns)

    def get(self, index: int) -> int:
        v: int = self.fields[index]
        return v

    def set_cluster_id(self, cluster_id: int) -> None:
        """The etcd cluster the next epoch is loaded from: published with that epoch's
        prefix (``publish(..., prefix=...)``), so an epoch and its cluster change
        together. Writer thread only."""
        self._next_cluster_id = cluster_id

    def publish(self, updates: dict[int, int], prefix: bytes | None = None,
                wake: bool = True) -> None:
        """Store ``updates`` (block index -> value) atomically for readers, then wake waiters."""
        buf = self.buf
        fields = self.fields
        with self._lock:
            for k, v in updates.items():
                fields[k] = v
            self.seq += 1
            _store(buf, layout.C_SEQ, self.seq)
            if prefix is not None:
                buf[layout.C_PREFIX:layout.C_PREFIX + len(prefix)] = prefix
                fields[layout.B_PREFIX_LEN] = len(prefix)
                defs = self.index_defs
                buf[layout.C_INDEX_DEFS:layout.C_INDEX_DEFS + len(defs)] = defs
                fields[layout.B_INDEX_DEFS_LEN] = len(defs)
                self.cluster_id = self._next_cluster_id
                _store(buf, layout.C_CLUSTER_ID, self.cluster_id)
                self._epoch_crc = epoch_crc(prefix, defs, _Q.pack(self.cluster_id))
            elif layout.B_PREFIX_LEN in updates or layout.B_INDEX_DEFS_LEN in updates:
                # A length given without its bytes: the checksum covers what readers read.
                self._epoch_crc = _epoch_crc_in(buf, fields)
            # One copy, not pack_into: readers load RING_TAIL alone (lap detection),
            # and pack_into would zero it on the way (see _store).
            block = _BLOCK.pack(*fields)
            buf[layout.C_BLOCK:_BLOCK_END] = block
            _store(buf, layout.C_BLOCK_CRC, _crc32(block, self._epoch_crc))
            self.seq += 1
            _store(buf, layout.C_SEQ, self.seq)
        if wake:
            self.wake()

    def wake(self) -> None:
        _futex.wake_all(self.futex_addr)
