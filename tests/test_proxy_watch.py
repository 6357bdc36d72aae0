"""The proxy's Watch service against real etcd: the same responses, field by field, from the cache.

One etcd and one writer for the module, etcd started with a 1 s progress
interval and a small --max-request-bytes so that the proxy, configured alike,
can be compared with it on progress_notify and fragment. Each test writes under
its own sub-prefix and opens the same watch on etcd and on the proxy.
"""

from __future__ import annotations

import gc
import os
import queue
import secrets
import shutil
import subprocess
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

import shmcache
from shmcache.etcdapi import Stub, dial, method_path, rpc
from shmcache.proxy.metrics import ProxyMetrics
from shmcache.proxy.watch import WatchService
from tests.etcdserver import EtcdServer
from tests.helpers import wait_until

PROGRESS = 1.0
POOL = "test-proxy-pool"  # gRPC's handler threads: the pool keeps them for the next call
MAX_REQUEST = 128 * 1024


@pytest.fixture(scope="module")
def etcd_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    """This module's etcd (the module's writer, conftest's, serves from it)."""
    with EtcdServer(data_dir=tmp_path_factory.mktemp("etcd-watch"), extra_args=[
            f"--experimental-watch-progress-notify-interval={PROGRESS:g}s",
            f"--max-request-bytes={MAX_REQUEST}"]) as server:
        yield server


@pytest.fixture
def etcd(etcd_session: EtcdServer) -> EtcdServer:
    return etcd_session


class Proxy:
    """A gRPC server with the WatchService on the module's Reader."""

    def __init__(self, reader: shmcache.Reader, forward: Any = None, **kw: Any) -> None:
        self.metrics = ProxyMetrics()
        self.service = WatchService(reader, self.metrics, forward, **kw)
        self.pool = futures.ThreadPoolExecutor(max_workers=64, thread_name_prefix=POOL)
        self.server = grpc.server(self.pool, options=[("grpc.so_reuseport", 0)])
        self.server.add_generic_rpc_handlers((self.service.handler(),))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.service.close()
        self.server.stop(None).wait(10)
        self.pool.shutdown()


@pytest.fixture
def proxy(reader: shmcache.Reader) -> Iterator[Proxy]:
    p = Proxy(reader, progress_interval=PROGRESS, max_request_bytes=MAX_REQUEST)
    try:
        yield p
    finally:
        p.close()


class EtcdForward:
    """The proxy's forwarder as the WatchService uses it (shmcache/proxy/forward.py's
    ``stream``): bytes both ways to etcd, cancelled when the client's call ends."""

    def __init__(self, endpoint: str) -> None:
        self.channel = dial.open_channel(*dial.parse_endpoint(endpoint))

    def stream(self, service: str, method: str, request: Any, context: Any,
               client_streaming: bool) -> Iterator[bytes]:
        assert client_streaming
        call = self.channel.stream_stream(method_path(service, method))(request)
        context.add_callback(call.cancel)
        yield from call


@pytest.fixture
def forwarding_proxy(reader: shmcache.Reader, etcd: EtcdServer) -> Iterator[Proxy]:
    fwd = EtcdForward(etcd.endpoint)
    p = Proxy(reader, fwd, progress_interval=PROGRESS, max_request_bytes=MAX_REQUEST)
    try:
        yield p
    finally:
        p.close()
        fwd.channel.close()


class Client:
    """One Watch stream: send requests, read responses with a deadline."""

    def __init__(self, endpoint: str) -> None:
        host, port = dial.parse_endpoint(endpoint)
        self.channel = dial.open_channel(host, port)
        self._requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._responses: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.call = Stub(self.channel, "Watch").Watch(iter(self._requests.get, None))
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self) -> None:
        try:
            for resp in self.call:
                self._responses.put(resp)
        except grpc.RpcError as exc:
            self._responses.put(exc)
        self._responses.put(None)

    def send(self, **kw: Any) -> None:
        self._requests.put(rpc.WatchRequest(**kw))

    def create(self, key: bytes, range_end: bytes = b"", **kw: Any) -> None:
        self.send(create_request=rpc.WatchCreateRequest(key=key, range_end=range_end, **kw))

    def next(self, timeout: float = 10.0) -> Any:
        item = self._responses.get(timeout=timeout)
        if isinstance(item, Exception):
            raise item
        return item

    def until(self, done: Callable[[list[Any]], bool], timeout: float = 15.0) -> list[Any]:
        out: list[Any] = []
        deadline = time.monotonic() + timeout
        while not done(out):
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"gave up waiting; got {out}"
            try:
                out.append(self.next(remaining))
            except queue.Empty:
                continue
        return out

    def quiet(self, seconds: float) -> list[Any]:
        """What arrives within ``seconds`` (for 'nothing more comes' checks)."""
        out = []
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                out.append(self.next(remaining))
            except queue.Empty:
                break
        return out

    def close(self) -> None:
        self.call.cancel()
        self._requests.put(None)
        self.channel.close()
        self._t.join(10)


@pytest.fixture
def clients(etcd: EtcdServer, proxy: Proxy) -> Iterator[Callable[[], tuple[Client, Client]]]:
    made: list[Client] = []

    def make() -> tuple[Client, Client]:
        pair = (Client(etcd.endpoint), Client(proxy.endpoint))
        made.extend(pair)
        return pair

    yield make
    for c in made:
        c.close()


@pytest.fixture
def kv(etcd: EtcdServer) -> Iterator[Any]:
    host, port = dial.parse_endpoint(etcd.endpoint)
    ch = dial.open_channel(host, port)
    yield Stub(ch, "KV")
    ch.close()


def put(kv: Any, key: bytes, value: bytes) -> int:
    return int(kv.Put(rpc.PutRequest(key=key, value=value), timeout=10).header.revision)


def delete(kv: Any, key: bytes, range_end: bytes = b"") -> int:
    return int(kv.DeleteRange(rpc.DeleteRangeRequest(key=key, range_end=range_end),
                              timeout=10).header.revision)


def txn(kv: Any, puts: list[tuple[bytes, bytes]], deletes: list[bytes] = ()) -> int:  # type: ignore[assignment]
    ops = [rpc.RequestOp(request_put=rpc.PutRequest(key=k, value=v)) for k, v in puts]
    ops += [rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=k)) for k in deletes]
    return int(kv.Txn(rpc.TxnRequest(success=ops), timeout=10).header.revision)


def plain(resp: Any) -> dict[str, Any]:
    """A response as etcd's fields that the proxy can know: member id and raft term are etcd's."""
    d: dict[str, Any] = {
        "revision": resp.header.revision, "watch_id": resp.watch_id, "created": resp.created,
        "canceled": resp.canceled, "compact_revision": resp.compact_revision,
        "cancel_reason": resp.cancel_reason, "fragment": resp.fragment,
        "events": [(e.type, _kv(e.kv), _kv(e.prev_kv) if e.HasField("prev_kv") else None)
                   for e in resp.events]}
    return d


def _kv(kv: Any) -> tuple[Any, ...]:
    return (kv.key, kv.value, kv.create_revision, kv.mod_revision, kv.version, kv.lease)


def both_until(pair: tuple[Client, Client], done: Callable[[list[Any]], bool]
               ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    e, p = pair
    return [plain(r) for r in e.until(done)], [plain(r) for r in p.until(done)]


def upto(rev: int) -> Callable[[list[Any]], bool]:
    """Done once a response with events of revision ``rev`` (or later) arrived."""
    return lambda out: any(r.events and r.events[-1].kv.mod_revision >= rev for r in out)


def prefix_end(prefix: bytes) -> bytes:
    return prefix[:-1] + bytes([prefix[-1] + 1])


def n_responses(n: int) -> Callable[[list[Any]], bool]:
    return lambda out: len(out) >= n


# -- tests -------------------------------------------------------------------------------------


def test_prefix_watch_from_now_matches_etcd(clients: Any, kv: Any, reader: shmcache.Reader,
                                            sub_prefix: bytes) -> None:
    """A prefix watch from now: created, then one response per revision, same as etcd's."""
    pair = clients()
    end = prefix_end(sub_prefix)
    reader.sync()
    for c in pair:
        c.create(sub_prefix, end, prev_kv=True)
    e, p = both_until(pair, n_responses(1))
    assert p == e and e[0]["created"]
    put(kv, sub_prefix + b"a", b"1")
    put(kv, sub_prefix + b"a", b"2")
    txn(kv, [(sub_prefix + b"b", b"x"), (sub_prefix + b"c", b"y")])
    last = delete(kv, sub_prefix, end)
    e, p = both_until(pair, upto(last))
    assert p == e
    assert len(e) == 4


def test_catch_up_from_a_past_revision_matches_etcd(clients: Any, kv: Any,
                                                    reader: shmcache.Reader,
                                                    sub_prefix: bytes) -> None:
    """A watch from a past start revision gets what it missed as etcd sends it (one
    catch-up response headed by the current revision), then one response per revision."""
    first = put(kv, sub_prefix + b"a", b"1")
    put(kv, sub_prefix + b"b", b"1")
    txn(kv, [(sub_prefix + b"a", b"2"), (sub_prefix + b"c", b"3")])
    put(kv, sub_prefix + b"zz-outside-range", b"x")
    last = delete(kv, sub_prefix + b"b")
    reader.sync()
    pair = clients()
    for c in pair:
        c.create(sub_prefix, sub_prefix + b"z", start_revision=first + 1, prev_kv=True)
    e, p = both_until(pair, upto(last))
    assert p == e
    assert e[0]["created"] and len(e) == 2 and len(e[1]["events"]) == 4
    later = put(kv, sub_prefix + b"c", b"4")
    e, p = both_until(pair, upto(later))
    assert p == e and e[0]["revision"] == later


def test_many_watches_on_one_stream_match_etcd(clients: Any, kv: Any, reader: shmcache.Reader,
                                               sub_prefix: bytes) -> None:
    """Ids chosen by the client and assigned, single keys, ranges, from-key, a duplicate id,
    an empty range, cancels (also of an unknown id): etcd's answers, in etcd's order."""
    pair = clients()
    a, b, c = sub_prefix + b"a", sub_prefix + b"b", sub_prefix + b"c"
    reader.sync()
    creates = [dict(key=a), dict(key=b, watch_id=7), dict(key=a, range_end=c),
               dict(key=b, watch_id=7), dict(key=c, range_end=a), dict(key=c, watch_id=1),
               dict(key=c)]
    for cl in pair:
        for kw in creates:
            cl.create(**kw)
    e, p = both_until(pair, n_responses(len(creates)))
    assert p == e
    assert [r["watch_id"] for r in e] == [0, 7, 1, -1, -1, -1, 2]
    rev = txn(kv, [(a, b"1"), (b, b"2"), (c, b"3")])
    e, p = both_until(pair, n_responses(4))  # watches 0, 7, 1 (a, b of [a, c)), 2
    assert sorted(map(str, p)) == sorted(map(str, e))  # (etcd's order among watches varies)
    assert all(r["revision"] == rev for r in e)
    for cl in pair:
        cl.send(cancel_request=rpc.WatchCancelRequest(watch_id=7))
        cl.send(cancel_request=rpc.WatchCancelRequest(watch_id=99))
        cl.send(cancel_request=rpc.WatchCancelRequest(watch_id=0))
    e, p = both_until(pair, n_responses(2))
    assert p == e and [(r["watch_id"], r["canceled"]) for r in e] == [(7, True), (0, True)]
    last = put(kv, b, b"after")  # watch 7 is gone: only [a, c) sees it
    e, p = both_until(pair, n_responses(1))
    assert p == e and e[0]["watch_id"] == 1 and e[0]["revision"] == last
    for cl in pair:
        cl.create(key=a)  # the next assigned id: 3 (0 is free again but etcd counts on)
    e, p = both_until(pair, n_responses(1))
    assert p == e and e[0]["watch_id"] == 3


@pytest.mark.parametrize("filters", [[rpc.WatchCreateRequest.NOPUT],
                                     [rpc.WatchCreateRequest.NODELETE]])
def test_filters_match_etcd(clients: Any, kv: Any, reader: shmcache.Reader, sub_prefix: bytes,
                            filters: list[int]) -> None:
    """NOPUT and NODELETE drop those events; a revision left without events sends nothing."""
    first = put(kv, sub_prefix + b"a", b"1")
    delete(kv, sub_prefix + b"a")
    txn(kv, [(sub_prefix + b"b", b"1")], [sub_prefix + b"nothing"])
    put(kv, sub_prefix + b"c", b"1")
    txn(kv, [(sub_prefix + b"d", b"1")], [sub_prefix + b"c"])
    last = delete(kv, sub_prefix + b"b")
    reader.sync()
    pair = clients()
    for cl in pair:
        cl.create(sub_prefix, prefix_end(sub_prefix), start_revision=first, filters=filters)
        cl.create(sub_prefix, prefix_end(sub_prefix), filters=filters)  # from now
    e, p = both_until(pair, n_responses(3))  # two created, one catch-up
    assert sorted(map(str, p)) == sorted(map(str, e))  # (the catch-up comes later on etcd)
    live = [put(kv, sub_prefix + b"e", b"1"), delete(kv, sub_prefix + b"e")]
    e, p = both_until(pair, n_responses(2))  # one for each watch (in any order)
    assert sorted(map(str, p)) == sorted(map(str, e))
    assert {r["revision"] for r in e} == {live[filters[0] == rpc.WatchCreateRequest.NOPUT]}
    assert last > first


def test_progress_request_matches_etcd(clients: Any, kv: Any, reader: shmcache.Reader,
                                       sub_prefix: bytes) -> None:
    """A progress request: watch id -1, the revision every watch of the stream has reached,
    sent after the events up to it; also on a stream without watches."""
    pair = clients()
    reader.sync()
    for cl in pair:
        cl.send(progress_request=rpc.WatchProgressRequest())
    e, p = both_until(pair, n_responses(1))
    assert p == e and e[0]["watch_id"] == -1
    for cl in pair:
        cl.create(sub_prefix, prefix_end(sub_prefix))
    both_until(pair, n_responses(1))
    rev = put(kv, sub_prefix + b"a", b"1")
    reader.sync()
    for cl in pair:
        cl.send(progress_request=rpc.WatchProgressRequest())
    e, p = both_until(pair, n_responses(2))
    assert p == e and e[1]["watch_id"] == -1 and e[1]["revision"] == rev


def test_progress_notify_matches_etcd(clients: Any, kv: Any, reader: shmcache.Reader,
                                      sub_prefix: bytes) -> None:
    """progress_notify: an idle watch gets progress responses (its id, the current
    revision) every interval; a watch that got events skips one; others get none."""
    pair = clients()
    rev = put(kv, sub_prefix + b"a", b"1")
    reader.sync()
    for cl in pair:
        cl.create(sub_prefix + b"a", progress_notify=True, watch_id=5)
        cl.create(sub_prefix + b"b", watch_id=6)
    both_until(pair, n_responses(2))
    e, p = both_until(pair, n_responses(1))
    assert p == e == [{**e[0], "watch_id": 5, "revision": rev, "events": []}]
    other = put(kv, b"/elsewhere/" + sub_prefix, b"x")  # the revision moves, not the watch
    reader.sync()
    e, p = both_until(pair, lambda out: any(r["revision"] >= other for r in map(plain, out)))
    assert [r["watch_id"] for r in e + p] == [5] * (len(e) + len(p))
    assert e[-1] == p[-1]


def test_fragment_splits_as_etcd(clients: Any, kv: Any, reader: shmcache.Reader,
                                 sub_prefix: bytes) -> None:
    """fragment: a response above --max-request-bytes arrives in parts of at least one
    event each, every part but the last marked fragment; without it, in one piece."""
    value = b"v" * 100_000  # 8 of them: above --max-request-bytes + etcd's 512 KiB allowance
    first = put(kv, sub_prefix + b"0", value)
    for i in range(1, 8):
        last = put(kv, sub_prefix + b"%d" % i, value)
    reader.sync()
    pair = clients()
    for cl in pair:
        cl.create(sub_prefix, prefix_end(sub_prefix), start_revision=first, fragment=True)
    e, p = both_until(pair, upto(last))
    assert p == e
    assert [(r["fragment"], len(r["events"])) for r in e] == [(False, 0), (True, 6), (False, 2)]
    for cl in pair:
        cl.create(sub_prefix, prefix_end(sub_prefix), start_revision=first)
    e, p = both_until(pair, upto(last))
    assert p == e and len(e) == 2


def test_start_revision_the_cache_no_longer_holds(clients: Any, kv: Any, etcd: EtcdServer,
                                                  reader: shmcache.Reader,
                                                  sub_prefix: bytes) -> None:
    """Below the oldest revision the cache holds: created, then canceled with
    compact_revision (the oldest start revision served), as etcd answers below its
    compaction; the id stays taken until the client cancels it."""
    oldest = reader.status().oldest_watchable_revision  # since_revision: start oldest + 1
    put(kv, sub_prefix + b"a", b"1")
    etcd.compact(oldest + 1)
    reader.sync()
    pair = clients()
    for cl in pair:
        cl.create(sub_prefix, prefix_end(sub_prefix), start_revision=oldest, watch_id=3)
    e, p = both_until(pair, n_responses(2))
    assert p == e
    assert e[1] == {**e[1], "watch_id": 3, "canceled": True, "compact_revision": oldest + 1}
    for cl in pair:
        cl.create(sub_prefix, watch_id=3)  # still taken
        cl.send(cancel_request=rpc.WatchCancelRequest(watch_id=3))
        cl.create(sub_prefix, prefix_end(sub_prefix), start_revision=oldest + 1, watch_id=3)
    e, p = both_until(pair, n_responses(3))
    assert p == e
    assert [(r["watch_id"], r["created"], r["canceled"]) for r in e] == [
        (-1, True, True), (3, False, True), (3, True, False)]


# -- etcdctl ---------------------------------------------------------------------------------


def _etcdctl() -> str:
    from shmcache.cli.demo_etcd import find_etcd_binary

    beside = os.path.join(os.path.dirname(find_etcd_binary()), "etcdctl")
    found = beside if os.access(beside, os.X_OK) else shutil.which("etcdctl")
    if found is None:
        pytest.skip("no etcdctl binary")
    return found


class Etcdctl:
    """``etcdctl watch ...`` running in the background, its output collected."""

    def __init__(self, endpoint: str, *args: str) -> None:
        self.proc = subprocess.Popen(
            [_etcdctl(), "--endpoints", endpoint, "watch", *args], stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, env={**os.environ, "ETCDCTL_API": "3"})
        self.out = b""
        self._lock = threading.Lock()
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._lock:
                self.out += line

    def wait_for(self, text: bytes, timeout: float = 15.0) -> bytes:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if text in self.out:
                    return self.out
            time.sleep(0.02)
        raise AssertionError(f"etcdctl did not print {text!r}; printed {self.out!r}")

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self._t.join(5)


@pytest.mark.parametrize("args", [["--prefix"], ["--prefix", "--prev-kv"], ["--prev-kv"],
                                  ["--prev-kv", "RANGE_END"]])
def test_etcdctl_watch_prints_what_it_prints_against_etcd(
        proxy: Proxy, etcd: EtcdServer, kv: Any, reader: shmcache.Reader, sub_prefix: bytes,
        args: list[str]) -> None:
    """etcdctl watch (--prefix, --prev-kv, --rev) through the proxy prints exactly what it
    prints against etcd: the history from --rev, then live events."""
    key = sub_prefix if "--prefix" in args else sub_prefix + b"a"
    if "RANGE_END" in args:  # etcdctl watch KEY RANGE_END: [a, c)
        args = [a for a in args if a != "RANGE_END"] + [key.decode(),
                                                        (sub_prefix + b"c").decode()]
    else:
        args = [*args, key.decode()]
    first = put(kv, sub_prefix + b"a", b"1")
    put(kv, sub_prefix + b"b", b"2")
    txn(kv, [(sub_prefix + b"a", b"3"), (sub_prefix + b"c", b"multi\nline")])
    delete(kv, sub_prefix + b"a")
    reader.sync()
    runs = [Etcdctl(ep, f"--rev={first}", *args) for ep in (etcd.endpoint, proxy.endpoint)]
    try:
        put(kv, sub_prefix + b"a", b"live")
        delete(kv, sub_prefix, prefix_end(sub_prefix))
        put(kv, sub_prefix + b"a", b"end")
        outs = [r.wait_for(b"\nend\n") for r in runs]
    finally:
        for r in runs:
            r.close()
    assert outs[1] == outs[0]
    assert outs[0].count(b"PUT\n") >= 3 and outs[0].count(b"DELETE\n") >= 2


# -- what the proxy does not serve, and what it costs --------------------------------------------


def test_a_watch_outside_the_cache_prefix_is_refused(proxy: Proxy, writer: Any,
                                                     reader: shmcache.Reader) -> None:
    """Keys the cache does not hold: created and canceled at once with a reason, the stream
    and its other watches unharmed."""
    prefix = writer[1]
    c = Client(proxy.endpoint)
    try:
        c.create(b"/elsewhere/a")
        c.create(prefix[:-1], prefix_end(prefix))  # wider than the cache's range
        c.create(prefix, b"\0")  # from the prefix on: everything after it too
        c.create(prefix + b"x", watch_id=4)
        got = [plain(r) for r in c.until(n_responses(4))]
    finally:
        c.close()
    for r in got[:3]:
        assert (r["watch_id"], r["created"], r["canceled"]) == (-1, True, True)
        assert "outside the cache's prefix" in r["cancel_reason"]
    assert (got[3]["watch_id"], got[3]["canceled"]) == (4, False)


def _etcd_watchers(etcd: EtcdServer) -> int:
    with urllib.request.urlopen(f"{etcd.endpoint}/metrics", timeout=10) as f:
        for line in f.read().decode().splitlines():
            if line.startswith("etcd_debugging_mvcc_watcher_total "):
                return int(float(line.split()[1]))
    raise AssertionError("etcd has no etcd_debugging_mvcc_watcher_total")


def test_a_thousand_client_watches_add_no_watcher_on_etcd(proxy: Proxy, etcd: EtcdServer,
                                                          kv: Any, reader: shmcache.Reader,
                                                          sub_prefix: bytes) -> None:
    """1,000 client watches (4 streams of 250) through one proxy: etcd's watcher count is
    what it was (the writer's one), and every watch gets the event."""
    reader.sync()
    before = _etcd_watchers(etcd)
    streams = [Client(proxy.endpoint) for _ in range(4)]
    try:
        for c in streams:
            for i in range(250):
                c.create(sub_prefix + b"%d" % (i % 10), prefix_end(sub_prefix))
        for c in streams:
            created = c.until(n_responses(250))
            assert all(r.created and not r.canceled for r in created)
        assert proxy.metrics.snapshot().watches == 1000
        assert proxy.metrics.snapshot().watch_streams == 4
        rev = put(kv, sub_prefix + b"9", b"x")
        for c in streams:
            got = c.until(n_responses(250))
            assert {(r.header.revision, len(r.events)) for r in got} == {(rev, 1)}
        assert _etcd_watchers(etcd) == before
    finally:
        for c in streams:
            c.close()


def _live(kind: type) -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) is kind)


def test_a_client_disconnect_frees_its_watches(proxy: Proxy, kv: Any, reader: shmcache.Reader,
                                               sub_prefix: bytes) -> None:
    """Clients that go away (cancel the RPC) leave no stream, watch, thread or demultiplexer
    entry behind, however many came and went."""
    from shmcache.proxy.watch import _Stream
    from shmcache.reader.aio import AsyncWatch
    from shmcache.reader.demux import demux_of

    def cycle() -> None:
        c = Client(proxy.endpoint)
        for i in range(20):
            c.create(sub_prefix + b"%d" % i)
        assert len(c.until(n_responses(20))) == 20
        c.close()

    def settled() -> bool:
        snap = proxy.metrics.snapshot()
        return snap.watches == 0 and snap.watch_streams == 0 and \
            demux_of(reader).joined_count() == 0 and _live(_Stream) == 0 and \
            _live(AsyncWatch) == 0

    def threads() -> list[str]:
        return sorted(t.name for t in threading.enumerate() if not t.name.startswith(POOL))

    cycle()
    wait_until(settled)
    before = threads()
    for _ in range(30):
        cycle()
    wait_until(settled)
    wait_until(lambda: Counter(threads()) <= Counter(before), threads)  # (the reader's may end)


def test_a_watch_outside_the_prefix_goes_to_etcd(forwarding_proxy: Proxy, etcd: EtcdServer,
                                                 kv: Any, reader: shmcache.Reader,
                                                 sub_prefix: bytes) -> None:
    """With a forwarder, a watch outside the cache's prefix is etcd's own, on the same
    stream as the cache's watches: the same responses as etcd's (ids, events, cancel,
    progress), and etcd's watcher goes when the client does."""
    other = b"/elsewhere/" + secrets.token_hex(4).encode() + b"/"
    before = _etcd_watchers(etcd)
    pair = (Client(etcd.endpoint), Client(forwarding_proxy.endpoint))
    try:
        reader.sync()
        for cl in pair:
            cl.create(sub_prefix, prefix_end(sub_prefix))  # 0: the cache's
            cl.create(other, prefix_end(other), prev_kv=True)  # 1: etcd's
            cl.create(other + b"a", watch_id=5)  # etcd's, id chosen
        e, p = both_until(pair, n_responses(3))
        assert p == e and [r["watch_id"] for r in e] == [0, 1, 5]
        put(kv, other + b"a", b"1")
        rev = txn(kv, [(other + b"a", b"2"), (sub_prefix + b"a", b"3")])
        e, p = both_until(pair, n_responses(5))  # 1 and 5 twice, 0 once
        assert sorted(map(str, p)) == sorted(map(str, e))
        assert {(r["watch_id"], r["revision"]) for r in e} >= {(0, rev), (1, rev), (5, rev)}
        reader.sync()
        for cl in pair:
            cl.send(progress_request=rpc.WatchProgressRequest())
            cl.send(cancel_request=rpc.WatchCancelRequest(watch_id=1))
        e, p = both_until(pair, n_responses(2))
        assert p == e and [(r["watch_id"], r["revision"]) for r in e] == [(-1, rev), (1, rev)]
        assert forwarding_proxy.metrics.snapshot().watches == 2
        last = put(kv, other + b"b", b"unwatched now")
        last = put(kv, other + b"a", b"4")
        e, p = both_until(pair, n_responses(1))
        assert p == e and e[0]["watch_id"] == 5 and e[0]["revision"] == last
    finally:
        for cl in pair:
            cl.close()
    wait_until(lambda: _etcd_watchers(etcd) == before)
    wait_until(lambda: forwarding_proxy.metrics.snapshot().watches == 0)


def test_a_start_revision_in_the_future_matches_etcd(clients: Any, kv: Any,
                                                     reader: shmcache.Reader,
                                                     sub_prefix: bytes) -> None:
    """A start revision beyond the current one: nothing until it, then from it on."""
    rev = put(kv, sub_prefix + b"a", b"0")
    reader.sync()
    pair = clients()
    for cl in pair:
        cl.create(sub_prefix, prefix_end(sub_prefix), start_revision=rev + 3)
    e, p = both_until(pair, n_responses(1))
    assert p == e and e[0]["created"]
    revs = [put(kv, sub_prefix + b"a", b"%d" % i) for i in range(1, 5)]
    e, p = both_until(pair, upto(revs[-1]))
    assert p == e and [r["revision"] for r in e] == revs[2:]


def test_closing_the_service_ends_its_streams(reader: shmcache.Reader, sub_prefix: bytes) -> None:
    """close() ends every open stream (the client's call ends) and its threads."""
    threads = threading.active_count()
    p = Proxy(reader)
    c = Client(p.endpoint)
    try:
        c.create(sub_prefix)
        assert c.next().created
        p.service.close()
        with pytest.raises((grpc.RpcError, queue.Empty)):
            while c.next(timeout=10) is not None:
                pass
        assert p.metrics.snapshot().watch_streams == 0
    finally:
        c.close()
        p.close()
    wait_until(lambda: threading.active_count() <= threads,
               lambda: [t.name for t in threading.enumerate()])


def test_a_client_too_slow_for_the_ring_is_canceled_with_compact_revision(
        proxy: Proxy, kv: Any, reader: shmcache.Reader, sub_prefix: bytes) -> None:
    """A client that stops reading: the proxy queues a bounded amount for it and leaves the
    rest in the ring; once the ring overwrote what the watch had not read, the client gets
    the events it can still have, in order, then canceled with compact_revision (as etcd
    cancels a watcher that fell behind its compaction), not an ever-growing queue."""
    host, port = dial.parse_endpoint(proxy.endpoint)
    ch = dial.open_channel(host, port)
    requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
    call = Stub(ch, "Watch").Watch(iter(requests.get, None), timeout=60)  # (not to hang)
    try:
        requests.put(rpc.WatchRequest(create_request=rpc.WatchCreateRequest(
            key=sub_prefix, range_end=prefix_end(sub_prefix))))
        responses = iter(call)
        assert next(responses).created
        value = b"v" * 50_000
        last = 0
        for i in range(240):  # 12 MB: the 4 MiB ring, gRPC's windows and the backlog
            last = put(kv, sub_prefix + b"%d" % (i % 8), value)
        reader.sync()
        revs = []
        for resp in responses:  # now read
            if resp.canceled:
                break
            revs += [e.kv.mod_revision for e in resp.events]
        assert resp.compact_revision > revs[-1] + 1 and resp.watch_id == 0
        assert revs == list(range(revs[0], revs[0] + len(revs))) and revs[-1] < last
    finally:
        call.cancel()
        requests.put(None)
        ch.close()


# python-etcd3's watcher thread re-opens its stream forever and dies on the closed channel.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_python_etcd3_watches_through_the_proxy_as_against_etcd(
        proxy: Proxy, etcd: EtcdServer, kv: Any, reader: shmcache.Reader,
        sub_prefix: bytes) -> None:
    """python-etcd3's watch_prefix (its own generated protos, its own stream handling) gets
    the same events through the proxy as from etcd, from a past revision and live."""
    first = put(kv, sub_prefix + b"a", b"1")
    txn(kv, [(sub_prefix + b"b", b"2")], [sub_prefix + b"a"])
    reader.sync()
    got = []
    for port in (etcd.port, proxy.port):
        etcd.client().close()  # (sets up what python-etcd3 needs to import)
        import etcd3

        client = etcd3.client(host="127.0.0.1", port=port)
        try:
            events, cancel = client.watch_prefix(sub_prefix, start_revision=first,
                                                 prev_kv=True)
            if port == proxy.port:
                last = put(kv, sub_prefix + b"c", b"3")
            else:
                last = 0
            seen = []
            for ev in events:
                seen.append((type(ev).__name__, ev.key, ev.value, ev.mod_revision,
                             ev.create_revision, ev.version,
                             ev.prev_value if hasattr(ev, "prev_value") else None))
                if len(seen) == 3 + (port == proxy.port):
                    break
            cancel()
            got.append((seen, last))
        finally:
            client.close()
    (theirs, _), (ours, last) = got
    assert ours[:3] == theirs
    assert ours[3][1] == sub_prefix + b"c" and ours[3][3] == last
    assert [t for t, *_ in theirs] == ["PutEvent", "PutEvent", "DeleteEvent"]


def test_watches_created_while_writes_run_get_every_event_once_in_order(
        proxy: Proxy, etcd: EtcdServer, kv: Any, reader: shmcache.Reader,
        sub_prefix: bytes) -> None:
    """Watches made on one stream from past and current revisions while writes run: each
    gets exactly etcd's events from its start revision on (none skipped, repeated or out
    of order), one response per revision once caught up."""
    first = put(kv, sub_prefix + b"k0", b"start")
    stop = threading.Event()
    written: list[int] = []

    def write() -> None:
        i = 0
        while not stop.is_set() and i < 400:
            keys = [sub_prefix + b"k%d" % ((i + j) % 7) for j in range(1 + i % 3)]
            written.append(txn(kv, [(k, b"%d" % i) for k in keys]) if i % 5 else
                           delete(kv, keys[0]))
            i += 1

    c = Client(proxy.endpoint)
    t = threading.Thread(target=write)
    t.start()
    starts: dict[int, int] = {}
    try:
        for wid in range(1, 13):
            wait_until(lambda n=wid: len(written) >= n * 25)
            start = first if wid % 3 == 0 else (written[-1] - wid if wid % 3 == 1 else 0)
            starts[wid] = start
            c.create(sub_prefix, prefix_end(sub_prefix), watch_id=wid, start_revision=start)
        t.join()
        last = written[-1]
        got: dict[int, list[tuple[int, bytes, int]]] = {w: [] for w in starts}
        created: dict[int, int] = {}

        def done(out: list[Any]) -> bool:
            r = out[-1] if out else None
            if r is not None and r.created:
                created[r.watch_id] = r.header.revision
            elif r is not None:
                assert not r.canceled
                got[r.watch_id] += [(e.type, e.kv.key, e.kv.mod_revision) for e in r.events]
                if not starts[r.watch_id]:  # from now: etcd's synced watcher, by revision
                    assert {e.kv.mod_revision for e in r.events} == {r.header.revision}
            return len(created) == len(starts) and all(
                g and g[-1][2] == last for g in got.values())

        c.until(done, timeout=60)
    finally:
        stop.set()
        t.join()
        c.close()
    history = etcd_history(etcd, sub_prefix, first, last)
    for wid, start in starts.items():
        begin = start or created[wid] + 1
        assert got[wid] == [h for h in history if h[2] >= begin], wid


def etcd_history(etcd: EtcdServer, prefix: bytes, since: int,
                 until: int) -> list[tuple[int, bytes, int]]:
    """etcd's own events under ``prefix`` with revisions ``since`` to ``until``, by a watch."""
    c = Client(etcd.endpoint)
    out: list[tuple[int, bytes, int]] = []
    try:
        c.create(prefix, prefix_end(prefix), start_revision=since)

        def done(resps: list[Any]) -> bool:
            if resps and resps[-1].events:
                out.extend((e.type, e.kv.key, e.kv.mod_revision) for e in resps[-1].events)
            return bool(out) and out[-1][2] >= until

        c.until(done)
    finally:
        c.close()
    return out


def test_a_closed_reader_ends_the_streams_unavailable(writer: Any, sub_prefix: bytes) -> None:
    """The proxy's Reader closing under open streams (a shutdown) ends them UNAVAILABLE
    with the Reader's message, as a stopping etcd's end: the client reconnects."""
    r = shmcache.Reader(writer[0].name)
    p = Proxy(r)
    c = Client(p.endpoint)
    try:
        c.create(sub_prefix)
        assert c.next().created
        r.close()
        with pytest.raises(grpc.RpcError) as err:
            while c.next(timeout=15) is not None:
                pass
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "closed" in (err.value.details() or "")
    finally:
        c.close()
        p.close()


@pytest.mark.slow
def test_stream_churn_does_not_grow_memory(proxy: Proxy, kv: Any, reader: shmcache.Reader,
                                           sub_prefix: bytes) -> None:
    """Many clients coming and going (each with 50 watches and some events): the proxy's
    memory levels off (RSS after 1,000 streams within a few MB of after 200)."""
    import psutil

    def cycle(i: int) -> None:
        c = Client(proxy.endpoint)
        for j in range(50):
            c.create(sub_prefix, prefix_end(sub_prefix), prev_kv=j % 2 == 0)
        c.until(n_responses(50))
        if i % 10 == 0:
            put(kv, sub_prefix + b"1", b"x" * 1000)
            c.until(n_responses(50))
        c.close()

    me = psutil.Process()
    for i in range(200):
        cycle(i)
    gc.collect()
    base = me.memory_info().rss
    for i in range(800):
        cycle(i)
    gc.collect()
    grown = me.memory_info().rss - base
    assert grown < 8 * 2**20, f"RSS grew {grown / 2**20:.1f} MB over 800 streams"
    wait_until(lambda: proxy.metrics.snapshot().watches == 0)
