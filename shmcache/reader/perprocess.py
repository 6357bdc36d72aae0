"""PerReader: one helper object per (Reader, process), such as a Reader's watch thread.

The helpers own threads, which a forked child does not inherit: the child makes
its own on first use. Used by aio (the asyncio waker) and demux (the watch
demultiplexer).

Concurrency contract: ``get`` and ``peek`` may be called from any thread; the
registry's lock is re-created in a forked child (another thread may have held it
at fork time).
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

__all__ = ["PerReader"]


class _Owned(Protocol):
    pid: int  # the process that made it


T = TypeVar("T", bound=_Owned)


class PerReader(Generic[T]):
    """``factory(reader)`` made once per Reader and process; a Reader's is dropped with it."""

    def __init__(self, factory: Callable[[Any], T]) -> None:
        self._factory = factory
        self._lock = threading.Lock()
        self._items: weakref.WeakKeyDictionary[object, T] = weakref.WeakKeyDictionary()
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._lock = threading.Lock()
        self._items.clear()

    def get(self, reader: object) -> T:
        """This process's object for ``reader`` (made on first use)."""
        with self._lock:
            item = self._items.get(reader)
            if item is None or item.pid != os.getpid():
                item = self._items[reader] = self._factory(reader)
            return item

    def peek(self, reader: object) -> T | None:
        """This process's object for ``reader`` if it has one; never makes one."""
        with self._lock:
            item = self._items.get(reader)
        return item if item is not None and item.pid == os.getpid() else None
