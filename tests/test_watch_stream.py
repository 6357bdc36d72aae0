"""The writer's watch path: the hand decoder of WatchResponse and both stream transports.

``_watchpb.decode_watch_response`` is held to protobuf's own decoding of the same
bytes (random messages, unknown fields, negative and large integers, truncated
input). ``_DirectCall`` (grpc's segregated call, driven by the reading thread)
and ``_ThreadedCall`` (the public API, its fallback) are run against a real
etcd: events in order, progress requests answered, close from another thread,
an error status as a ``grpc.RpcError`` the feed recognises.
"""

from __future__ import annotations

import os
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import shmcache
from shmcache.etcdapi import mvcc, rpc
from shmcache.format import layout
from shmcache.writer.etcd import connection as _etcd
from shmcache.writer.etcd import decode as _watchpb
from shmcache.writer.etcd import stream as _stream
from tests.etcdserver import EtcdServer, free_port
from tests.helpers import WriterProcess, etcd_range, put
from tests.test_service import _scrape

# -- the decoder -------------------------------------------------------------------------

I64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
SMALL = st.one_of(st.integers(min_value=0, max_value=300), I64)


@st.composite
def key_values(draw: Any) -> mvcc.KeyValue:
    return mvcc.KeyValue(key=draw(st.binary(max_size=40)), value=draw(st.binary(max_size=300)),
                           create_revision=draw(SMALL), mod_revision=draw(SMALL),
                           version=draw(SMALL), lease=draw(SMALL))


@st.composite
def responses(draw: Any) -> rpc.WatchResponse:
    resp = rpc.WatchResponse(
        watch_id=draw(SMALL), created=draw(st.booleans()), canceled=draw(st.booleans()),
        compact_revision=draw(SMALL), cancel_reason=draw(st.text(max_size=20)))
    if draw(st.booleans()):
        resp.header.revision = draw(SMALL)
        resp.header.cluster_id = draw(st.integers(min_value=0, max_value=2**64 - 1))
        resp.header.raft_term = draw(st.integers(min_value=0, max_value=2**64 - 1))
    for _ in range(draw(st.integers(min_value=0, max_value=4))):
        ev = resp.events.add()
        # Mostly PUT and DELETE; now and then a type this etcd API does not have.
        ev.type = draw(st.sampled_from([0, 1] * 8 + [2, 7, -1, 2**31 - 1]))
        if draw(st.booleans()):
            ev.kv.CopyFrom(draw(key_values()))
        if draw(st.booleans()):
            ev.prev_kv.CopyFrom(draw(key_values()))
    return resp


def expected(resp: rpc.WatchResponse) -> _watchpb.WatchResponse | None:
    """What the feed used to build from protobuf's decoding (docs/design.md, step 4); None
    where the decoder must refuse (an unknown event type, an event without its key-value)."""
    events = []
    for ev in resp.events:
        if ev.type not in (0, 1) or not ev.HasField("kv"):
            return None
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
            resp.cancel_reason, events, _watchpb.cluster_varint(resp.header.cluster_id))


@settings(max_examples=400, deadline=None)
@given(responses(), st.binary(max_size=30))
def test_decoder_equals_protobuf(resp: rpc.WatchResponse, junk: bytes) -> None:
    data = resp.SerializeToString()
    # Unknown fields (a newer etcd's) are skipped: field 12 as bytes, 13 as a varint,
    # 14 as fixed64, 15 as fixed32, 100 (a two-byte tag) as bytes.
    extra = (b"\x62" + bytes([len(junk)]) + junk + b"\x68\xff\xff\x03" + b"\x71" + b"\0" * 8
             + b"\x7d" + b"\1" * 4 + b"\xa2\x06\x01x")
    for raw in (data, data + extra):
        want = expected(rpc.WatchResponse.FromString(raw))
        if want is None:
            with pytest.raises(ValueError):
                _watchpb.decode_watch_response(raw)
        else:
            assert _watchpb.decode_watch_response(raw) == want


@settings(max_examples=200, deadline=None)
@given(responses(), st.data())
def test_truncated_or_damaged_input_raises_value_error(resp: rpc.WatchResponse,
                                                       data: Any) -> None:
    raw = resp.SerializeToString()
    if raw:
        cut = data.draw(st.integers(min_value=0, max_value=len(raw) - 1))
        try:
            rpc.WatchResponse.FromString(raw[:cut])
        except Exception:
            with pytest.raises(ValueError):
                _watchpb.decode_watch_response(raw[:cut])
        else:  # a prefix protobuf accepts (it ended between fields): so must the decoder
            want = expected(rpc.WatchResponse.FromString(raw[:cut]))
            if want is None:  # (unless an event in it is one the decoder refuses)
                with pytest.raises(ValueError):
                    _watchpb.decode_watch_response(raw[:cut])
            else:
                assert _watchpb.decode_watch_response(raw[:cut]) == want
    with pytest.raises(ValueError):
        _watchpb.decode_watch_response(raw + b"\x5a\x05\x12")  # an event longer than the rest


@pytest.mark.parametrize(("event", "error"), [
    (b"\x08\x02\x12\x04\x0a\x02/a", "unknown event type 2"),  # type 2, kv {key "/a"}
    (b"\x08\x07\x12\x04\x0a\x02/a", "unknown event type 7"),
    (b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01\x12\x00", "unknown event type -1"),
    (b"\x08\x01", "without its key-value"),  # a DELETE of no key
    (b"", "without its key-value"),  # a PUT of no key
], ids=["type-2", "type-7", "type-minus-1", "delete-without-kv", "put-without-kv"])
def test_an_event_it_cannot_decode_exactly_is_an_error(event: bytes, error: str) -> None:
    """Crafted events are refused, never guessed (an unknown type once read as DELETE), even
    after a valid event in the same response."""
    good = b"\x12\x06\x0a\x02/b\x18\x05"  # PUT /b at revision 5
    data = b"\x0a\x02\x18\x05" + b"\x5a" + bytes([len(good)]) + good + b"\x5a" + bytes(
        [len(event)]) + event
    with pytest.raises(ValueError, match=error):
        _watchpb.decode_watch_response(data)
    assert _watchpb.decode_watch_response(data[:4 + 2 + len(good)]) == (
        5, False, False, 0, "", [(0, b"/b", b"", 0, 5, 0, 0, None)], b"")


def test_a_delete_and_a_put_of_a_real_response() -> None:
    resp = rpc.WatchResponse()
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
        (0, b"/b", b"w", 0, 7_000_000_000, 0, -1, None)], b"")


@pytest.mark.parametrize("cluster_id", [0, 1, 0x7F, 0x80, 2**63 - 1, 2**63, 2**64 - 1])
def test_the_header_cluster_id(cluster_id: int) -> None:
    """The header's cluster id comes back as its varint (what cluster_varint encodes, b""
    for 0, a field protobuf omits), and cluster_from_varint reads it back."""
    resp = rpc.WatchResponse()
    resp.header.cluster_id, resp.header.member_id, resp.header.revision = cluster_id, 99, 3
    got = _watchpb.decode_watch_response(resp.SerializeToString())
    assert got == (3, False, False, 0, "", [], _watchpb.cluster_varint(cluster_id))
    assert _watchpb.cluster_from_varint(got[-1]) == cluster_id


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


def _kind(stream: _stream.WatchStream) -> str:
    return "direct" if isinstance(stream._call, _stream._DirectCall) else "threaded"


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
            _rev, _created, canceled, compact, _reason, events, cluster = next(it)
            assert not canceled and not compact and events
            # Every response names the cluster the connection found at connect().
            assert cluster == conn.cluster_raw != b""
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


# -- degraded, never lying: a message the writer cannot decode, a broken direct path ---------

def _writer_with(tmp_path: Path, code: str, name: str, endpoint: str, prefix: bytes,
                 extra: list[str] | None = None) -> WriterProcess:
    """A writer process that runs ``code`` at interpreter start (a sitecustomize module)."""
    (tmp_path / "sitecustomize.py").write_text(textwrap.dedent(code))
    w = WriterProcess(name, endpoint, prefix, extra=extra)
    w.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path),
                                                        os.environ.get("PYTHONPATH")]))
    return w


# etcd sending an event of a type this API does not have: the writer's decoder is handed the
# first response that holds an event of the key .../victim with every event's type set to 7.
_UNKNOWN_EVENT_TYPE = """
    from shmcache.etcdapi import rpc
    import shmcache.writer.etcd.connection as etcd

    real, done = etcd.decode_watch_response, []

    def decode(data):
        resp = rpc.WatchResponse.FromString(bytes(data))
        if not done and any(ev.kv.key.endswith(b"/victim") for ev in resp.events):
            done.append(1)
            for ev in resp.events:
                ev.type = 7
            data = resp.SerializeToString()
        return real(data)

    etcd.decode_watch_response = decode
"""


def test_a_response_the_writer_cannot_decode_is_watched_again(
        tmp_path: Path, etcd_session: EtcdServer, etcd_client: Any, cache_name: str,
        unique_prefix: bytes) -> None:
    """An event of an unknown type breaks the stream (counted, logged) and the writer watches
    again from its revision: the cache ends equal to etcd, the key never guessed deleted."""
    p = unique_prefix
    put(etcd_client, p + b"victim", b"before")
    port = free_port()
    w = _writer_with(tmp_path, _UNKNOWN_EVENT_TYPE, cache_name, etcd_session.endpoint, p,
                     extra=["--metrics", f"127.0.0.1:{port}"])
    w.start()
    try:
        with shmcache.Reader(cache_name) as r:
            assert _scrape(port)[f"shmcache_watch_decode_errors_total{{{cache_name}}}"] == 0
            put(etcd_client, p + b"victim", b"after")  # the response the decoder refuses
            last = 0
            for i in range(20):
                last = put(etcd_client, p + b"k%d" % (i % 5), b"%d" % i)
            assert r.wait(last, timeout=30), w.log()
            assert r.list(p).items == etcd_range(etcd_client, p, r.revision)
            assert r.get(p + b"victim") is not None and r.get(p + b"victim").value == b"after"
        assert _scrape(port)[f"shmcache_watch_decode_errors_total{{{cache_name}}}"] == 1
        log = w.log()
        assert "could not be decoded: unknown event type 7" in log, log
    finally:
        w.close()


# grpcio's internals changed under _DirectCall: "construct" breaks the segregated call's
# signature, "complete" the completion events of a call that started.
_BROKEN_DIRECT_PATH = """
    import grpc._channel

    MODE = {mode!r}

    class BrokenCall:
        def __init__(self, inner):
            self._inner = inner

        def __getattr__(self, name):
            return getattr(self._inner, name)

        def next_event(self):
            self._inner.next_event()
            raise AttributeError("'BatchOperationEvent' object has no attribute 'tag'")

    class BrokenChannel:
        calls = 0

        def __init__(self, inner):
            self._inner = inner

        def __getattr__(self, name):
            return getattr(self._inner, name)

        def segregated_call(self, *args):
            if args[1] != b"/etcdserverpb.Watch/Watch":  # (grpc's own blocking unary calls)
                return self._inner.segregated_call(*args)
            BrokenChannel.calls += 1
            if MODE == "construct":
                raise TypeError("segregated_call() takes exactly 9 positional arguments (7 given)")
            return BrokenCall(self._inner.segregated_call(*args))

    def break_direct_path(channel):
        channel._channel = BrokenChannel(channel._channel)
        return channel

    if MODE != "in-process":
        init = grpc._channel.Channel.__init__

        def patched_init(self, *args, **kwargs):
            init(self, *args, **kwargs)
            break_direct_path(self)

        grpc._channel.Channel.__init__ = patched_init
"""


@pytest.mark.parametrize("mode", ["construct", "complete"])
def test_a_broken_direct_path_falls_back_for_the_process(
        mode: str, etcd_session: EtcdServer, etcd_client: Any, unique_prefix: bytes,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A direct call that fails to start or to complete its first message: the same stream
    continues on the public API, so do later ones (the direct path is not tried again),
    and the switch is logged once."""
    monkeypatch.delenv("SHMCACHE_GRPC_THREADED", raising=False)
    monkeypatch.setattr(_stream, "DIRECT_PATH", _stream.DirectPath())
    broken: dict[str, Any] = {}
    exec(textwrap.dedent(_BROKEN_DIRECT_PATH.format(mode=mode)).replace(
        "MODE != \"in-process\"", "False"), broken)
    c = _etcd.Connection(_etcd.EtcdSettings(endpoints=[etcd_session.endpoint]))
    c.connect()
    broken["break_direct_path"](c.channel)
    p = unique_prefix
    try:
        for n in range(3):
            rev = put(etcd_client, p + b"k", b"%d" % n)
            stream = c.watch_decoded(p, layout.prefix_range_end(p), rev)
            try:
                it = iter(stream)
                assert next(it)[1]  # created
                assert [ev[4] for ev in next(it)[5]] == [rev]
                assert _kind(stream) == "threaded"
            finally:
                stream.close()
    finally:
        c.close()
    assert broken["BrokenChannel"].calls == 1
    warnings = [rec.getMessage() for rec in caplog.records
                if "the direct watch call failed" in rec.getMessage()]
    assert len(warnings) == 1, warnings
    assert ("9 positional arguments" if mode == "construct" else "no attribute 'tag'") in warnings[0]


@pytest.mark.parametrize("mode", ["construct", "complete"])
def test_a_writer_whose_direct_path_breaks_serves(
        mode: str, tmp_path: Path, etcd_session: EtcdServer, etcd_client: Any, cache_name: str,
        unique_prefix: bytes) -> None:
    """A writer process on a grpcio whose internals changed serves through the public API:
    it follows etcd, answers consistent reads, and says so once in its log."""
    p = unique_prefix
    w = _writer_with(tmp_path, _BROKEN_DIRECT_PATH.format(mode=mode), cache_name,
                     etcd_session.endpoint, p)
    w.start()
    try:
        last = 0
        for i in range(100):
            last = put(etcd_client, p + b"k%03d" % (i % 30), b"%d" % i)
        with shmcache.Reader(cache_name) as r:
            assert r.wait(last, timeout=30), w.log()
            assert r.list(p).items == etcd_range(etcd_client, p, r.revision)
            assert r.sync(timeout=10) >= last  # progress requests on the public API
        assert w.proc is not None and w.proc.poll() is None
        log = w.log()
        assert log.count("the direct watch call failed") == 1, log
        assert "Traceback" not in log, log
    finally:
        w.close()
