"""The writer's etcd layer, tree against tree: a relist (``Connection.list_range``) of N keys.

    python bench/etcdapi_cost.py --tree before=DIR --tree after=DIR [--keys 100000]
                                 [--value-size 256] [--rounds 3] [--tag etcdapi-relist]
    python bench/etcdapi_cost.py --writer --tree before=DIR --tree after=DIR [--keys 100000]
    python bench/etcdapi_cost.py --watch-path --tree before=DIR --tree after=DIR [--rounds 3]

One throwaway etcd (``--unsafe-no-fsync``) holds --keys keys of --value-size
bytes under one prefix. Each round lists them once per tree, in a fresh process
running that tree's ``shmcache.writer.etcd.connection`` (``PYTHONPATH=DIR``; a
tree may carry its own protobuf in DIR, e.g. ``pip install --target DIR
--no-deps protobuf==3.20.3``, which then shadows this interpreter's), the order
rotating every round, and ``etcdctl get --prefix > /dev/null`` as etcd's own
client for reference. Recorded per list: wall time, the process's CPU time
during the list, peak RSS of the process, and the protobuf version and
implementation it ran on. Medians over the rounds; the results file goes to
bench/results/TAG.json.

``--writer`` measures the whole relist instead: ``python -m shmcache serve`` of
each tree started on the range, the wall time until a Reader opens the cache (the
writer has listed and published its first snapshot) and the writer's CPU time
then (utime + stime, /proc/PID/stat), the writer stopped after each.

``--watch-path`` instead replays the writer's per-revision work without etcd, in
each tree's process with its etcd layer (and so its protobuf) imported: 200,000
one-event WatchResponses with a prev_kv (1,000 keys, 256-byte values) through
``decode_watch_response``, msgpack and a SortedDict update, and prints the CPU
per response: what importing one protobuf or the other costs the hot path.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C  # noqa: E402

PREFIX = b"/bench/relist/"

CHILD = """
import json, resource, sys, time
import google.protobuf
from google.protobuf.internal import api_implementation
from shmcache.format import layout
from shmcache.writer.etcd import connection as etcd

prefix = sys.argv[2].encode()
conn = etcd.Connection(etcd.EtcdSettings(endpoints=[sys.argv[1]]))
conn.connect()
t0, c0 = time.perf_counter(), time.process_time()
revision, items = conn.list_range(prefix, layout.prefix_range_end(prefix))
wall, cpu = time.perf_counter() - t0, time.process_time() - c0
conn.close()
print(json.dumps({"keys": len(items), "wall_s": wall, "cpu_s": cpu,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "protobuf": f"{google.protobuf.__version__} ({api_implementation.Type()})"}))
"""


WATCH_PATH = """
import sys, time
import google.protobuf
import msgpack
from google.protobuf.internal import api_implementation
from sortedcontainers import SortedDict
from shmcache.writer.etcd import connection  # noqa: F401  (the tree's etcd layer, its protobuf)
from shmcache.writer.etcd.decode import decode_watch_response


def varint(n):
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


def field(num, payload):
    if isinstance(payload, int):
        return varint(num << 3) + varint(payload)
    return varint(num << 3 | 2) + varint(len(payload)) + payload


def key_value(key, value, rev):
    return (field(1, key) + field(2, 5) + field(3, rev) + field(4, 3) + field(5, value))


msgs = []
for i in range(1000):
    key = b"/bench/k%04d" % i
    event = (field(1, 0) + field(2, key_value(key, b"v" * 256, 1000 + i))
             + field(3, key_value(key, b"w" * 256, 999 + i)))
    msgs.append(field(1, field(1, 123456789) + field(3, 1000 + i)) + field(11, event))
state = SortedDict()
n = 200_000
c0 = time.process_time()
for i in range(n):
    for ev in decode_watch_response(msgs[i % 1000])[5]:
        state[ev[1]] = (ev[2], ev[3], ev[4], ev[5], ev[6], msgpack.packb(ev, use_bin_type=True))
cpu = time.process_time() - c0
print(f"{cpu / n * 1e6:.2f} us/response  protobuf {google.protobuf.__version__} "
      f"({api_implementation.Type()})")
"""


def watch_path(trees: list[tuple[str, str]], rounds: int) -> int:
    for rnd in range(rounds):
        for label, tree in trees[rnd % len(trees):] + trees[:rnd % len(trees)]:
            out = subprocess.run([sys.executable, "-c", WATCH_PATH],
                                 env={**os.environ, "PYTHONPATH": tree}, cwd=tree,
                                 capture_output=True, text=True, timeout=600, check=True)
            print(f"round {rnd + 1} {label:12s} {out.stdout.strip()}", flush=True)
    return 0


def serve_in(tree: str, endpoint: str, keys: int) -> dict[str, Any]:
    """Start a writer from ``tree`` on PREFIX; seconds and writer CPU until it serves."""
    import shmcache
    from shmcache.writer.lock import remove_cache

    name = f"relist{os.getpid()}"
    remove_cache(name, force=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "shmcache", "serve", name, "--endpoints", endpoint,
         "--prefix", PREFIX.decode(), "--ring-size", "64MiB", "--remove-on-exit",
         "--log-level", "warning"], cwd=tree, env={**os.environ, "PYTHONPATH": tree})
    try:
        with shmcache.Reader(name, timeout=600) as r:
            wall = time.perf_counter() - t0
            with open(f"/proc/{proc.pid}/stat", "rb") as f:
                stat = f.read()
            fields = stat[stat.rindex(b")") + 2:].split()
            cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            if r.status().key_count != keys:
                raise RuntimeError(f"the cache holds {r.status().key_count} keys, not {keys}")
    finally:
        proc.terminate()
        proc.wait(60)
        remove_cache(name, force=True)
    return {"wall_s": wall, "cpu_s": cpu}


def load(endpoint: str, n: int, size: int) -> None:
    """n keys of ``size`` bytes under PREFIX, 128 puts per transaction (etcd's limit)."""
    import grpc

    from shmcache.etcdapi import Stub, rpc

    with grpc.insecure_channel(endpoint.removeprefix("http://")) as ch:
        kv = Stub(ch, "KV")
        value = b"v" * size
        for start in range(0, n, 128):
            ops = [rpc.RequestOp(request_put=rpc.PutRequest(key=PREFIX + b"%08d" % i,
                                                            value=value))
                   for i in range(start, min(start + 128, n))]
            kv.Txn(rpc.TxnRequest(success=ops), timeout=30)


def list_in(tree: str, endpoint: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-c", CHILD, endpoint, PREFIX.decode()],
                         env={**os.environ, "PYTHONPATH": tree}, cwd=tree,
                         capture_output=True, text=True, timeout=600, check=True)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def etcdctl_get(etcdctl: str, endpoint: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    subprocess.run([etcdctl, "--endpoints", endpoint, "get", "--prefix", PREFIX.decode()],
                   stdout=subprocess.DEVNULL, check=True, timeout=600)
    return {"wall_s": time.perf_counter() - t0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tree", action="append", default=[], required=True,
                    help="LABEL=DIR, a source tree whose shmcache is measured (repeatable)")
    ap.add_argument("--keys", type=int, default=100_000)
    ap.add_argument("--value-size", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tag", default="etcdapi-relist")
    ap.add_argument("--watch-path", action="store_true",
                    help="replay the per-revision watch path instead (no etcd)")
    ap.add_argument("--writer", action="store_true",
                    help="time a writer of each tree from start to serving instead")
    args = ap.parse_args()
    from tests.etcdserver import EtcdServer

    trees = [(label, os.path.abspath(path)) for label, _, path in
             (t.partition("=") for t in args.tree)]
    if args.watch_path:
        return watch_path(trees, args.rounds)
    etcdctl = shutil.which("etcdctl") or os.path.join(os.path.dirname(sys.executable), "etcdctl")
    rows: dict[str, list[dict[str, Any]]] = {label: [] for label, _ in trees}
    rows["etcdctl get"] = []
    with EtcdServer(extra_args=C.etcd_args()) as etcd:
        load(etcd.endpoint, args.keys, args.value_size)
        measure = serve_in if args.writer else (lambda t, e, _: list_in(t, e))
        runs: list[tuple[str, Any]] = [
            (label, lambda t=tree: measure(t, etcd.endpoint, args.keys)) for label, tree in trees]
        runs.append(("etcdctl get", lambda: etcdctl_get(etcdctl, etcd.endpoint)))
        for rnd in range(args.rounds):
            for label, run in runs[rnd % len(runs):] + runs[:rnd % len(runs)]:
                res = run()
                rows[label].append(res)
                print(f"round {rnd + 1} {label:12s} " + "  ".join(
                    f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                    for k, v in res.items()), flush=True)
        etcd_version = etcd.version

    def med(label: str, key: str) -> float | None:
        xs = [r[key] for r in rows[label] if key in r]
        return round(statistics.median(xs), 3) if xs else None

    results = C.stamp(
        benchmark="relist through the writer's etcd layer", etcd=etcd_version,
        nproc=os.cpu_count(), load_average=os.getloadavg(), settings=vars(args),
        consumers={label: {"median": {k: med(label, k) for k in ("wall_s", "cpu_s",
                                                                  "peak_rss_mb")},
                           "protobuf": rs[0].get("protobuf") if rs else None, "rounds": rs}
                   for label, rs in rows.items()})
    for label, r in results["consumers"].items():
        print(f"{label:12s} median {r['median']}  {r['protobuf'] or ''}")
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"{args.tag}.json")
    C.write_json(path, results, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
