"""Watch responses encoded once for many watches parse as the messages etcd would send."""

from __future__ import annotations

import pytest

from shmcache import Event, KeyValue
from shmcache.etcdapi import mvcc, rpc
from shmcache.proxy.watch_encode import Encoder, batches, event_message, serialize

PUT = Event("PUT", KeyValue(b"/a/k", b"v2", 3, 5, 2, 0), KeyValue(b"/a/k", b"v1", 3, 3, 1, 0), 5)
NEW = Event("PUT", KeyValue(b"/a/n", b"x", 5, 5, 1, 7), None, 5)
DEL = Event("DELETE", KeyValue(b"/a/k", b"", 0, 5, 0, 0), KeyValue(b"/a/k", b"v2", 3, 4, 2, 0), 5)


@pytest.mark.parametrize("watch_id", [0, 1, 7, 300, 2**40, -1])
@pytest.mark.parametrize("prev_kv", [False, True])
def test_an_encoded_response_is_the_message(watch_id: int, prev_kv: bool) -> None:
    events = [PUT, NEW, DEL]
    got = rpc.WatchResponse.FromString(Encoder().response(watch_id, 99, 5, events, prev_kv))
    want = rpc.WatchResponse(header=rpc.ResponseHeader(cluster_id=99, revision=5),
                             watch_id=watch_id,
                             events=[event_message(e, prev_kv) for e in events])
    assert got == want
    assert got.events[0].HasField("prev_kv") == prev_kv
    assert not got.events[1].HasField("prev_kv")  # a create has none
    assert got.events[2].type == mvcc.Event.DELETE


def test_the_body_is_encoded_once_per_batch_of_the_same_events() -> None:
    enc = Encoder()
    events = [PUT, DEL]
    a = enc.response(1, 0, 5, events, True)
    b = enc.response(2, 0, 5, list(events), True)  # (another watch's list, the same events)
    assert enc.hits == 1 and a[2:] == b[2:] and a != b
    c = enc.response(3, 0, 5, [PUT, Event(*DEL)], True)  # an equal but other event object
    assert enc.hits == 1 and rpc.WatchResponse.FromString(c).watch_id == 3
    enc.response(4, 0, 5, events, False)  # without prev_kv: another body
    assert enc.hits == 1


def test_serialize_passes_encoded_bytes_through() -> None:
    msg = rpc.WatchResponse(watch_id=3, created=True)
    assert serialize(msg) == msg.SerializeToString()
    assert serialize(b"\x10\x03") == b"\x10\x03"


def _ev(rev: int, key: bytes = b"/a/k") -> Event:
    return Event("PUT", KeyValue(key, b"v", 1, rev, 1, 0), None, rev)


def test_batches_as_etcd_groups_them() -> None:
    """Synced: one response per revision, headed by it. Catching up: up to 1,000 revisions
    per response (etcd's watchBatchMaxRevs), a revision never split, headed by the
    revision caught up to."""
    events = [_ev(3), _ev(3, b"/a/j"), _ev(4), _ev(6)]
    assert [(r, len(b)) for r, b in batches(events, None)] == [(3, 2), (4, 1), (6, 1)]
    assert [(r, len(b)) for r, b in batches(events, 9)] == [(9, 4)]
    many = [_ev(rev, k) for rev in range(1, 2502) for k in (b"/a/1", b"/a/2")]
    got = list(batches(many, 3000))
    assert [(r, len(b)) for r, b in got] == [(3000, 2000), (3000, 2000), (3000, 1002)]
    assert [e for _r, b in got for e in b] == many
    assert got[1][1][0].revision == 1001
