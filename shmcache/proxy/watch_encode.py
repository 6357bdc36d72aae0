"""Watch responses as etcd groups and encodes them, each batch encoded once for all its watches.

With protobuf's pure-Python implementation (measured with protobuf 3.20 on
Python 3.11) building and serializing a one-event WatchResponse costs about 150 us.
N client watches of one key range get the same events at the same revision,
so the body (header and events) is encoded once and each watch's response is
its watch_id field in front of it: protobuf parses concatenated encodings as
one message (scalars last-wins, repeated fields appended), and these two parts
have no field in common.

Concurrency contract: an Encoder belongs to one thread (the watch service's loop).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ..etcdapi import mvcc, rpc
from .wire import varint

if TYPE_CHECKING:
    from ..types import Event, KeyValue

__all__ = ["Encoder", "batches", "fragments", "serialize"]

# Revisions per catch-up response (etcd's watchBatchMaxRevs).
CATCH_UP_REVISIONS = 1000

# Bodies kept: the batches of the last few revisions, for every filter and range.
_KEEP = 256
_WATCH_ID_TAG = b"\x10"  # field 2 (watch_id), varint


def serialize(resp: Any) -> bytes:
    """gRPC's response serializer: already encoded bytes pass through."""
    return resp if type(resp) is bytes else resp.SerializeToString()


def kv_message(kv: KeyValue) -> Any:
    return mvcc.KeyValue(key=kv.key, value=kv.value, create_revision=kv.create_revision,
                         mod_revision=kv.mod_revision, version=kv.version, lease=kv.lease)


def event_message(e: Event, prev_kv: bool) -> Any:
    return mvcc.Event(type=mvcc.Event.PUT if e.type == "PUT" else mvcc.Event.DELETE,
                      kv=kv_message(e.kv),
                      prev_kv=kv_message(e.prev_kv) if prev_kv and e.prev_kv else None)


class Encoder:
    """Encodes (header, events) bodies, reusing the body of the same event objects."""

    def __init__(self) -> None:
        # (revision, prev_kv, cluster, n, id of first and last event) -> (events, body)
        self._bodies: dict[tuple[int, ...], tuple[list[Event], bytes]] = {}
        self.hits = 0  # (for tests and the curious)

    def response(self, watch_id: int, cluster_id: int, revision: int, events: list[Event],
                 prev_kv: bool) -> bytes:
        """The encoded WatchResponse of ``watch_id``: ``events`` headed by ``revision``."""
        key = (revision, prev_kv, cluster_id, len(events), id(events[0]), id(events[-1]))
        got = self._bodies.get(key)
        if got is not None and all(a is b for a, b in zip(got[0], events, strict=True)):
            body = got[1]
            self.hits += 1
        else:
            header = rpc.ResponseHeader(cluster_id=cluster_id, revision=revision)
            body = rpc.WatchResponse(header=header, events=[
                event_message(e, prev_kv) for e in events]).SerializeToString()
            if len(self._bodies) >= _KEEP:
                del self._bodies[next(iter(self._bodies))]
            self._bodies[key] = (events, body)  # (holding the events keeps their ids unique)
        return _WATCH_ID_TAG + varint(watch_id) + body if watch_id else body


def batches(events: list[Event], catch_up: int | None) -> Iterator[tuple[int, list[Event]]]:
    """``events`` (ascending revisions) as etcd's responses group them: (header revision,
    events) with all events of a revision together.

    A synced watch (``catch_up`` None) gets one response per revision, headed by it.
    A watch catching up (etcd's unsynced watchers) gets up to 1,000 revisions per
    response, each headed by ``catch_up``, the revision it has caught up to.
    """
    if catch_up is None:
        for rev, group in itertools.groupby(events, key=lambda e: e.revision):
            yield rev, list(group)
        return
    batch: list[Event] = []
    revs = 0
    for e in events:
        if not batch or e.revision != batch[-1].revision:
            if revs == CATCH_UP_REVISIONS:
                yield catch_up, batch
                batch, revs = [], 0
            revs += 1
        batch.append(e)
    yield catch_up, batch


def fragments(resp: Any, limit: int) -> Iterator[Any]:
    """etcd's sendFragments: as many events per part as keep it below ``limit`` bytes (at
    least one), ``fragment`` set on every part but the last."""
    events = list(resp.events)
    i = 0
    while True:
        part = rpc.WatchResponse(header=resp.header, watch_id=resp.watch_id, fragment=True)
        for ev in events[i:]:
            part.events.append(ev)
            if len(part.events) > 1 and part.ByteSize() >= limit:
                del part.events[-1]
                break
            i += 1
        if i == len(events):
            part.fragment = False
        yield part
        if not part.fragment:
            return
