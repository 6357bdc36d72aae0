"""The exception hierarchy: every error shmcache raises is a ShmCacheError."""

from __future__ import annotations

__all__ = [
    "CacheExistsError",
    "CompactedError",
    "CorruptSegmentError",
    "FutureRevisionError",
    "InvalidNameError",
    "NotFoundError",
    "SegmentPermissionError",
    "ShmCacheError",
    "StaleError",
    "TimeoutError",
    "VersionMismatchError",
    "WriterError",
    "WriterRunningError",
]

import builtins


class ShmCacheError(Exception):
    """Root of every error shmcache raises."""

    hint: str = ""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        if hint is None:
            hint = type(self).hint
        self.message = message
        super().__init__(f"{message}. {hint}" if hint else message)


class FutureRevisionError(ShmCacheError, ValueError):
    """A read asked for a revision the cache has not reached yet (like etcd's ErrFutureRev)."""

    hint = "Pass min_revision= to wait for it instead"


class InvalidNameError(ShmCacheError, ValueError):
    """A cache name is not 1-64 characters of letters, digits and ``._-``."""

    hint = "Use 1 to 64 characters from [A-Za-z0-9._-]"


class NotFoundError(ShmCacheError, FileNotFoundError):
    """No cache of that name exists on this host (its control segment is missing)."""

    hint = "Is the writer running? Start it with `shmcache serve NAME --endpoints ...`"

    def __init__(self, message: str, *, name: str = "", hint: str | None = None) -> None:
        self.name = name
        super().__init__(message, hint=hint)


class CompactedError(ShmCacheError):
    """The history a watch or a read needs is no longer retained (like etcd's ErrCompacted).

    ``compact_revision`` is the smallest ``since_revision`` (or read revision) that
    would be served now: list again, then watch from the list's revision.
    """

    hint = "List again and watch from the list's revision"

    def __init__(self, message: str, *, compact_revision: int, hint: str | None = None) -> None:
        self.compact_revision = compact_revision
        super().__init__(message, hint=hint)


class ExpiredTokenError(CompactedError, ValueError):
    """A continue token of an epoch the cache has left (its writer relisted, resetting the
    history): the revision it continues is gone. A CompactedError (list again, as for a
    token whose revision left the window) and, like every token a cache cannot
    continue, a ValueError. Not exported: callers catch it as either (docs/api.md)."""

    hint = "List again from the first page"


class CorruptSegmentError(ShmCacheError, ValueError):
    """Bytes in a shared-memory segment violate the format; nothing from them was returned."""

    hint = "Run `shmcache check NAME`; restarting the writer republishes the cache"

    def __init__(self, message: str, *, segment: str = "", hint: str | None = None) -> None:
        self.segment = segment
        super().__init__(f"{segment}: {message}" if segment else message, hint=hint)


class VersionMismatchError(CorruptSegmentError):
    """A segment was written in a format version this library does not read."""

    hint = "Run the same shmcache version in the writer and the readers"

    def __init__(self, message: str, *, segment: str = "", found: int, expected: int) -> None:
        self.found = found
        self.expected = expected
        super().__init__(message, segment=segment)


class StaleError(ShmCacheError):
    """The writer has not published a heartbeat within the reader's ``max_staleness``."""

    hint = "Check the writer service (`shmcache status NAME`)"

    def __init__(self, message: str, *, age: float, hint: str | None = None) -> None:
        self.age = age
        super().__init__(message, hint=hint)


class TimeoutError(ShmCacheError, builtins.TimeoutError):
    """A wait for a revision or a confirmation from the writer ran out of time."""


class WriterError(ShmCacheError):
    """The writer cannot run: etcd errors it cannot recover from, bad settings."""


class CacheExistsError(WriterError):
    """Another live writer already serves this cache name."""

    hint = "Stop the other writer first; only one writer per cache name may run"


class SegmentPermissionError(ShmCacheError, builtins.PermissionError):
    """A segment's owner, group or mode keeps this process out: a reader without read
    access, a writer that cannot give its segments the group it was asked for, or a
    writer refusing a segment it did not create (it could have been planted).

    ``segment`` names the segment (empty when there is none yet); ``uid``, ``gid`` and
    ``mode`` are its owner, group and permission bits as found, ``gid`` the group asked
    for when the writer cannot apply it (None when unknown).
    """

    def __init__(self, message: str, *, segment: str = "", uid: int | None = None,
                 gid: int | None = None, mode: int | None = None,
                 hint: str | None = None) -> None:
        self.segment = segment
        self.uid = uid
        self.gid = gid
        self.mode = mode
        super().__init__(message, hint=hint)


class WriterRunningError(ShmCacheError):
    """A cache cannot be removed: a live writer holds it (``pid`` names the writer)."""

    hint = ("Stop the writer first (`systemctl stop shmcache@NAME`); "
            "`shmcache rm --force` is for a writer that is stuck")

    def __init__(self, message: str, *, pid: int, hint: str | None = None) -> None:
        self.pid = pid
        super().__init__(message, hint=hint)
