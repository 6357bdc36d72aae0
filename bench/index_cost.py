"""Secondary index lookups beside the alternatives, in one run, on this machine.

    python bench/index_cost.py [--keys 100000] [--rounds 5] [--json bench/results/index-cost.json]

Loads --keys pod-like JSON values (~250 bytes, ``spec.nodeName`` one of keys/100
nodes, so each node has 100 pods spread over the range) into a throwaway etcd
(--unsafe-no-fsync), starts a writer with ``--index node=json:/spec/nodeName``
and, in this one process, times in interleaved rounds:

- ``list(prefix of 100)``: the reference, 100 contiguous keys;
- ``by_index("node", X)``: the 100 pods of one node, from the index;
- list-and-filter: ``list(whole range)`` then json.loads of each value (what a
  user does without an index);
- a per-process dict index: built once from the cache (a relist plus a JSON
  parse of every value, as a client-go indexer does from its informer's store),
  then one dict lookup.

Reports wall and CPU time per operation (medians over rounds), the ratios the
issue sets targets for, the dict index's build time and memory, and the reader's
memory growth over the by_index rounds. The JSON is written only if every step
succeeded (to a temporary file, then renamed).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import psutil  # noqa: E402

import shmcache  # noqa: E402
from bench._common import stamp  # noqa: E402
from tests.etcdserver import EtcdServer  # noqa: E402
from tests.helpers import WriterProcess  # noqa: E402

PREFIX = b"/bench/pods/"
NAME = "bench-index"


def pod_key(i: int) -> bytes:
    return PREFIX + b"g%05d/pod-%02d" % (i // 100, i % 100)


def pod_value(i: int, nodes: int) -> bytes:
    return json.dumps({
        "metadata": {"name": f"pod-{i}", "namespace": f"ns-{i % 10}",
                     "labels": {"app": f"app-{i % 50}", "tier": "web"}},
        "spec": {"nodeName": f"node-{(i * 7919) % nodes}", "containers": [
            {"name": "main", "image": "registry.example/app:1.2.3"}]},
        "status": {"phase": "Running"}}).encode()


def load(client: Any, n: int, nodes: int) -> int:
    from etcd3.etcdrpc import rpc_pb2

    stub, md = client.kvstub, client.metadata
    inflight: list[Any] = []
    rev = 0
    for start in range(0, n, 100):
        ops = [rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(
            key=pod_key(i), value=pod_value(i, nodes))) for i in range(start, min(n, start + 100))]
        inflight.append(stub.Txn.future(rpc_pb2.TxnRequest(success=ops), 60, metadata=md))
        if len(inflight) >= 8:
            rev = max(rev, inflight.pop(0).result().header.revision)
    for f in inflight:
        rev = max(rev, f.result().header.revision)
    return int(rev)


def timed(fn: Any, n: int) -> tuple[float, float]:
    """(wall µs, CPU µs) per call over n calls."""
    gc.collect()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n):
        fn()
    return ((time.perf_counter() - t0) / n * 1e6, (time.process_time() - c0) / n * 1e6)


def rss() -> int:
    return int(psutil.Process().memory_info().rss)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keys", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    n = args.keys
    nodes = max(1, n // 100)
    rnd = random.Random(1)
    with EtcdServer(extra_args=["--unsafe-no-fsync", "--quota-backend-bytes",
                                str(8 << 30)]) as etcd:
        client = etcd.client()
        t0 = time.perf_counter()
        last = load(client, n, nodes)
        print(f"loaded {n} keys in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        w = WriterProcess(NAME, etcd.endpoint, PREFIX, ring_size="64MiB",
                          extra=["--index", "node=json:/spec/nodeName", "--verify-interval", "0"])
        try:
            w.start(wait=False)
            w.wait_ready(timeout=600)
            r = shmcache.Reader(NAME, timeout=600)
            assert r.wait(last, timeout=600)
            groups = [PREFIX + b"g%05d/" % g for g in range(n // 100)]
            names = [f"node-{j}" for j in range(nodes)]
            # Correctness first: a lookup equals the filter it replaces.
            probe = names[len(names) // 2]
            filtered = [kv for kv in r.list(PREFIX)
                        if json.loads(kv.value)["spec"]["nodeName"] == probe]
            assert r.by_index("node", probe).items == filtered and len(filtered) == 100
            assert len(r.list(groups[0])) == 100

            rss0 = rss()
            t0, c0 = time.perf_counter(), time.process_time()
            dict_index: dict[str, list[Any]] = {}
            for kv in r.list(PREFIX):
                dict_index.setdefault(json.loads(kv.value)["spec"]["nodeName"], []).append(kv)
            build = {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
                     "rss_growth_mb": (rss() - rss0) / 2**20}

            ops: dict[str, Any] = {
                "list(prefix of 100)": (lambda: r.list(rnd.choice(groups)), 2000),
                "by_index (100 of the range)": (lambda: r.by_index("node", rnd.choice(names)),
                                                2000),
                "list whole range + json filter": (
                    lambda: [kv for kv in r.list(PREFIX)
                             if json.loads(kv.value)["spec"]["nodeName"] == rnd.choice(names)],
                    max(1, 200_000 // n)),
                "per-process dict index lookup": (lambda: dict_index[rnd.choice(names)], 20000),
            }
            samples: dict[str, list[tuple[float, float]]] = {k: [] for k in ops}
            rss_before_rounds = rss()
            for _ in range(args.rounds):
                for name, (fn, count) in ops.items():
                    samples[name].append(timed(fn, count))
            by_index_rss_growth = (rss() - rss_before_rounds) / 2**20
            r.close()
        finally:
            w.close()
    res = {name: {"wall_us": statistics.median(s[0] for s in xs),
                  "cpu_us": statistics.median(s[1] for s in xs)} for name, xs in samples.items()}
    bi, l100 = res["by_index (100 of the range)"], res["list(prefix of 100)"]
    lf = res["list whole range + json filter"]
    out = stamp(benchmark="index_cost", keys=n, nodes=nodes, rounds=args.rounds, ops=res,
                ratios={"by_index / list(prefix of 100), CPU": bi["cpu_us"] / l100["cpu_us"],
                        "list+filter / by_index, CPU": lf["cpu_us"] / bi["cpu_us"]},
                dict_index_build=build, reader_rss_growth_mb_over_rounds=by_index_rss_growth)
    width = max(len(k) for k in res)
    print(f"{n} keys, {nodes} nodes of 100 pods, medians of {args.rounds} interleaved rounds")
    for name, v in res.items():
        print(f"  {name:<{width}}  {v['wall_us']:>12.1f} µs wall  {v['cpu_us']:>12.1f} µs CPU")
    for k, v in out["ratios"].items():
        print(f"  {k}: {v:.2f}")
    print(f"  dict index: built in {build['wall_s']:.2f}s ({build['cpu_s']:.2f}s CPU), "
          f"+{build['rss_growth_mb']:.0f} MB in this process")
    print(f"  reader RSS growth over the rounds: {by_index_rss_growth:.1f} MB")
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(out, f, indent=2)
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
