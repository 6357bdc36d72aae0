"""Sharded watches: ``watch``/``awatch(..., shard=(i, n))`` receive exactly etcd's watch events
of their shard's keys, on their own and through the demultiplexer, which routes them by shard."""

from __future__ import annotations

import asyncio
import zlib
from typing import Any

import shmcache
from shmcache.reader import demux as _demux
from tests.helpers import WriterProcess, delete, drain, etcd_events, put, txn, wait_rev


def _changes(client: Any, p: bytes, n: int, tag: bytes) -> int:
    """Puts, deletes and a multi-key transaction under ``p``; the last revision."""
    for i in range(n):
        k = p + b"k%03d" % (i % 40)
        if i % 5 == 4:
            delete(client, k)
        else:
            put(client, k, tag + b"%d" % i)
    return txn(client, [("put", p + b"t%02d" % j, tag) for j in range(6)])


def test_sharded_watches_get_exactly_their_shards_events(
        etcd_session: Any, etcd_client: Any, writer: tuple[WriterProcess, bytes],
        sub_prefix: bytes, reader: shmcache.Reader) -> None:
    """n = 1, 3 and 4 sharded watches beside an unsharded one, first reading on their own
    (catching up from an old revision), then joined to the demultiplexer: each gets etcd's
    events of its shard, in order, none missing or repeated; the shards of n together
    are the unsharded watch's events."""
    p = sub_prefix
    since = put(etcd_client, p + b"start", b"0")
    wait_rev(reader, _changes(etcd_client, p, 60, b"a"))  # history the watches catch up on
    shards = [(i, n) for n in (1, 3, 4) for i in range(n)]
    watches = {s: reader.watch(p, since_revision=since, shard=s) for s in shards}
    whole = reader.watch(p, since_revision=since)
    try:
        got: dict[Any, list[shmcache.Event]] = {s: [] for s in [*shards, None]}
        mid = reader.revision
        for s, w in [*watches.items(), (None, whole)]:
            got[s] += drain(w, mid)
        assert all(w.joined for w in watches.values())
        d = _demux.demux_of(reader)
        assert d.joined_count() >= len(shards) + 1
        last = _changes(etcd_client, p, 60, b"b")  # delivered through the demultiplexer
        for s, w in [*watches.items(), (None, whole)]:
            got[s] += drain(w, last)
    finally:
        for w in [*watches.values(), whole]:
            w.close()
    want = etcd_events(etcd_session.endpoint, p, since, last)
    assert got[None] == want and len(want) > 100
    for i, n in shards:
        assert got[i, n] == [e for e in want if zlib.crc32(e.kv.key) % n == i], (i, n)
    for n in (3, 4):
        assert sorted((e.revision, e.kv.key) for i in range(n) for e in got[i, n]) == \
            sorted((e.revision, e.kv.key) for e in want)


def test_a_sharded_index_watch_and_awatch(
        etcd_session: Any, etcd_client: Any, cache_name: str, unique_prefix: bytes) -> None:
    """shard= with index= keeps the events of the shard among the index's; awatch takes
    shard= as watch does."""
    import json

    p = unique_prefix
    w = WriterProcess(cache_name, etcd_session.endpoint, p,
                      extra=["--index", "node=json:/spec/nodeName"])
    try:
        w.start()
        with shmcache.Reader(cache_name) as r:
            since = r.revision
            ix = r.watch(p, since_revision=since, index=("node", "n1"), shard=(1, 2))
            last = 0
            for i in range(40):
                node = f"n{i % 3}"
                last = put(etcd_client, p + b"pod%02d" % (i % 15),
                           json.dumps({"spec": {"nodeName": node}}).encode())

            async def collect() -> list[shmcache.Event]:
                out: list[shmcache.Event] = []
                aw = r.awatch(p, since_revision=since, shard=(0, 2))
                try:
                    while aw.revision < last:
                        out += await aw.poll(timeout=0.5)
                finally:
                    aw.close()
                return out

            got_async = asyncio.run(collect())
            got_ix = drain(ix, last)
            ix.close()
    finally:
        w.close()
    want = etcd_events(etcd_session.endpoint, p, since, last)

    def on_n1(kv: Any) -> bool:
        return kv is not None and json.loads(kv.value)["spec"]["nodeName"] == "n1"

    assert got_async == [e for e in want if zlib.crc32(e.kv.key) % 2 == 0]
    assert got_ix == [e for e in want if zlib.crc32(e.kv.key) % 2 == 1
                      and (on_n1(e.kv) or on_n1(e.prev_kv))]
    assert got_ix, "the test needs events in that shard and index"
