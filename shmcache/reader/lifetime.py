"""Lifetime: one owner's open/closed state and the calls in flight; the last one out unmaps.

A Reader's mappings (control segment, ring, snapshot, delta and index
segments) are used by calls in many threads and by its helper threads (the
watch demultiplexer, the asyncio waker). As py-lmdb invalidates every
transaction and cursor when their environment closes, closing a Reader marks
one flag that every use checks, and the mappings go away only when the last
use in flight has left: no call ever reads an unmapped page or sleeps on an
unmapped futex word.

Concurrency contract: every method may be called from any thread and from a
signal handler. None takes a lock: the use count is a list (``append`` and
``pop`` are single operations in CPython) and ``release`` runs once, in
whichever thread leaves last (``close`` itself when nothing is in flight).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["Lifetime"]


class Lifetime:
    """``enter``/``exit`` around each use (or ``with``); ``close`` marks closed, the last
    ``exit`` after it calls ``release``. ``enter`` on a closed owner raises ``error()``."""

    __slots__ = ("closed", "_users", "_release", "_error")

    def __init__(self, release: Callable[[], None], error: Callable[[], BaseException]) -> None:
        self.closed = False
        self._users: list[None] = []
        self._release = [release]  # popped by the one caller that runs it
        self._error = error

    def enter(self) -> None:
        """Count a use in; raise ``error()`` if the owner is closed."""
        self._users.append(None)
        # Counted in first, checked second: a close() between the two sees the use
        # and leaves the release to it.
        if self.closed:
            self.exit()
            raise self._error()

    def check(self) -> None:
        """Raise ``error()`` if the owner is closed."""
        if self.closed:
            raise self._error()

    def exit(self) -> None:
        self._users.pop()
        if self.closed and not self._users:
            self._finish()

    def __enter__(self) -> None:
        self.enter()

    def __exit__(self, *exc: Any) -> None:
        self.exit()

    def close(self, wake: Callable[[], None] | None = None) -> bool:
        """Mark closed, call ``wake`` (to end the waits in flight), release if nothing is in
        flight. False if it was closed already. ``wake`` runs counted in, so with
        everything still mapped."""
        if self.closed:
            return False
        self._users.append(None)
        self.closed = True
        try:
            if wake is not None:
                wake()
        finally:
            self.exit()
        return True

    def _finish(self) -> None:
        try:
            release = self._release.pop()
        except IndexError:
            return  # released already (two callers saw the count reach 0)
        release()

    @property
    def users(self) -> int:
        """Uses in flight (tests)."""
        return len(self._users)

    def forget_users(self) -> None:
        """In a forked child: the threads that were inside a use do not exist there."""
        self._users = []
        if self.closed:
            self._finish()
