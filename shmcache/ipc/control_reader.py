"""A reader's handle on a control segment (ControlReader) and whether its writer still runs.

The block's format and its seqlock read are format/control.py's; this maps the segment,
sleeps on its futex word and judges the writer's liveness from /proc.
"""

from __future__ import annotations

import struct
import time
from typing import Any, Protocol

from ..errors import (
    CorruptSegmentError,
    NotFoundError,
    ShmCacheError,
    StaleError,
)
from ..format import layout
from ..format.control import (
    TAIL_OFF,
    Block,
    check_header,
    etcd_down_since,
    etcd_reached,
    publish_failure,
    read_block,
    read_index_defs,
    read_prefix,
    writer_identity,
)
from ..format.indexspec import decode_defs
from ..types import Status
from . import futex as _futex
from . import shm as _shm
from .liveness import pid_namespace, process_start_ticks

_Q = struct.Struct("<Q")


class Lifetime(Protocol):
    """What ControlReader needs of its owner's lifetime (reader/lifetime.py's Lifetime)."""

    closed: bool

    def check(self) -> None: ...

    def __enter__(self) -> None: ...

    def __exit__(self, *exc: Any) -> None: ...


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



class ControlReader:
    """A reader's read-only handle on a control segment: the block, the tail, the futex word.

    Concurrency contract: every method may be called from any thread. Given its
    owner's ``life`` (a Reader's lifetime.Lifetime), ``wait`` counts itself in
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
        v: int = _Q.unpack_from(self.buf, TAIL_OFF)[0]
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
