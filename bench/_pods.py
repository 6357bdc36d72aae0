"""Shared pieces of bench/index_cost.py and bench/page_cost.py: pod-like data, timing, output.

The data: key ``PREFIX gNNNNN/pod-MM`` (100 pods per group, so a group prefix
matches exactly 100 keys), a ~250-byte JSON value whose ``spec.nodeName`` is one
of keys/100 nodes (each node has 100 pods spread over the whole range) and
whose ``metadata.namespace`` is one of 10 (each namespace holds a tenth of the
range, also spread over it).
"""

from __future__ import annotations

import gc
import json
import os
import time
from typing import Any

from bench._common import cpu_sample

NAMESPACES = 10


def pod_key(prefix: bytes, i: int) -> bytes:
    return prefix + b"g%05d/pod-%02d" % (i // 100, i % 100)


def group_prefix(prefix: bytes, g: int) -> bytes:
    """The prefix of exactly the 100 keys of group g."""
    return prefix + b"g%05d/" % g


def node_of(i: int, nodes: int) -> str:
    return f"node-{(i * 7919) % nodes}"


def pod_value(i: int, nodes: int, gen: int = 0) -> bytes:
    return json.dumps({
        "metadata": {"name": f"pod-{i}", "namespace": f"ns-{i % NAMESPACES}",
                     "labels": {"app": f"app-{i % 50}", "tier": "web"},
                     "generation": gen},
        "spec": {"nodeName": node_of(i, nodes), "containers": [
            {"name": "main", "image": "registry.example/app:1.2.3"}]},
        "status": {"phase": "Running"}}).encode()


def load(client: Any, prefix: bytes, n: int, nodes: int) -> int:
    """Put n pods in Txn requests of 100 puts (etcd allows 128), 8 in flight; the revision.
    ``client``: an ``ApiClient`` (as for ``put_each``)."""
    from shmcache.etcdapi import rpc

    stub, md = client.kv, client.metadata
    inflight: list[Any] = []
    rev = 0
    for start in range(0, n, 100):
        ops = [rpc.RequestOp(request_put=rpc.PutRequest(
            key=pod_key(prefix, i), value=pod_value(i, nodes)))
            for i in range(start, min(n, start + 100))]
        inflight.append(stub.Txn.future(rpc.TxnRequest(success=ops), 120, metadata=md))
        if len(inflight) >= 8:
            rev = max(rev, inflight.pop(0).result().header.revision)
    for f in inflight:
        rev = max(rev, f.result().header.revision)
    return int(rev)


def put_each(client: Any, items: list[tuple[bytes, bytes]]) -> int:
    """One etcd revision (one ring record) per put, pipelined; the last revision."""
    from shmcache.etcdapi import rpc

    stub, md = client.kv, client.metadata
    inflight: list[Any] = []
    rev = 0
    for k, v in items:
        inflight.append(stub.Put.future(rpc.PutRequest(key=k, value=v), 60, metadata=md))
        if len(inflight) >= 64:
            rev = max(rev, inflight.pop(0).result().header.revision)
    for f in inflight:
        rev = max(rev, f.result().header.revision)
    return int(rev)


def timed(fn: Any, n: int) -> tuple[list[float], float]:
    """n calls of fn: (each call's wall time in µs, CPU µs per call over the n calls).

    CPU time is time.process_time of this process (all its threads; a Reader
    has none of its own), read around the whole batch.
    """
    gc.collect()
    walls: list[float] = []
    clock = time.perf_counter
    c0 = time.process_time()
    for _ in range(n):
        t0 = clock()
        fn()
        walls.append(clock() - t0)
    cpu = (time.process_time() - c0) / n * 1e6
    return [w * 1e6 for w in walls], cpu


def memory() -> dict[str, int]:
    """This process's USS, and the part of it that is pages of shmcache's segments.

    smaps counts a page of a shared mapping as private while no other process
    maps it, so a lone reader's USS includes the pages of the cache's snapshot
    and index segments it touched; with more readers those pages are shared
    (page cache of /dev/shm, one copy per host). ``own`` = USS minus those pages:
    what the process itself allocated.
    """
    import psutil

    p = psutil.Process()
    u = int(p.memory_full_info().uss)
    shm_private = shm_rss = 0
    for m in p.memory_maps(grouped=True):
        if "/dev/shm/shmcache." in m.path:
            shm_private += m.private_clean + m.private_dirty
            shm_rss += m.rss
    return {"uss": u, "shm_private": shm_private, "shm_rss": shm_rss, "own": u - shm_private}


class CpuMeter:
    """Cores used by processes outside this benchmark's tree (the machine may be shared)."""

    def __init__(self) -> None:
        self.t0 = cpu_sample()

    def foreign_cores(self) -> float:
        now = cpu_sample()
        wall = now[0] - self.t0[0]
        other = max(0.0, (now[1] - self.t0[1]) - (now[2] - self.t0[2]))
        return round(other / wall, 2) if wall > 0 else 0.0


def library_facts() -> dict[str, Any]:
    """Which shmcache this process measures: its directory, a digest of its Python and C
    sources and of the built C extension, and whether the C speedups are in use.

    Compared at the start and the end of a run: the library must not change under it
    (other work in a shared tree rebuilds it). A ``COMMIT`` file beside the package
    (written into an export of one commit, e.g. ``git archive``) is reported too.
    """
    import hashlib

    import shmcache
    from shmcache.format import snapshot

    pkg = os.path.dirname(os.path.abspath(shmcache.__file__))
    h = hashlib.sha256()
    for name in sorted(os.listdir(pkg)):
        if name.endswith((".py", ".c", ".so")):
            with open(os.path.join(pkg, name), "rb") as f:
                h.update(name.encode() + b"\0" + f.read())
    commit = None
    try:
        with open(os.path.join(os.path.dirname(pkg), "COMMIT")) as f:
            commit = f.read().strip()
    except OSError:
        pass
    return {"path": pkg, "commit_file": commit, "sources_and_build_sha256": h.hexdigest()[:16],
            "speedups": bool(getattr(snapshot, "USE_SPEEDUPS", False))}
