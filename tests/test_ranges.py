"""etcd's Range from the cache: ``Reader.range``, ``count``, ``keys_only`` and shards, each
answer compared with etcd's own RangeRequest at the same revision (current and past, across
pages, snapshots and overlay segments)."""

from __future__ import annotations

import random
import zlib
from typing import Any

import pytest

import shmcache
from shmcache.format import layout, snapshot
from shmcache.types import KeyValue
from tests.helpers import WriterProcess, delete, put, txn, wait_rev


def etcd(client: Any, key: bytes, range_end: bytes | None = None, revision: int = 0, *,
         keys_only: bool = False, count_only: bool = False) -> tuple[list[KeyValue], int]:
    """etcd's own Range answer: (kvs, count)."""
    from etcd3.etcdrpc import rpc_pb2

    req = rpc_pb2.RangeRequest(key=key, range_end=range_end or b"", revision=revision,
                               keys_only=keys_only, count_only=count_only)
    resp = client.kvstub.Range(req, 10, metadata=client.metadata)
    return [KeyValue(kv.key, kv.value, kv.create_revision, kv.mod_revision, kv.version, kv.lease)
            for kv in resp.kvs], int(resp.count)


def _load(client: Any, p: bytes, n: int) -> int:
    rev = 0
    for i in range(0, n, 100):
        rev = txn(client, [("put", p + b"k%04d" % j, b"v%d" % j) for j in range(i, min(n, i + 100))])
    return rev


@pytest.fixture
def loaded(etcd_session: Any, etcd_client: Any, cache_name: str,
           unique_prefix: bytes) -> Any:
    """A writer started after 300 keys were written: they are in its first snapshot (the
    module writer's keys are all changes since its empty one). Yields (reader, prefix,
    revision of the load)."""
    p = unique_prefix
    rev = _load(etcd_client, p, 300)
    w = WriterProcess(cache_name, etcd_session.endpoint, p)
    try:
        w.start()
        with shmcache.Reader(cache_name) as r:
            yield r, p, rev
    finally:
        w.close()


def _pages(read: Any, limit: int, revision: int | None,
           **kw: Any) -> tuple[list[KeyValue], set[int]]:
    """Every page of ``read(**kw)`` from ``revision``: (items, the pages' revisions)."""
    res = read(limit=limit, revision=revision, **kw)
    items, revs = list(res.items), {res.revision}
    while res.continue_token is not None:
        res = read(limit=limit, continue_token=res.continue_token, **kw)
        items += res.items
        revs.add(res.revision)
    return items, revs


def _ranges(p: bytes) -> list[tuple[bytes, bytes | None]]:
    """(key, range_end) pairs inside prefix ``p``: single keys, windows, a prefix, empty."""
    return [(p + b"k0010", None), (p + b"k0010x", None), (p + b"k0020", p + b"k0060"),
            (p + b"k0100", p + b"k0100"), (p + b"k0150", p + b"k0120"), (p + b"k01", p + b"k02"),
            (p, layout.prefix_range_end(p)), (p + b"k0295", layout.prefix_range_end(p))]


@pytest.mark.parametrize("speedups", [True, False], ids=["c", "python"])
def test_range_count_and_keys_only_equal_etcd_now_and_in_the_past(
        etcd_client: Any, loaded: Any, monkeypatch: pytest.MonkeyPatch, speedups: bool) -> None:
    """For single keys, windows, prefixes and empty ranges: ``range`` (whole and paged),
    ``keys_only`` and ``count`` equal etcd's Range, Range with keys_only and with
    count_only, at the current revision and at a past one, with changes in between (keys
    in the snapshot, changed since and new)."""
    if not speedups:
        monkeypatch.setattr(snapshot, "USE_SPEEDUPS", False)
    reader, p, past = loaded
    ops: list[tuple[str, bytes, bytes]] = []
    for j in range(0, 300, 7):
        ops.append(("delete", p + b"k%04d" % j, b"") if j % 2 else
                   ("put", p + b"k%04d" % j, b"changed"))
        ops.append(("put", p + b"k%04da" % j, b"new"))
    # More keys new than old among the changes (a count that swapped the two would
    # otherwise come out right).
    ops += [("put", p + b"k%04db" % j, b"new") for j in (11, 12, 101, 102, 250, 296)]
    now = txn(etcd_client, ops)
    wait_rev(reader, now)
    for rev in (now, past):
        for key, end in _ranges(p):
            want, _ = etcd(etcd_client, key, end, rev)
            at = None if rev == now else rev
            res = reader.range(key, end, revision=at)
            assert (res.items, res.revision) == (want, rev), (key, end, rev)
            keys, _ = etcd(etcd_client, key, end, rev, keys_only=True)
            assert reader.range(key, end, revision=at, keys_only=True).items == keys
            assert all(kv.value == b"" for kv in keys)
            _, n = etcd(etcd_client, key, end, rev, count_only=True)
            if end is not None:  # (count's range_end None is the prefix form)
                assert reader.count(key, range_end=end, revision=at) == \
                    shmcache.CountResult(n, rev), (key, end, rev)
            for ko in (False, True):
                items, revs = _pages(reader.range, 9, at, key=key, range_end=end,
                                     keys_only=ko)
                assert items == (keys if ko else want) and revs == {rev}, (key, end, rev)
        for q in (p, p + b"k00", p + b"k02", p + b"nothing"):
            want, n = etcd(etcd_client, q, layout.prefix_range_end(q), rev)
            at = None if rev == now else rev
            assert reader.count(q, revision=at) == shmcache.CountResult(n, rev) and n == len(want)
            assert reader.list(q, revision=at, keys_only=True).items == etcd(
                etcd_client, q, layout.prefix_range_end(q), rev, keys_only=True)[0]
            got = list(reader.iter_list(q, page_size=11, keys_only=True)) if rev == now else None
            if got is not None:
                assert got == [kv._replace(value=b"") for kv in want]


def test_pages_of_a_range_stay_at_the_first_pages_revision(
        etcd_client: Any, writer: tuple[WriterProcess, bytes], sub_prefix: bytes,
        reader: shmcache.Reader) -> None:
    """Writes between the pages of a window: every page is exact at the first one's
    revision, as list's pages are; a list(prefix) token continues range(prefix, its end)."""
    p = sub_prefix
    wait_rev(reader, _load(etcd_client, p, 200))
    key, end = p + b"k0050", p + b"k0150"
    first = reader.range(key, end, limit=30)
    rev = first.revision
    put(etcd_client, p + b"k0100", b"changed")
    delete(etcd_client, p + b"k0120")
    wait_rev(reader, put(etcd_client, p + b"k0090x", b"new"))
    pages = [first]
    while pages[-1].more:
        pages.append(reader.range(key, end, limit=30, continue_token=pages[-1].continue_token))
    assert [kv for pg in pages for kv in pg] == etcd(etcd_client, key, end, rev)[0]
    assert {pg.revision for pg in pages} == {rev} and len(pages) == 4
    tok = reader.list(p, limit=5).continue_token
    assert tok is not None
    assert reader.range(p, layout.prefix_range_end(p), limit=5, continue_token=tok).items == \
        reader.list(p, limit=5, continue_token=tok).items
    with pytest.raises(ValueError, match=r"belongs to the range \["):
        reader.list(p, limit=5, continue_token=first.continue_token)
    with pytest.raises(ValueError, match="belongs to the listing of prefix"):
        reader.range(key, end, limit=5, continue_token=tok)


def test_ranges_outside_the_prefix_are_value_errors(
        writer: tuple[WriterProcess, bytes], reader: shmcache.Reader) -> None:
    p = writer[1]
    for key, end in ((b"/elsewhere", None), (p + b"a", b"\0"), (p + b"a", b"\xff"),
                     (b"/", p + b"b"), (layout.prefix_range_end(p), None)):
        with pytest.raises(ValueError, match="range|key") as exc:
            reader.range(key, end)
        assert repr(key) in str(exc.value) and "outside the key range" in str(exc.value)
        if end is not None:
            with pytest.raises(ValueError, match="outside the key range"):
                reader.count(key, range_end=end)
    with pytest.raises(ValueError, match="must not be empty"):
        reader.range(b"")
    with pytest.raises(ValueError, match="outside the key range"):
        reader.count(b"/elsewhere")
    with pytest.raises(TypeError, match="range_end"):
        reader.range(p, 5)  # type: ignore[arg-type]
    with pytest.raises(shmcache.FutureRevisionError):
        reader.count(p, revision=reader.revision + 1000)


def test_count_copies_no_value(etcd_client: Any, writer: tuple[WriterProcess, bytes],
                               sub_prefix: bytes, reader: shmcache.Reader,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    """count reads positions and entry headers only: any read that copies values fails."""
    p = sub_prefix
    past = _load(etcd_client, p, 150)
    wait_rev(reader, txn(etcd_client, [("delete", p + b"k0003", b""), ("put", p + b"z", b"v")]))
    real_get, real_range = snapshot.Snapshot.get, snapshot.Snapshot.range_list

    def get(self: Any, key: bytes, keys_only: bool = False) -> Any:
        assert keys_only, "count copied a value"
        return real_get(self, key, keys_only)

    def range_list(self: Any, start: bytes, end: Any, limit: int = -1, keys_only: bool = False,
                   shard: Any = None) -> Any:
        assert keys_only, "count copied values"
        return real_range(self, start, end, limit, keys_only, shard)

    monkeypatch.setattr(snapshot.Snapshot, "get", get)
    monkeypatch.setattr(snapshot.Snapshot, "range_list", range_list)
    assert reader.count(p).count == 150
    assert reader.count(p, revision=past).count == 150
    assert reader.count(p + b"k000", range_end=p + b"k001").count == 9  # (k0003 deleted)


def test_answers_equal_etcd_across_overlay_and_snapshot_switches(
        etcd_session: Any, etcd_client: Any, cache_name: str, unique_prefix: bytes) -> None:
    """Churn through several snapshots and overlay segments: range, count, keys_only and
    each shard equal etcd at the current revision and at revisions on both sides of the
    snapshot and overlay segment."""
    p = unique_prefix
    w = WriterProcess(cache_name, etcd_session.endpoint, p, ring_size="4MiB")
    rng = random.Random(3)
    seen = set()
    try:
        w.start()
        with shmcache.Reader(cache_name) as r:
            for _round in range(6):
                last = 0
                for i in range(250):
                    k = p + b"k%04d" % rng.randrange(300)
                    last = (put(etcd_client, k, b"v%d-" % i + b"x" * rng.randrange(500, 1500))
                            if rng.random() < 0.8 else delete(etcd_client, k))
                wait_rev(r, last)
                b = r.control.block()
                assert b is not None
                seen.add((b.snap_seq, b.ovl_seq))
                for rev in {last, b.snap_revision, b.ovl_revision or last, (b.snap_revision +
                                                                          last) // 2}:
                    if rev < b.compact_revision:
                        continue
                    at = None if rev == last else rev
                    for key, end in ((p + b"k00", p + b"k02"), (p, layout.prefix_range_end(p)),
                                     (p + b"k0150", None)):
                        want, n = etcd(etcd_client, key, end, rev)
                        assert r.range(key, end, revision=at).items == want, (key, rev)
                        assert r.range(key, end, revision=at, keys_only=True).items == \
                            etcd(etcd_client, key, end, rev, keys_only=True)[0]
                        if end is not None:
                            assert r.count(key, range_end=end, revision=at).count == n
                        union = []
                        for i in range(3):
                            part = r.range(key, end, revision=at, shard=(i, 3)).items
                            assert all(zlib.crc32(kv.key) % 3 == i for kv in part)
                            union += part
                        assert sorted(union) == want
    finally:
        w.close()
    assert len({s for s, _ in seen}) >= 2 and any(o for _, o in seen), seen


@pytest.mark.parametrize("speedups", [True, False], ids=["c", "python"])
def test_shards_partition_every_listing(
        etcd_client: Any, loaded: Any, monkeypatch: pytest.MonkeyPatch, speedups: bool) -> None:
    """The n shards of a listing (paged, keys only, at a past revision) are disjoint, hold
    exactly the keys with crc32(key) % n == i, and together equal the unsharded answer."""
    if not speedups:
        monkeypatch.setattr(snapshot, "USE_SPEEDUPS", False)
    reader, p, past = loaded
    wait_rev(reader, txn(etcd_client, [("delete", p + b"k0007", b""),
                                       ("put", p + b"k0050x", b"new"),
                                       ("put", p + b"k0051", b"changed")]))
    for rev in (None, past):
        whole = reader.list(p, revision=rev).items
        for n in (1, 2, 5):
            union: list[KeyValue] = []
            for i in range(n):
                part, revs = _pages(reader.list, 7, rev, prefix=p, shard=(i, n))
                assert all(zlib.crc32(kv.key) % n == i for kv in part)
                assert part == [kv for kv in whole if zlib.crc32(kv.key) % n == i]
                assert list(reader.iter_list(p, page_size=4, shard=(i, n))) == (
                    part if rev is None else list(reader.iter_list(p, shard=(i, n))))
                union += part
            assert sorted(union) == whole
        keys = reader.range(p + b"k0010", p + b"k0090", shard=(1, 4), keys_only=True,
                            revision=rev).items
        assert keys == [kv._replace(value=b"") for kv in whole if
                        p + b"k0010" <= kv.key < p + b"k0090" and zlib.crc32(kv.key) % 4 == 1]
    tok = reader.list(p, limit=3, shard=(0, 2)).continue_token
    with pytest.raises(ValueError, match=r"shard=\(0, 2\)"):
        reader.list(p, limit=3, shard=(1, 2), continue_token=tok)


@pytest.mark.parametrize("bad, exc", [((2, 2), ValueError), ((-1, 3), ValueError),
                                      ((0, 0), ValueError), ("0/2", TypeError),
                                      ((True, 2), TypeError), ((0, 2, 1), TypeError),
                                      ((0.0, 2), TypeError)])
def test_bad_shards_name_the_argument(writer: tuple[WriterProcess, bytes],
                                      reader: shmcache.Reader, bad: Any, exc: type) -> None:
    for call in (lambda: reader.list(shard=bad), lambda: reader.range(writer[1], shard=bad),
                 lambda: list(reader.iter_list(shard=bad)), lambda: reader.watch(shard=bad),
                 lambda: reader.by_index("node", "n1", shard=bad)):
        with pytest.raises(exc, match="shard"):
            call()


def test_the_documented_shard_example() -> None:
    """docs/format.md's worked example of the shard function holds."""
    from pathlib import Path

    doc = (Path(__file__).parent.parent / "docs" / "format.md").read_text()
    assert "`crc32(b\"/jobs/000120\")`\nis 1,361,627,507" in doc
    assert zlib.crc32(b"/jobs/000120") == 1_361_627_507 and 1_361_627_507 % 8 == 3


@pytest.mark.parametrize("speedups", [True, False], ids=["c", "python"])
def test_by_index_keys_only_and_shards_equal_etcd_filtered(
        etcd_session: Any, etcd_client: Any, cache_name: str, unique_prefix: bytes,
        monkeypatch: pytest.MonkeyPatch, speedups: bool) -> None:
    """by_index with keys_only and shard=(i, n), paged, now and at a past revision, across
    snapshots (a small snapshot cadence): etcd's range at that revision, filtered by the
    node field, then by shard; the shards together are the unsharded answer."""
    import json

    from shmcache.format import indexseg

    if not speedups:
        monkeypatch.setattr(snapshot, "USE_SPEEDUPS", False)
        monkeypatch.setattr(indexseg, "USE_SPEEDUPS", False)
    p = unique_prefix
    rng = random.Random(5)

    def pod(node: int) -> bytes:
        return json.dumps({"spec": {"nodeName": f"n{node}"}, "pad": "x" * 300}).encode()

    txn(etcd_client, [("put", p + b"pod%03d" % i, pod(i % 3)) for i in range(90)])
    w = WriterProcess(cache_name, etcd_session.endpoint, p, ring_size="1MiB",
                      extra=["--index", "node=json:/spec/nodeName", "--snapshot-bytes", "20000"])
    try:
        w.start()
        with shmcache.Reader(cache_name) as r:
            past = r.revision
            last = past
            for _ in range(120):
                k = p + b"pod%03d" % rng.randrange(110)
                last = (put(etcd_client, k, pod(rng.randrange(3))) if rng.random() < 0.8
                        else delete(etcd_client, k))
            wait_rev(r, last)
            for rev in (last, past):
                at = None if rev == last else rev
                kvs = [kv for kv in etcd(etcd_client, p, layout.prefix_range_end(p), rev)[0]]
                for node in (b"n0", b"n2"):
                    want = [kv for kv in kvs if json.loads(kv.value)["spec"]["nodeName"]
                            == node.decode()]
                    assert r.by_index("node", node, revision=at).items == want
                    keys, _ = _pages(r.by_index, 6, at, index="node", value=node,
                                     keys_only=True)
                    assert keys == [kv._replace(value=b"") for kv in want]
                    union: list[KeyValue] = []
                    for i in range(3):
                        part, revs = _pages(r.by_index, 4, at, index="node", value=node,
                                            shard=(i, 3))
                        assert part == [kv for kv in want if zlib.crc32(kv.key) % 3 == i]
                        assert revs == {rev}
                        union += part
                    assert sorted(union) == want
            assert r.control.block().snap_seq > 1  # type: ignore[union-attr]
    finally:
        w.close()


def test_range_and_count_across_an_epoch(etcd_session: Any, etcd_client: Any, cache_name: str,
                                         unique_prefix: bytes) -> None:
    """A Reader kept across a history reset (a writer restarted with other index
    definitions relists: a new epoch) answers range and count as etcd does; a range's token
    of the old epoch is an ExpiredTokenError (a CompactedError and a ValueError)."""
    import time

    from shmcache.errors import ExpiredTokenError

    p = unique_prefix
    _load(etcd_client, p, 120)
    w = WriterProcess(cache_name, etcd_session.endpoint, p)
    try:
        w.start()
        with shmcache.Reader(cache_name) as r:
            epoch = r.status().epoch
            key, end = p + b"k0010", p + b"k0100"
            tok = r.range(key, end, limit=20, keys_only=True).continue_token
            assert tok is not None
            w.terminate()
            w.args += ["--index", "node=json:/spec/nodeName"]
            w.start()
            deadline = time.monotonic() + 15
            while r.status().epoch == epoch and time.monotonic() < deadline:
                time.sleep(0.05)  # the new writer relists (restore refused)
            assert r.status().epoch > epoch
            with pytest.raises(ExpiredTokenError) as info:
                r.range(key, end, limit=20, continue_token=tok)
            assert isinstance(info.value, shmcache.CompactedError)
            assert isinstance(info.value, ValueError)
            last = delete(etcd_client, p + b"k0050")
            wait_rev(r, last)
            want, n = etcd(etcd_client, key, end, last)
            assert r.range(key, end).items == want
            assert r.count(key, range_end=end) == shmcache.CountResult(n, last) and n == 89
            assert _pages(r.range, 7, None, key=key, range_end=end, shard=(0, 2))[0] == \
                [kv for kv in want if zlib.crc32(kv.key) % 2 == 0]
    finally:
        w.close()
