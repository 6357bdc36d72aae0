"""Where by_index's time goes, step by step, beside list(prefix of 100).

    python bench/profile_index.py [--keys 100000] [--calls 3000]

The data and writer of bench/index_cost.py (``--index node=json:/spec/nodeName``,
each node value holding 100 keys spread over the range). In this one process,
each step of ``Reader.by_index("node", X)`` is timed alone with the reader's own
objects (internal API: IndexSegment.lookup, IndexSegment.run_keys,
IndexSegment.run_items), beside ``Reader.list(prefix of 100)`` and the snapshot's C
range call. CPU time (time.process_time) per call over --calls calls, median of
5 repetitions. Prints only; the figures go to docs/benchmarks.md by hand.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import shmcache  # noqa: E402
from bench._pods import group_prefix, library_facts, load  # noqa: E402
from tests.etcdserver import EtcdServer  # noqa: E402
from tests.helpers import WriterProcess  # noqa: E402

PREFIX = b"/bench/profile-index/"
NAME = "bench-profile-index"


def per_call(fn: Callable[[], Any], calls: int) -> float:
    """CPU µs per call: median of 5 repetitions of ``calls`` calls."""
    reps = []
    for _ in range(5):
        c0 = time.process_time()
        for _ in range(calls):
            fn()
        reps.append((time.process_time() - c0) / calls * 1e6)
    return statistics.median(reps)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keys", type=int, default=100_000)
    ap.add_argument("--calls", type=int, default=3000)
    args = ap.parse_args()
    n = args.keys
    nodes = n // 100
    rnd = random.Random(1)
    with EtcdServer(extra_args=["--unsafe-no-fsync"]) as etcd:
        client = etcd.api_client()
        last = load(client, PREFIX, n, nodes)
        w = WriterProcess(NAME, etcd.endpoint, PREFIX, ring_size="64MiB",
                          extra=["--index", "node=json:/spec/nodeName", "--verify-interval", "0"])
        try:
            w.start(wait=False)
            w.wait_ready(600)
            r = shmcache.Reader(NAME)
            assert r.wait(last, 600)
            v = r._view  # internal: the reader's view (snapshot, index segment)
            seg, snap = v.indexes(), v.snap
            assert snap is not None
            names = [f"node-{j}".encode() for j in range(nodes)]
            groups = [group_prefix(PREFIX, g) for g in range(n // 100)]
            keys = seg.run_keys(0, names[5], None, -1)
            assert len(keys) == 100
            steps = {
                "list(prefix of 100)": lambda: r.list(rnd.choice(groups)),
                "  Snapshot.range_list (100 entries)": lambda: snap.range_list(
                    groups[7], groups[8], -1),
                "by_index (100 keys)": lambda: r.by_index("node", rnd.choice(names)),
                "  IndexSegment.lookup (value table search)": lambda: seg.lookup(
                    0, rnd.choice(names)),
                "  IndexSegment.run_keys (lookup + 100 postings, keys, CRCs, order)":
                    lambda: seg.run_keys(0, rnd.choice(names), None, -1),
                "  IndexSegment.run_items (lookup, run, 100 snapshot probes: one C call)":
                    lambda: seg.run_items(0, rnd.choice(names), None, -1, v.recent, snap),
                "(random.choice, included above)": lambda: rnd.choice(names),
            }
            print(f"{n} keys; library {library_facts()}")
            for name, fn in steps.items():
                print(f"  {name:<70} {per_call(fn, args.calls):8.1f} µs CPU")
            r.close()
        finally:
            w.close()
            client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
