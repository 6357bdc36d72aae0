"""The proxy's watches across a writer restart: kept when the writer resumes, ended as etcd
ends a compacted watch when it relists (canceled with compact_revision, from which a new
watch is served). Each test has an etcd and a writer of its own."""

from __future__ import annotations

import shmcache
from tests.etcdserver import EtcdServer
from tests.helpers import WriterProcess
from tests.test_proxy_watch import Client, Proxy, _kv, prefix_end


def test_a_relist_cancels_watches_with_compact_revision(etcd_server: EtcdServer, cache_name: str,
                                                        unique_prefix: bytes) -> None:
    from shmcache.etcdapi import Stub, dial, rpc

    kv = Stub(dial.open_channel(*dial.parse_endpoint(etcd_server.endpoint)), "KV")

    def put(key: bytes, value: bytes) -> int:
        return int(kv.Put(rpc.PutRequest(key=unique_prefix + key, value=value),
                          timeout=10).header.revision)

    w = WriterProcess(cache_name, etcd_server.endpoint, unique_prefix)
    w.start()
    r = shmcache.Reader(cache_name)
    p = Proxy(r)
    c = Client(p.endpoint)
    try:
        c.create(unique_prefix, prefix_end(unique_prefix))
        assert c.next().created
        first = put(b"a", b"1")
        got = c.next()
        assert [_kv(e.kv)[:2] for e in got.events] == [(unique_prefix + b"a", b"1")]
        w.kill()
        put(b"b", b"2")
        last = put(b"c", b"3")
        etcd_server.compact(last)
        w.start()  # relists: a new epoch, history from its list revision on
        end = c.next(timeout=30)
        assert (end.watch_id, end.canceled, end.created) == (0, True, False)
        assert end.compact_revision > first
        assert p.metrics.snapshot().watches == 0
        # From the revision it names, a new watch is served (and sees what comes next).
        c.create(unique_prefix, prefix_end(unique_prefix), start_revision=end.compact_revision)
        created = c.next()
        assert created.created and not created.canceled and created.watch_id == 1
        rev = put(b"d", b"4")
        got = c.next()
        assert got.watch_id == 1 and got.header.revision == rev
    finally:
        c.close()
        p.close()
        r.close()
        w.close()


def test_a_writer_restart_without_relist_keeps_watches(etcd_server: EtcdServer, cache_name: str,
                                                      unique_prefix: bytes) -> None:
    """A writer killed and restarted (etcd kept its history): the proxy's watches go on with
    the events written meanwhile and after, none lost, none canceled."""
    from shmcache.etcdapi import Stub, dial, rpc

    kv = Stub(dial.open_channel(*dial.parse_endpoint(etcd_server.endpoint)), "KV")

    def put(key: bytes, value: bytes) -> int:
        return int(kv.Put(rpc.PutRequest(key=unique_prefix + key, value=value),
                          timeout=10).header.revision)

    w = WriterProcess(cache_name, etcd_server.endpoint, unique_prefix)
    w.start()
    r = shmcache.Reader(cache_name)
    p = Proxy(r)
    c = Client(p.endpoint)
    try:
        c.create(unique_prefix, prefix_end(unique_prefix))
        assert c.next().created
        revs = [put(b"a", b"1")]
        w.kill()
        revs += [put(b"b", b"2"), put(b"a", b"3")]
        w.start()
        revs.append(put(b"c", b"4"))
        got = c.until(lambda out: bool(out) and out[-1].header.revision == revs[-1], timeout=30)
        assert [r.header.revision for r in got] == revs
        assert not any(r.canceled for r in got)
    finally:
        c.close()
        p.close()
        r.close()
        w.close()
