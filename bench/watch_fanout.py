"""Many watches in one process: CPU and delivery delay as the number of watches grows.

    python bench/watch_fanout.py [--watches 100] [--coroutines 1000] [--rate 1000]
        [--seconds 10] [--rounds 3] [--baseline-tree DIR] [--json bench/results/watch-fanout.json]

Starts a throwaway etcd (--unsafe-no-fsync) and a writer, then, in interleaved
rounds, runs each case in a fresh child process while this process puts
--rate values per second, spread round-robin over the watched sub-prefixes:

- ``1 watch``: one thread iterating one Watch of the whole range (the reference);
- ``threads``: --watches threads, each iterating a Watch of its own sub-prefix;
- ``asyncio``: --coroutines coroutines in one event loop, each ``async for`` over
  an awatch of its own sub-prefix;
- each of the above idle (no writes) for the same time, for the CPU the child uses
  by just waiting.

Reported per case (medians over rounds): the child's CPU time over the window as
a share of one core, with writes and idle; CPU µs per delivered event; the delay
from the put's start in this process (CLOCK_MONOTONIC, stamped in the value) to
delivery to the watch's consumer: p50, p99 and max over every event. That delay
includes etcd's commit and the writer's receive and publish, so it bounds
publish-to-delivery from above; the ``1 watch`` row shows that fixed part. Every
delivered event is checked to belong to its watch, and the count to equal what
was put under its prefix.

``--baseline-tree DIR`` also runs every case with the shmcache package of
another checkout (e.g. a git worktree of the commit before a change), in the
same rounds, against a writer of that checkout (its shared-memory format may
differ) that follows the same etcd prefix: both writers run throughout, so
every case sees the same load.

The JSON is written only if every step succeeded (a temporary file, renamed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")
sys.path.insert(0, ROOT)
if os.environ.get("FANOUT_TREE"):  # a child of --baseline-tree: that checkout's package first
    sys.path.insert(0, os.environ["FANOUT_TREE"])

PREFIX = b"/bench/fanout/"
NAME = "bench-fanout"


# -- the child: watches in one process ------------------------------------------------------

def _child(kind: str, n: int, name: str) -> None:
    """Runs in a fresh interpreter (its shmcache from PYTHONPATH). Protocol on stdin/stdout:
    prints "ready", waits for "go", measures until "stop", prints one JSON line."""
    import shmcache

    r = shmcache.Reader(name)
    lat: list[int] = []
    counts = [0] * n
    wrong = [0]
    stop = threading.Event()
    lock = threading.Lock()

    def record(i: int, ev: Any) -> None:
        now = time.monotonic_ns()
        if not ev.kv.key.startswith(PREFIX + b"w%04d/" % i):
            wrong[0] += 1
        with lock:
            lat.append(now - int(ev.kv.value[:20]))
            counts[i] += 1

    def prefix_of(i: int) -> bytes:
        return PREFIX if kind == "1 watch" else PREFIX + b"w%04d/" % i

    if kind in ("1 watch", "threads"):
        watches = [r.watch(prefix_of(i)) for i in range(n)]
        for w in watches:
            w.poll(0)

        def consume(i: int) -> None:
            w = watches[i]
            while not stop.is_set():
                for ev in w.poll(timeout=0.5):
                    if kind == "1 watch":
                        now = time.monotonic_ns()
                        with lock:
                            lat.append(now - int(ev.kv.value[:20]))
                            counts[0] += 1
                    else:
                        record(i, ev)

        threads = [threading.Thread(target=consume, args=(i,), daemon=True) for i in range(n)]
        for t in threads:
            t.start()
        runner = None
    else:
        import asyncio

        started = threading.Event()
        loop_box: list[Any] = []

        async def main() -> None:
            loop_box.append(asyncio.get_running_loop())

            watches = [r.awatch(prefix_of(i)) for i in range(n)]
            loop_box.append(watches)

            async def one(i: int) -> None:
                async for ev in watches[i]:  # as users write it; ends at close()
                    record(i, ev)

            tasks = [asyncio.create_task(one(i)) for i in range(n)]
            await asyncio.sleep(0.5)
            started.set()
            await asyncio.gather(*tasks)

        runner = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
        runner.start()
        started.wait(30)
    time.sleep(1.0)  # everything joined and settled
    print("ready", flush=True)
    assert sys.stdin.readline().strip() == "go"
    with lock:
        lat.clear()
        counts[:] = [0] * n
    c0, t0 = time.process_time(), time.perf_counter()
    assert sys.stdin.readline().strip() == "stop"
    time.sleep(0.3)  # the last events in flight
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    stop.set()
    if runner is not None:
        for w in loop_box[1]:
            w.close()
    with lock:
        out = {"cpu_s": cpu, "wall_s": wall, "events": sum(counts), "wrong": wrong[0],
               "lat_ns": sorted(lat)}
    print(json.dumps(out), flush=True)
    os._exit(0)  # threads blocked in poll: no need to wait for them


# -- the parent ---------------------------------------------------------------------------------

class Child:
    def __init__(self, kind: str, n: int, tree: str | None, name: str) -> None:
        env = dict(os.environ)
        env["FANOUT_TREE"] = tree or ""
        self.p = subprocess.Popen(
            [sys.executable, __file__, "--child", kind, "--n", str(n), "--name", name],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=tree or ROOT)
        assert self.p.stdout is not None
        line = self.p.stdout.readline().strip()
        if line != "ready":
            self.p.kill()
            raise RuntimeError(f"child {kind} failed to start: {line!r}")

    def send(self, word: str) -> None:
        assert self.p.stdin is not None
        self.p.stdin.write(word + "\n")
        self.p.stdin.flush()

    def result(self) -> dict[str, Any]:
        assert self.p.stdout is not None
        line = self.p.stdout.readline()
        self.p.wait(30)
        return dict(json.loads(line))


class Writer:
    """``shmcache serve`` of a checkout (its own package: run from its directory)."""

    def __init__(self, name: str, endpoint: str, tree: str | None) -> None:
        self.name = name
        env = dict(os.environ)
        env["PYTHONPATH"] = tree or ROOT
        self.p = subprocess.Popen(
            [sys.executable, "-m", "shmcache", "serve", name, "--endpoints", endpoint,
             "--prefix", PREFIX.decode(), "--ring-size", "64MiB", "--remove-on-exit"],
            cwd=tree or ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(2)
        if self.p.poll() is not None:
            raise RuntimeError(f"writer {name} exited with {self.p.returncode}")

    def close(self) -> None:
        self.p.terminate()
        try:
            self.p.wait(15)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()


def _loader(client: Any, n: int, rate: int, seconds: float) -> int:
    """Put ``rate`` values/s for ``seconds``, round-robin over ``n`` sub-prefixes."""
    from shmcache.etcdapi import rpc

    total = int(rate * seconds)
    t_next = time.perf_counter()
    for i in range(total):
        key = PREFIX + b"w%04d/k" % (i % n)
        value = b"%020d" % time.monotonic_ns()
        client.kv.Put(rpc.PutRequest(key=key, value=value), 10, metadata=client.metadata)
        t_next += 1.0 / rate
        delay = t_next - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
    return total


def run_case(client: Any, kind: str, n: int, rate: int, seconds: float, writes: bool,
             tree: str | None, name: str) -> dict[str, Any]:
    child = Child(kind, n, tree, name)
    try:
        child.send("go")
        t0 = time.perf_counter()
        if writes:
            sent = _loader(client, n if kind != "1 watch" else 1, rate, seconds)
            put_rate = sent / (time.perf_counter() - t0)
        else:
            time.sleep(seconds)
            sent, put_rate = 0, 0.0
        child.send("stop")
        res = child.result()
    finally:
        if child.p.poll() is None:
            child.p.kill()
            child.p.wait()
    # Fewer events than were put: the watches fell behind (reported as "undelivered");
    # more, or any to the wrong watch, is a bug.
    if res["wrong"] or res["events"] > sent:
        raise RuntimeError(f"{kind}: delivered {res['events']} events of {sent}, "
                           f"{res['wrong']} to the wrong watch")
    res["undelivered"] = sent - res["events"]
    lat = res.pop("lat_ns")
    res["sent"] = sent
    res["put_rate"] = put_rate if writes else 0.0
    res["core_share"] = res["cpu_s"] / res["wall_s"]
    if lat:
        res["delay_ms"] = {p: lat[min(len(lat) - 1, int(len(lat) * p / 100))] / 1e6
                           for p in (50, 99)}
        res["delay_ms"]["max"] = lat[-1] / 1e6
        res["cpu_us_per_event"] = res["cpu_s"] / len(lat) * 1e6
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--name", help=argparse.SUPPRESS)
    ap.add_argument("--watches", type=int, default=100)
    ap.add_argument("--coroutines", type=int, default=1000)
    ap.add_argument("--rate", type=int, default=1000, help="puts per second")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--baseline-tree", default=None, metavar="DIR",
                    help="also run every case with the shmcache package of this checkout")
    ap.add_argument("--json", default=None, metavar="PATH")
    args = ap.parse_args()
    if args.child:
        _child(args.child, args.n, args.name)
        return 0

    from bench._common import stamp, write_json
    from tests.etcdserver import EtcdServer

    trees: list[tuple[str, str | None]] = [("this tree", None)]
    if args.baseline_tree:
        trees.append(("baseline", os.path.abspath(args.baseline_tree)))
    cases = [("1 watch", 1), ("threads", args.watches), ("asyncio", args.coroutines)]
    results: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        server = EtcdServer(data_dir=os.path.join(tmp, "etcd"), extra_args=["--unsafe-no-fsync"])
        server.start()
        writers = [Writer(f"{NAME}-{i}", server.endpoint, tree)
                   for i, (_label, tree) in enumerate(trees)]
        try:
            client = server.api_client()
            for rnd in range(args.rounds):
                for (tree_label, tree), w in zip(trees, writers, strict=True):
                    for kind, n in cases:
                        for writes in (True, False):
                            label = f"{tree_label} | {kind} x{n} | " + (
                                f"{args.rate} puts/s" if writes else "idle")
                            res = run_case(client, kind, n, args.rate, args.seconds, writes,
                                           tree, w.name)
                            results.setdefault(label, []).append(res)
                            print(f"round {rnd + 1}: {label}: {res['core_share']:.1%} of a "
                                  f"core, {res['events']} events ({res['undelivered']} not "
                                  f"delivered in time), {res['put_rate']:.0f} puts/s"
                                  + (f", delay p50 {res['delay_ms'][50]:.2f} ms p99 "
                                     f"{res['delay_ms'][99]:.2f} ms" if "delay_ms" in res
                                     else ""), flush=True)
            client.close()
        finally:
            for w in writers:
                w.close()
            server.close()

    def med(rows: list[dict[str, Any]], f: Any) -> float:
        vals = [f(r) for r in rows if f(r) is not None]
        return statistics.median(vals) if vals else float("nan")

    print(f"\n{'case':58} {'core':>7} {'µs/ev':>7} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7}")
    summary = {}
    for label, rows in results.items():
        s = {"core_share": med(rows, lambda r: r["core_share"]),
             "cpu_us_per_event": med(rows, lambda r: r.get("cpu_us_per_event")),
             "delay_p50_ms": med(rows, lambda r: r.get("delay_ms", {}).get(50)),
             "delay_p99_ms": med(rows, lambda r: r.get("delay_ms", {}).get(99)),
             "delay_max_ms": med(rows, lambda r: r.get("delay_ms", {}).get("max"))}
        summary[label] = s
        print(f"{label:58} {s['core_share']:7.1%} {s['cpu_us_per_event']:7.1f} "
              f"{s['delay_p50_ms']:7.2f} {s['delay_p99_ms']:7.2f} {s['delay_max_ms']:7.2f}")
    if args.json:
        doc = {"stamp": stamp(), "args": vars(args), "summary": summary, "rounds": results}
        write_json(args.json, doc, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
