"""Reader: attach read-only to a cache and answer get, list and watch from shared memory.

Never imports etcd, grpc or protobuf.
"""

from __future__ import annotations

import bisect
import collections
import os
import struct
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any, NoReturn

from sortedcontainers import SortedDict

from . import _codec, _futex, _shm, _sync, control, layout, ring
from .errors import (
    CompactedError,
    CorruptSegmentError,
    FutureRevisionError,
    NotFoundError,
    ShmCacheError,
    StaleError,
    TimeoutError,
)
from . import snapshot as snapshot_mod
from .snapshot import Snapshot

from .types import Event, KeyValue, ListResult, Status

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
_TAIL_OFF = layout.C_BLOCK + 8 * layout.B_RING_TAIL
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


def _range_end(prefix: bytes) -> bytes | None:
    """Exclusive upper bound of the keys under ``prefix``; None for "no bound".

    etcd spells "no bound" b"\\0" (the range end of b"" and of all-0xff prefixes).
    """
    if not prefix:
        return None
    end = layout.prefix_range_end(prefix)
    return None if end == b"\0" else end


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
        self._ctl_name = layout.control_name(name)
        deadline = time.monotonic() + timeout
        while True:
            seg = _shm.open_readonly(self._ctl_name)
            if seg is not None:
                try:
                    control.check_header(seg.buf, seg.size, self._ctl_name)
                    break
                except CorruptSegmentError:
                    # Bytes that are there but wrong will not fix themselves: fail now.
                    # Only a segment still all zeros (a writer initialising it) is
                    # worth the wait. (Decided before close(): the map is gone after.)
                    initialising = seg.size >= layout.CONTROL_SIZE and \
                        seg.buf[:8] == b"\0" * 8
                    seg.close()
                    if time.monotonic() >= deadline or not initialising:
                        raise
            elif time.monotonic() >= deadline:
                raise NotFoundError(f"no shmcache named {name!r} on this host "
                                    f"(no segment {self._ctl_name})", name=name)
            time.sleep(0.02)
        self._ctl = seg
        self._cbuf = seg.buf
        self._futex_addr = _futex.address_of(seg.buf, _SEQ)
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
        for seg in (self._ctl, self._ring):
            if seg is not None:
                seg.close()
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
        pid, _start, hb = control.writer_identity(self._cbuf)
        age = (time.monotonic_ns() - hb) / 1e9 if hb else float("inf")
        if age > self.max_staleness or pid == 0:  # type: ignore[operator]
            raise StaleError(
                f"cache {self.name!r} is stale: writer pid {pid} "
                f"{'alive' if control.writer_alive(self._cbuf) else 'not running'}, "
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
                b = control.read_block(self._cbuf)
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
        if control.read_block(self._cbuf) == b:
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
            prefix = control.read_prefix(self._cbuf, b.prefix_len)
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
                if control.read_block(self._cbuf) == b:
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
        cbuf = self._cbuf
        try:
            for pos, rev, _nxt, payload in ring.iter_records(
                    ring_seg.buf, b.ring_capacity, start, b.ring_head,
                    lambda: _unpack_q(cbuf, _TAIL_OFF)[0], after_revision=last_rev,
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
            self._prefix_end = _range_end(prefix)
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
            end = _range_end(prefix)
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

    # -- reads at a past revision ----------------------------------------------
    #
    # Every ring record carries each event's prev_kv, and the ring holds every
    # event after oldest_watchable_revision. So the value of a key at revision R
    # is: the prev_kv of its first event after R if it has one (None if it did
    # not exist), else its current value. Nothing is copied but the keys that
    # changed after R.

    def _changes_after(self, revision: int) -> dict[bytes, KeyValue | None]:
        """key -> its KeyValue (or None) at ``revision``, for keys changed since. Holds the lock."""
        b = self._block
        assert b is not None
        if revision > self._revision:
            raise FutureRevisionError(
                f"revision {revision} is above cache {self.name!r}'s current revision "
                f"{self._revision}")
        if revision < b.compact_revision:
            raise CompactedError(
                f"cache {self.name!r} no longer holds the history at revision {revision}; the "
                f"oldest it can serve is {b.compact_revision}", compact_revision=b.compact_revision)
        undo: dict[bytes, KeyValue | None] = {}
        if revision == self._revision:
            return undo
        ring_seg = self._ring
        assert ring_seg is not None
        cbuf = self._cbuf
        try:
            for _pos, rev, _nxt, payload in ring.iter_records(
                    ring_seg.buf, b.ring_capacity, self._position_after(revision), self._pos,
                    lambda: _unpack_q(cbuf, _TAIL_OFF)[0], name=ring_seg.name):
                if rev > revision:
                    for ev in _codec.decode(payload, rev, ring_seg.name):
                        if ev.kv.key not in undo:
                            undo[ev.kv.key] = ev.prev_kv
        except ring.Lapped:
            b2 = control.read_block(self._cbuf) or b
            raise CompactedError(
                f"the history of cache {self.name!r} at revision {revision} was overwritten "
                f"while it was read", compact_revision=b2.compact_revision) from None
        return undo

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
        end = _range_end(start)
        items = {kv.key: kv for kv in current.items}
        for key, kv in undo.items():
            if key >= start and (end is None or key < end):
                if kv is None:
                    items.pop(key, None)
                else:
                    items[key] = kv
        out = [items[k] for k in sorted(items)]
        if limit is not None:
            out = out[:limit]
        return ListResult(out, revision)

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
            word = _unpack_q(self._cbuf, _SEQ)[0] & 0xFFFFFFFF
            if self.revision >= revision:
                return True
            remaining = 1.0 if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                return False
            _futex.wait(self._futex_addr, word, min(remaining, 1.0))

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
        b = control.read_block(self._cbuf)
        while b is None:  # the writer is inside a publish (or stopped in one)
            if time.monotonic() >= deadline:
                raise TimeoutError(f"the writer of cache {self.name!r} is stuck inside a "
                                   f"publish; cannot confirm a consistent read")
            time.sleep(0.001)
            b = control.read_block(self._cbuf)
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
            word = _unpack_q(self._cbuf, _SEQ)[0] & 0xFFFFFFFF
            b = control.read_block(self._cbuf)
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
            _futex.wait(self._futex_addr, word, min(deadline - now, 0.25))

    def status(self) -> Status:
        """The cache's and its writer's state, read without waiting."""
        self._check_open()
        b = control.read_block(self._cbuf) or self._block
        if b is None:
            raise ShmCacheError(f"cache {self.name!r} has not published its state yet")
        pid, _start, hb = control.writer_identity(self._cbuf)
        alive = control.writer_alive(self._cbuf)
        return Status(
            name=self.name, prefix=control.read_prefix(self._cbuf, b.prefix_len),
            writer_pid=pid, writer_alive=alive,
            heartbeat_age=(time.monotonic_ns() - hb) / 1e9 if hb else None,
            revision=b.revision, etcd_revision=b.etcd_revision, epoch=b.epoch,
            oldest_watchable_revision=b.compact_revision, snapshot_revision=b.snap_revision,
            key_count=b.key_count, ring_capacity=b.ring_capacity,
            ring_used=b.ring_head - b.ring_tail, format_version=layout.FORMAT_VERSION,
            etcd_unreachable_since=control.etcd_down_since(self._cbuf) if alive else None)

    # -- for Watch -------------------------------------------------------------

    def _position_after(self, since: int) -> int:
        """A ring position at or before the first record with revision > since (never after it)."""
        with self._lock:
            b = self._block
            assert b is not None
            if since >= b.snap_revision:
                i = bisect.bisect_right(self._rec_revs, since)
                return self._rec_pos[i] if i < len(self._rec_pos) else self._pos
            ring_seg = self._ring
        assert ring_seg is not None
        # Older than the snapshot: walk record headers from the tail. Headers are
        # only a hint here; the Watch validates every record it reads.
        for _attempt in range(10):
            tail = _unpack_q(self._cbuf, _TAIL_OFF)[0]
            pos = tail
            try:
                while pos < b.ring_head:
                    kind, rev, nxt = ring.peek_revision(ring_seg.buf, b.ring_capacity, pos)
                    if kind == layout.REC_KIND_EVENTS and rev > since:
                        break
                    pos = nxt
            except ring.TornRecord:
                continue
            if _unpack_q(self._cbuf, _TAIL_OFF)[0] <= tail:
                return pos
        return _unpack_q(self._cbuf, _TAIL_OFF)[0]

    # -- integrations (shmcache/aio.py, shmcache/subscribe.py) --
    # Return types are shmcache.aio.AsyncWatch and shmcache.subscribe.Subscription
    # (Any here: this module does not import those).

    def awatch(self, prefix: bytes | str = b"", since_revision: int | None = None) -> Any:
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

    def subscribe(self, prefix: bytes | str, callback: Any, *, since_revision: int | None = None,
                  on_reset: Any = None, on_error: Any = None) -> Any:
        """Call ``callback(event)`` for every change under ``prefix`` from a background thread.

        Returns a running Subscription (``close()`` stops it); see shmcache/subscribe.py.
        """
        from .subscribe import Subscription

        return Subscription(self, prefix, callback, since_revision=since_revision,
                            on_reset=on_reset, on_error=on_error)


class Watch:
    """An ordered stream of events; see ``Reader.watch``.

    Iterate it (blocks until events arrive) or ``poll(timeout)``. Never skips,
    repeats or reorders an event: if the writer overwrote events this watch had
    not read yet, or reset its history, the next read raises CompactedError.
    A Watch belongs to one thread at a time; ``close()`` may be called from any.
    """

    def __init__(self, reader: Reader, prefix: bytes, since_revision: int | None) -> None:
        reader._refresh()
        if not prefix:
            prefix = reader._prefix
        reader._check_key_range(prefix, "prefix")
        self._reader = reader
        self.prefix = prefix
        self._end = _range_end(prefix)
        with reader._lock:
            # Block, ring and position are taken together: a refresh in another
            # thread between them would make the watch skip events or read one
            # ring at a position meant for another.
            b = reader._block
            assert b is not None
            self._ring = reader._ring
            if since_revision is None:
                since_revision = b.revision
                self._pos = reader._pos
            else:
                if since_revision < b.compact_revision:
                    raise CompactedError(
                        f"cache {reader.name!r} no longer holds the events after revision "
                        f"{since_revision}; the oldest since_revision it can serve is "
                        f"{b.compact_revision}", compact_revision=b.compact_revision)
                self._pos = reader._position_after(since_revision)
        assert self._ring is not None
        self._epoch = b.epoch
        self._ring_gen = b.ring_gen
        self._cap = b.ring_capacity
        self._since = since_revision
        self._last_record = 0  # revision of the last record read, for order checks
        self.revision = max(since_revision, 0)
        self._pending: collections.deque[Event] = collections.deque()
        self._closed = False

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._closed = True

    def __iter__(self) -> Iterator[Event]:
        while not self._closed:
            if not self._pending:
                self._pending.extend(self.poll(timeout=0.5))
                continue
            yield self._pending.popleft()

    def _lapped(self, b: control.Block | None = None) -> CompactedError:
        r = self._reader
        b = b or control.read_block(r._cbuf) or r._block
        compact = b.compact_revision if b is not None else self._since + 1
        return CompactedError(
            f"watch on cache {r.name!r} fell behind: events after revision {self._since} were "
            f"overwritten before it read them", compact_revision=max(compact, self._since + 1),
            hint="Use a larger --ring-size, or list again and watch from the list's revision")

    def _collect(self, seg: _shm.Segment, cap: int, stop: int, tail: Any,
                 max_revision: int | None, events: list[Event]) -> None:
        """Append the matching events of the records from ``self._pos`` to ``stop``; commit.

        The watch's position moves only if every record read was intact
        (ring.iter_records raises Lapped or CorruptSegmentError otherwise).
        """
        prefix, end = self.prefix, self._end
        since, last = self._since, self._last_record
        found: list[Event] = []
        for _pos, rev, _nxt, payload in ring.iter_records(
                seg.buf, cap, self._pos, stop, tail, after_revision=last,
                max_revision=max_revision, name=seg.name):
            last = rev
            if rev > since:
                for ev in _codec.decode(payload, rev, seg.name):
                    k = ev.kv.key
                    if k >= prefix and (end is None or k < end):
                        found.append(ev)
                since = rev
        events.extend(found)
        self._pos = max(self._pos, stop)
        self._last_record = last
        self._since = since

    def _follow_ring(self, b: control.Block, events: list[Event]) -> None:
        """The writer moved to a new ring in the same epoch (it grew, or a restart resized it).

        Read on to the end of the old ring (the writer sealed it, see
        ring.read_seal; this watch's mapping of it stays valid), then continue
        at the start of the new one, whose history begins at
        ``b.compact_revision``. No event is lost or repeated; a watch that cannot
        reach that revision (the old ring lapped it, or was not sealed) gets
        CompactedError.
        """
        r = self._reader
        assert self._ring is not None
        if self._since < b.compact_revision:
            seal = ring.read_seal(self._ring.buf)
            if seal is None:
                raise CompactedError(
                    f"cache {r.name!r} replaced its ring log; events after revision "
                    f"{self._since} are not all available",
                    compact_revision=b.compact_revision)
            s_tail, s_head, s_revision = seal
            try:
                self._collect(self._ring, self._cap, s_head, lambda: s_tail, s_revision, events)
            except ring.Lapped:
                raise self._lapped(b) from None
            self._since = max(self._since, s_revision)
            if self._since < b.compact_revision:  # a second new ring came meanwhile
                raise CompactedError(
                    f"cache {r.name!r} replaced its ring log twice while this watch read; "
                    f"events after revision {self._since} are not all available",
                    compact_revision=b.compact_revision)
        with r._lock:
            r._refresh()
            rb, seg = r._block, r._ring
        assert rb is not None and seg is not None
        if rb.epoch != self._epoch or self._since < rb.compact_revision:
            raise CompactedError(
                f"cache {r.name!r} replaced its ring log again while this watch read; events "
                f"after revision {self._since} are not all available",
                compact_revision=rb.compact_revision)
        # A new ring's first record is at position 0; if it has lapped already, the
        # read that follows says so.
        self._ring, self._ring_gen, self._cap = seg, rb.ring_gen, rb.ring_capacity
        self._pos = 0
        self._last_record = self._since

    def _read_available(self) -> list[Event]:
        r = self._reader
        if r._closed:
            r._check_open()
        if r.max_staleness is not None:
            r._check_stale()
        b = control.read_block(r._cbuf)
        if b is None:
            return []
        if b.epoch != self._epoch:
            raise CompactedError(
                f"cache {r.name!r} reset its history (epoch {self._epoch} -> {b.epoch}); "
                f"events after revision {self._since} are not all available",
                compact_revision=b.compact_revision)
        control.validate_block(b, r._ctl_name)
        events: list[Event] = []
        if b.ring_gen != self._ring_gen:
            self._follow_ring(b, events)
            b = control.read_block(r._cbuf)
            if b is None or b.ring_gen != self._ring_gen:
                return events  # moved on again: the next read follows it
            control.validate_block(b, r._ctl_name)
        assert self._ring is not None
        cbuf = r._cbuf
        try:
            self._collect(self._ring, self._cap, b.ring_head,
                          lambda: _unpack_q(cbuf, _TAIL_OFF)[0], b.revision, events)
        except ring.Lapped:
            if events:
                return events  # delivered first; the next read reports the lap
            raise self._lapped() from None
        self.revision = max(self.revision, b.revision)
        return events


    def poll(self, timeout: float | None = 0.0) -> list[Event]:
        """Events available now, waiting up to ``timeout`` seconds for the first; [] on timeout.

        Waiting sleeps on the writer's futex word: no CPU while idle, woken by the
        publish that brings new events.
        """
        if self._pending:
            out = list(self._pending)
            self._pending.clear()
            return out
        r = self._reader
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._closed:
            r._check_open()  # a closed Reader has unmapped the word waited on
            word = _unpack_q(r._cbuf, _SEQ)[0] & 0xFFFFFFFF
            events = self._read_available()
            if events:
                return events
            remaining = 0.5 if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                return []
            _futex.wait(r._futex_addr, word, min(remaining, 0.5))
        return []
