"""The writer against production-like etcd: a 3-member cluster losing a member, TLS with client
certificates, user/password authentication and expiring auth tokens."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest

import shmcache
from shmcache.writer.etcd import connection as _etcd
from shmcache.writer.writer import Writer
from tests.etcdserver import EtcdCluster, EtcdServer, free_port, generate_tls_files
from tests.helpers import WriterProcess, drain, etcd_events, etcd_range, put
from tests.test_service import _scrape, _writer_log


def _connected_member(cluster: EtcdCluster, pid: int, timeout: float = 10.0) -> EtcdServer:
    """The member the process ``pid`` holds an established connection to."""
    ports = {m.port for m in cluster.members}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for c in psutil.Process(pid).net_connections(kind="tcp"):
            if c.status == psutil.CONN_ESTABLISHED and c.raddr and c.raddr.port in ports:
                member = cluster.member_at(c.raddr.port)
                assert member is not None
                return member
        time.sleep(0.05)
    raise AssertionError("the writer holds no connection to any member")


def _put_retrying(client: Any, key: bytes, value: bytes, timeout: float = 30.0) -> int:
    """A put that retries while the cluster elects a new leader ("request timed out").

    A timed-out put may still have been applied: callers compare with etcd's own
    history afterwards, never with what they meant to write.
    """
    import grpc

    deadline = time.monotonic() + timeout
    while True:
        try:
            return put(client, key, value)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_failover_when_the_connected_member_dies(tmp_path: Path, cache_name: str,
                                                unique_prefix: bytes) -> None:
    """Kill the member the writer watches through, mid-stream: it moves to another member and
    resumes from its revision, with no relist; a watch sees exactly etcd's events."""
    p = unique_prefix
    cluster = EtcdCluster(3, data_dir=tmp_path / "cluster").start()
    port = free_port()
    w = WriterProcess(cache_name, ",".join(cluster.endpoints), p,
                      extra=["--metrics", f"127.0.0.1:{port}"])
    stop = threading.Event()
    survivors: list[EtcdServer] = []
    written: list[int] = []

    def load() -> None:
        client = survivors[0].client()
        try:
            i = 0
            while not stop.is_set() and i < 2000:
                written.append(_put_retrying(client, p + b"k%d" % (i % 50), b"v%d" % i))
                i += 1
                time.sleep(0.005)
        finally:
            client.close()

    loader = threading.Thread(target=load)
    try:
        seed = cluster.client()
        put(seed, p + b"before", b"1")
        seed.close()
        w.start()
        victim = _connected_member(cluster, w.pid)
        survivors.extend(m for m in cluster.members if m is not victim)
        r = shmcache.Reader(cache_name)
        since = r.revision
        watch = r.watch(p, since_revision=since)
        loader.start()
        time.sleep(1.0)
        victim.kill()
        t_kill = time.monotonic()
        client = survivors[1].client()
        marker = _put_retrying(client, p + b"marker", b"after-kill")
        t_marker = time.monotonic()
        assert r.wait(marker, timeout=20), _writer_log(w)
        gap = time.monotonic() - t_marker
        time.sleep(1.0)
        stop.set()
        loader.join()
        last = _put_retrying(client, p + b"last", b"1")
        client.close()
        print(f"\nfailover: marker written {t_marker - t_kill:.3f}s after the kill, in the cache "
              f"{gap:.3f}s later; {len(written)} puts during the test")
        got = drain(watch, last, timeout=20)
        want = etcd_events(survivors[0].endpoint, p, since, last)
        assert got == want
        assert len({e.revision for e in got}) == len(got)  # single puts: one event per revision
        res = r.list(p)
        check = survivors[0].client()
        assert res.items == etcd_range(check, p, res.revision)
        check.close()
        assert _connected_member(cluster, w.pid) in survivors
        m = _scrape(port)
        c = f"{{{cache_name}}}"
        assert m["shmcache_relists_total" + c] == 1  # the first list only
        assert m["shmcache_cluster_changes_total" + c] == 0  # another member, the same cluster
        assert m["shmcache_reconnects_total" + c] >= 1
        assert m["shmcache_watch_restarts_total" + c] >= 1
        assert r.status().epoch == 1
        r.close()
    finally:
        stop.set()
        if loader.is_alive():
            loader.join()
        w.close()
        cluster.close()


def test_tls_with_client_certificate_from_config_file(tmp_path: Path, cache_name: str,
                                                      unique_prefix: bytes) -> None:
    """etcd serving TLS and requiring client certificates: the writer connects with the CA,
    certificate and key named in its config file (paths relative to the file)."""
    tls = generate_tls_files(tmp_path / "pki")
    p = unique_prefix
    with EtcdServer(data_dir=tmp_path / "etcd", tls=tls, client_cert_auth=True) as etcd:
        assert etcd.endpoint.startswith("https://")
        client = etcd.client()
        put(client, p + b"a", b"1")
        # Without a client certificate etcd refuses the connection.
        bare = _etcd.Connection(_etcd.EtcdSettings(endpoints=[etcd.endpoint], ca_cert=tls.ca,
                                                   timeout=2))
        with pytest.raises(Exception) as ei:
            bare.connect()
        assert _etcd.is_grpc_error(ei.value)
        bare.close()
        conf = tmp_path / "pki" / "cache.toml"
        conf.write_text(f'endpoints = ["{etcd.endpoint}"]\nprefix = "{p.decode()}"\n'
                        f'ring_size = "1MiB"\nca_file = "ca.pem"\ncert_file = "client.pem"\n'
                        f'key_file = "client-key.pem"\n')
        w = WriterProcess(cache_name, etcd.endpoint, p, extra=["--config", str(conf)])
        # The config file is the only source of the TLS settings.
        w.args = w.args[:5] + ["--config", str(conf)]
        try:
            w.start()
            r = shmcache.Reader(cache_name)
            since = r.revision
            put(client, p + b"b", b"2")
            last = put(client, p + b"a", b"3")
            assert drain(r.watch(p, since_revision=since), last) == etcd_events_tls(
                etcd, p, since, last)
            res = r.list(p)
            assert res.items == etcd_range(client, p, res.revision)
            assert f"connected to etcd 127.0.0.1:{etcd.port}" in _writer_log(w)
            r.close()
        finally:
            client.close()
            w.close()


def etcd_events_tls(etcd: EtcdServer, prefix: bytes, since: int, until: int) -> list[Any]:
    """tests.helpers.etcd_events over TLS (it builds its own connection)."""
    from shmcache.format import layout

    assert etcd.tls is not None
    conn = _etcd.Connection(_etcd.EtcdSettings(endpoints=[etcd.endpoint], ca_cert=etcd.tls.ca,
                                               cert_cert=etcd.tls.client_cert,
                                               cert_key=etcd.tls.client_key))
    conn.connect()
    stream = conn.watch(prefix, layout.prefix_range_end(prefix), since + 1)
    out: list[shmcache.Event] = []
    timer = threading.Timer(15, stream.close)
    timer.start()
    try:
        for resp in stream:
            for ev in resp.events:
                kv = ev.kv
                pk = ev.prev_kv if ev.HasField("prev_kv") else None
                prev = (shmcache.KeyValue(pk.key, pk.value, pk.create_revision, pk.mod_revision,
                                          pk.version, pk.lease) if pk is not None else None)
                k = shmcache.KeyValue(kv.key, kv.value, kv.create_revision, kv.mod_revision,
                                      kv.version, kv.lease)
                out.append(shmcache.Event("PUT" if ev.type == 0 else "DELETE", k, prev,
                                          kv.mod_revision))
            if out and out[-1].revision >= until:
                break
    finally:
        timer.cancel()
        stream.close()
        conn.close()
    return out


def _fresh_put(server: EtcdServer, key: bytes, value: bytes) -> int:
    """A put on a new client: one authenticated earlier may hold an expired token by now."""
    client = server.client()
    try:
        return put(client, key, value)
    finally:
        client.close()


@pytest.fixture
def auth_etcd(tmp_path: Path) -> Any:
    """etcd with authentication on and simple tokens that expire after 2 s without use."""
    server = EtcdServer(data_dir=tmp_path / "etcd",
                        extra_args=["--auth-token", "simple", "--auth-token-ttl", "2"])
    try:
        server.start()
        server.enable_auth("root-pw")
        yield server
    finally:
        server.close()


def test_password_auth_survives_token_expiry_and_restart(
        auth_etcd: EtcdServer, tmp_path: Path, cache_name: str, unique_prefix: bytes) -> None:
    """A read-only user with a password file: the cache keeps serving new events after the
    auth token expired, and after etcd restarted (which forgets every simple token). A
    connection's reads authenticate again by themselves when etcd no longer knows the token."""
    p = unique_prefix
    auth_etcd.add_user("cache-reader", "s3cret", read_prefix=p)
    pw = tmp_path / "password"
    pw.write_text("s3cret\n")
    os.chmod(pw, 0o600)
    _fresh_put(auth_etcd, p + b"a", b"1")
    w = WriterProcess(cache_name, auth_etcd.endpoint, p,
                      extra=["--user", "cache-reader", "--password-file", str(pw)])
    # A connection authenticated now, to show the token really expires in this setup.
    probe = _etcd.Connection(_etcd.EtcdSettings(endpoints=[auth_etcd.endpoint],
                                                user="cache-reader", password="s3cret"))
    try:
        w.start()
        r = shmcache.Reader(cache_name)
        assert r.get(p + b"a").value == b"1"
        probe.connect()
        token = probe.metadata
        since = r.revision
        time.sleep(3.5)  # > --auth-token-ttl: every token unused since then is gone
        expired = _token_refused(probe, token, p)
        assert "invalid auth token" in expired
        probe.current_revision(p, p + b"\xff")  # authenticates again, once
        assert probe.metadata != token
        after_expiry = _fresh_put(auth_etcd, p + b"b", b"2")
        assert r.wait(after_expiry, timeout=10), _writer_log(w)
        token = probe.metadata
        auth_etcd.restart()
        after_restart = _fresh_put(auth_etcd, p + b"c", b"3")
        assert r.wait(after_restart, timeout=20), _writer_log(w)
        assert _revision_when_reachable(probe, p) >= after_restart  # (a new token again)
        assert probe.metadata != token
        got = drain(r.watch(p, since_revision=since), after_restart)
        assert [(e.kv.key, e.kv.value) for e in got] == [(p + b"b", b"2"), (p + b"c", b"3")]
        root = auth_etcd.client()
        assert r.list(p).items == etcd_range(root, p, r.revision)
        root.close()
        r.close()
    finally:
        probe.close()
        w.close()


def _token_refused(conn: _etcd.Connection, token: Any, p: bytes) -> str:
    """What etcd answers a read with ``token`` (the check that the token really expired)."""
    from shmcache.etcdapi import Stub, rpc

    with pytest.raises(grpc.RpcError) as ei:
        Stub(conn.channel, "KV").Range(rpc.RangeRequest(key=p, count_only=True), timeout=5,
                                       metadata=token)
    return _etcd.describe(ei.value)


def _revision_when_reachable(conn: _etcd.Connection, p: bytes) -> int:
    """``conn.current_revision``, asked again while the channel reconnects to a restarted
    etcd (UNAVAILABLE); any other error is raised."""
    deadline = time.monotonic() + 20
    while True:
        try:
            return conn.current_revision(p, p + b"\xff")
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
        time.sleep(0.1)


def test_watch_opened_with_an_expired_token_reconnects(
        auth_etcd: EtcdServer, cache_name: str, unique_prefix: bytes,
        caplog: pytest.LogCaptureFixture) -> None:
    """The token expires between authentication and the watch (a slow list and snapshot):
    etcd cancels the watch ("permission denied"), and the writer re-authenticates on a new
    connection instead of hanging (python-etcd3's own watcher would hang here)."""
    p = unique_prefix
    _fresh_put(auth_etcd, p + b"a", b"1")
    w = Writer(cache_name, [auth_etcd.endpoint], p, ring_size="1MiB", remove_on_close=True,
               user="root", password="root-pw")

    def slow_list(loaded: int, total: int) -> None:
        if loaded >= total and w.stats["relists"] == 0:
            time.sleep(3.0)  # past --auth-token-ttl 2

    w.list_progress = slow_list
    caplog.set_level(logging.INFO, "shmcache.writer")
    t = threading.Thread(target=w.run)
    t.start()
    try:
        assert w.ready.wait(15)
        _fresh_put(auth_etcd, p + b"b", b"2")
        with shmcache.Reader(cache_name, timeout=5) as r:
            # Polled rather than r.wait(revision of the put): etcd 3.5.1 may answer a
            # progress request on the fresh watch with that revision before sending its
            # event (etcd issue 15220); the writer then relists, and the key comes with it.
            deadline = time.monotonic() + 15
            while (kv := r.get(p + b"b")) is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert kv is not None and kv.value == b"2", caplog.text
        assert w.stats["reconnects"] >= 1
        assert "etcd cancelled the watch" in caplog.text and "permission denied" in caplog.text
    finally:
        w.stop()
        t.join(10)
    assert not t.is_alive()


def test_connect_tries_each_endpoint_in_turn(etcd_session: EtcdServer) -> None:
    """One connect() moves past endpoints that do not answer to the next that does (no
    wait for the feed's backoff per dead member), and raises etcd's error when none does."""
    dead = f"http://127.0.0.1:{free_port()}"
    conn = _etcd.Connection(_etcd.EtcdSettings(endpoints=[dead, etcd_session.endpoint],
                                               timeout=5))
    try:
        conn.connect()
        assert conn.endpoint == f"127.0.0.1:{etcd_session.port}" and conn.cluster_id
        assert conn.version.startswith("3.")
    finally:
        conn.close()
    nowhere = _etcd.Connection(_etcd.EtcdSettings(endpoints=[dead, dead], timeout=5))
    with pytest.raises(grpc.RpcError) as ei:
        nowhere.connect()
    assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
    assert nowhere.channel is None and nowhere.metadata == ()
