"""shmcache: one etcd watch per host, shared with every process through POSIX shared memory."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import (
    CacheExistsError,
    CompactedError,
    CorruptSegmentError,
    FutureRevisionError,
    InvalidNameError,
    NotFoundError,
    SegmentPermissionError,
    ShmCacheError,
    StaleError,
    TimeoutError,
    VersionMismatchError,
    WriterError,
    WriterRunningError,
)
from .reader.aio import AsyncWatch
from .reader.reader import Reader, Watch
from .reader.subscribe import Subscription
from .types import CountResult, Event, KeyValue, ListResult, Status

if TYPE_CHECKING:
    from .writer.writer import Writer

__version__ = "0.1.0"

__all__ = [
    "AsyncWatch",
    "CacheExistsError",
    "CompactedError",
    "CorruptSegmentError",
    "CountResult",
    "Event",
    "FutureRevisionError",
    "InvalidNameError",
    "KeyValue",
    "ListResult",
    "NotFoundError",
    "Reader",
    "SegmentPermissionError",
    "ShmCacheError",
    "StaleError",
    "Status",
    "Subscription",
    "TimeoutError",
    "VersionMismatchError",
    "Watch",
    "Writer",
    "WriterError",
    "WriterRunningError",
    "remove",
]


def __getattr__(name: str) -> Any:
    # The writer imports grpc/protobuf: load it only when asked for, so a
    # reader-only process never imports them (and a reader-only install need not
    # have them).
    if name == "Writer":
        from .writer.writer import Writer

        return Writer
    raise AttributeError(f"module 'shmcache' has no attribute {name!r}")


def remove(name: str, *, force: bool = False) -> list[str]:
    """Unlink every shared-memory segment of cache ``name``; returns the segment names removed.

    Safe while readers are attached (their mappings stay valid). Raises
    WriterRunningError (with the writer's ``pid``) while a live writer holds the
    cache, unless ``force=True``: that is for a writer that is stuck; a running
    writer whose control segment is removed exits within its heartbeat period.
    """
    from .ipc.shm import validate_name
    from .writer.lock import remove_cache

    return remove_cache(validate_name(name), force=force)
