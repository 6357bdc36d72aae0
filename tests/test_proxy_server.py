"""``shmcache proxy`` as a server and a command: SO_REUSEPORT, TLS with client certificates,
the gRPC health service, SIGTERM, metrics, settings and errors, the hand-written encoders."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from shmcache.cli import proxy as proxy_cli
from shmcache.cli import proxy_config
from shmcache.cli.demo_etcd import free_port
from shmcache.etcdapi import Stub, dial, mvcc, rpc
from shmcache.proxy import wire
from shmcache.types import KeyValue
from tests.etcdserver import EtcdServer, generate_tls_files
from tests.helpers import WriterProcess, put, wait_until
from tests.proxyproc import ProxyProcess, etcdctl

pytestmark = pytest.mark.timeout(300)
ROOT = Path(__file__).parent.parent
OPERATIONS_MD = ROOT / "docs" / "operations.md"


def _health(endpoint: str, service: str = "", creds: Any = None) -> Any:
    target = endpoint
    ch = grpc.insecure_channel(target) if creds is None else grpc.secure_channel(target, creds)
    try:
        check = ch.unary_unary("/grpc.health.v1.Health/Check")
        req = b"" if not service else b"\x0a" + bytes([len(service)]) + service.encode()
        return check(req, timeout=10)
    finally:
        ch.close()


@pytest.fixture
def own_writer(etcd_session: EtcdServer, cache_name: str,
               unique_prefix: bytes) -> Iterator[WriterProcess]:
    w = WriterProcess(cache_name, etcd_session.endpoint, unique_prefix)
    try:
        w.start()
        yield w
    finally:
        w.close()


def test_two_proxies_share_one_port(writer: tuple[WriterProcess, bytes],
                                    etcd_session: EtcdServer, etcd_client: Any,
                                    sub_prefix: bytes) -> None:
    """Two proxy processes listen on one port (SO_REUSEPORT); with one stopped the other
    still answers there."""
    put(etcd_client, sub_prefix + b"k", b"v")
    port = free_port()
    with ProxyProcess(writer[0].name, port=port) as a, ProxyProcess(writer[0].name,
                                                                   port=port) as b:
        assert a.port == b.port == port
        assert etcdctl(a.endpoint, "get", (sub_prefix + b"k").decode(),
                       "--print-value-only").stdout == "v\n"
        assert a.terminate() == 0
        for _ in range(5):  # new connections, all to the one left
            assert etcdctl(b.endpoint, "get", (sub_prefix + b"k").decode(),
                           "--print-value-only").stdout == "v\n"


def test_tls_with_client_certificates(writer: tuple[WriterProcess, bytes], tmp_path: Path,
                                      etcd_client: Any, sub_prefix: bytes) -> None:
    """With a certificate and a client CA the proxy speaks TLS only and requires a client
    certificate signed by that CA."""
    tls = generate_tls_files(tmp_path / "tls")
    put(etcd_client, sub_prefix + b"t", b"secret")
    key = (sub_prefix + b"t").decode()
    with ProxyProcess(writer[0].name, extra=[
            "--listen-cert-file", tls.server_cert, "--listen-key-file", tls.server_key,
            "--listen-client-ca-file", tls.ca]) as p:
        url = f"https://127.0.0.1:{p.port}"
        assert etcdctl(url, "get", key, "--print-value-only", tls=tls).stdout == "secret\n"
        # (Short timeouts: a refused handshake is retried until etcdctl's deadlines.)
        fast = ("--dial-timeout=1s", "--command-timeout=2s")
        no_cert = etcdctl(url, "get", key, *fast, tls=tls, client_cert=False, check=False)
        assert no_cert.returncode != 0
        plain = etcdctl(f"http://127.0.0.1:{p.port}", "get", key, *fast, check=False)
        assert plain.returncode != 0
        with open(tls.ca, "rb") as f:
            ca = f.read()
        with open(tls.client_key, "rb") as f:
            ckey = f.read()
        with open(tls.client_cert, "rb") as f:
            ccert = f.read()
        creds = grpc.ssl_channel_credentials(ca, ckey, ccert)
        assert _health(f"127.0.0.1:{p.port}", creds=creds) == b"\x08\x01"


def test_health_follows_the_writer(own_writer: WriterProcess) -> None:
    """Health/Check says SERVING for "" and etcd's services while the cache's writer lives,
    NOT_SERVING once it is gone; an unknown service is NOT_FOUND."""
    with ProxyProcess(own_writer.name) as p:
        assert _health(p.endpoint) == wire.encode_health_response(wire.HEALTH_SERVING)
        assert _health(p.endpoint, "etcdserverpb.KV") == b"\x08\x01"
        with pytest.raises(grpc.RpcError) as exc:
            _health(p.endpoint, "no.such.Service")
        assert exc.value.code() == grpc.StatusCode.NOT_FOUND
        own_writer.kill()
        wait_until(lambda: _health(p.endpoint) == b"\x08\x02")
        # Without a writer: serializable reads answer at the last revision, linearizable
        # ones cannot be confirmed (and there is no etcd to forward them to).
        kv = Stub(dial.open_channel("127.0.0.1", p.port), "KV")
        prefix = own_writer.args[own_writer.args.index("--prefix") + 1].encode()
        assert kv.Range(rpc.RangeRequest(key=prefix, serializable=True), timeout=10).count == 0
        with pytest.raises(grpc.RpcError) as exc:
            kv.Range(rpc.RangeRequest(key=prefix), timeout=10)
        assert (exc.value.code(), exc.value.details()) == (
            grpc.StatusCode.UNAVAILABLE, "etcdserver: request timed out")


def test_sigterm_stops_cleanly(writer: tuple[WriterProcess, bytes]) -> None:
    """SIGTERM: exit 0 with "stopped" logged; the port is free again (the session fixture
    checks that no segment or child is left)."""
    p = ProxyProcess(writer[0].name).start()
    try:
        port = p.port
        assert p.terminate() == 0
        assert "stopped" in p.log()
        with ProxyProcess(writer[0].name, port=port, extra=[]) as again:
            assert again.port == port
    finally:
        p.close()


def test_metrics_count_served_and_forwarded(writer: tuple[WriterProcess, bytes],
                                            etcd_session: EtcdServer,
                                            sub_prefix: bytes) -> None:
    """--metrics exports requests by service, method, code and how (served, forwarded)."""
    with ProxyProcess(writer[0].name, etcd_session.endpoint,
                      extra=["--metrics", "127.0.0.1:0"]) as p:
        etcdctl(p.endpoint, "put", (sub_prefix + b"m").decode(), "1")
        etcdctl(p.endpoint, "get", (sub_prefix + b"m").decode())
        etcdctl(p.endpoint, "get", "/outside-the-prefix")
        m = re.search(r"metrics at http://127.0.0.1:(\d+)/metrics", p.log())
        assert m, p.log()
        text = urllib.request.urlopen(f"http://127.0.0.1:{m.group(1)}/metrics",
                                      timeout=10).read().decode()
    cache = writer[0].name
    for how, method in (("served", "Range"), ("forwarded", "Put"), ("forwarded", "Range")):
        assert re.search(rf'shmcache_proxy_requests_total{{cache="{cache}",code="OK",'
                         rf'how="{how}",method="{method}",service="KV"}} 1\.0', text), text
    assert "shmcache_proxy_watch_streams" in text and "shmcache_proxy_revision" in text


# -- the command ----------------------------------------------------------------------------------

def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run([sys.executable, "-m", "shmcache", "proxy", *args],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize(("args", "message"), [
    (["c"], "listen is not set"),
    (["c", "--listen", "nowhere"], "listen = 'nowhere' (from flag --listen): listen address"),
    (["no-such-cache-x", "--listen", "127.0.0.1:0"], "proxy: no shmcache named 'no-such-cache-x'"),
    (["c", "--listen", "127.0.0.1:0", "--listen-cert-file", "/etc/hostname"],
     "needs listen_key_file"),
    (["c", "--listen", "127.0.0.1:0", "--workers", "0"], "workers = '0'"),
    (["c", "--listen", "127.0.0.1:0", "--endpoints", "https://127.0.0.1:1,http://127.0.0.1:2"],
     "mixes http:// and https://"),
    (["c", "--listen", "127.0.0.1:0", "--ca-file", "/etc/hostname"],
     "ca_file = '/etc/hostname' (from flag --ca-file): is for etcd's https:// endpoints"),
])
def test_errors_are_one_line_exit_2(args: list[str], message: str) -> None:
    res = _run(*args)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("shmcache proxy: ") and message in lines[0], \
        res.stderr


def test_settings_from_environment_and_file(tmp_path: Path) -> None:
    """--check-config: flags > SHMCACHE_* > TOML file, each with its source."""
    cfg = tmp_path / "proxy.toml"
    cfg.write_text('listen = "127.0.0.1:2379"\nworkers = 8\nendpoints = ["http://10.0.0.1:2379"]\n')
    res = _run("c", "--config", str(cfg), "--check-config", "--workers", "9",
               env={"SHMCACHE_ENDPOINTS": "http://127.0.0.1:2379"})
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "listen = '127.0.0.1:2379'  (config file" in out
    assert "workers = 9  (flag --workers)" in out
    assert "endpoints = ['http://127.0.0.1:2379']  (environment SHMCACHE_ENDPOINTS)" in out
    bad = tmp_path / "bad.toml"
    bad.write_text('listen = "127.0.0.1:1"\nring_size = "1MiB"\n')
    res = _run("c", "--config", str(bad))
    assert res.returncode == 2 and "unknown setting 'ring_size'" in res.stderr


def test_cannot_listen_is_one_line(writer: tuple[WriterProcess, bytes]) -> None:
    """An address that is not this host's: exit 2, one line."""
    res = _run(writer[0].name, "--listen", "192.0.2.1:1")
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and "cannot listen" in res.stderr, res.stderr


# -- docs and the encoders --------------------------------------------------------------------------

def test_operations_md_lists_the_proxy_settings_and_metrics() -> None:
    text = OPERATIONS_MD.read_text()
    section = text[text.index("## Serve etcd clients from the cache"):]
    for name in proxy_config.PROXY_SETTINGS:
        assert re.search(rf"^\| [^|]*`{name}`[^|]* \|", section, re.M), name
    for name, _kind, _help in proxy_cli.PROXY_METRICS:
        assert f"`{name}`" in section, name


def test_range_response_encoder_is_protobufs() -> None:
    """wire.encode_range_response parses back, with protobuf, to the message meant."""
    kvs = [KeyValue(b"/a", b"", 1, 2, 1, 0), KeyValue(b"/b" * 100, b"v" * 300, 2**40, 2**40 + 5,
                                                      7, 2**62 + 3),
           KeyValue(b"/c", b"x", 3, 3, 1, -1 & (2**63 - 1)), KeyValue(b"/d", b"y", 0, 5, 0, 0)]
    for keys_only in (False, True):
        for more, count in ((False, 0), (True, 3), (False, 2**33)):
            header = wire.header_bytes(2**63 + 17, 0, 99, 0)
            got = rpc.RangeResponse.FromString(wire.encode_range_response(
                header, kvs, more, count, keys_only))
            want = rpc.RangeResponse(
                header=rpc.ResponseHeader(cluster_id=2**63 + 17, revision=99), more=more,
                count=count, kvs=[mvcc.KeyValue(key=k.key, value=b"" if keys_only else k.value,
                                                create_revision=k.create_revision,
                                                mod_revision=k.mod_revision,
                                                version=k.version, lease=k.lease) for k in kvs])
            assert got == want


def test_health_request_decoder() -> None:
    assert wire.decode_health_request(b"") == ""
    assert wire.decode_health_request(b"\x0a\x03abc\x10\x05") == "abc"
    with pytest.raises(ValueError):
        wire.decode_health_request(b"\x0a\x09abc")


def test_forwarded_lease_and_cluster(writer: tuple[WriterProcess, bytes],
                                     etcd_session: EtcdServer, sub_prefix: bytes) -> None:
    """Lease grant, keep-alive (a stream) and revoke, and Cluster.MemberList go to etcd; a
    read after the revoke no longer sees the lease's key."""
    with ProxyProcess(writer[0].name, etcd_session.endpoint) as p:
        ch = dial.open_channel("127.0.0.1", p.port)
        try:
            lease, kv = Stub(ch, "Lease"), Stub(ch, "KV")
            lid = lease.LeaseGrant(rpc.LeaseGrantRequest(TTL=60), timeout=10).ID
            kv.Put(rpc.PutRequest(key=sub_prefix + b"l", value=b"1", lease=lid), timeout=10)
            beats = list(lease.LeaseKeepAlive(iter([rpc.LeaseKeepAliveRequest(ID=lid)]),
                                              timeout=10))
            assert beats and beats[0].ID == lid and beats[0].TTL > 0
            lease.LeaseRevoke(rpc.LeaseRevokeRequest(ID=lid), timeout=10)
            got = kv.Range(rpc.RangeRequest(key=sub_prefix + b"l", serializable=True),
                           timeout=10)
            assert list(got.kvs) == []
            members = Stub(ch, "Cluster").MemberList(rpc.MemberListRequest(), timeout=10)
            assert len(members.members) == 1
        finally:
            ch.close()


def test_examples_run_the_proxy_with_valid_settings(tmp_path: Path) -> None:
    """The proxy commands of examples/ (Kubernetes, compose, the systemd unit's TOML file)
    pass ``shmcache proxy --check-config``; files mounted from Secrets are stand-ins."""
    import yaml

    commands = []
    for doc in yaml.safe_load_all((ROOT / "examples/kubernetes/pod-sidecar.yaml").read_text()):
        commands += [c["command"] for c in doc["spec"]["containers"]
                     if c.get("command", [])[:2] == ["shmcache", "proxy"]]
    compose = yaml.safe_load((ROOT / "examples/compose/compose.yaml").read_text())
    commands.append(compose["services"]["shmcache-proxy"]["command"])
    assert len(commands) == 2
    for command in commands:
        args = []
        for a in command[2:]:
            if a.startswith("/etc/etcd-ca/"):
                (tmp_path / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
                a = str(tmp_path / "ca.crt")
            args.append(a)
        res = _run(*args, "--check-config")
        assert res.returncode == 0, (command, res.stderr)
    toml = tmp_path / "mycache-proxy.toml"
    toml.write_text((ROOT / "examples/systemd/mycache-proxy.toml").read_text())
    (tmp_path / "etcd-ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    res = _run("mycache", "--config", str(toml), "--check-config")
    assert res.returncode == 0, res.stderr
    unit = (ROOT / "examples/systemd/shmcache-proxy@.service").read_text()
    assert "ExecStart=/usr/bin/shmcache proxy %i --config /etc/shmcache/%i-proxy.toml" in unit


@pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("lmdb", "matplotlib", "tqdm")),
    reason="needs the bench extra (pip install -e '.[bench]'), as tests/test_bench_smoke.py")
def test_proxy_benchmark_smoke(tmp_path: Path) -> None:
    """``bench/proxy_range.py --smoke`` runs every target and case at toy sizes."""
    import json

    out = tmp_path / "proxy_range.json"
    res = subprocess.run([sys.executable, "bench/proxy_range.py", "--smoke", "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    medians = json.loads(out.read_text())["medians"]
    assert set(medians) == {"etcd", "etcd grpc-proxy", "shmcache proxy"}
    assert all(m["errors"] == 0 and m["ops_per_s"] > 0 for cases in medians.values()
               for m in cases.values())


def test_snapshot_streams_through(writer: tuple[WriterProcess, bytes], etcd_session: EtcdServer,
                                  tmp_path: Path) -> None:
    """etcdctl snapshot save through the proxy: Maintenance.Snapshot, a server stream,
    forwarded message by message."""
    with ProxyProcess(writer[0].name, etcd_session.endpoint) as p:
        out = tmp_path / "snap.db"
        etcdctl(p.endpoint, "snapshot", "save", str(out))
        assert out.stat().st_size > 4096


def test_forwarding_to_etcd_over_tls(tmp_path: Path, cache_name: str,
                                     unique_prefix: bytes) -> None:
    """etcd serving TLS with client certificates: the proxy forwards with --ca-file,
    --cert-file and --key-file (etcdctl's --cacert, --cert, --key work too)."""
    tls = generate_tls_files(tmp_path / "pki")
    flags = ["--ca-file", tls.ca, "--cert-file", tls.client_cert, "--key-file",
             tls.client_key]
    with EtcdServer(data_dir=tmp_path / "etcd", tls=tls, client_cert_auth=True) as etcd:
        w = WriterProcess(cache_name, etcd.endpoint, unique_prefix, extra=flags)
        try:
            w.start()
            with ProxyProcess(cache_name, etcd.endpoint, extra=[
                    "--cacert", tls.ca, "--cert", tls.client_cert, "--key",
                    tls.client_key]) as p:
                key = (unique_prefix + b"k").decode()
                etcdctl(p.endpoint, "put", key, "over-tls")
                assert etcdctl(p.endpoint, "get", key, "--print-value-only").stdout == \
                    "over-tls\n"
                assert etcdctl(etcd.endpoint, "get", key, "--print-value-only",
                               tls=tls).stdout == "over-tls\n"
        finally:
            w.close()


def test_serves_across_a_writer_restart(own_writer: WriterProcess,
                                        etcd_session: EtcdServer) -> None:
    """The proxy's Reader follows a restarted writer: reads after the restart see writes
    made since, without restarting the proxy (which has no etcd to forward to: served)."""
    prefix = own_writer.args[own_writer.args.index("--prefix") + 1]
    with ProxyProcess(own_writer.name) as p:
        etcdctl(etcd_session.endpoint, "put", prefix + "a", "1")
        assert etcdctl(p.endpoint, "get", prefix + "a", "--print-value-only").stdout == "1\n"
        own_writer.kill()
        own_writer.start()
        etcdctl(etcd_session.endpoint, "put", prefix + "a", "2")
        assert etcdctl(p.endpoint, "get", prefix + "a", "--print-value-only").stdout == "2\n"
        wait_until(lambda: _health(p.endpoint) == b"\x08\x01")
