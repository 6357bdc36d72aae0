"""``shmcache proxy``'s KV service against real etcd: etcdctl, python-etcd3 and raw RangeRequests
through a proxy process answer what etcd answers; writes, out-of-prefix ranges and revisions
the cache does not hold go to etcd, or end with etcd's own statuses without ``--endpoints``."""

from __future__ import annotations

import random
import secrets
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

import shmcache
from shmcache.etcdapi import Stub, dial, rpc
from shmcache.format import layout
from tests.etcdserver import EtcdServer
from tests.helpers import WriterProcess, put
from tests.proxyproc import ProxyProcess, etcdctl, etcdctl_json, without_member

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def proxy(writer: tuple[WriterProcess, bytes], etcd_session: EtcdServer) -> Iterator[ProxyProcess]:
    """A proxy process for the module writer's cache, forwarding to the session etcd."""
    with ProxyProcess(writer[0].name, etcd_session.endpoint) as p:
        yield p


@pytest.fixture(scope="module")
def ro_proxy(writer: tuple[WriterProcess, bytes]) -> Iterator[ProxyProcess]:
    """A proxy process for the same cache without --endpoints: it can only serve."""
    with ProxyProcess(writer[0].name) as p:
        yield p


def _kv(endpoint: str) -> Any:
    return Stub(dial.open_channel(*dial.parse_endpoint(endpoint)), "KV")


def _load(client: Any, prefix: bytes, n: int, seed: int) -> list[bytes]:
    """``n`` keys under ``prefix`` with varied create/mod revisions, versions, values and a
    lease on some; a few deleted again."""
    rnd = random.Random(seed)
    keys = [prefix + f"k{i:03d}".encode() for i in range(n)]
    lease = client.lease(600)
    for k in keys:
        put(client, k, rnd.choice([b"a", b"bb", b"zz", b"m" * 20]), lease if rnd.random() < 0.2
            else None)
    for _ in range(n):
        put(client, rnd.choice(keys), rnd.choice([b"a", b"q", b"zz"]))
    for k in rnd.sample(keys, n // 6):
        client.delete(k)
    return keys


def _wait_cache(name: str, client: Any) -> None:
    from tests.helpers import etcd_current_revision

    with shmcache.Reader(name) as r:
        assert r.wait(etcd_current_revision(client), timeout=15)


# -- etcdctl and python-etcd3 ---------------------------------------------------------------------

GET_FORMS = [
    ["--prefix"],
    ["--prefix", "--limit", "3"],
    ["--prefix", "--keys-only"],
    ["--prefix", "--sort-by", "MODIFY", "--order", "DESCEND"],
    ["--prefix", "--sort-by", "CREATE"],
    ["--prefix", "--sort-by", "CREATE", "--order", "DESCEND", "--limit", "4"],
    ["--prefix", "--sort-by", "KEY", "--order", "DESCEND", "--keys-only"],
    ["--prefix", "--order", "DESCEND", "--limit", "2"],
    ["--prefix", "--consistency", "s"],
]


def test_etcdctl_get_matches_etcd(proxy: ProxyProcess, etcd_session: EtcdServer,
                                  etcd_client: Any, sub_prefix: bytes,
                                  writer: tuple[WriterProcess, bytes]) -> None:
    """etcdctl get (--prefix, --rev, --limit, --keys-only, --count-only, --sort-by/--order,
    a single key) prints through the proxy what it prints against etcd, header included but
    for member_id and raft_term."""
    keys = _load(etcd_client, sub_prefix, 12, seed=1)
    _wait_cache(writer[0].name, etcd_client)
    mid_rev = put(etcd_client, keys[0], b"later") - 3
    put(etcd_client, keys[1], b"later too")
    p = sub_prefix.decode()
    forms = [[p, *f] for f in GET_FORMS] + [[p, "--prefix", "--rev", str(mid_rev)],
                                             [p, "--prefix", "--rev", str(mid_rev), "--limit", "2"],
                                             [keys[0].decode()], [keys[0].decode(), "--rev",
                                                                  str(mid_rev)],
                                             [p + "k003", p + "k009"]]
    for args in forms:
        want = without_member(etcdctl_json(etcd_session.endpoint, "get", *args))
        got = without_member(etcdctl_json(proxy.endpoint, "get", *args))
        assert got == want, args
    # --count-only prints with -w fields only: every field but the member's.
    def fields(endpoint: str) -> list[str]:
        out = etcdctl(endpoint, "get", p, "--prefix", "--count-only", "-w", "fields").stdout
        return [line for line in out.splitlines()
                if not line.startswith(('"MemberID"', '"RaftTerm"'))]
    counted = fields(proxy.endpoint)
    assert counted == fields(etcd_session.endpoint)
    n = len(etcdctl_json(etcd_session.endpoint, "get", p, "--prefix")["kvs"])
    assert f'"Count" : {n}' in counted and n > 5
    # Sorted by a target with equal values (versions, values): etcd's order among the
    # equal ones is unspecified (Go's unstable sort), so the sort values must agree, and
    # the keys of each value.
    for target in ("VERSION", "VALUE"):
        args = [p, "--prefix", "--sort-by", target, "--order", "DESCEND"]
        want, got = (etcdctl_json(e, "get", *args)["kvs"] for e in (etcd_session.endpoint,
                                                                    proxy.endpoint))
        field = "version" if target == "VERSION" else "value"
        assert [kv[field] for kv in got] == [kv[field] for kv in want]
        assert sorted(map(str, got)) == sorted(map(str, want))


def test_etcdctl_put_del_and_endpoint_status(proxy: ProxyProcess, etcd_session: EtcdServer,
                                             etcd_client: Any, sub_prefix: bytes) -> None:
    """put and del through the proxy reach etcd (a read right after sees them); endpoint
    status is etcd's."""
    key = (sub_prefix + b"x").decode()
    out = etcdctl_json(proxy.endpoint, "put", key, "v1")
    assert etcdctl(proxy.endpoint, "get", key, "--print-value-only").stdout == "v1\n"
    assert etcd_client.get(key)[0] == b"v1"
    assert out["header"]["revision"] == etcd_client.get(key)[1].mod_revision
    deleted = etcdctl_json(proxy.endpoint, "del", key)
    assert deleted["deleted"] == 1
    assert etcdctl_json(proxy.endpoint, "get", key).get("kvs") is None
    want = etcdctl_json(etcd_session.endpoint, "endpoint", "status")[0]["Status"]
    got = etcdctl_json(proxy.endpoint, "endpoint", "status")[0]["Status"]
    for field in ("version", "leader"):
        assert got[field] == want[field]
    assert got["header"]["cluster_id"] == want["header"]["cluster_id"]


def test_python_etcd3_through_the_proxy(proxy: ProxyProcess, etcd_session: EtcdServer,
                                        etcd_client: Any, sub_prefix: bytes) -> None:
    """python-etcd3 (get, get_prefix, put, delete) works against the proxy unchanged."""
    import etcd3  # (etcd_client imported it the way protobuf needs)

    client = etcd3.client(host="127.0.0.1", port=proxy.port)
    try:
        for i in range(5):
            client.put(sub_prefix + b"p%d" % i, b"v%d" % i)
        value, meta = client.get(sub_prefix + b"p3")
        assert value == b"v3"
        want = [(v, m.key, m.mod_revision, m.version)
                for v, m in etcd_client.get_prefix(sub_prefix)]
        got = [(v, m.key, m.mod_revision, m.version) for v, m in client.get_prefix(sub_prefix)]
        assert got == want and len(got) == 5
        assert client.delete(sub_prefix + b"p0")
        assert client.get(sub_prefix + b"p0") == (None, None)
        assert etcd_client.get(sub_prefix + b"p0") == (None, None)
    finally:
        client.close()


# -- Range field by field ------------------------------------------------------------------------

def _random_request(rnd: random.Random, keys: list[bytes], prefix: bytes, lo: int,
                    hi: int) -> Any:
    key = rnd.choice([*keys, prefix])
    end = rnd.choice([b"", layout.prefix_range_end(prefix), rnd.choice(keys), key + b"\0",
                      prefix])
    def rev() -> int:
        return rnd.choice([0, rnd.randint(lo, hi)])
    return rpc.RangeRequest(
        key=key, range_end=end, limit=rnd.choice([0, 0, 1, 2, 5, 30, -1]),
        revision=rnd.choice([0, 0, rnd.randint(lo, hi)]),
        sort_order=rnd.randint(0, 2), sort_target=rnd.randint(0, 4),
        serializable=rnd.random() < 0.5, keys_only=rnd.random() < 0.3,
        count_only=rnd.random() < 0.15, min_mod_revision=rev(), max_mod_revision=rev(),
        min_create_revision=rev(), max_create_revision=rev())


_TARGET = {0: "key", 1: "version", 2: "create_revision", 3: "mod_revision", 4: "value"}


def _same_answer(req: Any, want: Any, got: Any, whole: Any) -> None:
    """``got`` is etcd's answer ``want`` but for the order among items with equal sort values,
    which etcd leaves unspecified (``whole``: etcd's answer without a limit)."""
    assert (got.header.revision, got.header.cluster_id, got.count, got.more) == \
        (want.header.revision, want.header.cluster_id, want.count, want.more), req
    w, g = list(want.kvs), list(got.kvs)
    if req.sort_target == 0:
        assert g == w, req
        return
    field = _TARGET[req.sort_target]
    assert [getattr(kv, field) for kv in g] == [getattr(kv, field) for kv in w], req
    if req.keys_only:
        return  # (values are not there to tell equal versions apart)
    pool = {kv.SerializeToString() for kv in whole.kvs}
    assert all(kv.SerializeToString() in pool for kv in g), req
    assert len({kv.key for kv in g}) == len(g), req


def test_range_fuzz_matches_etcd(ro_proxy: ProxyProcess, etcd_session: EtcdServer,
                                 etcd_client: Any, sub_prefix: bytes,
                                 writer: tuple[WriterProcess, bytes]) -> None:
    """Random RangeRequests (every field) answered by a proxy without --endpoints (so from
    the cache, never forwarded) equal etcd's answers at the same revision."""
    start = put(etcd_client, sub_prefix + b"start", b"")
    keys = _load(etcd_client, sub_prefix, 40, seed=7)
    _wait_cache(writer[0].name, etcd_client)
    with shmcache.Reader(writer[0].name) as r:
        lo = max(start, r.status().oldest_watchable_revision)
        hi = r.revision
    e_kv, p_kv = _kv(etcd_session.endpoint), _kv(ro_proxy.endpoint)
    rnd = random.Random(11)
    answered = 0
    for _ in range(400):
        req = _random_request(rnd, keys, sub_prefix, lo, hi)
        try:
            want = e_kv.Range(req, timeout=20)
        except grpc.RpcError as exc:
            with pytest.raises(grpc.RpcError) as got_exc:
                p_kv.Range(req, timeout=20)
            assert (got_exc.value.code(), got_exc.value.details()) == \
                (exc.code(), exc.details()), req
            continue
        whole = rpc.RangeRequest()
        whole.CopyFrom(req)
        whole.limit = 0
        _same_answer(req, want, p_kv.Range(req, timeout=20), e_kv.Range(whole, timeout=20))
        answered += 1
    assert answered > 300


def test_revision_errors_as_etcd_without_endpoints(ro_proxy: ProxyProcess,
                                                   etcd_session: EtcdServer, sub_prefix: bytes,
                                                   writer: tuple[WriterProcess, bytes]) -> None:
    """Without --endpoints: an empty key, a future revision and a range outside the prefix
    end with etcd's statuses (the last with FAILED_PRECONDITION); writes are refused."""
    e_kv, p_kv = _kv(etcd_session.endpoint), _kv(ro_proxy.endpoint)
    for req in (rpc.RangeRequest(key=b""), rpc.RangeRequest(key=sub_prefix, revision=10**9)):
        with pytest.raises(grpc.RpcError) as want:
            e_kv.Range(req, timeout=10)
        with pytest.raises(grpc.RpcError) as got:
            p_kv.Range(req, timeout=10)
        assert (got.value.code(), got.value.details()) == (want.value.code(),
                                                           want.value.details())
    with pytest.raises(grpc.RpcError) as got:
        p_kv.Range(rpc.RangeRequest(key=b"/elsewhere"), timeout=10)
    assert got.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as got:
        p_kv.Put(rpc.PutRequest(key=sub_prefix + b"w", value=b"v"), timeout=10)
    assert got.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_out_of_prefix_range_is_forwarded(proxy: ProxyProcess, etcd_client: Any,
                                          etcd_session: EtcdServer) -> None:
    """A range outside the cache's prefix is etcd's answer, byte for byte but the header."""
    other = b"/other-" + secrets.token_hex(4).encode() + b"/"
    put(etcd_client, other + b"a", b"1")
    put(etcd_client, other + b"b", b"2")
    req = rpc.RangeRequest(key=other, range_end=layout.prefix_range_end(other))
    want, got = _kv(etcd_session.endpoint).Range(req, timeout=10), \
        _kv(proxy.endpoint).Range(req, timeout=10)
    assert got == want and len(got.kvs) == 2


def test_serializable_read_after_a_forwarded_write(proxy: ProxyProcess, sub_prefix: bytes) -> None:
    """A serializable Range right after a Put through the same proxy sees the Put: the proxy
    waits for the write's revision before answering from the cache."""
    kv = _kv(proxy.endpoint)
    key = sub_prefix + b"raw"
    for i in range(40):
        rev = kv.Put(rpc.PutRequest(key=key, value=b"%d" % i), timeout=10).header.revision
        resp = kv.Range(rpc.RangeRequest(key=key, serializable=True), timeout=10)
        assert [(x.value, x.mod_revision) for x in resp.kvs] == [(b"%d" % i, rev)]
        assert resp.header.revision >= rev


# -- revisions the cache no longer holds -------------------------------------------------------------

def test_old_and_compacted_revisions(etcd_server: EtcdServer, cache_name: str,
                                     unique_prefix: bytes) -> None:
    """A revision older than the cache holds is forwarded to etcd (which still has it), or
    answered OUT_OF_RANGE "compacted" without --endpoints; once etcd compacted it, etcd's
    own error comes back through the proxy."""
    client = etcd_server.client()
    w = WriterProcess(cache_name, etcd_server.endpoint, unique_prefix, ring_size="64KiB")
    try:
        first = put(client, unique_prefix + b"a", b"first")
        w.start()
        big = b"x" * 2000
        with shmcache.Reader(cache_name) as r:
            last = first
            while r.status().oldest_watchable_revision <= first + 1:
                last = put(client, unique_prefix + b"b", big + b"%d" % last)
                r.wait(last, timeout=15)
        with ProxyProcess(cache_name, etcd_server.endpoint) as p, ProxyProcess(cache_name) as ro:
            req = rpc.RangeRequest(key=unique_prefix, range_end=layout.prefix_range_end(
                unique_prefix), revision=first)
            want = _kv(etcd_server.endpoint).Range(req, timeout=10)
            assert _kv(p.endpoint).Range(req, timeout=10) == want
            assert [kv.value for kv in want.kvs] == [b"first"]
            with pytest.raises(grpc.RpcError) as got:
                _kv(ro.endpoint).Range(req, timeout=10)
            assert (got.value.code(), got.value.details()) == (
                grpc.StatusCode.OUT_OF_RANGE,
                "etcdserver: mvcc: required revision has been compacted")
            etcd_server.compact(last)
            with pytest.raises(grpc.RpcError) as got:
                _kv(p.endpoint).Range(req, timeout=10)
            assert got.value.code() == grpc.StatusCode.OUT_OF_RANGE
            assert "compacted" in (got.value.details() or "")
    finally:
        client.close()
        w.close()


def test_auth_token_travels_to_etcd(etcd_server: EtcdServer, cache_name: str,
                                    unique_prefix: bytes) -> None:
    """With etcd's authentication on, a client authenticates through the proxy and its token
    goes with its forwarded calls: a Put with the token succeeds, one without it gets etcd's
    own refusal."""
    etcd_server.enable_auth("rootpw")
    w = WriterProcess(cache_name, etcd_server.endpoint, unique_prefix,
                      extra=["--user", "root", "--password", "rootpw"])
    try:
        w.start()
        with ProxyProcess(cache_name, etcd_server.endpoint) as p:
            ch = dial.open_channel("127.0.0.1", p.port)
            try:
                md = dial.authenticate(ch, "root", "rootpw", timeout=10)
                kv = Stub(ch, "KV")
                key = unique_prefix + b"a"
                rev = kv.Put(rpc.PutRequest(key=key, value=b"1"), timeout=10,
                             metadata=md).header.revision
                got = kv.Range(rpc.RangeRequest(key=key), timeout=10, metadata=md)
                assert [(x.value, x.mod_revision) for x in got.kvs] == [(b"1", rev)]
                with pytest.raises(grpc.RpcError) as refused:
                    kv.Put(rpc.PutRequest(key=key, value=b"2"), timeout=10)
                assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "user name is empty" in (refused.value.details() or "")
            finally:
                ch.close()
    finally:
        w.close()


def test_endpoint_status_without_endpoints(ro_proxy: ProxyProcess, etcd_session: EtcdServer,
                                           writer: tuple[WriterProcess, bytes]) -> None:
    """etcdctl endpoint status works against a proxy without --endpoints: the cache's
    revision and cluster, and a line in errors saying where the answer came from."""
    got = etcdctl_json(ro_proxy.endpoint, "endpoint", "status")[0]["Status"]
    want = etcdctl_json(etcd_session.endpoint, "endpoint", "status")[0]["Status"]
    with shmcache.Reader(writer[0].name) as r:
        assert got["header"]["revision"] <= r.revision
    assert got["header"]["cluster_id"] == want["header"]["cluster_id"]
    assert "answered from the cache" in got["errors"][0]


def test_forwarding_moves_to_the_next_endpoint(writer: tuple[WriterProcess, bytes],
                                               etcd_session: EtcdServer,
                                               sub_prefix: bytes) -> None:
    """With several --endpoints, a call that finds the first UNAVAILABLE fails (it may have
    been a write etcd applied: not retried), and later calls go to the next endpoint."""
    from shmcache.cli.demo_etcd import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    with ProxyProcess(writer[0].name, f"{dead},{etcd_session.endpoint}") as p:
        kv = _kv(p.endpoint)
        put_req = rpc.PutRequest(key=sub_prefix + b"f", value=b"1")
        with pytest.raises(grpc.RpcError) as first:
            kv.Put(put_req, timeout=10)
        assert first.value.code() == grpc.StatusCode.UNAVAILABLE
        rev = kv.Put(put_req, timeout=10).header.revision
        got = kv.Range(rpc.RangeRequest(key=sub_prefix + b"f", serializable=True), timeout=10)
        assert [x.mod_revision for x in got.kvs] == [rev]


def test_linearizable_read_sees_a_write_made_directly_to_etcd(
        ro_proxy: ProxyProcess, etcd_session: EtcdServer, sub_prefix: bytes) -> None:
    """A linearizable Range through the proxy right after a Put to etcd itself (not through
    the proxy) sees the Put: the proxy waits for a consistent read first."""
    e_kv, p_kv = _kv(etcd_session.endpoint), _kv(ro_proxy.endpoint)
    key = sub_prefix + b"lin"
    for i in range(30):
        rev = e_kv.Put(rpc.PutRequest(key=key, value=b"%d" % i), timeout=10).header.revision
        resp = p_kv.Range(rpc.RangeRequest(key=key), timeout=10)
        assert [(x.value, x.mod_revision) for x in resp.kvs] == [(b"%d" % i, rev)]
        assert resp.header.revision >= rev


def test_bytes_that_are_no_range_request(ro_proxy: ProxyProcess) -> None:
    """A request body protobuf cannot parse ends INTERNAL, as etcd's gRPC server answers it."""
    ch = dial.open_channel("127.0.0.1", ro_proxy.port)
    try:
        with pytest.raises(grpc.RpcError) as exc:
            ch.unary_unary("/etcdserverpb.KV/Range")(b"\x0a\xff", timeout=10)
        assert exc.value.code() == grpc.StatusCode.INTERNAL
    finally:
        ch.close()
