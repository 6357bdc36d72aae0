"""The proxy's Watch service against real etcd: the same responses, field by field, from the cache.

One etcd and one writer for the module, etcd started with a 1 s progress
interval and a small --max-request-bytes so that the proxy, configured alike,
can be compared with it on progress_notify and fragment. Each test writes under
its own sub-prefix and opens the same watch on etcd and on the proxy.
"""

from __future__ import annotations

import os
import queue
import secrets
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

import shmcache
from shmcache.cli.demo_etcd import find_etcd_binary
from shmcache.etcdapi import Stub, dial, mvcc, rpc
from shmcache.proxy.metrics import ProxyMetrics
from shmcache.proxy.watch import WatchService
from tests.etcdserver import EtcdServer
from tests.helpers import WriterProcess

PROGRESS = 1.0
MAX_REQUEST = 64 * 1024


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    server = EtcdServer(data_dir=tmp_path_factory.mktemp("etcd-watch"), extra_args=[
        f"--experimental-watch-progress-notify-interval={PROGRESS:g}s",
        f"--max-request-bytes={MAX_REQUEST}"])
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def writer(etcd: EtcdServer) -> Iterator[tuple[WriterProcess, bytes]]:
    name = f"t-{secrets.token_hex(4)}"
    prefix = b"/t/" + secrets.token_hex(8).encode() + b"/"
    w = WriterProcess(name, etcd.endpoint, prefix)
    try:
        w.start()
        yield w, prefix
    finally:
        w.close()


class Proxy:
    """A gRPC server with the WatchService on the module's Reader."""

    def __init__(self, reader: shmcache.Reader, **kw: Any) -> None:
        self.metrics = ProxyMetrics()
        self.service = WatchService(reader, self.metrics, None, **kw)
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=64),
                                  options=[("grpc.so_reuseport", 0)])
        self.server.add_generic_rpc_handlers((self.service.handler(),))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.service.close()
        self.server.stop(None).wait(10)


@pytest.fixture
def proxy(reader: shmcache.Reader) -> Iterator[Proxy]:
    p = Proxy(reader, progress_interval=PROGRESS, max_request_bytes=MAX_REQUEST)
    try:
        yield p
    finally:
        p.close()


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


def n_responses(n: int) -> Callable[[list[Any]], bool]:
    return lambda out: len(out) >= n


# -- tests -------------------------------------------------------------------------------------


def test_prefix_watch_from_now_matches_etcd(clients: Any, kv: Any, reader: shmcache.Reader,
                                            sub_prefix: bytes) -> None:
    """A prefix watch from now: created, then one response per revision, same as etcd's."""
    pair = clients()
    end = sub_prefix[:-1] + bytes([sub_prefix[-1] + 1])
    for c in pair:
        c.create(sub_prefix, end, prev_kv=True)
    e, p = both_until(pair, n_responses(1))
    assert e[0]["created"] and p[0]["created"]
    put(kv, sub_prefix + b"a", b"1")
    put(kv, sub_prefix + b"a", b"2")
    txn(kv, [(sub_prefix + b"b", b"x"), (sub_prefix + b"c", b"y")])
    last = delete(kv, sub_prefix, end)
    e, p = both_until(pair, upto(last))
    assert p == e
    assert len(e) == 4
