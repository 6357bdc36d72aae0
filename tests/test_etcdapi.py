"""shmcache.etcdapi: etcd's v3 API from etcd's own descriptors, in a private pool, against real etcd."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import grpc
import pytest

from shmcache.etcdapi import ETCD_VERSION, Stub, method_path, mvcc, rpc, service_handler
from tests.etcdserver import EtcdServer


def test_round_trip_against_real_etcd(etcd_session: EtcdServer, unique_prefix: bytes) -> None:
    with grpc.insecure_channel(etcd_session.endpoint.removeprefix("http://")) as ch:
        kv = Stub(ch, "KV")
        put = kv.Put(rpc.PutRequest(key=unique_prefix + b"a", value=b"1"), timeout=10)
        resp = kv.Range(rpc.RangeRequest(key=unique_prefix, range_end=unique_prefix + b"\xff",
                                         sort_order=rpc.RangeRequest.DESCEND,
                                         sort_target=rpc.RangeRequest.KEY), timeout=10)
        assert [(x.key, x.value, x.mod_revision) for x in resp.kvs] == [
            (unique_prefix + b"a", b"1", put.header.revision)]
        status = Stub(ch, "Maintenance").Status(rpc.StatusRequest(), timeout=10)
        assert status.header.cluster_id != 0 and status.version.startswith("3.")
        # A streaming method: the watch stream's created response and the put's event.
        calls = iter([rpc.WatchRequest(create_request=rpc.WatchCreateRequest(
            key=unique_prefix + b"a", start_revision=put.header.revision))])
        stream = Stub(ch, "Watch").Watch(calls, timeout=10)
        msgs = []
        for m in stream:
            msgs.append(m)
            if m.events:
                break
        stream.cancel()
        assert msgs[0].created
        assert [(e.type, e.kv.key) for e in msgs[-1].events] == [(mvcc.Event.PUT,
                                                                 unique_prefix + b"a")]


def test_unknown_names_are_clear_errors() -> None:
    with pytest.raises(AttributeError, match="etcdserverpb has no message 'Nope'"):
        rpc.Nope  # noqa: B018
    with pytest.raises(ValueError, match="etcd has no service 'Nope'"):
        Stub(None, "Nope")
    assert method_path("KV", "Range") == "/etcdserverpb.KV/Range"
    assert ETCD_VERSION.startswith("v3.5.")


def test_serves_etcd_methods_to_a_grpc_client() -> None:
    def status(request: Any, context: Any) -> Any:
        return rpc.StatusResponse(version="3.5.x-test", dbSize=7)

    server = grpc.server(__import__("concurrent.futures").futures.ThreadPoolExecutor(2))
    server.add_generic_rpc_handlers((service_handler("Maintenance", {"Status": status}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            m = Stub(ch, "Maintenance")
            assert m.Status(rpc.StatusRequest(), timeout=10).dbSize == 7
            with pytest.raises(grpc.RpcError) as err:
                m.Defragment(rpc.DefragmentRequest(), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        server.stop(None)


def test_lives_beside_another_etcd_client_in_one_process() -> None:
    # python-etcd3 registers etcd's names in protobuf's global pool; ours are
    # private, so importing both, in either order, works.
    code = ("import os; os.environ.setdefault('PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION', 'python');"
            "{a}; {b}; from shmcache.etcdapi import rpc; from etcd3.etcdrpc import rpc_pb2;"
            "assert rpc.RangeRequest(key=b'x').SerializeToString() =="
            " rpc_pb2.RangeRequest(key=b'x').SerializeToString(); print('ok')")
    for a, b in (("import etcd3", "import shmcache.etcdapi"),
                 ("import shmcache.etcdapi", "import etcd3")):
        out = subprocess.run([sys.executable, "-c", code.format(a=a, b=b)], capture_output=True,
                             text=True, timeout=60)
        assert out.stdout.strip() == "ok", out.stderr


def test_parse_endpoint() -> None:
    from shmcache.etcdapi.dial import parse_endpoint

    assert parse_endpoint("http://127.0.0.1:2379") == ("127.0.0.1", 2379)
    assert parse_endpoint("https://etcd.example:4001") == ("etcd.example", 4001)
    assert parse_endpoint("10.0.0.1") == ("10.0.0.1", 2379)
    with pytest.raises(ValueError, match="has no host"):
        parse_endpoint("http://:2379")
    with pytest.raises(ValueError, match="has a bad port"):
        parse_endpoint("http://h:99999")


def test_dial_with_tls_and_authentication(tmp_path: Any) -> None:
    from shmcache.etcdapi.dial import authenticate, open_channel
    from tests.etcdserver import generate_tls_files

    tls = generate_tls_files(tmp_path / "tls")
    server = EtcdServer(str(tmp_path / "data"), tls=tls)
    server.start()
    try:
        server.enable_auth()
        ch = open_channel(server.host, server.port, ca_cert=tls.ca, cert_key=tls.client_key,
                          cert_cert=tls.client_cert)
        with ch:
            md = authenticate(ch, "root", "root", timeout=10)
            kv = Stub(ch, "KV")
            kv.Put(rpc.PutRequest(key=b"tls-key", value=b"v"), timeout=10, metadata=md)
            got = kv.Range(rpc.RangeRequest(key=b"tls-key"), timeout=10, metadata=md)
            assert [x.value for x in got.kvs] == [b"v"]
            with pytest.raises(grpc.RpcError) as err:
                authenticate(ch, "root", "wrong", timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        server.close()
