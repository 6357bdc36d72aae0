"""One client watch of a proxy's Watch stream: its keys, options and the events it wants."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from ..etcdapi import rpc
from .watch_range import KeySelection

if TYPE_CHECKING:
    from ..reader.aio import AsyncWatch
    from ..types import Event

__all__ = ["ClientWatch"]


class ClientWatch:
    """A watch as its create request asked for it. Owned by its stream, on the watch
    service's loop thread only (watch.py)."""

    def __init__(self, watch_id: int, keys: KeySelection | None, aw: AsyncWatch | None,
                 req: Any, start: int, *, catching_up: bool = False) -> None:
        self.id = watch_id
        self.keys = keys  # None: forwarded to etcd
        self.aw = aw  # None once it ended (compacted): the id stays taken until canceled
        self.prev_kv = req.prev_kv
        self.fragment = req.fragment
        self.progress_notify = req.progress_notify
        self.no_put = rpc.WatchCreateRequest.NOPUT in req.filters
        self.no_delete = rpc.WatchCreateRequest.NODELETE in req.filters
        self.start = start  # events below it are not wanted (a start revision in the future)
        self.catching_up = catching_up  # (its first events: etcd's catch-up batches)
        self.quiet = True  # no events sent since the last progress tick
        self.task: asyncio.Task[None] | None = None  # the one moving its events

    def fed_by(self, task: asyncio.Task[None]) -> None:
        self.task = task

    def end(self) -> bool:
        """Stop watching the cache (the id stays the client's until it cancels); True if
        it was watching. Cancels its task unless that is the caller."""
        aw, self.aw = self.aw, None
        if aw is not None:
            aw.close()
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()
        return aw is not None

    def delivering(self, events: bool) -> bool:
        """Events are about to be sent (``events``: some are): whether they are its
        catch-up (the first ones it read)."""
        catching_up, self.catching_up = self.catching_up, False
        if events:
            self.quiet = False
        return catching_up

    def ticked(self) -> None:
        """A progress tick passed: from now on, quiet until events are sent again."""
        self.quiet = True

    def wanted(self, events: list[Event]) -> list[Event]:
        """``events`` (of the watch's prefix) in its range, from its start revision, past
        its filters."""
        if self.start > 1 and events and events[0].revision < self.start:
            events = [e for e in events if e.revision >= self.start]
        assert self.keys is not None  # (a watch of the cache's)
        keys = self.keys.matches
        if keys is not None:
            events = [e for e in events if keys(e.kv.key)]
        if self.no_put or self.no_delete:
            events = [e for e in events
                      if not (self.no_put if e.type == "PUT" else self.no_delete)]
        return events
