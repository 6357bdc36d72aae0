"""writer/etcd/listing.py: paged, pipelined Range reads against real etcd, and its RangeResponse
decoders (C and pure Python) held to protobuf's own decoding."""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from shmcache.etcdapi import Stub, dial, mvcc, rpc
from shmcache.format import layout
from shmcache.format.speedups import _speedups
from shmcache.writer.etcd import connection as _etcd
from shmcache.writer.etcd import listing
from tests.etcdserver import EtcdServer

P = b"/listing/"
END = layout.prefix_range_end(P)

DECODERS = [pytest.param(listing.py_range_response, id="python")]
if _speedups is not None:
    DECODERS.append(pytest.param(_speedups.range_response, id="c"))


@pytest.fixture
def small_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pages of 50 keys, then 100: a few hundred keys make several pages."""
    monkeypatch.setattr(listing, "FIRST_PAGE", 50)
    monkeypatch.setattr(listing, "PAGE_MIN", 100)
    monkeypatch.setattr(listing, "PAGE_MAX", 100)


def _channel(server: EtcdServer) -> Any:
    return dial.open_channel(server.host, server.port)


def _put_all(kv: Any, items: dict[bytes, bytes]) -> int:
    rev = 0
    keys = sorted(items)
    for i in range(0, len(keys), 100):
        ops = [rpc.RequestOp(request_put=rpc.PutRequest(key=k, value=items[k]))
               for k in keys[i:i + 100]]
        rev = kv.Txn(rpc.TxnRequest(success=ops), timeout=30).header.revision
    return int(rev)


def _etcd_items(kv: Any, revision: int) -> list[listing.Item]:
    """[P, END) at ``revision`` in one unpaged Range, decoded by protobuf."""
    resp = kv.Range(rpc.RangeRequest(key=P, range_end=END, revision=revision), timeout=30)
    return [(x.key, (x.value, x.create_revision, x.mod_revision, x.version, x.lease))
            for x in resp.kvs]


def _no_check(cluster_id: int) -> None:
    pass


@pytest.fixture
def loaded(etcd_server: EtcdServer) -> Iterator[tuple[EtcdServer, Any, Any]]:
    """A fresh etcd holding 420 keys under P (and keys either side of it): (server, channel, KV)."""
    ch = _channel(etcd_server)
    kv = Stub(ch, "KV")
    rnd = random.Random(7)
    items = {P + b"%04d" % i: bytes(rnd.randrange(256) for _ in range(rnd.randrange(40)))
             for i in range(420)}
    items[P + b"\xff\xfe"] = b"near the end"
    items[P[:-1] + b"."] = b"outside, before"
    items[END] = b"outside, after"
    _put_all(kv, items)
    try:
        yield etcd_server, ch, kv
    finally:
        ch.close()


@pytest.mark.parametrize("decode", DECODERS)
def test_pages_are_one_cut_at_the_first_pages_revision_across_writes(
        loaded: tuple[EtcdServer, Any, Any], small_pages: None, decode: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Writes between pages (puts ahead of and behind the page being read, updates,
    deletes) do not show: every page is read at the first page's revision, and the
    result equals etcd's unpaged range at that revision, in key order (with either
    decoder)."""
    monkeypatch.setattr(listing, "range_response", decode)
    _server, ch, kv = loaded
    reader = listing.RangeReader(ch, (), 30, _no_check)
    pages: list[tuple[int, int]] = []

    def write(loaded_keys: int, total: int) -> None:
        pages.append((loaded_keys, total))
        n = len(pages)
        kv.Put(rpc.PutRequest(key=P + b"%04d" % (400 - n), value=b"updated"), timeout=10)
        kv.Put(rpc.PutRequest(key=P + b"%04da" % (300 + n), value=b"new"), timeout=10)
        kv.Put(rpc.PutRequest(key=P + b"%04da" % n, value=b"new, behind"), timeout=10)
        kv.DeleteRange(rpc.DeleteRangeRequest(key=P + b"%04d" % (200 + n)), timeout=10)

    revision, items = reader.list_range(P, END, progress=write)
    assert len(pages) >= 5
    assert [t for _, t in pages] == [421] * len(pages)  # (the range's size at the revision)
    assert pages[-1][0] == 421
    assert items == _etcd_items(kv, revision)
    assert [k for k, _ in items] == sorted(k for k, _ in items)
    now = kv.Range(rpc.RangeRequest(key=P, range_end=END), timeout=10)
    assert now.header.revision > revision and len(now.kvs) != len(items)


def test_the_next_page_is_requested_before_the_current_one_is_decoded(
        loaded: tuple[EtcdServer, Any, Any], small_pages: None) -> None:
    """Every page but the last is decoded with the next page's request in flight."""
    _server, ch, _kv = loaded
    reader = listing.RangeReader(ch, (), 30, _no_check)
    _rev, items = reader.list_range(P, END)
    assert len(items) == 421
    # 50 + 3 x 100 + 71 keys: 5 pages.
    assert reader.in_flight_at_decode == [1, 1, 1, 1, 0]


class _Recorder(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Keeps the RangeRequests a channel sends (etcd answers them as usual)."""

    def __init__(self) -> None:
        self.requests: list[Any] = []

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        self.requests.append(rpc.RangeRequest.FromString(request))
        return continuation(details, request)


def test_requests_carry_no_sort_order_and_later_pages_the_first_pages_revision(
        loaded: tuple[EtcdServer, Any, Any], small_pages: None) -> None:
    """No sort order: with one, etcd 3.5 reads (and sorts) the whole rest of the range for
    every page and only then applies the limit, which made a paged list quadratic. The
    first page is read at etcd's current revision, every later one at the first's, each
    continuing after the previous page's last key."""
    _server, ch, _kv = loaded
    rec = _Recorder()
    revision, items = listing.RangeReader(grpc.intercept_channel(ch, rec), (), 30,
                                          _no_check).list_range(P, END)
    reqs = rec.requests
    assert [(r.sort_order, r.sort_target) for r in reqs] == [(rpc.RangeRequest.NONE,
                                                               rpc.RangeRequest.KEY)] * 5
    assert [r.revision for r in reqs] == [0] + [revision] * 4
    assert [r.limit for r in reqs] == [50, 100, 100, 100, 100]
    keys = [k for k, _ in items]
    assert [r.key for r in reqs] == [P] + [keys[n - 1] + b"\0" for n in (50, 150, 250, 350)]
    assert {r.range_end for r in reqs} == {END}


def test_every_page_header_is_checked(loaded: tuple[EtcdServer, Any, Any],
                                      small_pages: None) -> None:
    server, ch, _kv = loaded
    conn = _etcd.Connection(_etcd.EtcdSettings(endpoints=[server.endpoint]))
    conn.connect()
    seen: list[int] = []

    def check(cluster_id: int) -> None:
        seen.append(cluster_id)
        conn.check_cluster(cluster_id)

    try:
        listing.RangeReader(ch, (), 30, check).list_range(P, END)
    finally:
        conn.close()
    assert seen == [conn.cluster_id] * 5 and conn.cluster_id


def test_compaction_during_a_paged_list_is_the_compaction_error(
        loaded: tuple[EtcdServer, Any, Any], small_pages: None) -> None:
    """etcd compacting past the list's revision between pages fails the list with etcd's
    compaction error (what the feed turns into a relist), not a partial result."""
    server, ch, kv = loaded
    conn = _etcd.Connection(_etcd.EtcdSettings(endpoints=[server.endpoint]))
    conn.connect()
    compacted: list[int] = []

    def compact(_loaded: int, _total: int) -> None:
        if not compacted:
            rev = kv.Put(rpc.PutRequest(key=P + b"0000", value=b"again"),
                         timeout=10).header.revision
            server.compact(rev)
            compacted.append(rev)

    try:
        with pytest.raises(grpc.RpcError) as info:
            conn.list_range(P, END, progress=compact)
    finally:
        conn.close()
    assert compacted
    assert _etcd.is_compacted(info.value)
    assert info.value.code() == grpc.StatusCode.OUT_OF_RANGE


def _cluster_of(ch: Any) -> int:
    return int(Stub(ch, "Maintenance").Status(rpc.StatusRequest(), timeout=10).header.cluster_id)


@pytest.fixture
def two_clusters(tmp_path: Path) -> Iterator[tuple[EtcdServer, EtcdServer]]:
    """Two etcd clusters holding 300 keys under P each, B further ahead in revision."""
    a = EtcdServer(data_dir=tmp_path / "a", name="cluster-a")
    b = EtcdServer(data_dir=tmp_path / "b", name="cluster-b")
    try:
        for server, rounds in ((a, 1), (b, 3)):
            server.start()
            with _channel(server) as ch:
                for _ in range(rounds):
                    _put_all(Stub(ch, "KV"), {P + b"%04d" % i: b"v" for i in range(300)})
        yield a, b
    finally:
        a.close()
        b.close()


def test_a_cluster_change_mid_list_is_refused(two_clusters: tuple[EtcdServer, EtcdServer],
                                              small_pages: None) -> None:
    """One channel whose calls go to A and B in turn (gRPC's round_robin over both): the
    list's first page comes from A, the second from B, and the list fails with
    ClusterChanged instead of splicing B's keys onto A's."""
    a, b = two_clusters
    conn = _etcd.Connection(_etcd.EtcdSettings(endpoints=[a.endpoint]))
    conn.connect()
    both = grpc.insecure_channel(
        f"ipv4:127.0.0.1:{a.port},127.0.0.1:{b.port}",
        options=[*dial.GRPC_OPTIONS, ("grpc.lb_policy_name", "round_robin")])
    try:
        # Until both members are connected and the last answer came from B: the next
        # call (the list's first page) goes to A.
        ids = {_cluster_of(ch) for ch in (conn.channel,)}
        deadline = time.monotonic() + 30
        seen: set[int] = set()
        while True:
            got = _cluster_of(both)
            seen.add(got)
            if len(seen) == 2 and got != conn.cluster_id:
                break
            assert time.monotonic() < deadline, "round_robin never reached both clusters"
        assert ids == {conn.cluster_id}
        pages: list[int] = []
        with pytest.raises(_etcd.ClusterChanged):
            listing.RangeReader(both, (), 30, conn.check_cluster).list_range(
                P, END, progress=lambda n, _t: pages.append(n))
        assert pages == [50]  # A's first page was read, B's second refused
    finally:
        both.close()
        conn.close()


# -- the decoders ----------------------------------------------------------------------------

def _random_response(rnd: random.Random) -> rpc.RangeResponse:
    big = [0, 1, 127, 128, 2**31, 2**62, 2**63 - 1, -1, -(2**63)]
    kvs = []
    for _ in range(rnd.randrange(6)):
        size = rnd.choice([0, 0, 1, 200, 70_000, 1 << 20])
        kvs.append(mvcc.KeyValue(
            key=rnd.randbytes(rnd.choice([0, 1, 30, 300])),
            value=rnd.randbytes(size),
            create_revision=rnd.choice(big), mod_revision=rnd.choice(big),
            version=rnd.choice(big), lease=rnd.choice(big)))
    resp = rpc.RangeResponse(kvs=kvs, more=rnd.random() < 0.5, count=rnd.choice(big))
    resp.header.cluster_id = rnd.choice([0, 1, 2**63, 2**64 - 1, 0x8E9E05C52164694D])
    resp.header.member_id = rnd.choice([0, 2**64 - 1])
    resp.header.revision = rnd.choice(big)
    resp.header.raft_term = rnd.choice([0, 5])
    return resp


def _by_protobuf(data: bytes) -> tuple[listing.Head, list[listing.Item]]:
    resp = rpc.RangeResponse.FromString(data)
    items = [(x.key, (x.value, x.create_revision, x.mod_revision, x.version, x.lease))
             for x in resp.kvs]
    head = (resp.header.cluster_id, resp.header.revision, resp.more, resp.count, len(items),
            items[-1][0] if items else None)
    return head, items


@pytest.mark.parametrize("decode", DECODERS)
def test_decoders_equal_protobuf_on_random_responses(decode: Any) -> None:
    """Empty and 1 MiB values, empty keys, leases, negative and 64-bit revisions, cluster
    ids above 2**63, header fields the decoder skips, unknown fields anywhere."""
    rnd = random.Random(21)
    for _ in range(300):
        data = _random_response(rnd).SerializeToString()
        if rnd.random() < 0.3:  # unknown fields (numbers 9 and 1000): protobuf skips them
            data += b"\x48\x05" + b"\xc2\x3e\x03abc"
        head, items = _by_protobuf(data)
        out: list[listing.Item] = []
        assert decode(data, None) == head
        assert decode(data, out) == head
        assert out == items


@pytest.mark.parametrize("decode", DECODERS)
def test_decoders_refuse_what_protobuf_cannot_read(decode: Any) -> None:
    """Every truncation of a response decodes as protobuf decodes it, or is a ValueError
    where protobuf refuses it."""
    rnd = random.Random(5)
    resp = _random_response(rnd)
    resp.kvs.add(key=b"k", value=b"v" * 300, mod_revision=2**40)
    data = resp.SerializeToString()
    for cut in range(len(data) - 1, 0, -7 if len(data) > 5000 else -1):
        part = data[:cut]
        try:
            want: Any = _by_protobuf(part)
        except Exception:
            want = ValueError
        try:
            out: list[listing.Item] = []
            got: Any = (decode(part, out), out)
        except ValueError:
            got = ValueError
        assert got == want, cut


@pytest.mark.skipif(_speedups is None, reason="the C speedups are not built")
def test_c_decoded_items_are_not_tracked_by_the_cyclic_gc() -> None:
    """Tuples of bytes and ints only: the C decoder untracks them, so the collections a
    relist's allocations trigger do not walk every item listed so far."""
    resp = rpc.RangeResponse(kvs=[mvcc.KeyValue(key=b"k%d" % i, value=b"v") for i in range(3)])
    out: list[listing.Item] = []
    _speedups.range_response(resp.SerializeToString(), out)
    assert out and not any(gc.is_tracked(item) or gc.is_tracked(item[1]) for item in out)


@pytest.mark.skipif(_speedups is None, reason="the C speedups are not built")
def test_c_and_python_decoders_agree_on_damaged_bytes() -> None:
    rnd = random.Random(9)
    base = _random_response(rnd).SerializeToString()[:4000]
    for _ in range(2000):
        data = bytearray(base)
        for _ in range(rnd.randrange(1, 4)):
            data[rnd.randrange(len(data))] = rnd.randrange(256)
        results = []
        for decode in (listing.py_range_response, _speedups.range_response):
            out: list[listing.Item] = []
            try:
                results.append((decode(bytes(data), out), out))
            except ValueError:
                results.append(ValueError)
        assert results[0] == results[1]


# -- the benchmark ---------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(importlib.util.find_spec("tqdm") is None,
                    reason="needs the bench extra (pip install -e '.[bench]')")
def test_relist_bench_smoke_run_and_a_failed_run_writes_nothing(tmp_path: Path) -> None:
    """``bench/relist.py --smoke`` measures every contender; a run that fails (a writer tree
    that does not exist) leaves no results file."""
    out = subprocess.run([sys.executable, "bench/relist.py", "--smoke", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    with open(tmp_path / "relist-smoke.json") as f:
        rows = json.load(f)["sizes"]["2000"]
    assert set(rows) == {"etcdctl get --prefix", "python-etcd3 get_prefix", "shmcache serve"}
    assert all(r["wall"] > 0 and r["peak_rss_mb"] > 0 for r in rows.values())
    failed = tmp_path / "failed"
    out = subprocess.run([sys.executable, "bench/relist.py", "--smoke", "--out", str(failed),
                          "--writer", f"x={tmp_path / 'no such tree'}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert not failed.exists() or not os.listdir(failed)
