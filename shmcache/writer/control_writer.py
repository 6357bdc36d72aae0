"""The writer's handle on its control segment: the seqlock publish, heartbeat, identity.

The block's format is format/control.py's (its module docstring states the protocol).
"""

from __future__ import annotations

import os
import struct
import threading
import time
import zlib
from typing import Any

from ..format import layout
from ..format.control import BLOCK_END, epoch_crc, epoch_crc_in
from ..ipc import futex as _futex
from ..ipc.liveness import pid_namespace, process_start_ticks

_Q = struct.Struct("<Q")
_BLOCK = layout.BLOCK
_crc32 = zlib.crc32


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

    def __init__(self, buf: Any, index_defs: bytes = b"") -> None:
        self.buf = buf
        self.futex_addr = _futex.address_of(buf, layout.C_SEQ)
        seq = _Q.unpack_from(buf, layout.C_SEQ)[0]
        if seq & 1:  # a previous writer died inside publish()
            seq += 1
            _store(buf, layout.C_SEQ, seq)
        self.seq = seq
        self.fields = list(_BLOCK.unpack_from(buf, layout.C_BLOCK))
        # Published with the prefix (each new epoch): indexspec.encode_defs.
        self.index_defs = index_defs
        # The cluster the published epoch was loaded from, and the one the next
        # epoch will be (set_cluster_id).
        self.cluster_id: int = _Q.unpack_from(buf, layout.C_CLUSTER_ID)[0]
        self._next_cluster_id = self.cluster_id
        self._epoch_crc = epoch_crc_in(buf, self.fields)
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
                     _crc32(buf[layout.C_BLOCK:BLOCK_END], epoch_crc_in(buf, fields)))
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
                self._epoch_crc = epoch_crc_in(buf, fields)
            # One copy, not pack_into: readers load RING_TAIL alone (lap detection),
            # and pack_into would zero it on the way (see _store).
            block = _BLOCK.pack(*fields)
            buf[layout.C_BLOCK:BLOCK_END] = block
            _store(buf, layout.C_BLOCK_CRC, _crc32(block, self._epoch_crc))
            self.seq += 1
            _store(buf, layout.C_SEQ, self.seq)
        if wake:
            self.wake()

    def wake(self) -> None:
        _futex.wake_all(self.futex_addr)
