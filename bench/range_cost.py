"""etcd's Range from the cache: count, keys_only and key ranges, CPU per call beside etcd.

    python bench/range_cost.py [--keys 1000000] [--rounds 5] [--writes 3000]
                               [--json bench/results/range-cost.json]

Loads --keys pod-like JSON values (bench/_pods.py; keys ``g%05d/pod-%02d``, so the
prefix ``g00`` holds 100,000 of them and each ``g%05d/`` 100) into a throwaway etcd
(--unsafe-no-fsync) and starts one writer on them (``--snapshot-interval 3600
--snapshot-bytes 48MiB``: keys written later stay "changed since the snapshot").
Then, in this one process, interleaved over --rounds rounds:

- ``count(g00)`` (100k keys) against ``len(list(g00))``, ``len(list(g00,
  keys_only=True))`` and etcd's ``count_only`` Range of the same prefix
  (serializable: etcd's cheapest read);
- ``list(group of 100)`` against ``list(group, keys_only=True)``, a random group
  each call;
- ``range(key_i, key_i+100)`` at a random offset i of all --keys keys, against
  etcd's Range of the same keys (serializable), a random i each call.

then again after --writes changes inside ``g00`` (rewrites, new keys and deletes, one
revision each: "changed since the snapshot", which count reads one by one). Every
answer is first checked against etcd's at the same revision. CPU per call:
time.process_time of this process around a batch (as many calls as take about 50
ms), median and range over the rounds; for etcd also the etcd server's CPU over the
batch (psutil), which is where etcd does the work. This process calls etcd through
shmcache.etcdapi, so etcd's client-side CPU is that of the installed protobuf
implementation (the stamp names it; the committed figures decoded python-etcd3's
messages under protobuf 3.20.3, pure Python, which costs the same). Seeded (--seed); the JSON is
stamped with the machine (bench/_common.stamp) and written only if every step
succeeded.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import psutil  # noqa: E402

import shmcache  # noqa: E402
from bench._common import stamp, write_json  # noqa: E402
from bench._pods import CpuMeter, library_facts, load, pod_key, pod_value, put_each  # noqa: E402
from bench.page_cost import calibrate  # noqa: E402
from shmcache.format import layout  # noqa: E402
from tests.etcdserver import EtcdServer  # noqa: E402
from tests.helpers import WriterProcess, delete  # noqa: E402

PREFIX = b"/bench/ranges/"
NAME = "bench-ranges"
BIG = PREFIX + b"g00"  # 100,000 keys


def etcd_range(client: Any, key: bytes, end: bytes, **kw: Any) -> Any:
    from shmcache.etcdapi import rpc

    req = rpc.RangeRequest(key=key, range_end=end, serializable=True, **kw)
    return client.kv.Range(req, 60, metadata=client.metadata)


def measure(ops: list[tuple[dict[str, Any], Callable[[], Any]]], rounds: int,
            etcd_proc: psutil.Process) -> list[dict[str, Any]]:
    """Interleaved rounds of every op (rotating order): CPU µs per call of this process
    and of etcd, median and range over the rounds."""
    gc.collect()
    gc.freeze()
    counts = [calibrate(fn) for _row, fn in ops]
    mine: list[list[float]] = [[] for _ in ops]
    theirs: list[list[float]] = [[] for _ in ops]
    order = list(range(len(ops)))
    for rd in range(rounds):
        shift = rd % len(order)
        for j in order[shift:] + order[:shift]:
            fn, n = ops[j][1], counts[j]
            e0 = sum(etcd_proc.cpu_times()[:2])
            c0 = time.process_time()
            for _ in range(n):
                fn()
            mine[j].append((time.process_time() - c0) / n * 1e6)
            theirs[j].append((sum(etcd_proc.cpu_times()[:2]) - e0) / n * 1e6)
    gc.unfreeze()
    out = []
    for j, (row, _fn) in enumerate(ops):
        out.append({**row, "calls_per_round": counts[j],
                    "cpu_us": statistics.median(mine[j]),
                    "cpu_us_range": [min(mine[j]), max(mine[j])],
                    "etcd_cpu_us": statistics.median(theirs[j])})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--writes", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    n = args.keys
    if n < 100_000 or n % 100:
        ap.error("--keys: a multiple of 100, at least 100,000")
    rnd = random.Random(args.seed)
    lib = library_facts()
    machine = stamp()
    results: list[dict[str, Any]] = []
    setup: dict[str, Any] = {}
    with EtcdServer(extra_args=["--unsafe-no-fsync", "--quota-backend-bytes",
                                str(8 << 30)]) as etcd:
        client = etcd.api_client()
        etcd_proc = psutil.Process(etcd.pid)
        w = WriterProcess(NAME, etcd.endpoint, PREFIX, ring_size="64MiB",
                          extra=["--snapshot-interval", "3600", "--snapshot-bytes", "48MiB",
                                 "--verify-interval", "0"])
        try:
            t0 = time.perf_counter()
            last = load(client, PREFIX, n, n // 100)
            setup["load_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            w.start(wait=False)
            w.wait_ready(timeout=1800)
            with shmcache.Reader(NAME, timeout=600) as r:
                assert r.wait(last, timeout=1800)
                setup["writer_ready_s"] = time.perf_counter() - t0
                print(f"loaded {n} keys in {setup['load_s']:.1f}s, writer ready in "
                      f"{setup['writer_ready_s']:.1f}s", file=sys.stderr)
                big_end = layout.prefix_range_end(BIG)
                offsets = [rnd.randrange(n - 100) for _ in range(4096)]
                groups = [rnd.randrange(n // 100) for _ in range(4096)]
                it = {"o": 0, "g": 0}

                def next_of(kind: str, pool: list[int]) -> int:
                    it[kind] = (it[kind] + 1) % len(pool)
                    return pool[it[kind]]

                def ops_of(phase: str) -> list[tuple[dict[str, Any], Callable[[], Any]]]:
                    def rng_key() -> tuple[bytes, bytes]:
                        i = next_of("o", offsets)
                        return pod_key(PREFIX, i), pod_key(PREFIX, i + 100)

                    def grp() -> bytes:
                        return PREFIX + b"g%05d/" % next_of("g", groups)

                    row = {"phase": phase, "keys": n}
                    return [
                        ({**row, "op": "count(100k-key prefix)"}, lambda: r.count(BIG)),
                        ({**row, "op": "len(list(100k-key prefix))"},
                         lambda: len(r.list(BIG).items)),
                        ({**row, "op": "len(list(100k-key prefix, keys_only=True))"},
                         lambda: len(r.list(BIG, keys_only=True).items)),
                        ({**row, "op": "etcd count_only (100k-key prefix)"},
                         lambda: etcd_range(client, BIG, big_end, count_only=True).count),
                        ({**row, "op": "list(prefix of 100)"}, lambda: r.list(grp())),
                        ({**row, "op": "list(prefix of 100, keys_only=True)"},
                         lambda: r.list(grp(), keys_only=True)),
                        ({**row, "op": "range(100 keys at a random offset)"},
                         lambda: r.range(*rng_key())),
                        ({**row, "op": "range(100 keys at a random offset, keys_only=True)"},
                         lambda: r.range(*rng_key(), keys_only=True)),
                        ({**row, "op": "etcd Range(100 keys at a random offset)"},
                         lambda: etcd_range(client, *rng_key()).kvs),
                    ]

                def check() -> None:
                    res = r.count(BIG)
                    want = etcd_range(client, BIG, big_end, count_only=True,
                                      revision=res.revision).count
                    assert res.count == want == len(r.list(BIG).items), (res, want)
                    for i in offsets[:20]:
                        k, e = pod_key(PREFIX, i), pod_key(PREFIX, i + 100)
                        got = r.range(k, e)
                        theirs = etcd_range(client, k, e, revision=got.revision).kvs
                        assert [(kv.key, kv.value, kv.mod_revision) for kv in got] == \
                            [(kv.key, kv.value, kv.mod_revision) for kv in theirs]
                        assert [kv._replace(value=b"") for kv in got] == \
                            r.range(k, e, keys_only=True, revision=got.revision).items

                check()
                meter = CpuMeter()
                results += measure(ops_of("idle"), args.rounds, etcd_proc)
                setup["foreign_cores_idle"] = meter.foreign_cores()
                # Changes inside the 100k prefix since the snapshot: rewrites, new keys
                # (between existing ones) and deletes, one revision each.
                items: list[tuple[bytes, bytes]] = []
                for j in range(args.writes):
                    i = rnd.randrange(100_000)
                    key = pod_key(PREFIX, i) + (b"x" if j % 3 == 1 else b"")
                    items.append((key, pod_value(i, n // 100, gen=j)))
                last = put_each(client, items)
                for j in range(0, args.writes, 3):
                    last = delete(client, pod_key(PREFIX, (j * 7919) % 100_000))
                assert r.wait(last, timeout=600)
                b = r.control.block()
                assert b is not None and b.snap_revision < last, "a snapshot came"
                check()
                meter = CpuMeter()
                phase = f"{args.writes + len(range(0, args.writes, 3))} changes since snapshot"
                results += measure(ops_of(phase), args.rounds, etcd_proc)
                setup["foreign_cores_changed"] = meter.foreign_cores()
        finally:
            w.close()
            client.close()
    if library_facts() != lib:
        raise SystemExit("the library changed during the run: results discarded")
    for row in results:
        print(f"{row['phase']:>32}  {row['op']:<56} {row['cpu_us']:>10.1f} µs"
              f"  (etcd {row['etcd_cpu_us']:.1f} µs)")
    if args.json:
        write_json(args.json, {"stamp": machine, "library": lib, "setup": setup,
                               "args": vars(args), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
