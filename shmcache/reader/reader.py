"""Reader: attach read-only to a cache and answer get, list and watch from shared memory.

The view (the live snapshot and delta segment plus the recent changes, the
events after them) is in view.py; reads at a past revision are in history.py,
watches in watch.py, the control segment's reader in control_reader.ControlReader.
Never imports etcd, grpc or protobuf.
"""

from __future__ import annotations

import dataclasses
import os
import struct
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from .. import _args
from ..errors import (
    NotFoundError,
    ShmCacheError,
    TimeoutError,
)
from ..format import control, layout
from ..format import snapshot as snapshot_mod
from ..format.control import Block
from ..ipc import control_reader
from ..ipc import shm as _shm
from ..ipc.control_reader import ControlReader
from ..types import Event, KeyValue, ListResult, Status
from . import sync_client
from .indexreads import IndexReads
from .janitor import Janitor, Upkeep, pinned_bytes
from .lifetime import Lifetime
from .ranges import RangeReads
from .view import Layers, Retry, View, lookup
from .watch import Watch

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
    # The mappings are inherited and stay valid. A lock held by another thread at
    # fork time would stay held forever in the child, and that thread's uses would
    # never end; the view it was moving (View.advance) is half-moved: rebuilt.
    for r in list(_readers):
        r._forked()
    _janitor.after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


class _NoState(ShmCacheError):
    """No block could be read yet: the writer stopped inside a publish (SEQ odd)."""


class _Waits:
    """The Reader's waits and integrations (mixed into Reader): the calls that block for the
    writer, and the asyncio and callback front-ends. Each counts itself in the Reader's uses
    (see Reader, "Lifetime")."""

    name: str
    _life: Lifetime
    _lock: threading.RLock
    _control: ControlReader
    _sync_client: sync_client.Client | None
    _revision: int

    def _refresh(self) -> None: ...  # (Reader's)
    def _check_open(self) -> None: ...

    def wait(self, revision: int, timeout: float | None = None) -> bool:
        """Block until ``self.revision >= revision``; False on timeout. Woken by the writer's
        publish, and by close() (then raises ShmCacheError)."""
        _args.read_args(_args.revision(revision, "revision"), None, timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._life:
            while True:
                self._check_open()
                word = self._control.word()
                self._refresh()
                if self._revision >= revision:
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
        _args.seconds(timeout, "timeout")

        def reached() -> int:
            self._refresh()
            return self._revision

        with self._life:
            with self._lock:
                client = self._sync_client
                if client is None:
                    client = self._sync_client = sync_client.Client(self.name)
            return client.confirm(self._control, reached, timeout)

    # -- integrations (shmcache/reader/aio.py, shmcache/reader/subscribe.py, imported when used) --

    def awatch(self, prefix: bytes | str = b"", since_revision: int | None = None, *,
               index: tuple[str, bytes | str] | None = None,
               shard: tuple[int, int] | None = None) -> AsyncWatch:
        """``watch`` for asyncio: ``async for ev in r.awatch(prefix, since_revision)``.

        Returns an AsyncWatch. Woken by the writer's publish through one thread per
        Reader and process, whatever the number of watches (shmcache/reader/aio.py).
        """
        from .aio import AsyncWatch

        return AsyncWatch(cast("Reader", self), prefix, since_revision, index=index,
                          shard=shard)

    async def await_revision(self, revision: int, timeout: float | None = None) -> bool:
        """``wait`` for asyncio: True once ``revision`` is reached, False after ``timeout`` s."""
        from .aio import await_revision

        return await await_revision(cast("Reader", self), revision, timeout)

    def subscribe(self, prefix: bytes | str, callback: Callable[[Event], object], *,
                  since_revision: int | None = None,
                  on_reset: Callable[[ListResult], object] | None = None,
                  on_error: Callable[[BaseException], object] | None = None) -> Subscription:
        """Call ``callback(event)`` for every change under ``prefix`` from a background thread.

        Returns a running Subscription (``close()`` stops it); see shmcache/reader/subscribe.py.
        """
        from .subscribe import Subscription

        return Subscription(cast("Reader", self), prefix, callback, since_revision=since_revision,
                            on_reset=on_reset, on_error=on_error)


class Reader(RangeReads, IndexReads, _Waits, Upkeep):
    """A read-only attachment to the cache ``name`` on this host.

    Concurrency contract: any number of Readers, in any number of processes,
    may be attached to one cache; they take no locks the writer sees and cannot
    modify any segment (every mapping is PROT_READ). A Reader may be shared by
    the threads of one process: ``get`` is lock-free, ``list`` and the refresh
    from the ring take a per-Reader lock. A Reader created before ``fork()``
    keeps working in the child (its mappings are inherited; its lock is
    re-created); it cannot be pickled: pass the cache name to workers and attach
    there.

    Lifetime: ``close()`` may be called from any thread or a signal handler (it
    takes no lock). Every call in flight or made after it, on the Reader and on
    its watches and subscriptions, raises ShmCacheError("Reader for NAME is
    closed"); calls waiting for the writer wake at once. The segments are
    unmapped when the last call in flight returns.

    Every answer is exact at a revision: ``list`` returns it, ``revision`` tells
    it. The Reader reads the snapshot and the delta segment (the keys changed
    since the snapshot) in place, and keeps in private only the recent changes,
    the events published after the delta segment (bounded by the writer's delta
    segment cadence, not by the write history or the number of keys).

    ``max_staleness`` (seconds): reads raise StaleError when the writer's last
    heartbeat is older, or the writer is dead. ``timeout``: how long to wait for a
    cache whose writer is still loading its first snapshot.
    """

    def __init__(self, name: str, *, max_staleness: float | None = None,
                 timeout: float = 0.0) -> None:
        self.name = _shm.validate_name(name)
        # Every call that touches a mapping counts itself in (lifetime): close()
        # unmaps only once the last one has left.
        self._life = Lifetime(self._release, self._closed_error)
        self.max_staleness = max_staleness
        self._lock = threading.RLock()
        deadline = time.monotonic() + _args.seconds(timeout, "timeout")
        self._control = control_reader.ControlReader.open(name, timeout, self._life)
        self._cbuf = self._control.buf  # (the hot path's one load: SEQ)
        # The view moves under self._lock; the hot path reads the copies below
        # (layers, prefix, fast state), each replaced whole after a move.
        self._view = View(self.name, self._control)
        self._seq = -1
        self._stuck_seq = -1
        self._sync_client: sync_client.Client | None = None
        self._prefix = b""
        self._layers: Layers = self._view.layers
        self._fast_state: tuple[Any, ...] | None = None
        self._revision = 0
        _readers.add(self)
        _janitor.start()
        try:
            while True:
                try:
                    self._refresh()
                    break
                except (NotFoundError, _NoState):
                    if time.monotonic() >= deadline:
                        raise
                    time.sleep(0.02)
        except BaseException:
            self.close()  # (unmapped now, not whenever the traceback is dropped)
            raise

    # -- plumbing ------------------------------------------------------------

    @property
    def max_staleness(self) -> float | None:
        """Seconds without a writer heartbeat after which reads raise StaleError (None: never)."""
        return self._max_staleness

    @max_staleness.setter
    def max_staleness(self, value: float | None) -> None:
        self._max_staleness = _args.opt_seconds(value, "max_staleness")
        # True when get() must take the slow path every time (staleness checks, closed).
        self._checks = value is not None or self._life.closed
        if hasattr(self, "_layers"):
            self._set_fast()

    def _set_fast(self) -> None:
        """Rebuild the state ``get`` hands to the C fast path; call after any view change.

        One immutable tuple, replaced whole, so a get in another thread sees either
        the old view or the new one. None: every get takes the Python path.
        """
        recent, snap, delta = self._layers
        if self._checks or _reader_get is None or snap is None or not snapshot_mod.USE_SPEEDUPS:
            self._fast_state = None
        else:
            self._fast_state = (self._cbuf, self._seq, self._stuck_seq, self._prefix, recent,
                                snap.params, _SLOW, delta.params if delta is not None else None)

    def __reduce__(self) -> Any:
        raise TypeError("a shmcache.Reader cannot be pickled: pass the cache name to the "
                        "worker and create the Reader there (shmcache.Reader(name))")

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Detach. Idempotent; from any thread or a signal handler (no lock is taken).

        Calls in flight in other threads raise ShmCacheError("... is closed"),
        waiting ones at once (one FUTEX_WAKE on the cache's word); the segments are
        unmapped when the last of them returns (here, if none is in flight).
        Values already returned stay valid (they are copies).
        """
        if self._life.closed:
            return
        self._checks = True
        self._fast_state = None  # every get from now on takes the counted path
        self._life.close(wake=self._control.wake)

    def _release(self) -> None:
        """Unmap everything; the Lifetime runs it once, after close(), when no call is in
        flight (in the thread that leaves last, perhaps a signal handler: no lock)."""
        client, self._sync_client = self._sync_client, None
        if client is not None:
            client.close()
        self._view.close()
        self._control.close()

    def _closed_error(self) -> ShmCacheError:
        return ShmCacheError(f"Reader for {self.name!r} is closed")

    def _forked(self) -> None:
        """In a forked child (see _after_fork_in_child)."""
        lock = self._lock
        moving = not lock.acquire(blocking=False)  # held by a thread the child lacks
        if not moving:
            lock.release()
        self._lock = threading.RLock()
        self._life.forget_users()
        if moving:
            self._view.reset()
            self._seq = self._stuck_seq = -1
            self._fast_state = None

    def __repr__(self) -> str:
        return f"<shmcache.Reader {self.name!r} revision={self._revision}>"

    def _check_open(self) -> None:
        if self._life.closed:
            raise self._closed_error()

    def _word(self) -> int:
        """The futex word now (counted in: raises once closed)."""
        with self._life:
            return self._control.word()

    def _check_stale(self) -> None:
        self._control.check_stale(self.name, self.max_staleness)  # type: ignore[arg-type]

    def _refresh(self) -> None:
        """Bring the view up to the writer's latest published block. Callers are counted
        in (self._life): the mappings stay."""
        if self.max_staleness is not None:
            self._check_stale()
        self._catch_up()

    def _catch_up(self) -> None:
        """``_refresh`` without the staleness check."""
        seq = _unpack_q(self._cbuf, _SEQ)[0]
        if seq == self._seq or seq == self._stuck_seq:
            return
        with self._lock:
            for _attempt in range(50):
                b = self._control.block()
                if b is None:
                    if self._view.block is None:
                        raise _NoState(
                            f"cache {self.name!r} has no consistent state to read: its writer "
                            f"stopped inside a publish (SEQ {seq} stays odd)",
                            hint="Start or restart its writer (`shmcache serve NAME ...`); "
                                 "Reader(name, timeout=...) waits for it")
                    # The writer stopped (died, or SIGSTOP) inside a publish. The
                    # view we have is still exact at its revision: keep serving it,
                    # and do not spin again until SEQ moves.
                    self._stuck_seq = seq
                    self._set_fast()
                    return
                if b.seq == self._seq:
                    return
                control.validate_block(b, self._control.name)
                v = self._view
                try:
                    v.advance(b)
                except Retry:
                    v.snap_seq = 0  # rebuild from the (new) snapshot
                    continue
                v.block = b
                self._layers, self._prefix = v.layers, v.prefix
                self._seq = b.seq
                self._revision = b.revision
                self._set_fast()
                return
            raise ShmCacheError(f"cache {self.name!r}: could not keep up with the writer "
                                f"after 50 attempts (ring too small for this reader?)")

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
        with self._life:
            self._refresh()
            return self._revision

    @property
    def prefix(self) -> bytes:
        """The key prefix the writer serves (b"" = the whole keyspace)."""
        with self._life:
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
            # Not counted in: the call holds the GIL and its buffers throughout, so a
            # close() cannot unmap under it; one that came first makes it fail here.
            try:
                kv = _reader_get(key, st)  # type: ignore[misc]  # (names the damaged segment)
            except ValueError:
                self._check_open()  # (a closed mapping fails as ValueError too)
                raise
            if kv is not _SLOW:
                return kv  # type: ignore[no-any-return]
        life = self._life
        life.enter()
        try:
            return self._get(key, revision, min_revision, timeout)
        finally:
            life.exit()

    def _get(self, key: bytes | str, revision: int | None, min_revision: int | None,
             timeout: float | None) -> KeyValue | None:
        """get() past the C fast path (counted in)."""
        if type(key) is not bytes:
            key = _args.as_bytes(key, "key")
        if revision is not None or min_revision is not None:  # (not on the plain get path)
            _args.read_args(revision, min_revision, timeout)
        if revision is not None:
            if min_revision is not None:
                self._wait_min(min_revision, timeout)
            with self._lock:
                self._refresh()
                self._check_key_range(key, "key")
                return self._view.get_at(key, revision, self._revision)
        if min_revision is not None:
            self._wait_min(min_revision, timeout)
        if self._checks:  # staleness checks
            self._refresh()
        else:
            seq = _unpack_q(self._cbuf, _SEQ)[0]
            if seq != self._seq and seq != self._stuck_seq:
                self._refresh()
        if not key.startswith(self._prefix):
            self._check_key_range(key, "key")
        # One tuple, replaced whole by a refresh (whose recent changes are a new dict).
        layers = self._layers
        recent, snap, delta = layers
        if delta is not None or _fast_get is None or not snapshot_mod.USE_SPEEDUPS:
            return lookup(layers, key)
        kv = recent.get(key, _MISSING)
        if kv is not _MISSING:
            return kv  # type: ignore[no-any-return]
        assert snap is not None
        # The C lookup straight from here: this is every reader's hot path.
        return _fast_get(key, snap.params)  # type: ignore[no-any-return]

    def watch(self, prefix: bytes | str = b"", since_revision: int | None = None, *,
              index: tuple[str, bytes | str] | None = None,
              shard: tuple[int, int] | None = None) -> Watch:
        """Events for keys starting with ``prefix`` with revision > ``since_revision``, in order.

        ``since_revision=None``: from now. Raises CompactedError if those events are
        no longer retained; list again and watch from the list's revision.
        ``index=(name, value)``: only the events whose kv or prev_kv has ``value`` in
        that index (so a key moving out of the selection is seen leaving it).
        ``shard=(i, n)``: only the events of keys with ``zlib.crc32(key) % n == i``.
        """
        with self._life:
            return Watch(self, _args.as_bytes(prefix, "prefix"),
                         _args.opt_revision(since_revision, "since_revision"), index,
                         _args.shard(shard))

    def status(self) -> Status:
        """The cache's and its writer's state, read without waiting (``pinned_bytes``
        reads every process's /proc/PID/maps: a few ms per 100 processes)."""
        with self._life:
            st = self._control.status(self.name, self._view.block)
        return dataclasses.replace(st, pinned_bytes=pinned_bytes(self.name))

    # -- for Watch (shmcache/reader/watch.py) ----------------------------------------

    @property
    def control(self) -> ControlReader:
        """The cache's control segment (block, tail, futex word, closed), read-only.

        The low-level handle that Watch, AsyncWatch and Subscription wait on;
        applications need none of it."""
        return self._control

    def _check_read(self) -> None:
        """Raise if the Reader is closed or (with max_staleness) the writer is stale."""
        if self._life.closed:
            raise self._closed_error()
        if self.max_staleness is not None:
            self._check_stale()

    def _watch_start(self, prefix: bytes, since: int | None,
                     ) -> tuple[bytes, Block, _shm.Segment, int, int]:
        """(prefix, block, ring, position, since) for a new Watch, from one view."""
        self._refresh()
        if not prefix:
            prefix = self._prefix
        self._check_key_range(prefix, "prefix")
        with self._lock:
            return (prefix, *self._view.watch_start(since))

    def _current_ring(self) -> tuple[Block, _shm.Segment]:
        """The block and ring segment after a refresh (a Watch following a new ring)."""
        with self._lock:
            self._refresh()
            b, seg = self._view.block, self._view.ring
        assert b is not None and seg is not None
        return b, seg


# Moves idle Readers off superseded segments (see janitor): without it a Reader that
# makes no calls pins every snapshot it ever mapped in /dev/shm.
_janitor: Janitor[Reader] = Janitor(lambda: [r for r in list(_readers) if not r._life.closed],
                                    Reader._release_superseded)
