"""Reader: attach read-only to a cache and answer get, list and watch from shared memory.

The view (the live snapshot plus a private overlay of the events after it) is
here; reads at a past revision are in _history, watches in _watch, the control
segment's reader in control.ControlReader. Never imports etcd, grpc or protobuf.
"""

from __future__ import annotations

import os
import struct
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

from sortedcontainers import SortedDict

from . import _codec, _history, _shm, _sync, control, layout, ring
from . import snapshot as snapshot_mod
from ._watch import Watch, range_end
from .errors import (
    CompactedError,
    CorruptSegmentError,
    NotFoundError,
    ShmCacheError,
    StaleError,
    TimeoutError,
)
from .snapshot import Snapshot
from .types import Event, KeyValue, ListResult, Status

if TYPE_CHECKING:
    from .aio import AsyncWatch
    from .subscribe import Subscription

_sp = snapshot_mod._speedups
_fast_get = _sp.get if _sp is not None else None
# Reader.get's common case in one C call (see _set_fast); needs the layout it was built for.
_reader_get = (_sp.reader_get if _sp is not None and getattr(_sp, "CONTROL_SEQ_OFF", -1)
               == layout.C_SEQ else None)
_SLOW = object()  # reader_get's answer when the Python path must run

__all__ = ["Reader", "Watch"]

_Q = struct.Struct("<Q")
_unpack_q = _Q.unpack_from
_SEQ = layout.C_SEQ
_MISSING = object()
_readers: weakref.WeakSet[Reader] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # A lock held by another thread at fork time would stay held forever in the
    # child; the mappings themselves are inherited and stay valid.
    for r in list(_readers):
        r._lock = threading.RLock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _as_key(key: bytes | str) -> bytes:
    if isinstance(key, str):
        return key.encode("utf-8")
    if isinstance(key, (bytes, bytearray, memoryview)):
        return bytes(key)
    raise TypeError(f"keys are bytes or str, not {type(key).__name__}")


class _Retry(Exception):
    """The writer moved on while we read (snapshot replaced, ring lapped): read the block again."""


class Reader:
    """A read-only attachment to the cache ``name`` on this host.

    Concurrency contract: any number of Readers, in any number of processes,
    may be attached to one cache; they take no locks the writer sees and cannot
    modify any segment (every mapping is PROT_READ). A Reader may be shared by
    the threads of one process: ``get`` is lock-free, ``list`` and the refresh
    from the ring take a per-Reader lock. A Reader created before ``fork()``
    keeps working in the child (its mappings are inherited; its lock is
    re-created); it cannot be pickled: pass the cache name to workers and attach
    there.

    Every answer is exact at a revision: ``list`` returns it, ``revision`` tells
    it. The Reader keeps a private overlay of the events published since the
    live snapshot (bounded by the writer's snapshot cadence and ring size, not
    by the number of keys) and otherwise reads the snapshot in place.

    ``max_staleness`` (seconds): reads raise StaleError when the writer's last
    heartbeat is older, or the writer is dead. ``timeout``: how long to wait for a
    cache whose writer is still loading its first snapshot.
    """

    def __init__(self, name: str, *, max_staleness: float | None = None,
                 timeout: float = 0.0) -> None:
        self.name = _shm.validate_name(name)
        self._closed = False
        self.max_staleness = max_staleness
        self._lock = threading.RLock()
        deadline = time.monotonic() + timeout
        self._control = control.ControlReader.open(name, timeout)
        self._ctl_name = self._control.name
        self._cbuf = self._control.buf  # (the hot path's one load: SEQ)
        # The view: everything below changes together, under self._lock.
        self._seq = -1
        self._stuck_seq = -1
        self._sync_client: _sync.Client | None = None
        self._block: control.Block | None = None
        self._epoch = -1
        self._prefix = b""
        self._prefix_end: bytes | None = None
        self._ring: _shm.Segment | None = None
        self._ring_gen = -1
        self._snap: Snapshot | None = None
        self._snap_seq = 0
        self._overlay: SortedDict = SortedDict()
        # The overlay is double-buffered (see _next_overlay): the spare and the
        # changes it lacks.
        self._spare: SortedDict | None = None
        self._spare_pending: list[tuple[bytes, KeyValue | None]] = []
        self._view: tuple[SortedDict, Snapshot | None] = (self._overlay, None)
        self._fast_state: tuple[Any, ...] | None = None
        self._rec_revs: list[int] = []
        self._rec_pos: list[int] = []
        self._pos = 0
        self._revision = 0
        _readers.add(self)
        while True:
            try:
                self._refresh()
                break
            except NotFoundError:
                if time.monotonic() >= deadline:
                    self.close()
                    raise
                time.sleep(0.02)

    # -- plumbing ------------------------------------------------------------

    @property
    def max_staleness(self) -> float | None:
        """Seconds without a writer heartbeat after which reads raise StaleError (None: never)."""
        return self._max_staleness

    @max_staleness.setter
    def max_staleness(self, value: float | None) -> None:
        self._max_staleness = value
        # True when get() must take the slow path every time (staleness checks, closed).
        self._checks = value is not None or self._closed
        if hasattr(self, "_view"):
            self._set_fast()

    def _set_fast(self) -> None:
        """Rebuild the state ``get`` hands to the C fast path; call after any view change.

        One immutable tuple, replaced whole, so a get in another thread sees either
        the old view or the new one. None: every get takes the Python path.
        """
        overlay, snap = self._view
        if self._checks or _reader_get is None or snap is None or not snapshot_mod.USE_SPEEDUPS:
            self._fast_state = None
        else:
            self._fast_state = (self._cbuf, self._seq, self._stuck_seq, self._prefix, overlay,
                                snap.params, _SLOW)

    def __reduce__(self) -> Any:
        raise TypeError("a shmcache.Reader cannot be pickled: pass the cache name to the "
                        "worker and create the Reader there (shmcache.Reader(name))")

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Detach. Idempotent. Values already returned stay valid (they are copies)."""
        if self._closed:
            return
        self._closed = True
        self._checks = True
        self._fast_state = None
        if self._sync_client is not None:
            self._sync_client.close()
        if self._snap is not None:
            self._snap.close()
        self._control.close()
        if self._ring is not None:
            self._ring.close()
        self._snap = None
        self._ring = None

    def __repr__(self) -> str:
        return f"<shmcache.Reader {self.name!r} revision={self._revision}>"

    def _check_open(self) -> None:
        if self._closed:
            raise ShmCacheError(f"Reader for {self.name!r} is closed")

    def _check_stale(self) -> None:
        # The heartbeat alone decides (no /proc lookup on the read path): a dead,
        # stopped or cleanly exited writer stops beating, and pid 0 marks a clean exit.
        pid, _start, hb = self._control.writer_identity()
        age = (time.monotonic_ns() - hb) / 1e9 if hb else float("inf")
        if age > self.max_staleness or pid == 0:  # type: ignore[operator]
            raise StaleError(
                f"cache {self.name!r} is stale: writer pid {pid} "
                f"{'alive' if self._control.writer_alive() else 'not running'}, "
                f"last heartbeat {age:.1f}s ago (max_staleness={self.max_staleness}s)", age=age)

    def _refresh(self) -> None:
        """Bring the view up to the writer's latest published block."""
        if self._closed:
            self._check_open()
        if self.max_staleness is not None:
            self._check_stale()
        seq = _unpack_q(self._cbuf, _SEQ)[0]
        if seq == self._seq or seq == self._stuck_seq:
            return
        with self._lock:
            for _attempt in range(50):
                b = self._control.block()
                if b is None:
                    # The writer stopped (died, or SIGSTOP) inside a publish. The
                    # view we have is still exact at its revision: keep serving it,
                    # and do not spin again until SEQ moves.
                    self._stuck_seq = seq
                    self._set_fast()
                    return
                if b.seq == self._seq:
                    return
                control.validate_block(b, self._ctl_name)
                try:
                    self._advance(b)
                except _Retry:
                    self._snap_seq = 0  # rebuild from the (new) snapshot
                    continue
                self._block = b
                self._seq = b.seq
                self._revision = b.revision
                self._set_fast()
                return
            raise ShmCacheError(f"cache {self.name!r}: could not keep up with the writer "
                                f"after 50 attempts (ring too small for this reader?)")

    def _open_ring(self, b: control.Block) -> _shm.Segment:
        """The ring segment block ``b`` points at (the one mapped already, if it is that one)."""
        if b.ring_gen == self._ring_gen and self._ring is not None:
            return self._ring
        name = layout.ring_name(self.name, b.ring_gen)
        seg = _shm.open_readonly(name)
        if seg is None:
            self._missing(b, name)
        ring.check_ring_header(seg.buf, seg.size, name, b.ring_gen, b.ring_capacity)
        return seg

    def _missing(self, b: control.Block, name: str) -> NoReturn:
        """A segment the block points at is gone: replaced meanwhile (retry) or removed (error)."""
        if self._control.block() == b:
            raise CorruptSegmentError(
                f"segment {name} that the control segment points at is missing",
                segment=self._ctl_name,
                hint="Was it removed by hand? Restarting the writer republishes the cache")
        raise _Retry()

    def _advance(self, b: control.Block) -> None:
        """Move the view to block ``b``: read the new ring records, then swap the result in.

        Nothing the view holds changes until every new record has been read and
        found intact (ring.iter_records): a lapped or corrupt ring leaves the
        view exactly as it was, and a lock-free ``get`` sees the old view or the
        new one, never a mixture.
        """
        if b.snap_seq == 0:
            if not control.writer_alive(self._cbuf):
                raise NotFoundError(
                    f"cache {self.name!r} has no snapshot and no writer is running (its "
                    f"writer stopped before it loaded the range from etcd)", name=self.name,
                    hint="Start its writer (`shmcache serve NAME ...`), or remove it with "
                         "`shmcache rm NAME`")
            raise NotFoundError(f"cache {self.name!r} has no snapshot yet: its writer is "
                                f"still loading", name=self.name,
                                hint="Pass Reader(name, timeout=...) to wait for it")
        prefix = self._prefix
        if b.epoch != self._epoch or b.prefix_len != len(prefix):
            prefix = self._control.prefix(b.prefix_len)
        ring_seg = self._open_ring(b)
        fresh = (prefix != self._prefix or b.epoch != self._epoch or ring_seg is not self._ring
                 or b.snap_seq != self._snap_seq or self._snap is None)
        if fresh:
            name = layout.snapshot_name(self.name, b.snap_seq)
            seg = _shm.open_readonly(name)
            if seg is None:
                self._missing(b, name)
            snap = Snapshot(name, seg.buf, seg.size)
            if snap.revision != b.snap_revision or snap.epoch != b.epoch or seg.size != b.snap_size:
                snap.close()
                if self._control.block() == b:
                    raise CorruptSegmentError(
                        f"snapshot revision {snap.revision}/epoch {snap.epoch}/size {seg.size} "
                        f"does not match the control segment ({b.snap_revision}/{b.epoch}/"
                        f"{b.snap_size})", segment=name)
                raise _Retry()
            start, last_rev = b.snap_ring_pos, b.snap_revision
        else:
            snap = self._snap  # type: ignore[assignment]
            start = self._pos
            last_rev = self._rec_revs[-1] if self._rec_revs else snap.revision
        changes: list[tuple[bytes, KeyValue | None]] = []
        revs: list[int] = []
        positions: list[int] = []
        try:
            for pos, rev, _nxt, payload in ring.iter_records(
                    ring_seg.buf, b.ring_capacity, start, b.ring_head,
                    self._control.tail, after_revision=last_rev,
                    max_revision=b.revision, name=ring_seg.name):
                for ev in _codec.decode(payload, rev, ring_seg.name):
                    changes.append((ev.kv.key, ev.kv if ev.type == "PUT" else None))
                revs.append(rev)
                positions.append(pos)
        except ring.Lapped:
            raise _Retry() from None
        # Everything read is intact: commit.
        if fresh:
            overlay: SortedDict = SortedDict()
            for key, kv in changes:
                overlay[key] = kv
            self._spare, self._spare_pending = None, []
            self._rec_revs, self._rec_pos = revs, positions
            self._prefix = prefix
            self._prefix_end = range_end(prefix)
            self._ring = ring_seg  # the old mapping is dropped, not closed: a Watch may hold it
            self._ring_gen = b.ring_gen
            # The old snapshot is dropped, not closed: a running list() may still hold it.
            self._snap = snap
            self._snap_seq = b.snap_seq
        else:
            overlay = self._next_overlay(changes)
            self._rec_revs.extend(revs)
            self._rec_pos.extend(positions)
        self._overlay = overlay
        self._view = (overlay, snap)
        self._pos = b.ring_head
        self._epoch = b.epoch

    def _next_overlay(self, changes: list[tuple[bytes, KeyValue | None]]) -> SortedDict:
        """The live overlay with ``changes`` applied, built aside from the one readers use.

        Two overlays alternate: the spare (the one replaced at the last refresh)
        first catches up with the changes it lacks, then takes the new ones, and
        becomes the live one. A ``get`` that picked up the old live overlay just
        before the swap keeps reading a state that does not change under it
        until the next refresh. Each change is applied twice; one copy is made
        per snapshot, at the first refresh after it.
        """
        if not changes:
            return self._overlay
        spare = self._spare
        if spare is None:
            spare = self._overlay.copy()
        else:
            for key, kv in self._spare_pending:
                spare[key] = kv
        for key, kv in changes:
            spare[key] = kv
        self._spare, self._spare_pending = self._overlay, changes
        return spare

    def _check_key_range(self, key: bytes, what: str) -> None:
        p = self._prefix
        if p and not key.startswith(p):
            raise ValueError(f"{what} {key!r} is outside the key range of cache {self.name!r} "
                             f"(prefix {p!r})")

    def _wait_min(self, min_revision: int | None, timeout: float | None) -> None:
        if min_revision is not None and not self.wait(min_revision, timeout):
            raise TimeoutError(f"cache {self.name!r} did not reach revision {min_revision} "
                               f"within {timeout}s (it is at {self._revision})")

    # -- public API ------------------------------------------------------------

    @property
    def revision(self) -> int:
        """The revision the cache has caught up to: every answer reflects exactly it."""
        self._refresh()
        return self._revision

    @property
    def prefix(self) -> bytes:
        """The key prefix the writer serves (b"" = the whole keyspace)."""
        self._refresh()
        return self._prefix

    def get(self, key: bytes | str, *, revision: int | None = None,
            min_revision: int | None = None,
            timeout: float | None = None) -> KeyValue | None:
        """The key's current KeyValue, or None if absent. No scan: a hash probe.

        ``revision``: the key as etcd had it at that revision, for any revision from
        ``status().oldest_watchable_revision`` up to the current one
        (CompactedError below, FutureRevisionError above).
        ``min_revision``: first wait (up to ``timeout`` seconds) until the cache has
        reached that revision; TimeoutError if it does not.
        """
        st = self._fast_state
        if st is not None and revision is None and min_revision is None:
            try:
                kv = _reader_get(key, st)  # type: ignore[misc]
            except ValueError as exc:
                raise self._view[1]._corrupt(str(exc)) from None  # type: ignore[union-attr]
            if kv is not _SLOW:
                return kv  # type: ignore[no-any-return]
        if type(key) is not bytes:
            key = _as_key(key)
        if revision is not None:
            if min_revision is not None:
                self._wait_min(min_revision, timeout)
            return self._get_at(key, revision)
        if min_revision is not None:
            self._wait_min(min_revision, timeout)
        if self._checks:  # staleness checks, or closed (then _refresh raises)
            self._refresh()
        else:
            seq = _unpack_q(self._cbuf, _SEQ)[0]
            if seq != self._seq and seq != self._stuck_seq:
                self._refresh()
        if not key.startswith(self._prefix):
            self._check_key_range(key, "key")
        # (overlay, snapshot) are read as one tuple: a concurrent refresh replaces
        # them as a pair, and only ever adds newer events to an overlay in place.
        overlay, snap = self._view
        ov = overlay.get(key, _MISSING)
        if ov is not _MISSING:
            return ov  # type: ignore[return-value]
        assert snap is not None
        if _fast_get is not None and snapshot_mod.USE_SPEEDUPS:
            # The C lookup straight from here: this is every reader's hot path.
            try:
                return _fast_get(key, snap.params)  # type: ignore[no-any-return]
            except ValueError as exc:
                raise snap._corrupt(str(exc)) from None
        return snap.get(key)

    def list(self, prefix: bytes | str = b"", limit: int | None = None, *,
             revision: int | None = None, min_revision: int | None = None,
             timeout: float | None = None) -> ListResult:
        """Every key starting with ``prefix``, sorted, exact at the returned ``.revision``.

        ``prefix`` defaults to the cache's whole range. ``limit`` caps the number
        of items (the first ones in key order). ``revision``: the range as etcd
        had it at that revision (see ``get``). ``min_revision``/``timeout``: wait
        for the cache to reach a revision first.
        """
        prefix = _as_key(prefix)
        if limit is not None and limit < 0:
            raise ValueError("limit must be >= 0")
        if revision is not None:
            if min_revision is not None:
                self._wait_min(min_revision, timeout)
            return self._list_at(prefix, limit, revision)
        if min_revision is not None:
            self._wait_min(min_revision, timeout)
        with self._lock:
            self._refresh()
            if not prefix:
                prefix = self._prefix
            self._check_key_range(prefix, "prefix")
            end = range_end(prefix)
            snap = self._snap
            assert snap is not None
            if end is None:
                ov_keys = list(self._overlay.irange(minimum=prefix))
            else:
                ov_keys = list(self._overlay.irange(prefix, end, inclusive=(True, False)))
            overlay = self._overlay
            ov_items = [(k, overlay[k]) for k in ov_keys]
            revision = self._revision
        want = limit if limit is not None else -1
        n_ov = len(ov_items)
        if not n_ov:
            return ListResult(snap.range_list(prefix, end, want), revision)
        # Each overlay entry hides at most one snapshot entry: limit + n_ov
        # snapshot entries are enough to fill ``limit`` answers.
        base = snap.range_list(prefix, end, -1 if want < 0 else want + n_ov)
        items: list[KeyValue] = []
        oi = 0
        for kv in base:
            k = kv.key
            while oi < n_ov and ov_items[oi][0] <= k:
                ok, ov = ov_items[oi]
                oi += 1
                if ov is not None:
                    if len(items) == want:
                        return ListResult(items, revision)
                    items.append(ov)
                if ok == k:
                    break
            else:
                if len(items) == want:
                    return ListResult(items, revision)
                items.append(kv)
                continue
            # k was shadowed by an overlay entry (already handled above)
        while oi < n_ov:
            ov = ov_items[oi][1]
            oi += 1
            if ov is not None:
                if len(items) == want:
                    break
                items.append(ov)
        return ListResult(items, revision)

    # -- reads at a past revision (see _history) --------------------------------

    def _changes_after(self, revision: int) -> dict[bytes, KeyValue | None]:
        """key -> its KeyValue (or None) at ``revision``, for keys changed since. Holds the lock."""
        b = self._block
        assert b is not None and self._ring is not None
        _history.check_window(self.name, revision, self._revision, b.compact_revision)
        if revision == self._revision:
            return {}
        return _history.changes_after(self.name, self._control, self._ring, b,
                                      self._position_after(revision), self._pos, revision)

    def _get_at(self, key: bytes, revision: int) -> KeyValue | None:
        with self._lock:
            self._refresh()
            self._check_key_range(key, "key")
            undo = self._changes_after(revision)
            if key in undo:
                return undo[key]
            overlay, snap = self._view
            ov = overlay.get(key, _MISSING)
            if ov is not _MISSING:
                return ov  # type: ignore[return-value]
            assert snap is not None
            return snap.get(key)

    def _list_at(self, prefix: bytes, limit: int | None, revision: int) -> ListResult:
        with self._lock:
            self._refresh()
            current = self.list(prefix)
            undo = self._changes_after(revision)
        start = prefix or self._prefix
        out = _history.apply_undo({kv.key: kv for kv in current.items}, undo, start,
                                  range_end(start))
        if limit is not None:
            out = out[:limit]
        return ListResult(out, revision)

    def _position_after(self, since: int) -> int:
        """A ring position at or before the first record with revision > since (never after it)."""
        with self._lock:
            b, seg = self._block, self._ring
            assert b is not None and seg is not None
            if since >= b.snap_revision:
                return _history.position_after(self._control, seg, b, self._rec_revs,
                                               self._rec_pos, self._pos, since)
        return _history.position_after(self._control, seg, b, [], [], 0, since)

    def watch(self, prefix: bytes | str = b"", since_revision: int | None = None) -> Watch:
        """Events for keys starting with ``prefix`` with revision > ``since_revision``, in order.

        ``since_revision=None``: from now. Raises CompactedError if those events are
        no longer retained; list again and watch from the list's revision.
        """
        return Watch(self, _as_key(prefix), since_revision)

    def wait(self, revision: int, timeout: float | None = None) -> bool:
        """Block until ``self.revision >= revision``; False on timeout. Woken by the writer's publish."""
        self._check_open()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._check_open()  # (close() from another thread unmaps the control word)
            word = self._control.word()
            if self.revision >= revision:
                return True
            remaining = 1.0 if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._control.wait(word, min(remaining, 1.0))

    def sync(self, timeout: float = 5.0) -> int:
        """Wait until the cache reflects every etcd write that completed before this call.

        Returns the revision the Reader's answers are now exact at (at least
        etcd's revision when sync() was called). Asks the writer, which reads
        etcd's current revision and confirms its watch has reached it (see
        docs/design.md, "Consistent reads"); concurrent calls share rounds.
        Raises TimeoutError if the writer cannot confirm within ``timeout``
        seconds, or at once if no writer is running.
        """
        self._check_open()
        deadline = time.monotonic() + timeout
        b = self._control.block()
        while b is None:  # the writer is inside a publish (or stopped in one)
            if time.monotonic() >= deadline:
                raise TimeoutError(f"the writer of cache {self.name!r} is stuck inside a "
                                   f"publish; cannot confirm a consistent read")
            time.sleep(0.001)
            b = self._control.block()
        # A round that starts after our request covers it: the one after every
        # round already started (a running round may have read etcd's revision
        # before this call).
        need = b.sync_started + 1
        with self._lock:
            if self._sync_client is None:
                self._sync_client = _sync.Client(self.name)
        sent = time.monotonic()
        if not self._sync_client.request():
            raise TimeoutError(f"cache {self.name!r} has no running writer to confirm a "
                               f"consistent read", hint="Check `shmcache status NAME`")
        while True:
            word = self._control.word()
            b = self._control.block()
            if b is not None and b.sync_done >= need:
                self._refresh()
                if self._revision >= b.sync_revision:
                    return self._revision
            now = time.monotonic()
            if now >= deadline:
                raise TimeoutError(f"the writer of cache {self.name!r} did not confirm a "
                                   f"consistent read within {timeout}s")
            if now - sent > 1.0:  # the writer may have restarted and lost the request
                sent = now
                self._sync_client.request()
            self._control.wait(word, min(deadline - now, 0.25))

    def status(self) -> Status:
        """The cache's and its writer's state, read without waiting."""
        self._check_open()
        b = self._control.block() or self._block
        if b is None:
            raise ShmCacheError(f"cache {self.name!r} has not published its state yet")
        ctl = self._control
        pid, _start, hb = ctl.writer_identity()
        alive = ctl.writer_alive()
        return Status(
            name=self.name, prefix=ctl.prefix(b.prefix_len),
            writer_pid=pid, writer_alive=alive,
            heartbeat_age=(time.monotonic_ns() - hb) / 1e9 if hb else None,
            revision=b.revision, etcd_revision=b.etcd_revision, epoch=b.epoch,
            oldest_watchable_revision=b.compact_revision, snapshot_revision=b.snap_revision,
            key_count=b.key_count, ring_capacity=b.ring_capacity,
            ring_used=b.ring_head - b.ring_tail, format_version=layout.FORMAT_VERSION,
            etcd_unreachable_since=ctl.etcd_down_since() if alive else None)

    # -- for Watch (shmcache/_watch.py) ----------------------------------------

    @property
    def control(self) -> control.ControlReader:
        """The cache's control segment (block, tail, futex word, closed), read-only.

        The low-level handle that Watch, AsyncWatch and Subscription wait on;
        applications need none of it."""
        return self._control

    def _check_read(self) -> None:
        """Raise if the Reader is closed or (with max_staleness) the writer is stale."""
        if self._closed:
            self._check_open()
        if self.max_staleness is not None:
            self._check_stale()

    def _watch_start(self, prefix: bytes, since: int | None,
                     ) -> tuple[bytes, control.Block, _shm.Segment, int, int]:
        """(prefix, block, ring, position, since) for a new Watch, from one view."""
        self._refresh()
        if not prefix:
            prefix = self._prefix
        self._check_key_range(prefix, "prefix")
        with self._lock:
            b, seg = self._block, self._ring
            assert b is not None and seg is not None
            if since is None:
                return prefix, b, seg, self._pos, b.revision
            if since < b.compact_revision:
                raise CompactedError(
                    f"cache {self.name!r} no longer holds the events after revision "
                    f"{since}; the oldest since_revision it can serve is "
                    f"{b.compact_revision}", compact_revision=b.compact_revision)
            return prefix, b, seg, self._position_after(since), since

    def _current_ring(self) -> tuple[control.Block, _shm.Segment]:
        """The block and ring segment after a refresh (a Watch following a new ring)."""
        with self._lock:
            self._refresh()
            b, seg = self._block, self._ring
        assert b is not None and seg is not None
        return b, seg

    # -- integrations (shmcache/aio.py, shmcache/subscribe.py, imported when used) --

    def awatch(self, prefix: bytes | str = b"",
               since_revision: int | None = None) -> AsyncWatch:
        """``watch`` for asyncio: ``async for ev in r.awatch(prefix, since_revision)``.

        Returns an AsyncWatch. Woken by the writer's publish through one thread per
        Reader and process, whatever the number of watches (shmcache/aio.py).
        """
        from .aio import AsyncWatch

        return AsyncWatch(self, prefix, since_revision)

    async def await_revision(self, revision: int, timeout: float | None = None) -> bool:
        """``wait`` for asyncio: True once ``revision`` is reached, False after ``timeout`` s."""
        from .aio import await_revision

        return await await_revision(self, revision, timeout)

    def subscribe(self, prefix: bytes | str, callback: Callable[[Event], object], *,
                  since_revision: int | None = None,
                  on_reset: Callable[[ListResult], object] | None = None,
                  on_error: Callable[[BaseException], object] | None = None) -> Subscription:
        """Call ``callback(event)`` for every change under ``prefix`` from a background thread.

        Returns a running Subscription (``close()`` stops it); see shmcache/subscribe.py.
        """
        from .subscribe import Subscription

        return Subscription(self, prefix, callback, since_revision=since_revision,
                            on_reset=on_reset, on_error=on_error)
