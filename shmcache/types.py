"""The value types readers hand out: KeyValue, Event, ListResult, CountResult, Status."""

from __future__ import annotations

import base64
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, NamedTuple

__all__ = ["CountResult", "Event", "KeyValue", "ListResult", "Status"]


class KeyValue(NamedTuple):
    """One key as etcd reports it. Immutable; compares equal field by field."""

    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int


class Event(NamedTuple):
    """One etcd watch event.

    For a DELETE, ``kv`` holds the key and the deletion revision as its
    ``mod_revision`` (other fields zero, as etcd reports it) and ``prev_kv`` the
    deleted key-value. ``revision`` is the etcd revision of the transaction.
    """

    type: Literal["PUT", "DELETE"]
    kv: KeyValue
    prev_kv: KeyValue | None
    revision: int


# tuple.__new__ skips NamedTuple's Python-level __new__, a Python call per KeyValue
# on the read path (docs/design.md, "The C speedups", has the figure).
kv_new = tuple.__new__


@dataclass(frozen=True)
class ListResult:
    """A range read: ``items`` sorted by key, exact at ``revision``.

    ``more``: keys remain after these (the read had a ``limit``);
    ``continue_token``: pass it as ``Reader.list(..., continue_token=)`` for the next
    page, which is exact at this same ``revision``.
    """

    items: list[KeyValue]
    revision: int
    more: bool = False
    continue_token: str | None = None

    def __iter__(self) -> Any:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


@dataclass(frozen=True)
class CountResult:
    """A count read (``Reader.count``): ``count`` keys in the range, exact at ``revision``
    (etcd's RangeResponse ``count`` and ``header.revision`` of a ``count_only`` range)."""

    count: int
    revision: int


@dataclass(frozen=True)
class Status:
    """What ``Reader.status()`` reports about a cache and its writer."""

    name: str
    prefix: bytes
    writer_pid: int
    writer_alive: bool
    heartbeat_age: float | None
    revision: int
    etcd_revision: int
    epoch: int
    oldest_watchable_revision: int
    snapshot_revision: int
    key_count: int
    ring_capacity: int
    ring_used: int
    format_version: int
    # Unix time since which the writer has failed to reach etcd (None: it reaches
    # etcd, or no writer runs). The cache keeps serving its last revision meanwhile.
    etcd_unreachable_since: float | None = None
    # How writer_alive was judged: "pid" (the writer's pid, seen in /proc: same PID
    # namespace) or "heartbeat" (another PID namespace, e.g. another container).
    liveness: str = "pid"
    # The secondary indexes the writer publishes: name -> spec (e.g. "json:/spec/nodeName").
    indexes: dict[str, str] = field(default_factory=dict)
    # The writer's last publish error (a full /dev/shm: "OSError: [Errno 28] No space
    # left on device") and the Unix time since which publishing fails; both None
    # while publishing works (or no writer runs). Readers keep serving the last
    # published revision meanwhile; the writer retries and catches up.
    publish_error: str | None = None
    publish_failing_since: float | None = None
    # The id of the etcd cluster the epoch was loaded from (etcd's cluster_id; 0: unknown).
    cluster_id: int = 0
    # Bytes of the cache's segments the writer unlinked that processes still map (each
    # counted once; from the /proc/PID/maps the caller may read). None: not counted.
    pinned_bytes: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly: ``prefix`` as text (undecodable bytes as ``\\xNN`` escapes, which
        a prefix containing a backslash makes ambiguous), ``prefix_base64`` exact."""
        d = asdict(self)
        d["prefix"] = self.prefix.decode("utf-8", "backslashreplace")
        d["prefix_base64"] = base64.b64encode(self.prefix).decode("ascii")
        return d
