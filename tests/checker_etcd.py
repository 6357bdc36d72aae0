"""The fault checker's etcd side (tests/checker.py): the cache's watch events held against
etcd's own, and the ``cluster_swap`` fault, another etcd cluster put behind the writer's etcd
address.

- ``verify_watch``: a watch's events from the cache against etcd's watch from the same
  start, with the previous values etcd could no longer send filled in from its range.
- ``Clusters``: the live etcd and another cluster standing by. ``swap`` stops the live one
  and starts the other, written ahead in revision and holding other data, on its client
  port; the cache must relist into a new epoch (a watch opened before ends with
  CompactedError after the old cluster's events only), come to equal the new cluster, and
  log the change. Readers learn of a swap through two shared values, so that each answer
  is held against the cluster it came from.
"""

from __future__ import annotations

import os
import random
import time
from typing import Any

import shmcache
from tests.checker_faults import StepOverrun
from tests.checker_workload import KEYS, PREFIX
from tests.etcdserver import EtcdServer, free_port, use_pure_python_protobuf
from tests.helpers import etcd_events

UNVERIFIABLE = object()  # etcd no longer has the history to compare with


def verify_watch(idx: int, endpoint: str, since: int, got: list[shmcache.Event],
                 at_start: Any, etcd_call: Any) -> str | None | object:
    """The cache's watch events from ``since`` against etcd's own watch from there: a
    divergence, None if equal, or UNVERIFIABLE when etcd no longer has what it takes.

    ``at_start`` is etcd's range at ``since`` (or UNVERIFIABLE); ``etcd_call(fn, *args)``
    calls etcd, UNVERIFIABLE once it compacted that history.
    """
    want = etcd_call(etcd_events, endpoint, PREFIX, since, got[-1].revision)
    if want is UNVERIFIABLE:
        return UNVERIFIABLE
    want = fill_omitted_prev_kvs(want, None if at_start is UNVERIFIABLE else at_start)
    if want is UNVERIFIABLE:
        return UNVERIFIABLE
    return None if got == want else _diff_events(idx, since, got, want)


def fill_omitted_prev_kvs(events: list[shmcache.Event],
                          at_start: list[shmcache.KeyValue] | None) -> list[shmcache.Event] | object:
    """etcd's watch events, each prev_kv that etcd left out filled in from its range at the
    watch's start (``at_start``) and the events before; UNVERIFIABLE without that range.

    etcd reads an event's prev_kv at the revision before the event and sends the
    event without it once compaction has passed that revision: the first event of
    a watch from the compact revision, and events still queued for a watch when a
    compaction overtakes them. The writer fills such a prev_kv from its state,
    which holds it exactly (Publisher.apply), so a watch from the cache rightly
    has a prev_kv etcd's lacks. The previous value is etcd's all the same, read
    from etcd's answers here; a prev_kv etcd did send is compared as sent.
    """
    state = {kv.key: kv for kv in at_start} if at_start is not None else None
    out = []
    for ev in events:
        # A DELETE always has a previous value, a PUT unless it created the key.
        if ev.prev_kv is None and (ev.type == "DELETE" or ev.kv.version > 1):
            if state is None:
                return UNVERIFIABLE
            ev = ev._replace(prev_kv=state.get(ev.kv.key))
        if state is not None:
            if ev.type == "PUT":
                state[ev.kv.key] = ev.kv
            else:
                state.pop(ev.kv.key, None)
        out.append(ev)
    return out


def _diff_events(idx: int, since: int, got: list[Any], want: list[Any]) -> str:
    for i, (a, b) in enumerate(zip(got, want, strict=False)):
        if a != b:
            fields = [f for f in ("type", "revision") if getattr(a, f) != getattr(b, f)]
            for part in ("kv", "prev_kv"):
                x, y = getattr(a, part), getattr(b, part)
                if (x is None) != (y is None):
                    fields.append(f"{part}: {'None' if x is None else 'set'} vs "
                                  f"{'None' if y is None else 'set'}")
                elif x is not None and y is not None:
                    fields += [f"{part}.{f}: {getattr(x, f)!r:.60} vs {getattr(y, f)!r:.60}"
                               for f in x._fields if getattr(x, f) != getattr(y, f)]
            return (f"reader {idx}: watch from {since} differs from etcd at event {i} "
                    f"({a.type} {a.kv.key!r} at {a.revision}): {'; '.join(fields)}")
    return (f"reader {idx}: watch from {since}: {len(got)} events, etcd has {len(want)}")


def cluster_id(server: EtcdServer) -> int:
    """The id of the etcd cluster ``server`` belongs to (from a response header)."""
    use_pure_python_protobuf()
    from etcd3.etcdrpc import rpc_pb2

    client = server.client()
    try:
        resp = client.maintenancestub.Status(rpc_pb2.StatusRequest(), 10,
                                             metadata=client.metadata)
        return int(resp.header.cluster_id)
    finally:
        client.close()


class Clusters:
    """The etcd the cache reads from (``live``) and, once a cluster swap ran, another cluster
    standing by at an address of its own, to be swapped in behind the live one's address.

    Concurrency contract: only the checker's main thread calls the methods. Other processes
    learn of a swap through two shared values: ``swaps`` (odd while a swap is under way) and
    ``cluster`` (the live cluster's id, 0 during a swap). A reader compares an answer of the
    cache with etcd only if the answer came from the live cluster and ``swaps`` stayed the
    same even number while it asked etcd (reader_loop's ``etcd_call``): each answer is held
    against the cluster it came from.
    """

    def __init__(self, binary: str | None, swaps: Any, cluster: Any) -> None:
        self.live = EtcdServer(binary=binary)
        self._binary = binary
        self._standby: EtcdServer | None = None
        self.swaps = swaps
        self.cluster = cluster
        self.ahead = 0  # swaps in which the new cluster was ahead of the old one's revision

    def start(self) -> None:
        self.live.start()
        self.cluster.value = cluster_id(self.live)

    def close(self) -> None:
        self.live.close()
        if self._standby is not None:
            self._standby.close()

    def client(self) -> Any:
        """A client of the live cluster."""
        return self.live.client()

    def swap(self, name: str, prefix: bytes, writer_log: str, limit: float,
             rnd: random.Random) -> tuple[dict[str, int], list[str]]:
        """Replace the live etcd by the other cluster, ahead in revision and holding other
        data, at the same address; then check what the cache must do: a watch opened before
        ends with CompactedError after events of the old cluster only, the cache comes to
        equal the new cluster, and the writer's log (``writer_log``, a path) names the
        change. Returns (counts, problems) in reader_loop's terms; StepOverrun if the cache
        has not followed within ``limit`` seconds."""
        new = self._standby_ahead(rnd)
        with open(writer_log, "rb") as f:
            log_from = f.seek(0, os.SEEK_END)
        problems: list[str] = []
        with shmcache.Reader(name, timeout=30) as r:
            since = r.revision
            watch = r.watch(prefix, since_revision=since)
            try:
                seeded = _revision(new)
                new.stop()  # (from its own address)
                self.swaps.value += 1
                self.cluster.value = 0
                old, port = self.live, self.live.port
                old.stop()
                new.start_at(port)
                self.live, self._standby = new, old
                new_id = cluster_id(new)
                self.cluster.value = new_id
                self.swaps.value += 1
                events, ended = _until_compacted(watch, limit)
            finally:
                watch.close()
        if not ended:
            problems.append(f"a watch opened before the cluster swap ({since}) got no "
                            f"CompactedError in {limit:.0f}s but {len(events)} events")
        problems += _equals_live(name, prefix, new, new_id, limit)
        with open(writer_log, "rb") as f:
            f.seek(log_from)
            logged = f.read().decode(errors="replace")
        if f"belongs to cluster {new_id:x}" not in logged:
            problems.append(f"the writer's log does not name the change to cluster {new_id:x}")
        # The old cluster stands by at an address of its own (for the next swap), where its
        # history shows what the watch got: its own events, none of the new cluster's.
        for attempt in range(3):  # (a free port may be taken before etcd binds it)
            try:
                old.start_at(free_port())
                break
            except RuntimeError:
                if attempt == 2:
                    raise
        old_rev = _revision(old)
        self.ahead += seeded > old_rev
        if events:
            problems += _events_of(old, prefix, since, events)
        return {"events": len(events), "lists": 1, "explicit": int(ended)}, problems

    def _standby_ahead(self, rnd: random.Random) -> EtcdServer:
        """The other cluster, running at its own address, seeded with data of its own and
        written ahead of the live cluster's revision."""
        use_pure_python_protobuf()
        from etcd3.etcdrpc import rpc_pb2

        fresh = self._standby is None
        if self._standby is None:
            # (A cluster token of its own: another cluster id even at the same peer URL.)
            self._standby = EtcdServer(binary=self._binary, name="checker-other",
                                       extra_args=["--initial-cluster-token", "checker-other"])
            self._standby.start()
        standby = self._standby
        # Ahead of the live revision by more than the workload writes before the swap.
        target = _revision(self.live) + rnd.randrange(300, 600)
        client = standby.client()
        try:
            keys = KEYS if fresh else rnd.sample(KEYS, 5)
            puts = [rpc_pb2.PutRequest(key=k, value=b"other cluster %d" % rnd.randrange(1000))
                    for k in keys]
            filler = rpc_pb2.PutRequest(key=b"/chk-filler", value=b"")  # (outside the prefix)
            while True:
                need = target - _revision(standby) - len(puts)
                if need <= 0 and not puts:
                    break
                batch = puts + [filler] * max(0, min(need, 500))
                puts = []
                for fut in [client.kvstub.Put.future(p, 10) for p in batch]:
                    fut.result()
        finally:
            client.close()
        return standby


def _revision(server: EtcdServer) -> int:
    from tests.helpers import etcd_current_revision

    client = server.client()
    try:
        return etcd_current_revision(client)
    finally:
        client.close()


def _until_compacted(watch: shmcache.Watch, limit: float) -> tuple[list[shmcache.Event], bool]:
    """The watch's events until it raises CompactedError (True) or ``limit`` seconds pass."""
    events: list[shmcache.Event] = []
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            events += watch.poll(timeout=0.1)
        except shmcache.CompactedError:
            return events, True
    return events, False


def _equals_live(name: str, prefix: bytes, server: EtcdServer, cid: int,
                 limit: float) -> list[str]:
    """The cache comes to hold ``server``'s cluster (``cid``) and equals it; else StepOverrun
    after ``limit`` seconds, or a divergence."""
    from tests.helpers import etcd_current_revision, etcd_range

    deadline = time.monotonic() + limit
    with shmcache.Reader(name, timeout=30) as r:
        while r.status().cluster_id != cid:
            if time.monotonic() > deadline:
                raise StepOverrun(f"the cache was not loaded from cluster {cid:x} "
                                  f"{limit:.0f}s after the swap")
            time.sleep(0.05)
        client = server.client()
        try:
            if not r.wait(etcd_current_revision(client), timeout=limit):
                raise StepOverrun(f"the cache stayed at {r.revision} after the swap")
            res = r.list(prefix)
            want = etcd_range(client, prefix, res.revision)
            answered_by = r.status().cluster_id
        finally:
            client.close()
    if answered_by != cid or res.items != want:
        return [f"after the cluster swap the cache at {res.revision} differs from the new "
                f"cluster ({len(res.items)} vs {len(want)} keys)"]
    return []


def _events_of(server: EtcdServer, prefix: bytes, since: int,
               events: list[shmcache.Event]) -> list[str]:
    """The events a watch opened before the swap got, against the old cluster's own
    history: each its event, none from the new cluster."""
    from tests.helpers import etcd_range

    client = server.client()
    try:
        at_start = etcd_range(client, prefix, since)
        want = etcd_events(server.endpoint, prefix, since, events[-1].revision)
    except Exception as exc:  # noqa: BLE001 - the old cluster has no such history
        return [f"the watch opened before the swap got events the old cluster does not have "
                f"({events[0].revision}..{events[-1].revision}): {exc}"[:400]]
    finally:
        client.close()
    want = fill_omitted_prev_kvs(want, at_start)
    return [] if events == want else [
        "a watch opened before the swap: " + _diff_events(0, since, events, want)]
