"""Subscription: deliver a prefix's changes to callbacks from a background thread (``Reader.subscribe``).

The pattern it serves: keep in-process objects (a routing table, a config
object) equal to a key range. The thread lists, watches from the list's
revision, resumes the watch from the last delivered revision after an error,
and lists again when the watch falls behind the ring (CompactedError), so the
callbacks never miss a change and never see one twice.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Protocol, Self

from ..errors import CompactedError
from ..types import Event, KeyValue, ListResult
from .owner import ReaderHandle

if TYPE_CHECKING:
    from .watch import Watch

__all__ = ["Subscription"]


class Reader(ReaderHandle, Protocol):
    """What a Subscription needs of a Reader (reader.py's Reader is the one)."""

    def watch(self, prefix: bytes | str = b"", since_revision: int | None = None, *,
              index: tuple[str, bytes | str] | None = None) -> Watch: ...

    def list(self, prefix: bytes | str = b"", limit: int | None = None, *,
             revision: int | None = None, min_revision: int | None = None,
             timeout: float | None = None, continue_token: str | None = None) -> ListResult: ...

# How long one poll sleeps before looking at the stop flag: bounds close() latency.
_POLL = 0.25
_BACKOFF_MIN = 0.05
_BACKOFF_MAX = 2.0


def _log_error(exc: BaseException) -> None:
    import logging  # only when something goes wrong: readers need not import logging

    logging.getLogger("shmcache.subscribe").error(
        "shmcache subscription: %s: %s", type(exc).__name__, exc, exc_info=exc)


class Subscription:
    """A background thread that hands every change under ``prefix`` to ``callback``.

    Created by ``Reader.subscribe``; see docs/api.md for the full contract. In
    short:

    - ``callback(event)`` is called for every change, in revision order, on the
      subscription's own thread (one call at a time).
    - Without ``on_reset`` the subscription starts by listing the prefix and
      delivers each key as a PUT event carrying the list's revision; after a
      CompactedError it lists again and delivers the *difference* from what it
      delivered before (PUTs for new or changed keys, DELETEs for vanished ones,
      in key order, all at the new list's revision). Applying the events in order
      to an empty dict therefore always gives etcd's state at ``revision``. The
      subscription keeps the last KeyValue of every key to compute that difference.
    - With ``on_reset``, ``on_reset(list_result)`` receives the whole state
      instead, at the start (unless ``since_revision`` is given) and after every
      relist; ``callback`` only receives real events, and nothing is kept.
    - ``since_revision``: start with the events after it instead of a list. It
      needs ``on_reset``, the only way to recover if those events are gone.
    - An exception from a callback, and any reader error other than
      CompactedError, goes to ``on_error(exc)`` (default: logged to the
      ``shmcache.subscribe`` logger). After a callback error delivery continues
      with the next event; after a reader error the watch is resumed from
      ``revision`` with a backoff of 0.05 s doubling to 2 s.
    - ``close()`` stops the thread and joins it (after the callback in progress,
      if any, returns). Closing the Reader stops the subscription too.

    A Subscription does not survive ``fork()``: subscribe in the child.
    """

    def __init__(self, reader: Reader, prefix: bytes | str, callback: Callable[[Event], object],
                 *, since_revision: int | None = None,
                 on_reset: Callable[[ListResult], object] | None = None,
                 on_error: Callable[[BaseException], object] | None = None) -> None:
        if not callable(callback):
            raise TypeError("callback must be callable")
        if since_revision is not None and on_reset is None:
            raise ValueError("since_revision needs on_reset: if the events after it are gone "
                             "(CompactedError), the subscription must hand you a fresh list")
        # Validates the prefix against the cache's range now, in the caller's thread.
        reader.list(prefix, limit=0)
        self._reader = reader
        self.prefix = prefix.encode() if isinstance(prefix, str) else bytes(prefix)
        self._callback = callback
        self._on_reset = on_reset
        self._on_error = on_error or _log_error
        self._state: dict[bytes, KeyValue] | None = None if on_reset is not None else {}
        self._since = since_revision
        self._revision = since_revision if since_revision is not None else 0
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._watch: Watch | None = None
        self._pid = os.getpid()
        #: Lists done after a CompactedError (the initial list is not counted).
        self.relists = 0
        #: Reader errors (other than CompactedError) and callback errors seen.
        self.errors = 0
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"shmcache-subscribe-{reader.name}")
        self._thread.start()

    # -- public ---------------------------------------------------------------------

    @property
    def revision(self) -> int:
        """Every change up to this revision has been handed to the callbacks."""
        return self._revision

    @property
    def alive(self) -> bool:
        """The thread is running (False after close(), after the Reader closed, and in a forked child)."""
        return self._pid == os.getpid() and self._thread.is_alive() and not self._stop.is_set()

    def wait(self, revision: int, timeout: float | None = None) -> bool:
        """Block until the callbacks have seen every change up to ``revision``; False on timeout
        or if the subscription stopped first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._revision < revision:
                if not self.alive:
                    return False
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(_POLL if remaining is None else min(remaining, _POLL))
            return True

    def close(self) -> None:
        """Stop delivering and join the thread. Idempotent; may be called from a callback."""
        self._stop.set()
        w = self._watch
        if w is not None:
            w.close()
        if threading.current_thread() is not self._thread and self._thread.is_alive():
            self._thread.join()
        with self._cond:
            self._cond.notify_all()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.alive else "stopped"
        return (f"<shmcache.Subscription {self._reader.name!r} prefix={self.prefix!r} "
                f"revision={self._revision} {state}>")

    # -- the thread -------------------------------------------------------------------

    def _advance(self, revision: int) -> None:
        if revision > self._revision:
            with self._cond:
                self._revision = revision
                self._cond.notify_all()

    def _report(self, exc: BaseException) -> None:
        self.errors += 1
        try:
            self._on_error(exc)
        except Exception as again:  # noqa: BLE001 - the handler itself failed: log both
            _log_error(again)

    def _deliver(self, events: Iterable[Event]) -> bool:
        """Hand events to the callback, advancing ``revision`` per complete revision.

        Returns False if close() interrupted the batch.
        """
        state = self._state
        prev: Event | None = None
        for ev in events:
            if self._stop.is_set():
                return False
            if prev is not None and ev.revision != prev.revision:
                self._advance(prev.revision)
            if state is not None:
                if ev.type == "PUT":
                    state[ev.kv.key] = ev.kv
                else:
                    state.pop(ev.kv.key, None)
            try:
                self._callback(ev)
            except Exception as exc:  # noqa: BLE001 - a user callback: report, go on
                self._report(exc)
            prev = ev
        if prev is not None:
            self._advance(prev.revision)
        return True

    def _relist(self) -> None:
        res = self._reader.list(self.prefix)
        if self._stop.is_set():
            return
        if self._on_reset is not None:
            try:
                self._on_reset(res)
            except Exception as exc:  # noqa: BLE001 - a user callback: report, go on
                self._report(exc)
        else:
            assert self._state is not None
            self._deliver(_diff(self._state, res))
        if not self._stop.is_set():
            with self._cond:
                # A relist may go *down* in revision (a new etcd cluster, docs/design.md).
                self._revision = res.revision
                self._cond.notify_all()

    def _run(self) -> None:
        need_list = self._since is None
        backoff = _BACKOFF_MIN
        r = self._reader
        try:
            while not self._stop.is_set():
                try:
                    if need_list:
                        self._relist()
                        need_list = False
                        continue
                    if self._watch is None:
                        self._watch = r.watch(self.prefix, since_revision=self._revision)
                        if self._stop.is_set():  # close() raced with the assignment
                            break
                    events = self._watch.poll(timeout=_POLL)
                    if not self._deliver(events):
                        break
                    self._advance(self._watch.revision)
                    backoff = _BACKOFF_MIN
                except CompactedError:
                    self._watch = None
                    need_list = True
                    self.relists += 1
                except Exception as exc:  # noqa: BLE001 - any reader error: report, resume
                    if r.control.closed or self._stop.is_set():
                        break
                    self._watch = None
                    self._report(exc)
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, _BACKOFF_MAX)
        finally:
            self._stop.set()
            if self._watch is not None:
                self._watch.close()
            with self._cond:
                self._cond.notify_all()


def _diff(known: dict[bytes, KeyValue], res: ListResult) -> list[Event]:
    """Events that turn ``known`` into ``res.items``, in key order, at ``res.revision``."""
    rev = res.revision
    out: list[Event] = []
    fresh = {kv.key: kv for kv in res.items}
    for key in sorted(known.keys() | fresh.keys()):
        old, new = known.get(key), fresh.get(key)
        if new is None:
            assert old is not None
            out.append(Event("DELETE", KeyValue(key, b"", 0, rev, 0, 0), old, rev))
        elif new != old:
            out.append(Event("PUT", new, old, rev))
    return out

