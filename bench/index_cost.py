"""Secondary index lookups beside the alternatives, in one run, on this machine.

    python bench/index_cost.py [--keys 100000] [--rounds 7] [--json bench/results/index-cost.json]

Loads --keys pod-like JSON values (~270 bytes, ``spec.nodeName`` one of keys/100
nodes, so each node has 100 pods spread over the range; bench/_pods.py) into a
throwaway etcd (--unsafe-no-fsync), starts a writer with
``--index node=json:/spec/nodeName`` and, in this one process, times in
interleaved rounds (the order rotating each round):

- ``list(prefix of 100)``: the reference, 100 contiguous keys;
- ``by_index("node", X)``: the 100 pods of one node, from the index;
- list-and-filter: ``list(whole range)`` then json.loads of each value, keeping
  the pods of one node (what a user does without an index);
- a per-process dict index (built once from the cache before the rounds: a
  relist plus a JSON parse of every value, as a client-go indexer does from
  its informer's store): index value -> keys, then the store's item for each
  key, as client-go's ``Indexer.ByIndex`` does.

Each op's X is drawn at random (seeded) on every call; the script's own heap is
frozen out of the garbage collector's passes (gc.freeze) during the rounds.
Reported: CPU time per call (time.process_time around a batch; median and range
over the rounds), wall time per call (each call timed; p50/p90/p99 over every
call of every round), and the ratios the issue sets targets for (CPU), also
taken within each round.

Memory, each in a fresh process (spawned, one at a time, after the rounds):

- a reader: memory before ``Reader()``, after attaching, and after
  ``by_index`` of every node value twice (so every posting and every entry of
  the snapshot is touched). USS counts pages of a shared mapping as private
  while no other process maps them, so a lone reader's USS also holds the
  pages of the cache's segments it read (shared between readers, one copy per
  host): reported apart, "own" = USS minus them. json.loads is wrapped to
  count calls, which must stay 0 (readers never parse values);
- the dict index built from the cache (Reader.list of the range + a parse of
  every value): build wall/CPU and own memory growth (as for the reader);
- the dict index built from a replica: a paginated etcd range read (pages of
  50,000) into {key: value} plus a parse of every value: build wall/CPU and
  USS growth. The range read goes through shmcache.etcdapi under the installed
  protobuf implementation (the stamp names it; the committed figures used
  python-etcd3's messages under protobuf 3.20.3, pure Python). Keeping either
  current (a watch per process) is not included.

The JSON is written only if every step succeeded (to a temporary file, then
renamed). Measured here: 7 s at 10k keys, 17 s at 100k (the default), about
3 min at 1M (loading etcd and the writer's first snapshot ~40 s each, the
replica's etcd read ~45 s, list-and-filter 4 s a call).
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import os
import random
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import shmcache  # noqa: E402
from bench._common import etcd_client, pct, range_all, stamp, write_json  # noqa: E402
from bench._pods import (  # noqa: E402
    CpuMeter,
    group_prefix,
    library_facts,
    load,
    memory,
    node_of,
    pod_key,
    timed,
)
from shmcache.format.layout import prefix_range_end  # noqa: E402
from tests.etcdserver import EtcdServer  # noqa: E402
from tests.helpers import WriterProcess  # noqa: E402

PREFIX = b"/bench/pods/"
NAME = "bench-index"


# -- memory, each in a fresh process -------------------------------------------------------

def _child(kind: str, arg: dict[str, Any], q: Any) -> None:
    try:
        q.put(_MEASURE[kind](**arg))
    except BaseException as exc:  # reported to the parent, which fails the run
        q.put({"error": f"{type(exc).__name__}: {exc}"})


def _reader_memory(name: str, values: list[str]) -> dict[str, Any]:
    calls = [0]
    real_loads = json.loads

    def counting_loads(*a: Any, **kw: Any) -> Any:
        calls[0] += 1
        return real_loads(*a, **kw)

    json.loads = counting_loads  # type: ignore[assignment]
    memory()  # (psutil's first smaps read allocates: not the reader's)
    gc.collect()
    m0 = memory()
    r = shmcache.Reader(name)
    m_attach = memory()
    keys = 0
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(2):
        for v in values:
            keys += len(r.by_index("node", v))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    gc.collect()
    m1 = memory()
    r.close()
    mb = 2**20
    return {"uss_before_mb": m0["uss"] / mb,
            "attach_own_growth_mb": (m_attach["own"] - m0["own"]) / mb,
            "own_growth_mb": (m1["own"] - m0["own"]) / mb,
            "uss_growth_mb": (m1["uss"] - m0["uss"]) / mb,
            "shm_pages_touched_mb": m1["shm_rss"] / mb,
            "by_index_calls": 2 * len(values),
            "keys_returned": keys, "json_loads_calls": calls[0], "wall_s": wall, "cpu_s": cpu}


def _dict_from_cache(name: str, prefix: bytes) -> dict[str, Any]:
    memory()
    gc.collect()
    u0 = memory()["own"]
    r = shmcache.Reader(name)
    t0, c0 = time.perf_counter(), time.process_time()
    store: dict[bytes, Any] = {}
    index: dict[str, list[bytes]] = {}
    for kv in r.list(prefix):
        store[kv.key] = kv
        index.setdefault(json.loads(kv.value)["spec"]["nodeName"], []).append(kv.key)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    gc.collect()
    u1 = memory()["own"]
    out = {"keys": len(store), "values": len(index), "wall_s": wall, "cpu_s": cpu,
           "growth_mb": (u1 - u0) / 2**20}
    del store, index
    r.close()
    return out


def _dict_from_replica(host: str, port: int, prefix: bytes) -> dict[str, Any]:
    client = etcd_client(host, port)
    memory()
    gc.collect()
    u0 = memory()["own"]
    t0, c0 = time.perf_counter(), time.process_time()
    _rev, kvs = range_all(client, prefix, prefix_range_end(prefix), page=50_000)
    store = {kv.key: kv.value for kv in kvs}
    del kvs
    listed_wall, listed_cpu = time.perf_counter() - t0, time.process_time() - c0
    index: dict[str, list[bytes]] = {}
    for k, v in store.items():
        index.setdefault(json.loads(v)["spec"]["nodeName"], []).append(k)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    gc.collect()
    u1 = memory()["own"]
    out = {"keys": len(store), "values": len(index), "wall_s": wall, "cpu_s": cpu,
           "etcd_list_wall_s": listed_wall, "etcd_list_cpu_s": listed_cpu,
           "growth_mb": (u1 - u0) / 2**20}
    del store, index
    client.close()
    return out


_MEASURE = {"reader": _reader_memory, "dict from cache": _dict_from_cache,
            "dict from replica": _dict_from_replica}


def in_fresh_process(kind: str, **arg: Any) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(kind, arg, q))
    p.start()
    try:
        res: dict[str, Any] = q.get(timeout=1800)
    finally:
        p.join(60)
        if p.is_alive():
            p.kill()
            p.join()
    if "error" in res:
        raise RuntimeError(f"{kind}: {res['error']}")
    return res


# -- the run ----------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keys", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    n = args.keys
    if n < 100 or n % 100:
        ap.error("--keys must be a multiple of 100")
    nodes = n // 100
    rnd = random.Random(args.seed)
    t_start = time.monotonic()
    lib = library_facts()  # what this run measures; must not change under it
    machine = stamp()
    with EtcdServer(extra_args=["--unsafe-no-fsync", "--quota-backend-bytes",
                                str(8 << 30)]) as etcd:
        client = etcd.api_client()
        t0 = time.perf_counter()
        last = load(client, PREFIX, n, nodes)
        load_s = time.perf_counter() - t0
        print(f"loaded {n} keys in {load_s:.1f}s", file=sys.stderr)
        w = WriterProcess(NAME, etcd.endpoint, PREFIX, ring_size="64MiB",
                          extra=["--index", "node=json:/spec/nodeName", "--verify-interval", "0"])
        try:
            t0 = time.perf_counter()
            w.start(wait=False)
            w.wait_ready(timeout=1800)
            r = shmcache.Reader(NAME, timeout=600)
            assert r.wait(last, timeout=1800)
            ready_s = time.perf_counter() - t0
            print(f"writer ready in {ready_s:.1f}s", file=sys.stderr)
            groups = [group_prefix(PREFIX, g) for g in range(n // 100)]
            names = [f"node-{j}" for j in range(nodes)]
            # Correctness first: a lookup equals the filter it replaces, and the data
            # are what the loader wrote.
            probe = names[len(names) // 2]
            whole = r.list(PREFIX)
            assert [kv.key for kv in whole] == sorted(pod_key(PREFIX, i) for i in range(n))
            filtered = [kv for kv in whole if json.loads(kv.value)["spec"]["nodeName"] == probe]
            assert r.by_index("node", probe).items == filtered and len(filtered) == 100
            assert sum(node_of(i, nodes) == probe for i in range(n)) == 100
            assert len(r.list(groups[0])) == 100
            value_bytes = statistics.median(len(kv.value) for kv in whole)
            del whole, filtered

            # The per-process dict index the rounds look up in (its memory is measured
            # in a fresh process below).
            store: dict[bytes, Any] = {}
            dict_index: dict[str, list[bytes]] = {}
            for kv in r.list(PREFIX):
                store[kv.key] = kv
                dict_index.setdefault(json.loads(kv.value)["spec"]["nodeName"], []).append(kv.key)

            def list_and_filter() -> list[Any]:
                node = rnd.choice(names)  # one node per call
                return [kv for kv in r.list(PREFIX)
                        if json.loads(kv.value)["spec"]["nodeName"] == node]

            def dict_lookup() -> list[Any]:
                return [store[k] for k in dict_index[rnd.choice(names)]]

            assert dict_lookup() and len(list_and_filter()) == 100
            ops: dict[str, tuple[Any, int]] = {
                "list(prefix of 100)": (lambda: r.list(rnd.choice(groups)), 2000),
                "by_index (100 of the range)": (lambda: r.by_index("node", rnd.choice(names)),
                                                2000),
                "list whole range + json filter": (list_and_filter, max(1, 200_000 // n)),
                "per-process dict index lookup": (dict_lookup, 20000),
            }
            walls: dict[str, list[float]] = {k: [] for k in ops}
            cpus: dict[str, list[float]] = {k: [] for k in ops}
            order = list(ops)
            # This script's own heap (the dict index's 100k+ objects) out of the collector's
            # full passes, which would otherwise charge its size to every op.
            gc.collect()
            gc.freeze()
            meter = CpuMeter()
            for rd in range(args.rounds):
                for name in order[rd % len(order):] + order[:rd % len(order)]:
                    fn, count = ops[name]
                    ws, cpu = timed(fn, count)
                    walls[name].extend(ws)
                    cpus[name].append(cpu)
            foreign = meter.foreign_cores()
            gc.unfreeze()
            rounds_s = time.monotonic() - meter.t0[0]
            store.clear()
            dict_index.clear()
            gc.collect()

            mem = {"reader": in_fresh_process("reader", name=NAME, values=names),
                   "dict index from the cache": in_fresh_process(
                       "dict from cache", name=NAME, prefix=PREFIX),
                   "dict index from a replica": in_fresh_process(
                       "dict from replica", host=etcd.host, port=etcd.port, prefix=PREFIX)}
            etcd_version = etcd.version
            # Closed only now: while r maps the index segment, the cleanup of a test
            # session ending on this host does not take it for a leak (tests/conftest.py
            # reads "NAME.idx.N" as a cache named "NAME.idx").
            r.close()
        finally:
            w.close()
            client.close()
    res = {name: {"calls_per_round": ops[name][1],
                  "cpu_us": statistics.median(cpus[name]),
                  "cpu_us_range": [min(cpus[name]), max(cpus[name])],
                  "wall_us": {"p50": pct(walls[name], 50), "p90": pct(walls[name], 90),
                              "p99": pct(walls[name], 99)}} for name in ops}
    bi, l100 = res["by_index (100 of the range)"], res["list(prefix of 100)"]
    lf = res["list whole range + json filter"]
    # Also the ratio within each round (the two ops ran back to back), median and range.
    per_round = [b / lst for b, lst in zip(cpus["by_index (100 of the range)"],
                                            cpus["list(prefix of 100)"], strict=True)]
    rdr = mem["reader"]
    assert rdr["json_loads_calls"] == 0, rdr
    assert rdr["keys_returned"] == 2 * n, rdr
    if library_facts() != lib:
        raise RuntimeError(f"the shmcache library changed during the run ({lib} -> "
                           f"{library_facts()}): figures not written")
    out = dict(machine, library=lib, benchmark="index_cost", keys=n, nodes=nodes,
               rounds=args.rounds, seed=args.seed, etcd=etcd_version,
               value_bytes_median=value_bytes, load_s=load_s, writer_ready_s=ready_s,
               rounds_s=rounds_s, total_s=time.monotonic() - t_start,
               foreign_cpu_cores=foreign, ops=res,
               ratios={"by_index / list(prefix of 100), CPU": bi["cpu_us"] / l100["cpu_us"],
                       "list+filter / by_index, CPU": lf["cpu_us"] / bi["cpu_us"]},
               by_index_over_list_per_round={"median": statistics.median(per_round),
                                             "min": min(per_round), "max": max(per_round)},
               memory=mem)
    width = max(len(k) for k in res)
    print(f"{n} keys, {nodes} nodes of 100 pods, {args.rounds} interleaved rounds "
          f"(other processes used {foreign} cores meanwhile)")
    print(f"  {'':<{width}}  {'CPU µs/call':>12} {'(range)':>21}  {'wall p50':>10} {'p99':>10}")
    for name, v in res.items():
        lo, hi = v["cpu_us_range"]
        print(f"  {name:<{width}}  {v['cpu_us']:>12.1f} {f'({lo:.1f}–{hi:.1f})':>21}  "
              f"{v['wall_us']['p50']:>10.1f} {v['wall_us']['p99']:>10.1f}")
    for k, v in out["ratios"].items():
        print(f"  {k}: {v:.2f}")
    pr = out["by_index_over_list_per_round"]
    print(f"  by_index / list(prefix of 100) within a round: median {pr['median']:.2f} "
          f"({pr['min']:.2f}–{pr['max']:.2f})")
    print(f"  reader: own memory {rdr['attach_own_growth_mb']:+.2f} MB at attach, "
          f"{rdr['own_growth_mb']:+.2f} MB after by_index of every value twice "
          f"(USS +{rdr['uss_growth_mb']:.2f} MB incl. {rdr['shm_pages_touched_mb']:.1f} MB "
          f"of shared segment pages); json.loads calls: {rdr['json_loads_calls']}")
    for k in ("dict index from the cache", "dict index from a replica"):
        m = mem[k]
        print(f"  {k}: built in {m['wall_s']:.2f}s ({m['cpu_s']:.2f}s CPU), "
              f"own memory +{m['growth_mb']:.0f} MB")
    print(f"  total {out['total_s']:.0f}s")
    if args.json:
        write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
