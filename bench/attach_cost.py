"""What a fresh process pays to attach, right after heavy writes: time and memory.

    python bench/attach_cost.py [--keys 1000000] [--burst-mib 16] [--processes 20]
        [--tree DIR] [--json bench/results/attach-1m.json]

Starts a throwaway etcd (--unsafe-no-fsync) and a writer (from --tree, default
this checkout: the writer and the readers come from the same tree, since the
shared-memory format must match), then:

1. bulk load: --keys keys of ~250 bytes are put in 128-op transactions while
   the writer runs, so they reach it as watch events through the ring, as in
   production; as soon as a Reader sees the last revision,
2. --processes fresh processes attach one after the other; each times
   ``Reader(name)`` plus its first ``get`` (perf_counter inside the process, after
   ``import shmcache``: interpreter start-up and imports are not counted) and the
   growth of its unique memory (USS, psutil) across them;
3. burst: --burst-mib MiB of changes (1 KiB values over random existing keys),
   then the same fresh processes again.

Reports p50, p99 and max of each over the processes, with the writer's
snapshot and overlay fields at that moment (records a fresh Reader must decode:
RING_HEAD minus OVL_RING_POS, or minus SNAP_RING_POS without an overlay
segment). The JSON is written only if every step succeeded.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")
sys.path.insert(0, ROOT)

PREFIX = b"/bench/attach/"
NAME = "bench-attach"

CHILD = r"""
import gc, json, sys, time
import psutil
import shmcache  # imports are start-up, not attach: outside the measurement
proc = psutil.Process()
gc.collect()
u0 = proc.memory_full_info().uss
t0 = time.perf_counter()
r = shmcache.Reader(sys.argv[1])
kv = r.get(sys.argv[2].encode())
t1 = time.perf_counter()
gc.collect()
u1 = proc.memory_full_info().uss
v = r._view
print(json.dumps({"ms": (t1 - t0) * 1000, "uss_growth_mb": (u1 - u0) / 2**20,
                  "found": kv is not None, "private_entries": len(v.recent),
                  "private_records": len(v.rec_revs),
                  "overlay_segment": getattr(v, "ovl", None) is not None}))
"""


def key(i: int) -> bytes:
    return PREFIX + b"k%08d" % i


def attach_round(tree: str, n: int, keys: int) -> dict[str, Any]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([tree, ROOT])
    rows = []
    rng = random.Random(1)
    for _ in range(n):
        k = key(rng.randrange(keys)).decode()
        out = subprocess.run([sys.executable, "-c", CHILD, NAME, k], capture_output=True,
                             text=True, env=env, cwd=tree, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"attach child failed: {out.stderr[-2000:]}")
        rows.append(json.loads(out.stdout))
    if not all(r["found"] for r in rows):
        raise RuntimeError("a fresh reader did not find a loaded key")

    def dist(f: str) -> dict[str, float]:
        xs = sorted(r[f] for r in rows)
        return {"p50": xs[len(xs) // 2], "p99": xs[min(len(xs) - 1, int(len(xs) * 0.99))],
                "max": xs[-1]}

    return {"attach_get_ms": dist("ms"), "uss_growth_mb": dist("uss_growth_mb"),
            "private_entries": dist("private_entries"),
            "private_records": dist("private_records"),
            "overlay_segment": all(r["overlay_segment"] for r in rows)}


def block_facts(tree: str) -> dict[str, Any]:
    code = ("import json, sys, shmcache; r = shmcache.Reader(sys.argv[1]); "
            "b = r.control.block(); print(json.dumps(b.__dict__))")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([tree, ROOT])
    out = subprocess.run([sys.executable, "-c", code, NAME], capture_output=True, text=True,
                         env=env, cwd=tree, timeout=60, check=True)
    b = json.loads(out.stdout)
    start = b["ovl_ring_pos"] if b.get("ovl_seq") else b["snap_ring_pos"]
    return {"revision": b["revision"], "snap_revision": b["snap_revision"],
            "ovl_seq": b.get("ovl_seq"), "records_after_layers_bytes": b["ring_head"] - start}


def wait_revision(tree: str, rev: int, timeout: float = 600) -> None:
    code = ("import sys, shmcache; r = shmcache.Reader(sys.argv[1], timeout=60); "
            "sys.exit(0 if r.wait(int(sys.argv[2]), float(sys.argv[3])) else 1)")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([tree, ROOT])
    subprocess.run([sys.executable, "-c", code, NAME, str(rev), str(timeout)], env=env,
                   cwd=tree, check=True, timeout=timeout + 60)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=1_000_000)
    ap.add_argument("--burst-mib", type=float, default=16.0)
    ap.add_argument("--processes", type=int, default=20)
    ap.add_argument("--ring-size", default="64MiB")
    ap.add_argument("--tree", default=ROOT, help="the checkout whose writer and readers run")
    ap.add_argument("--json", default=None, metavar="PATH")
    args = ap.parse_args()
    tree = os.path.abspath(args.tree)

    from bench._common import stamp, write_json
    from shmcache.etcdapi import rpc
    from tests.etcdserver import EtcdServer

    result: dict[str, Any] = {"args": vars(args)}
    with tempfile.TemporaryDirectory() as tmp:
        server = EtcdServer(data_dir=os.path.join(tmp, "etcd"),
                            extra_args=["--unsafe-no-fsync", "--quota-backend-bytes",
                                        str(8 << 30)])
        server.start()
        env = dict(os.environ)
        env["PYTHONPATH"] = tree
        log = open(os.path.join(tmp, "writer.log"), "w")
        writer = subprocess.Popen(
            [sys.executable, "-m", "shmcache", "serve", NAME, "--endpoints", server.endpoint,
             "--prefix", PREFIX.decode(), "--ring-size", args.ring_size,
             "--remove-on-exit"], env=env, cwd=tree, stdout=log, stderr=subprocess.STDOUT)
        try:
            client = server.api_client()
            wait_revision(tree, 1, 60)
            t0 = time.monotonic()
            rev = 0
            value = b"v" * 240
            for start in range(0, args.keys, 128):
                ops = [rpc.RequestOp(request_put=rpc.PutRequest(key=key(i), value=value))
                       for i in range(start, min(start + 128, args.keys))]
                resp = client.kv.Txn(rpc.TxnRequest(success=ops), 30, metadata=client.metadata)
                rev = resp.header.revision
            wait_revision(tree, rev)
            result["load_seconds"] = time.monotonic() - t0
            print(f"loaded {args.keys} keys in {result['load_seconds']:.0f} s", flush=True)
            result["after_bulk_load"] = {"block": block_facts(tree),
                                         **attach_round(tree, args.processes, args.keys)}
            print(json.dumps(result["after_bulk_load"]), flush=True)
            rng = random.Random(2)
            big = b"b" * 1024
            n = int(args.burst_mib * 2**20 / (1024 + 30))
            for start in range(0, n, 64):
                ops = [rpc.RequestOp(request_put=rpc.PutRequest(key=key(i), value=big))
                       for i in rng.sample(range(args.keys), min(64, n - start))]
                rev = client.kv.Txn(rpc.TxnRequest(success=ops), 30,
                                    metadata=client.metadata).header.revision
            wait_revision(tree, rev)
            result["after_burst"] = {"block": block_facts(tree),
                                     **attach_round(tree, args.processes, args.keys)}
            print(json.dumps(result["after_burst"]), flush=True)
            client.close()
        finally:
            writer.terminate()
            writer.wait(60)
            log.close()
            server.close()
    result["stamp"] = stamp()
    if args.json:
        write_json(args.json, result, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
