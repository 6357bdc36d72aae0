"""The writer's watch path: the hand decoder of WatchResponse and both stream transports.

``_watchpb.decode_watch_response`` is held to protobuf's own decoding of the same
bytes (random messages, unknown fields, negative and large integers, truncated
input). ``_DirectCall`` (grpc's segregated call, driven by the reading thread)
and ``_ThreadedCall`` (the public API, its fallback) are run against a real
etcd: events in order, progress requests answered, close from another thread,
an error status as a ``grpc.RpcError`` the feed recognises.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from etcd3.etcdrpc import kv_pb2, rpc_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

import shmcache
from shmcache import _etcd, _watchpb, layout
from tests.etcdserver import EtcdServer
from tests.helpers import WriterProcess, etcd_range, put

# -- the decoder -------------------------------------------------------------------------

I64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
SMALL = st.one_of(st.integers(min_value=0, max_value=300), I64)


@st.composite
def key_values(draw: Any) -> kv_pb2.KeyValue:
    return kv_pb2.KeyValue(key=draw(st.binary(max_size=40)), value=draw(st.binary(max_size=300)),
                           create_revision=draw(SMALL), mod_revision=draw(SMALL),
                           version=draw(SMALL), lease=draw(SMALL))


@st.composite
def responses(draw: Any) -> rpc_pb2.WatchResponse:
    resp = rpc_pb2.WatchResponse(
        watch_id=draw(SMALL), created=draw(st.booleans()), canceled=draw(st.booleans()),
        compact_revision=draw(SMALL), cancel_reason=draw(st.text(max_size=20)))
    if draw(st.booleans()):
        resp.header.revision = draw(SMALL)
        resp.header.cluster_id = draw(st.integers(min_value=0, max_value=2**64 - 1))
        resp.header.raft_term = draw(st.integers(min_value=0, max_value=2**64 - 1))
    for _ in range(draw(st.integers(min_value=0, max_value=4))):
        ev = resp.events.add()
        ev.type = draw(st.sampled_from([0, 1]))
        if draw(st.booleans()):
            ev.kv.CopyFrom(draw(key_values()))
        if draw(st.booleans()):
            ev.prev_kv.CopyFrom(draw(key_values()))
    return resp


def expected(resp: rpc_pb2.WatchResponse) -> _watchpb.WatchResponse:
    """What the feed used to build from protobuf's decoding (docs/design.md, step 4)."""
    events = []
    for ev in resp.events:
        e = ev.kv
        p = ev.prev_kv
        prev = ((p.key, p.value, p.create_revision, p.mod_revision, p.version, p.lease)
                if ev.HasField("prev_kv") else None)
        if ev.type == 0:
            events.append((0, e.key, e.value, e.create_revision, e.mod_revision, e.version,
                           e.lease, prev))
        else:
            events.append((1, e.key, b"", 0, e.mod_revision, 0, 0, prev))
    return (resp.header.revision, resp.created, resp.canceled, resp.compact_revision,
            resp.cancel_reason, events)


@settings(max_examples=400, deadline=None)
@given(responses(), st.binary(max_size=30))
def test_decoder_equals_protobuf(resp: rpc_pb2.WatchResponse, junk: bytes) -> None:
    data = resp.SerializeToString()
    assert _watchpb.decode_watch_response(data) == expected(resp)
    # Unknown fields (a newer etcd's) are skipped: field 12 as bytes, 13 as a varint,
    # 14 as fixed64, 15 as fixed32, 100 (a two-byte tag) as bytes.
    extra = (b"\x62" + bytes([len(junk)]) + junk + b"\x68\xff\xff\x03" + b"\x71" + b"\0" * 8
             + b"\x7d" + b"\1" * 4 + b"\xa2\x06\x01x")
    assert _watchpb.decode_watch_response(data + extra) == expected(
        rpc_pb2.WatchResponse.FromString(data + extra))


@settings(max_examples=200, deadline=None)
@given(responses(), st.data())
def test_truncated_or_damaged_input_raises_value_error(resp: rpc_pb2.WatchResponse,
                                                       data: Any) -> None:
    raw = resp.SerializeToString()
    if raw:
        cut = data.draw(st.integers(min_value=0, max_value=len(raw) - 1))
        try:
            rpc_pb2.WatchResponse.FromString(raw[:cut])
        except Exception:
            with pytest.raises(ValueError):
                _watchpb.decode_watch_response(raw[:cut])
        else:  # a prefix protobuf accepts (it ended between fields): so must the decoder
            _watchpb.decode_watch_response(raw[:cut])
    with pytest.raises(ValueError):
        _watchpb.decode_watch_response(raw + b"\x5a\x05\x12")  # an event longer than the rest


def test_a_delete_and_a_put_of_a_real_response() -> None:
    resp = rpc_pb2.WatchResponse()
    resp.header.revision = 7_000_000_000
    ev = resp.events.add()
    ev.type = 1
    ev.kv.key, ev.kv.mod_revision = b"/a", 7_000_000_000
    ev.prev_kv.key, ev.prev_kv.value, ev.prev_kv.mod_revision = b"/a", b"v" * 200, 5
    ev = resp.events.add()
    ev.kv.key, ev.kv.value, ev.kv.mod_revision, ev.kv.lease = b"/b", b"w", 7_000_000_000, -1
    got = _watchpb.decode_watch_response(resp.SerializeToString())
    assert got == (7_000_000_000, False, False, 0, "", [
        (1, b"/a", b"", 0, 7_000_000_000, 0, 0, (b"/a", b"v" * 200, 0, 5, 0, 0)),
        (0, b"/b", b"w", 0, 7_000_000_000, 0, -1, None)])


# -- the transports, against etcd -------------------------------------------------------------

@pytest.fixture(params=["direct", "threaded"])
def transport(request: Any, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "threaded":
        monkeypatch.setenv("SHMCACHE_GRPC_THREADED", "1")
    else:
        monkeypatch.delenv("SHMCACHE_GRPC_THREADED", raising=False)
    return str(request.param)


@pytest.fixture
def conn(etcd_session: EtcdServer) -> Iterator[_etcd.Connection]:
    c = _etcd.Connection(_etcd.EtcdSettings(endpoints=[etcd_session.endpoint]))
    c.connect()
    yield c
    c.close()


def _kind(stream: _etcd.WatchStream) -> str:
    return "direct" if isinstance(stream._call, _etcd._DirectCall) else "threaded"


def test_events_progress_and_close(transport: str, conn: _etcd.Connection, etcd_client: Any,
                                   unique_prefix: bytes) -> None:
    p = unique_prefix
    first = put(etcd_client, p + b"a", b"1")
    stream = conn.watch_decoded(p, layout.prefix_range_end(p), first)
    assert _kind(stream) == transport
    it = iter(stream)
    revs = []
    try:
        created = next(it)
        assert created[1] and created[0] >= first
        for i in range(50):
            put(etcd_client, p + b"k%d" % (i % 7), b"%d" % i)
        while len(revs) < 51:
            _rev, _created, canceled, compact, _reason, events = next(it)
            assert not canceled and not compact and events
            revs += [ev[4] for ev in events]
        assert revs == list(range(first, first + 51))
        # Progress requests (several, faster than their answers: they queue).
        for _ in range(3):
            stream.request_progress()
        progress = [next(it) for _ in range(3)]
        assert all(not r[5] and r[0] == first + 50 for r in progress)
        # close() from another thread ends the iteration with a grpc.RpcError.
        threading.Timer(0.2, stream.close).start()
        with pytest.raises(grpc.RpcError) as ei:
            next(it)
        assert ei.value.code() == grpc.StatusCode.CANCELLED
        assert _etcd.is_grpc_error(ei.value) and "CANCELLED" in _etcd.describe(ei.value)
    finally:
        stream.close()


def test_a_stream_left_early_is_released(transport: str, conn: _etcd.Connection,
                                         etcd_client: Any, unique_prefix: bytes) -> None:
    """Breaking out of the iteration (the feed relists mid-stream) cancels the call and
    completes what it started: many streams in a row neither hang nor fail."""
    p = unique_prefix
    rev = put(etcd_client, p + b"a", b"1")
    for _ in range(30):
        stream = conn.watch_decoded(p, layout.prefix_range_end(p), rev)
        for resp in stream:
            if resp[5]:
                break
        stream.close()
    stream = conn.watch(p, layout.prefix_range_end(p), rev)  # protobuf responses (tests, tools)
    for resp in stream:
        if resp.events:
            assert resp.events[0].kv.key == p + b"a"
            break
    stream.close()


def test_an_error_status_is_an_rpc_error(transport: str, etcd_server: EtcdServer,
                                         unique_prefix: bytes) -> None:
    c = _etcd.Connection(_etcd.EtcdSettings(endpoints=[etcd_server.endpoint]))
    c.connect()
    try:
        stream = c.watch_decoded(unique_prefix, layout.prefix_range_end(unique_prefix), 1)
        it = iter(stream)
        next(it)  # created
        etcd_server.kill()
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as ei:
            next(it)
        assert time.monotonic() - t0 < 20
        assert ei.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN,
                                   grpc.StatusCode.INTERNAL), _etcd.describe(ei.value)
        stream.close()
    finally:
        c.close()


def test_writer_on_the_threaded_fallback(etcd_session: EtcdServer, etcd_client: Any,
                                         cache_name: str, unique_prefix: bytes) -> None:
    """A writer process on the public-API transport follows etcd like the default one."""
    p = unique_prefix
    w = WriterProcess(cache_name, etcd_session.endpoint, p)
    w.env["SHMCACHE_GRPC_THREADED"] = "1"
    w.start()
    try:
        last = 0
        for i in range(200):
            last = put(etcd_client, p + b"k%03d" % (i % 50), b"%d" % i)
        with shmcache.Reader(cache_name) as r:
            assert r.wait(last, timeout=20)
            assert r.list(p).items == etcd_range(etcd_client, p, r.revision)
            r.sync(timeout=10)  # progress requests go through the fallback's send path
    finally:
        w.close()
