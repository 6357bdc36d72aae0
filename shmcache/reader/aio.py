"""asyncio support: ``Reader.awatch`` and ``Reader.await_revision``, woken by the writer's publish.

How the wake-up reaches the event loop: each Reader that has asyncio waiters gets
one daemon *waker* thread per process. It sleeps in FUTEX_WAIT on the control
segment's SEQ word (the same word ``Watch.poll`` and ``Reader.wait`` sleep on),
and when the word changes it calls ``loop.call_soon_threadsafe`` once per event
loop that has waiters; that callback resolves every waiter's future of the loop.
So 200 coroutines watching one cache cost one thread and one cross-thread call
per publish, and an idle loop is not polled at all. The thread starts on the
first wait and exits after about 0.5-1 s without waiters (or when the Reader
closes); after ``fork()`` the child starts its own.

Importing this module does not import asyncio, which is slow to import
(docs/design.md, "Reader dependencies"): reader-only processes that never use
asyncio do not pay for it.
"""

from __future__ import annotations

import collections
import os
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, Protocol, Self

from ..errors import ShmCacheError
from .owner import ReaderHandle
from .perprocess import PerReader

if TYPE_CHECKING:
    import asyncio

    from ..types import Event
    from .watch import Watch

__all__ = ["AsyncWatch", "await_revision"]


class Reader(ReaderHandle, Protocol):
    """What this module needs of a Reader (reader.py's Reader is the one)."""

    def watch(self, prefix: bytes | str = b"", since_revision: int | None = None, *,
              index: tuple[str, bytes | str] | None = None,
              shard: tuple[int, int] | None = None) -> Watch: ...


# FUTEX_WAIT slice of the waker thread: bounds how long a missed wake (a writer
# that died between bumping SEQ and waking) or a closed Reader goes unnoticed.
_SLICE = 0.5
# A waker thread with no waiters for this long exits. Not zero: between two
# events an awatch loop briefly has no waiter registered, and restarting a
# thread for every event would cost more than the wait.
_IDLE_EXIT = 0.5


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class _Waker:
    """The per-(process, Reader) thread that turns futex wake-ups into event-loop callbacks."""

    def __init__(self, reader: Reader) -> None:
        self.pid = os.getpid()
        self._reader = weakref.ref(reader)  # the registry maps Reader -> _Waker: no cycle
        self._name = reader.name
        self._lock = threading.Lock()
        self._by_loop: dict[asyncio.AbstractEventLoop, set[asyncio.Future[None]]] = {}
        # Loops with a _fire call pending: a burst of publishes before the loop
        # gets to run costs one cross-thread call, not one per publish.
        self._scheduled: set[asyncio.AbstractEventLoop] = set()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        # Counters, for tests and for the curious: word changes the thread saw,
        # and call_soon_threadsafe calls it made.
        self.changes = 0
        self.loop_calls = 0

    # -- called from event loops -------------------------------------------------

    def add(self, loop: asyncio.AbstractEventLoop, fut: asyncio.Future[None], seen: int) -> None:
        """Register ``fut`` to be resolved on ``loop`` when the word moves away from ``seen``."""
        with self._lock:
            if self._error is not None:
                # Not retried: the futex calls fail the same way every time (an
                # unsupported platform); restarting the thread per wait would spin.
                raise self._error
            self._by_loop.setdefault(loop, set()).add(fut)
            if self._thread is None:
                # The new thread compares against ``seen``, not against the word it
                # reads when it gets to run: a publish in between must wake us.
                t = threading.Thread(target=self._run, args=(seen,), daemon=True,
                                     name=f"shmcache-aio-{self._name}")
                self._thread = t
                t.start()

    def discard(self, loop: asyncio.AbstractEventLoop, fut: asyncio.Future[None]) -> None:
        with self._lock:
            futs = self._by_loop.get(loop)
            if futs is not None:
                futs.discard(fut)
                if not futs:
                    del self._by_loop[loop]

    def waiter_count(self) -> int:
        with self._lock:
            return sum(len(f) for f in self._by_loop.values())

    def thread(self) -> threading.Thread | None:
        with self._lock:
            return self._thread

    def _fire(self, loop: asyncio.AbstractEventLoop) -> None:
        """Runs on ``loop``: resolve every future of that loop registered so far."""
        with self._lock:
            self._scheduled.discard(loop)
            futs = self._by_loop.pop(loop, set())
        for fut in futs:
            _resolve(fut)

    # -- the thread ----------------------------------------------------------------

    def _due(self) -> list[asyncio.AbstractEventLoop]:
        """Loops with waiters and no _fire pending; marks them pending. Call under the lock."""
        # A loop closed before running its _fire would otherwise stay "pending" forever
        # (and its orphaned waiters would keep this thread alive): retry it, which fails
        # with RuntimeError in _schedule and drops it.
        self._scheduled = {loop for loop in self._scheduled if not loop.is_closed()}
        loops = [loop for loop in self._by_loop if loop not in self._scheduled]
        self._scheduled.update(loops)
        return loops

    def _schedule(self, loops: list[asyncio.AbstractEventLoop]) -> None:
        for loop in loops:
            try:
                loop.call_soon_threadsafe(self._fire, loop)
                self.loop_calls += 1
            except RuntimeError:  # that loop was closed with waiters pending: forget them
                with self._lock:
                    self._scheduled.discard(loop)
                    self._by_loop.pop(loop, None)

    def _run(self, last: int) -> None:
        reader = self._reader()
        life = None
        try:
            if reader is None:
                return
            ctl = reader.control
            try:
                # Counted in the Reader's uses: the word stays mapped while we sleep on
                # it; the last use out after close() unmaps.
                reader._life.enter()
                life = reader._life
            except ShmCacheError:
                return  # closed already: finally wakes every waiter
            del reader  # (no strong reference while asleep: the Reader may be dropped)
            idle_since: float | None = None
            word = ctl.word()
            while True:
                if word == last:
                    ctl.wait(last, _SLICE)
                    word = ctl.word()
                closed = life.closed
                with self._lock:
                    if closed:
                        return  # finally: fire every waiter; they see the closed Reader
                    if not self._by_loop:
                        now = time.monotonic()
                        if idle_since is None:
                            idle_since = now
                        if now - idle_since >= _IDLE_EXIT:
                            self._thread = None
                            return
                        loops = []
                    else:
                        idle_since = None
                        loops = self._due() if word != last else []
                if word != last:
                    self.changes += 1
                    last = word
                self._schedule(loops)
                word = ctl.word()
        except Exception as exc:
            if life is not None and life.closed:
                return  # closed under us (ctl.wait raises then): not an error
            with self._lock:
                self._error = exc
            raise
        finally:
            # Whatever ended the thread (closed Reader, an unexpected error), no
            # waiter may be left asleep: wake them all; a later wait starts a new thread.
            with self._lock:
                if self._thread is threading.current_thread():
                    self._thread = None
                loops = self._due()
            self._schedule(loops)
            if life is not None:
                life.exit()


_WAKERS: PerReader[_Waker] = PerReader(_Waker)


def _waker_for(reader: Reader) -> _Waker:
    return _WAKERS.get(reader)


async def _wait_change(reader: Reader, seen: int, timeout: float | None,
                       holder: list[Any] | None = None) -> None:
    """Return once the futex word may differ from ``seen``, or after ``timeout`` seconds.

    ``holder``, if given, receives the future while it is pending so that a
    ``close()`` from elsewhere can resolve it.
    """
    import asyncio

    loop = asyncio.get_running_loop()
    waker = _waker_for(reader)
    fut: asyncio.Future[None] = loop.create_future()
    waker.add(loop, fut, seen)
    timer = None
    try:
        # Registered first, then re-checked: a publish between the caller's read
        # of the word and the registration is seen here, one after it by the
        # thread (which compares against the word it saw last).
        if reader._word() != seen:
            return
        if timeout is not None:
            timer = loop.call_later(max(timeout, 0.0), _resolve, fut)
        if holder is not None:
            holder.append(fut)
        await fut
    finally:
        # Also on cancellation (task.cancel(), asyncio.timeout): nothing stays registered.
        if timer is not None:
            timer.cancel()
        if holder is not None:
            holder.clear()
        waker.discard(loop, fut)


async def await_revision(reader: Reader, revision: int, timeout: float | None = None) -> bool:
    """``Reader.wait`` for asyncio: True once ``reader.revision >= revision``, False on timeout."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        seen = reader._word()  # (ShmCacheError once the Reader is closed)
        if reader.revision >= revision:
            return True
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            return False
        await _wait_change(reader, seen, remaining)


class AsyncWatch:
    """``Reader.watch`` for asyncio; returned by ``Reader.awatch``.

    ``async for ev in w`` yields events in order until ``close()``;
    ``await w.poll(timeout)`` returns what is available, waiting up to ``timeout``
    for the first. Same guarantees and errors as Watch: never skips, repeats or
    reorders an event, raises CompactedError when it fell behind the ring.
    Use it from one event loop; ``close()`` may be called from any thread.
    """

    def __init__(self, reader: Reader, prefix: bytes | str = b"",
                 since_revision: int | None = None, *,
                 index: tuple[str, bytes | str] | None = None,
                 shard: tuple[int, int] | None = None) -> None:
        self._reader = reader
        self._watch: Watch = reader.watch(prefix, since_revision, index=index, shard=shard)
        self._pending: collections.deque[Event] = collections.deque()
        self._waiting: list[asyncio.Future[None]] = []

    @property
    def prefix(self) -> bytes:
        return self._watch.prefix

    @property
    def revision(self) -> int:
        """Every event up to this revision has been read (it follows progress, too)."""
        return self._watch.revision

    @property
    def closed(self) -> bool:
        return self._watch.closed

    def close(self) -> None:
        """Stop: a pending ``async for`` ends (StopAsyncIteration), ``poll`` returns []."""
        self._watch.close()
        for fut in list(self._waiting):
            try:
                fut.get_loop().call_soon_threadsafe(_resolve, fut)
            except RuntimeError:
                pass  # its loop is closed: nobody is waiting any more

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Event:
        while not self._pending:
            if self.closed:
                raise StopAsyncIteration
            self._pending.extend(await self.poll(None))
        return self._pending.popleft()

    async def poll(self, timeout: float | None = 0.0) -> list[Event]:
        """Events available now, waiting up to ``timeout`` seconds (None: no limit) for the first."""
        if self._pending:
            out = list(self._pending)
            self._pending.clear()
            return out
        r = self._reader
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.closed:
            seen = r._word()  # (ShmCacheError once the Reader is closed)
            events = self._watch.poll(0)
            if events:
                return events
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return []
            if self._watch.joined:
                await self._wait_queued(remaining)
            else:  # still catching up on its own: woken by the writer's publish
                await _wait_change(r, seen, remaining, self._waiting)
        return []

    async def _wait_queued(self, timeout: float | None) -> None:
        """Until the demultiplexer queues events (or an error) for this watch, or ``timeout``.

        It resolves the future from its thread with one call_soon_threadsafe per
        event loop and batch, however many watches of the loop got events.
        """
        import asyncio

        w = self._watch
        d, inbox = w._demux, w._inbox
        if d is None or inbox is None:
            return
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        if not d.add_async(inbox, fut):
            return  # something is queued already
        timer = loop.call_later(max(timeout, 0.0), _resolve, fut) if timeout is not None \
            else None
        self._waiting.append(fut)
        try:
            await fut
        finally:
            if timer is not None:
                timer.cancel()
            self._waiting.remove(fut)
            d.discard_async(inbox, fut)
