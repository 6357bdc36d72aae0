"""Core figures of one reader and the writer, on this machine, with a real etcd.

    python bench/core_figures.py [--keys 100000] [--events 50000] [--json out.json]

Measures: single-reader get/s and list(1000 keys)/s at --keys keys of 256-byte
values; CPU used by an idle watcher over 5 s; publish-to-wake delay (the
writer's publish of a record -> a watcher process returning it, timed with
CLOCK_MONOTONIC, which is system-wide); etcd put -> watcher event; writer ingest
(events/s from etcd into the ring while catching up a backlog). Percentiles, no means.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import random
import signal
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import psutil  # noqa: E402

import shmcache  # noqa: E402
from tests.etcdserver import EtcdServer  # noqa: E402
from tests.helpers import WriterProcess, put  # noqa: E402

PREFIX = b"/bench/"


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


def load(client: Any, n: int, value_size: int = 256) -> None:
    from shmcache.etcdapi import rpc

    val = b"v" * value_size
    for start in range(0, n, 100):
        ops = [rpc.RequestOp(request_put=rpc.PutRequest(
            key=PREFIX + b"key/%07d" % i, value=val)) for i in range(start, min(n, start + 100))]
        client.kv.Txn(rpc.TxnRequest(success=ops), 30, metadata=client.metadata)


def idle_watcher(name: str, q: Any) -> None:
    r = shmcache.Reader(name)
    w = r.watch(PREFIX)
    p = psutil.Process()
    c0 = p.cpu_times()
    t0 = time.monotonic()
    while time.monotonic() - t0 < 5:
        w.poll(timeout=1)
    c1 = p.cpu_times()
    q.put((c1.user + c1.system) - (c0.user + c0.system))


def wake_watcher(name: str, q: Any, n: int) -> None:
    """Returns, per event, (monotonic ns when poll returned, value = put start ns)."""
    r = shmcache.Reader(name)
    w = r.watch(PREFIX + b"clock")
    got = []
    while len(got) < n:
        for ev in w.poll(timeout=5):
            got.append((time.monotonic_ns(), int(ev.kv.value)))
    q.put(got)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keys", type=int, default=100_000)
    ap.add_argument("--events", type=int, default=50_000)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    res: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
                    "python": platform.python_version(), "platform": platform.platform(),
                    "shmcache": shmcache.__version__},
    }
    name = f"bench-{os.getpid()}"
    with EtcdServer() as etcd:
        client = etcd.api_client()
        t0 = time.monotonic()
        load(client, args.keys)
        print(f"loaded {args.keys} keys in {time.monotonic() - t0:.1f}s (etcd {etcd.version})")
        w = WriterProcess(name, etcd.endpoint, PREFIX, ring_size="64MiB")
        try:
            w.start()
            r = shmcache.Reader(name)
            keys = [PREFIX + b"key/%07d" % random.randrange(args.keys) for _ in range(100_000)]
            # get
            get = r.get
            for k in keys[:1000]:
                get(k)
            rates = []
            for _ in range(5):
                t0 = time.perf_counter()
                for k in keys:
                    get(k)
                rates.append(len(keys) / (time.perf_counter() - t0))
            res["get_per_s"] = {"median": statistics.median(rates), "min": min(rates)}
            print(f"single-reader get: {statistics.median(rates):,.0f}/s (median of 5 x 100k)")
            # list of 1000 keys
            starts = [random.randrange(args.keys // 1000) for _ in range(200)]
            t0 = time.perf_counter()
            for s in starts:
                out = r.list(PREFIX + b"key/%04d" % s)
                assert len(out.items) == 1000
            lr = len(starts) / (time.perf_counter() - t0)
            res["list_1000_per_s"] = lr
            print(f"single-reader list(1000 keys): {lr:,.0f}/s")
            # idle watcher CPU
            ctx = mp.get_context("spawn")
            q = ctx.Queue()
            p = ctx.Process(target=idle_watcher, args=(name, q))
            p.start()
            cpu = q.get(timeout=60)
            p.join()
            res["idle_watcher_cpu_s_per_5s"] = cpu
            print(f"idle watcher: {cpu * 1000:.1f} ms CPU in 5 s ({cpu / 5 * 100:.2f}% of a core)")
            # put -> event, and publish -> wake
            n = 300
            p = ctx.Process(target=wake_watcher, args=(name, q, n))
            p.start()
            time.sleep(1.5)
            for _ in range(n):
                put(client, PREFIX + b"clock", str(time.monotonic_ns()).encode())
                time.sleep(0.01)
            got = q.get(timeout=60)
            p.join()
            d = [(a - b) / 1e6 for a, b in got]
            res["put_to_event_ms"] = {"p50": pct(d, 50), "p90": pct(d, 90), "p99": pct(d, 99),
                                      "max": max(d)}
            print(f"etcd put -> watcher event: p50 {pct(d, 50):.2f} ms, p99 {pct(d, 99):.2f} ms, "
                  f"max {max(d):.2f} ms")
            # writer ingest: stop the writer, write a backlog, continue it, time the catch-up
            os.kill(w.pid, signal.SIGSTOP)
            from shmcache.etcdapi import rpc

            for i in range(args.events):
                client.kv.Put(rpc.PutRequest(key=PREFIX + b"ingest/%d" % (i % 1000),
                                             value=b"x" * 256), 10, metadata=client.metadata)
            last = put(client, PREFIX + b"ingest/last", b"1")
            base = r.revision
            t0 = time.monotonic()
            os.kill(w.pid, signal.SIGCONT)
            assert r.wait(last, timeout=300)
            dt = time.monotonic() - t0
            ingest = (last - base) / dt
            res["writer_ingest_events_per_s"] = ingest
            print(f"writer ingest: {last - base} events in {dt:.2f}s = {ingest:,.0f} events/s")
            r.close()
        finally:
            w.close()
            client.close()
    print(json.dumps(res, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
