"""What a sharded watch costs its process: n workers each watching one shard against n
workers each watching a prefix that gets 1/n of the events, under the same etcd write rate.

    python bench/shard_watch_cost.py [--workers 8] [--rate 1000] [--seconds 20] [--rounds 2]
                                     [--json bench/results/shard-watch-cost.json]

A throwaway etcd (--unsafe-no-fsync) and one writer on ``/bench/shards/``. A thread of
this process puts --rate keys a second (one revision each, pipelined, paced every 10
ms), in turn under ``p0/`` ... ``p{n-1}/``, keys drawn at random from 10,000 per
sub-prefix. Forked worker processes attach a Reader each and poll one watch in a
loop (what a pre-fork worker does; the watch joins the process's demultiplexer; the
workers are spawned, since this process runs gRPC threads that a fork would copy):

- "sharded": n workers, worker i watching the whole prefix with ``shard=(i, n)``: each
  gets about 1/n of all events;
- "prefix": n workers, worker i watching ``p{i}/``: each gets 1/n of the events too.

Both cases run n worker processes, so they share the 2 cores alike (a worker that
has the machine to itself wakes for every publish, one sharing it wakes less often
for more records at a time: fewer processes would favour one case).

Each round runs both cases, one after the other, for --seconds each once every worker
has caught up. A worker's cost is its process CPU time (time.process_time: its main
thread and its demultiplexer thread) over the window, as cores and as µs per event it
received. The goal (issue 22): each sharded worker at most 1.2x the prefix worker.
The JSON is stamped with the machine (bench/_common.stamp).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import statistics
import sys
import threading
import time
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import shmcache  # noqa: E402
from bench._common import stamp, write_json  # noqa: E402
from bench._pods import CpuMeter, library_facts  # noqa: E402
from tests.etcdserver import EtcdServer  # noqa: E402
from tests.helpers import WriterProcess  # noqa: E402

PREFIX = b"/bench/shards/"
NAME = "bench-shards"


def worker(prefix: bytes, shard: tuple[int, int] | None, since: int, ctl: Any) -> None:
    """Poll one watch; on "go" note CPU and events, on "stop" report them."""
    with shmcache.Reader(NAME) as r, r.watch(prefix, since_revision=since, shard=shard) as w:
        events = 0
        mark: tuple[float, int, float] | None = None
        while True:
            events += len(w.poll(timeout=0.05))
            if ctl.poll():
                cmd = ctl.recv()
                if cmd == "rev":
                    ctl.send(w.revision)
                elif cmd == "go":
                    mark = (time.process_time(), events, time.monotonic())
                elif cmd == "stop":
                    assert mark is not None
                    ctl.send((time.process_time() - mark[0], events - mark[1],
                              time.monotonic() - mark[2]))
                    return


class Load:
    """Puts at ``rate`` a second from a thread, in turn under p0/ ... p{n-1}/."""

    def __init__(self, client: Any, rate: int, n: int, seed: int) -> None:
        self.client, self.rate, self.n = client, rate, n
        self.rnd = random.Random(seed)
        self.stop = threading.Event()
        self.last = 0
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        from shmcache.etcdapi import rpc

        stub, md = self.client.kv, self.client.metadata
        per_tick = self.rate / 100
        owed = 0.0
        inflight: list[Any] = []
        tick = time.monotonic()
        seq = 0
        while not self.stop.is_set():
            owed += per_tick
            while owed >= 1:
                owed -= 1
                seq += 1
                sub = b"p%d/" % (seq % self.n)
                key = PREFIX + sub + b"%05d" % self.rnd.randrange(10_000)
                inflight.append(stub.Put.future(rpc.PutRequest(key=key, value=b"v" * 100),
                                                60, metadata=md))
            while inflight and inflight[0].done():
                self.last = max(self.last, inflight.pop(0).result().header.revision)
            tick += 0.01
            time.sleep(max(0.0, tick - time.monotonic()))
        for f in inflight:
            self.last = max(self.last, f.result().header.revision)


def run_case(label: str, specs: list[tuple[bytes, tuple[int, int] | None]], seconds: float,
             load: Load, reader: shmcache.Reader) -> dict[str, Any]:
    # spawn, not fork: this process runs gRPC's threads (the load), which a forked child
    # inherits in an undefined state (gRPC skips its fork handlers then; children died).
    ctx = mp.get_context("spawn")
    since = reader.revision
    pipes, procs = [], []
    for prefix, shard in specs:
        mine, theirs = ctx.Pipe()
        p = ctx.Process(target=worker, args=(prefix, shard, since, theirs))
        p.start()
        pipes.append(mine)
        procs.append(p)
    try:
        # Until every worker has caught up with the load (its watch joined and current).
        deadline = time.monotonic() + 120
        while True:
            if not all(p.is_alive() for p in procs):
                raise RuntimeError(f"a worker of case {label!r} died")
            target = reader.revision
            for c in pipes:
                c.send("rev")
            if all(c.recv() >= target for c in pipes) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        meter = CpuMeter()
        for c in pipes:
            c.send("go")
        time.sleep(seconds)
        for c in pipes:
            c.send("stop")
        reports = [c.recv() for c in pipes]
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
                p.join()
    rows = [{"cores": cpu / wall, "events_per_s": ev / wall,
             "cpu_us_per_event": cpu / ev * 1e6 if ev else None}
            for cpu, ev, wall in reports]
    return {"case": label, "workers": rows, "foreign_cores": meter.foreign_cores()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--rate", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    n = args.workers
    lib = library_facts()
    machine = stamp()
    rounds: list[dict[str, Any]] = []
    with EtcdServer(extra_args=["--unsafe-no-fsync"]) as etcd:
        client = etcd.api_client()
        w = WriterProcess(NAME, etcd.endpoint, PREFIX, ring_size="64MiB")
        load = Load(client, args.rate, n, args.seed)
        try:
            w.start()
            with shmcache.Reader(NAME) as r:
                load.thread.start()
                for rd in range(args.rounds):
                    cases = [("sharded", [(PREFIX, (i, n)) for i in range(n)]),
                             ("prefix", [(PREFIX + b"p%d/" % i, None) for i in range(n)])]
                    if rd % 2:
                        cases.reverse()
                    for label, specs in cases:
                        res = run_case(label, specs, args.seconds, load, r)
                        res["round"] = rd
                        rounds.append(res)
                        cores = [x["cores"] for x in res["workers"]]
                        print(f"round {rd} {label:>8}: {len(cores)} workers, cores "
                              f"{min(cores):.4f}-{max(cores):.4f}, events/s "
                              f"{statistics.median(x['events_per_s'] for x in res['workers']):.0f}",
                              file=sys.stderr)
        finally:
            load.stop.set()
            load.thread.join(30)
            w.close()
            client.close()
    if library_facts() != lib:
        raise SystemExit("the library changed during the run: results discarded")
    def cores(case: str) -> list[float]:
        return [wk["cores"] for x in rounds if x["case"] == case for wk in x["workers"]]

    prefix_cores = statistics.median(cores("prefix"))
    sharded = cores("sharded")
    summary = {"prefix_worker_cores_median": prefix_cores,
               "prefix_worker_cores_max": max(cores("prefix")),
               "sharded_worker_cores_median": statistics.median(sharded),
               "sharded_worker_cores_max": max(sharded),
               "ratio_median": statistics.median(sharded) / prefix_cores,
               "ratio_max": max(sharded) / prefix_cores}
    print(summary)
    if args.json:
        write_json(args.json, {"stamp": machine, "library": lib, "args": vars(args),
                               "rounds": rounds, "summary": summary})
    return 0


if __name__ == "__main__":
    sys.exit(main())
