"""The cache belongs to one etcd cluster: another cluster behind the same endpoint (a restore
or failover onto another cluster, ahead in revision) is a relist into a new epoch, counted;
the same cluster coming back is a resume.

Two real etcd clusters: A, which the writer starts on, and B, another cluster (its own
data, its own cluster id) written further ahead in revision, then started on A's client
port once A is stopped, as a replaced etcd behind an unchanged address would be.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import shmcache
from shmcache.format import layout
from shmcache.writer import verify as _verify
from shmcache.writer.etcd import connection as _etcd
from shmcache.writer.etcd import decode as _watchpb
from shmcache.writer.writer import Writer
from tests.etcdserver import EtcdServer
from tests.helpers import WriterProcess, etcd_current_revision, etcd_range, put

P = b"/c/"


def _cluster_id(server: EtcdServer) -> int:
    from etcd3.etcdrpc import rpc_pb2

    client = server.client()
    try:
        resp = client.maintenancestub.Status(rpc_pb2.StatusRequest(), 10,
                                             metadata=client.metadata)
        return int(resp.header.cluster_id)
    finally:
        client.close()


def _wait(cond: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture
def clusters(tmp_path: Path) -> Iterator[tuple[EtcdServer, EtcdServer]]:
    """(A running with 10 keys under P; B stopped, another cluster 300 revisions ahead)."""
    a = EtcdServer(data_dir=tmp_path / "a", name="cluster-a")
    b = EtcdServer(data_dir=tmp_path / "b", name="cluster-b")
    try:
        b.start()
        client = b.client()
        for i in range(300):
            put(client, P + b"b%03d" % i, b"from B")
        client.close()
        b.stop()
        a.start()
        client = a.client()
        for i in range(10):
            put(client, P + b"a%03d" % i, b"from A")
        client.close()
        assert _cluster_id(a) != 0
        yield a, b
    finally:
        a.close()
        b.close()


def _swap(a: EtcdServer, b: EtcdServer) -> None:
    """Stop A and start B at A's client address (B keeps its own data and peer port)."""
    a.stop()
    b._port = a.port  # (EtcdServer keeps a server's ports across starts: B takes A's)
    b.start()


def _cache_equals(name: str, server: EtcdServer) -> bool:
    client = server.client()
    try:
        want = etcd_range(client, P)
        rev = etcd_current_revision(client)
    finally:
        client.close()
    with shmcache.Reader(name) as r:
        return r.revision >= rev and list(r.list(P)) == want


def test_another_cluster_at_the_same_endpoint_is_a_relist_into_a_new_epoch(
        clusters: tuple[EtcdServer, EtcdServer], cache_name: str) -> None:
    """B (ahead in revision) replaces A at the writer's endpoint: the cache comes to equal B
    in a new epoch, a watch opened before gets CompactedError, the change is counted once
    and Status.cluster_id names B. (It used to splice B's history onto A's state in the
    same epoch: the watch read B's events as a continuation, and check said OK.)"""
    a, b = clusters
    w = Writer(cache_name, [a.endpoint], P, ring_size="1MiB", verify_interval=0,
               remove_on_close=True, backoff_max=0.5)
    t = threading.Thread(target=w.run, daemon=True)
    t.start()
    try:
        assert w.ready.wait(30)
        with shmcache.Reader(cache_name, timeout=5) as r:
            _wait(lambda: _cache_equals(cache_name, a), "the cache to equal A")
            st = r.status()
            a_id = _cluster_id(a)
            watch = r.watch(P, since_revision=r.revision)
            _swap(a, b)
            _wait(lambda: _cache_equals(cache_name, b), "the cache to equal B")
            with pytest.raises(shmcache.CompactedError):
                for _ in range(600):
                    watch.poll(0.05)
            after = r.status()
            assert after.epoch == st.epoch + 1
            assert (st.cluster_id, after.cluster_id) == (a_id, _cluster_id(b))
        assert w.stats["cluster_changes"] == 1
    finally:
        w.stop()
        t.join(15)


def test_a_connection_notices_another_cluster_in_every_header(
        clusters: tuple[EtcdServer, EtcdServer]) -> None:
    """A connection made to A, whose channel reaches B after the swap: a range answer raises
    ClusterChanged, and a watch response carries B's cluster id, not the connection's (the
    feed compares them for every response)."""
    a, b = clusters
    conn = _etcd.Connection(_etcd.EtcdSettings(endpoints=[a.endpoint]))
    try:
        conn.connect()
        assert conn.cluster_id == _cluster_id(a)
        assert conn.cluster_raw == _watchpb.cluster_varint(conn.cluster_id)
        conn.current_revision(P, layout.prefix_range_end(P))
        _swap(a, b)
        deadline = time.monotonic() + 30
        while True:  # (the channel reconnects by itself, after a backoff)
            try:
                conn.current_revision(P, layout.prefix_range_end(P))
            except _etcd.ClusterChanged as exc:
                assert f"{_cluster_id(b):x}" in str(exc)
                break
            except Exception as exc:
                assert _etcd.is_grpc_error(exc), exc
            assert time.monotonic() < deadline, "the connection never reached B"
            time.sleep(0.1)
        stream = conn.watch_decoded(P, layout.prefix_range_end(P), 1)
        try:
            created = next(iter(stream))
        finally:
            stream.close()
        assert _watchpb.cluster_from_varint(created[-1]) == _cluster_id(b)
        assert created[-1] != conn.cluster_raw
    finally:
        conn.close()


def test_the_same_cluster_coming_back_is_a_resume(
        clusters: tuple[EtcdServer, EtcdServer], cache_name: str) -> None:
    """A restarted (the same cluster, the same endpoint): the watch continues in the same
    epoch, nothing is counted."""
    a, _b = clusters
    w = Writer(cache_name, [a.endpoint], P, ring_size="1MiB", verify_interval=0,
               remove_on_close=True, backoff_max=0.5)
    t = threading.Thread(target=w.run, daemon=True)
    t.start()
    try:
        assert w.ready.wait(30)
        with shmcache.Reader(cache_name, timeout=5) as r:
            _wait(lambda: _cache_equals(cache_name, a), "the cache to equal A")
            epoch = r.status().epoch
            watch = r.watch(P, since_revision=r.revision)
            a.restart()
            _wait(lambda: w.stats["watches"] >= 2, "the writer to watch again")
            client = a.client()
            rev = put(client, P + b"after", b"restart")
            client.close()
            got: list[shmcache.Event] = []
            deadline = time.monotonic() + 30
            while not got and time.monotonic() < deadline:
                got = watch.poll(0.2)
            assert [(e.kv.key, e.kv.mod_revision) for e in got] == [(P + b"after", rev)]
            assert r.status().epoch == epoch
        assert w.stats["cluster_changes"] == 0
    finally:
        w.stop()
        t.join(15)


def test_a_writer_restarted_onto_another_cluster_relists(
        clusters: tuple[EtcdServer, EtcdServer], cache_name: str) -> None:
    """The swap while the writer is stopped: the restarted writer does not resume the
    segments A's state left (B is ahead, so the revision check alone let it) but relists."""
    a, b = clusters
    w = WriterProcess(cache_name, a.endpoint, P).start()
    try:
        _wait(lambda: _cache_equals(cache_name, a), "the cache to equal A")
        with shmcache.Reader(cache_name) as r:
            epoch = r.status().epoch
        assert w.terminate() == 0
        _swap(a, b)
        w.start()
        _wait(lambda: _cache_equals(cache_name, b), "the cache to equal B")
        with shmcache.Reader(cache_name) as r:
            assert r.status().epoch == epoch + 1
            assert r.status().cluster_id == _cluster_id(b)
        assert "belongs to cluster" in w.log()
    finally:
        w.close()


def test_the_verifier_does_not_compare_a_cache_with_another_cluster(
        clusters: tuple[EtcdServer, EtcdServer], cache_name: str) -> None:
    """A snapshot loaded from A against a connection to B (the verifier connects again after
    the swap, before the feed has relisted): not a mismatch, which would be logged as
    "verification failed" and counted for nothing (the fault checker's cluster_swap found
    it), but an inconclusive round naming both clusters."""
    a, b = clusters
    w = WriterProcess(cache_name, a.endpoint, P).start()
    try:
        _wait(lambda: _cache_equals(cache_name, a), "the cache to equal A")
        a_id = _cluster_id(a)
        assert w.terminate() == 0  # (the segments stay: A's snapshot)
        _swap(a, b)
        conn = _etcd.Connection(_etcd.EtcdSettings(endpoints=[a.endpoint]))
        try:
            conn.connect()
            with pytest.raises(_verify.Inconclusive,
                               match=f"belongs to cluster {_cluster_id(b):x}, the cache was "
                                     f"loaded from cluster {a_id:x}"):
                _verify.compare_cache(cache_name, conn)
        finally:
            conn.close()
    finally:
        w.close()
