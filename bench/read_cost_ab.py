"""CPU per get and per list(prefix of 100) of two library trees, side by side in one run.

    python bench/read_cost_ab.py A_DIR B_DIR [--keys 10000,100000] [--rounds 7]
                                 [--pure-python] [--json PATH]

A_DIR and B_DIR are source trees of shmcache with their C extension built in place
(for example ``git archive main | tar -x -C A_DIR`` then ``python setup.py
build_ext --inplace`` there). For each key count: a throwaway etcd loaded with
the bench layout (bench/_common.key/value: 256-byte values) and one writer (from
this checkout); then one reader process per tree, each importing its own
shmcache (PYTHONPATH) and attached to the same segments, measured in interleaved
rounds (the order alternating each round): ``Reader.get`` over 10,000 random
keys and ``Reader.list`` of random prefixes of 100 keys, the same in both, CPU
time (time.process_time) per call over a batch; medians over rounds. The trees
must read the same segment format. ``--pure-python`` sets SHMCACHE_PURE_PYTHON
in both readers.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

PREFIX = b"/bench/ab/"
CASES = {"get": 100_000, "list100": 3_000}


def worker(name: str, n: int) -> None:
    """Attach to cache ``name`` and answer "CASE" lines with the CPU µs per call."""
    import shmcache

    def key(i: int) -> bytes:  # bench/_common.key, which this tree may lack
        return PREFIX + b"k/%07d" % i

    r = shmcache.Reader(name)
    rng = random.Random(1)
    keys = [key(rng.randrange(n)) for _ in range(10_000)]
    prefixes = [PREFIX + b"k/%05d" % rng.randrange(n // 100) for _ in range(1_000)]
    assert len(r.list(prefixes[0]).items) == 100 and r.get(keys[0]) is not None
    ops = {"get": (r.get, keys), "list100": (r.list, prefixes)}
    print(json.dumps({"ready": shmcache.__file__}), flush=True)
    for line in sys.stdin:
        f, args = ops[line.strip()]
        reps = CASES[line.strip()]
        c0 = time.process_time()
        for i in range(reps):
            f(args[i % len(args)])
        print(json.dumps((time.process_time() - c0) / reps * 1e6), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--keys", default="10000,100000")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--pure-python", action="store_true")
    ap.add_argument("--json", default=None, metavar="PATH")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:  # (sys.path as the tree's PYTHONPATH gives it)
        worker(args.worker[0], int(args.worker[1]))
        return 0
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from bench._common import load_etcd, stamp, write_json
    from tests.etcdserver import EtcdServer
    from tests.helpers import WriterProcess

    trees = {"a": os.path.abspath(args.a), "b": os.path.abspath(args.b)}
    results: dict[str, Any] = {}
    for n in [int(x) for x in args.keys.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            server = EtcdServer(data_dir=os.path.join(tmp, "etcd"),
                                extra_args=["--unsafe-no-fsync"])
            server.start()
            w = WriterProcess(f"bench-ab-{n}", server.endpoint, PREFIX, ring_size="64MiB")
            procs: dict[str, subprocess.Popen[str]] = {}
            try:
                client = server.api_client()
                load_etcd(client, PREFIX, n)
                client.close()
                w.start(wait=False)
                w.wait_ready(timeout=900)
                import shmcache

                with shmcache.Reader(w.name) as r:
                    while r.status().key_count < n:
                        time.sleep(0.2)
                env = dict(os.environ)
                if args.pure_python:
                    env["SHMCACHE_PURE_PYTHON"] = "1"
                for t, path in trees.items():
                    procs[t] = subprocess.Popen(
                        [sys.executable, os.path.abspath(__file__), "-", "-", "--worker",
                         w.name, str(n)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                        text=True, env={**env, "PYTHONPATH": path}, cwd=path)
                for t, p in procs.items():
                    ready = json.loads(p.stdout.readline())  # type: ignore[union-attr]
                    assert ready["ready"].startswith(trees[t]), (t, ready)
                rows: dict[str, list[float]] = {f"{t} {c}": [] for t in trees for c in CASES}
                for rnd in range(args.rounds):
                    order = list(trees) if rnd % 2 == 0 else list(reversed(trees))
                    for c in CASES:
                        for t in order:
                            p = procs[t]
                            p.stdin.write(c + "\n")  # type: ignore[union-attr]
                            p.stdin.flush()  # type: ignore[union-attr]
                            rows[f"{t} {c}"].append(json.loads(p.stdout.readline()))  # type: ignore[union-attr]
                med = {k: statistics.median(v) for k, v in rows.items()}
                results[str(n)] = {"cpu_us_per_op": med, "rounds": rows,
                                   "b_vs_a": {c: med[f"b {c}"] / med[f"a {c}"] for c in CASES}}
                print(f"{n:>9} keys: " + ", ".join(f"{k} {v:.3f} us" for k, v in med.items())
                      + "; b/a " + ", ".join(f"{c} {x:.3f}x" for c, x in
                                             results[str(n)]["b_vs_a"].items()), flush=True)
            finally:
                for p in procs.values():
                    p.stdin.close()  # type: ignore[union-attr]
                    p.wait(30)
                w.close()
                server.close()
    if args.json:
        write_json(args.json, {"stamp": stamp(), "args": vars(args), "trees": trees,
                               "results": results}, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
