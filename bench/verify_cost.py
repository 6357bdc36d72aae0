"""Cost of checking a cache against etcd (the writer's verifier) beside a relist, same run.

    python bench/verify_cost.py [--keys 100000] [--rounds 3]

Loads --keys keys of 256-byte values into a throwaway etcd, starts a writer, then
alternates: a keys-only comparison of the snapshot with etcd (what --verify-interval
runs), the same with values (check --against-etcd --values), and a full relist read
(what the writer does on start). Reports wall time, this process's CPU time and the
bytes etcd sent, medians over the rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import shmcache  # noqa: E402
from shmcache.format import layout
from shmcache.writer import verify as _verify
from shmcache.writer.etcd import connection as _etcd  # noqa: E402
from tests.etcdserver import EtcdServer  # noqa: E402
from tests.helpers import WriterProcess  # noqa: E402

PREFIX = b"/bench/verify/"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keys", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    from shmcache.etcdapi import rpc

    with EtcdServer(extra_args=["--unsafe-no-fsync", "--quota-backend-bytes", str(8 << 30)]) as etcd:
        client = etcd.api_client()
        value = b"v" * 256
        for i in range(0, args.keys, 128):
            ops = [rpc.RequestOp(request_put=rpc.PutRequest(
                key=PREFIX + b"%08d" % j, value=value)) for j in range(i, min(args.keys, i + 128))]
            client.kv.Txn(rpc.TxnRequest(success=ops), 30, metadata=client.metadata)
        w = WriterProcess("bench-verify", etcd.endpoint, PREFIX, ring_size="64MiB",
                          extra=["--verify-interval", "0"])
        try:
            w.start(wait=False)
            w.wait_ready(timeout=600)
            shmcache.Reader("bench-verify", timeout=600).close()  # the first snapshot is out
            conn = _etcd.Connection(_etcd.EtcdSettings(endpoints=[etcd.endpoint]))
            conn.connect()
            out: dict[str, list[tuple[float, float, int]]] = {"verify keys-only": [],
                                                               "verify with values": [],
                                                               "relist": []}
            for _ in range(args.rounds):
                for name in out:
                    t0, c0 = time.perf_counter(), time.process_time()
                    if name == "relist":
                        rev, items = conn.list_range(PREFIX, layout.prefix_range_end(PREFIX))
                        size = sum(len(k) + len(v[0]) for k, v in items)  # payload, a lower bound
                        n = len(items)
                    else:
                        res = _verify.compare_cache("bench-verify", conn,
                                                    values=name.endswith("values"))
                        assert res.mismatches == 0, res.first
                        size, n = res.etcd_bytes, res.keys
                    out[name].append((time.perf_counter() - t0, time.process_time() - c0, size))
                    assert n == args.keys
            conn.close()
        finally:
            w.close()
            client.close()
    report = {name: {"wall_s": statistics.median(r[0] for r in rows),
                     "cpu_s": statistics.median(r[1] for r in rows),
                     "etcd_bytes": int(statistics.median(r[2] for r in rows))}
              for name, rows in out.items()}
    print(json.dumps({"keys": args.keys, "rounds": args.rounds, "machine": os.uname().machine,
                      "cpus": os.cpu_count(), "results": report}, indent=1))


if __name__ == "__main__":
    main()
