"""shmcache against its alternatives, side by side in one run, on this machine.

    python bench/run.py            # full run (< 20 min on 2 cores): 10k, 100k and 1M keys
    python bench/run.py --quick    # < 3 min: 10k and 100k keys, K = 1, 2, 8
    python bench/run.py --smoke    # < 40 s: every code path at toy sizes (for a test)

Starts its own etcd (throwaway, loopback), one shmcache writer per data set size
(``python -m shmcache serve``), a Redis server (Debian's redis-server, no
persistence), an LMDB environment, a multiprocessing Manager and a pool of reader
processes, then measures (issue 5):

1. read throughput of K reader processes: get(random key), list(prefix of 100
   keys), list(whole range); writer idle and under 1,000 events/s;
2. the same through direct etcd reads, per-worker replicas, Redis, a Manager
   dict, LMDB and a plain dict (the upper bound);
3. propagation delay etcd put -> watch event, shmcache vs a direct etcd watch;
4. writer ingest vs python-etcd3 bare receive; snapshot publish time and the
   longest event-publishing stall it causes;
5. memory (USS/PSS) per reader after a full sweep vs per-worker replicas;
6. cold start: attach + first get vs a replica's list;
7. etcd load: watchers and requests etcd serves.

Prints tables (percentiles, no means), writes bench/results/MODE.json (with a
machine/Python/version stamp) and bench/results/MODE-*.png; docs/benchmarks.md
explains them. The results are written only when the run completes: until then
they go to a temporary file (its path is printed if the run fails), and a failed
or interrupted run leaves bench/results/ as it was. Without a redis-server
binary (or redis-py) the Redis alternative is skipped, with a note in the output
and in the results ("notes", "skipped"). ``python bench/_report.py bench/results/MODE.json`` re-renders.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import multiprocessing as mp
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import traceback
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C  # noqa: E402
import _report  # noqa: E402

RESULTS = os.path.join(C.ROOT, "bench", "results")

MODES: dict[str, dict[str, Any]] = {
    "full": {
        "sizes": [10_000, 100_000, 1_000_000], "ks": [1, 2, 4, 8], "alt_ks": [1, 2, 4, 8],
        "dur": 1.0, "lat": 0.4, "list_dur": 1.0, "whole_dur": 1.0, "slow_cap": 3.0,
        "replica_max_k": {1_000_000: 1},
        # etcd counts the rest of the range on every page of a paginated list, so the
        # writer's relist of 1M keys in 2,000-key pages takes ~20 min here: at 1M the
        # writer starts first and follows the load through its watch instead.
        "writer_first_min_n": 1_000_000, "replica_load_max_n": 100_000,
        # memory: keys -> (shmcache workers, replica workers)
        "memory": {10_000: (8, 8), 100_000: (8, 8), 1_000_000: (8, 0)},
        "cold": [100_000, 1_000_000], "cold_procs": 5,
        "prop_size": 100_000, "prop_rates": [20, 200, 1000], "prop_seconds": 8.0,
        "ingest_size": 100_000, "ingest_events": 60_000,
        "load_rate": 1000, "stall_seconds": {10_000: 6.0, 100_000: 8.0, 1_000_000: 25.0},
        "stall_rate": 200,
        "snapshot_interval": 30.0, "h2h_rounds": 7, "h2h_dur": 0.5,
    },
    "quick": {
        "sizes": [10_000, 100_000], "ks": [1, 2, 8], "alt_ks": [1, 8], "load_ks": [1, 8],
        "dur": 0.25, "lat": 0.1, "list_dur": 0.25, "whole_dur": 0.25, "slow_cap": 1.0,
        # 8 replicas of 100k keys each list the range first (~14 s): full mode only.
        "replica_max_k": {100_000: 1},
        "memory": {10_000: (2, 0), 100_000: (4, 2)},
        "cold": [100_000], "cold_procs": 3,
        "prop_size": 100_000, "prop_rates": [100, 1000], "prop_seconds": 2.5,
        "ingest_size": 100_000, "ingest_events": 6_000,
        "load_rate": 1000, "stall_seconds": {10_000: 3.0, 100_000: 4.0},
        "stall_rate": 200,
        "snapshot_interval": 30.0, "h2h_rounds": 3, "h2h_dur": 0.2,
        # replicas under write load: each of the K lists the range while 1k ev/s arrive
        "replica_load_max_n": 10_000,
    },
    "smoke": {
        "sizes": [2_000], "ks": [1, 2], "alt_ks": [1],
        "dur": 0.1, "lat": 0.05, "list_dur": 0.1, "whole_dur": 0.1, "slow_cap": 1.0,
        "replica_max_k": {},
        "memory": {2_000: (2, 1)},
        "cold": [2_000], "cold_procs": 1,
        "prop_size": 2_000, "prop_rates": [200], "prop_seconds": 1.0,
        "ingest_size": 2_000, "ingest_events": 1_000,
        "load_rate": 1000, "stall_seconds": {2_000: 1.0},
        "stall_rate": 200,
        "snapshot_interval": 2.0, "h2h_rounds": 2, "h2h_dur": 0.05,
    },
}

ALTERNATIVES = ["dict", "lmdb", "redis", "manager", "etcd", "replica"]
OPS = ["get", "list100", "whole"]


def redis_missing() -> str | None:
    """Why the Redis alternative cannot run on this machine; None if it can."""
    if not (shutil.which("redis-server") or os.path.exists("/usr/bin/redis-server")):
        return "no redis-server binary on PATH (Debian: apt-get install -y redis-server)"
    if importlib.util.find_spec("redis") is None:
        return "redis-py is not installed (pip install -e \".[bench]\")"
    return None


class Bench:
    def __init__(self, mode: str, cfg: dict[str, Any], ctx: Any, progress: Any) -> None:
        self.mode = mode
        self.cfg = cfg
        self.ctx = ctx
        self.bar = progress
        self.run_id = f"bench{os.getpid()}"
        self.res: dict[str, Any] = {"mode": mode, "config": {k: (v if not isinstance(v, dict)
                                                                  else {str(a): b for a, b in v.items()})
                                                              for k, v in cfg.items()},
                                    "throughput": [], "memory": [], "coldstart": [],
                                    "propagation": [], "ingest": [], "snapshots": [],
                                    "stall": [], "write_load": [], "skipped": [],
                                    "notes": [], "timings": {"steps": []}}
        self._step: tuple[str, float] | None = None
        self.slow: dict[tuple[str, str], tuple[int, float]] = {}
        self.pool: list[tuple[Any, Any]] = []
        self.etcd: Any = None
        self.redis: C.RedisServer | None = None
        self.skip_redis: str | None = None  # why Redis is left out (no redis-server)
        self.manager: Any = None
        self.lmdb_dir = tempfile.mkdtemp(prefix="shmcache-bench-lmdb-")
        self.manager_dicts: dict[int, Any] = {}
        self.out = RESULTS
        self.path = os.path.join(RESULTS, f"{mode}.json")
        self.partial: str | None = None  # results so far, outside self.out

    # -- plumbing -----------------------------------------------------------------------

    def alternatives(self) -> list[str]:
        return [b for b in ALTERNATIVES if not (b == "redis" and self.skip_redis)]

    def step(self, what: str) -> None:
        now = time.monotonic()
        if self._step is not None:
            self.res["timings"]["steps"].append([self._step[0], round(now - self._step[1], 2)])
        self._step = (what, now)
        self.bar.set_description_str(what[:60])

    def tick(self, n: int = 1) -> None:
        self.bar.update(n)

    def log(self, msg: str) -> None:
        self.bar.write(msg, file=sys.stderr)

    def start_pool(self, n: int) -> None:
        import _workers

        for i in range(n):
            a, b = self.ctx.Pipe()
            p = self.ctx.Process(target=_workers.pool_main, args=(b, i), daemon=True)
            p.start()
            self.pool.append((p, a))

    def call(self, idx: list[int], cmd: str, args: list[Any], timeout: float = 900) -> list[Any]:
        for i, a in zip(idx, args, strict=False):
            self.pool[i][1].send((cmd, a))
        out, errors = [], []
        for i in idx:
            conn = self.pool[i][1]
            if not conn.poll(timeout):
                raise RuntimeError(f"pool worker {i} did not answer {cmd} in {timeout}s")
            status, val = conn.recv()  # every answer is read, so the pipes stay in step
            if status != "ok":
                errors.append(f"pool worker {i} failed {cmd}:\n{val}")
            out.append(val)
        if errors:
            raise RuntimeError(errors[0])
        return out

    def metrics(self) -> dict[str, float]:
        try:
            return C.etcd_metrics(self.etcd.endpoint)
        except OSError:
            return {}

    def foreign_cpu(self, since: tuple[float, float, float], label: str) -> None:
        """Cores used by processes outside the benchmark (the machine may be shared)."""
        now = C.cpu_sample()
        wall = now[0] - since[0]
        other = max(0.0, (now[1] - since[1]) - (now[2] - since[2])) / wall if wall else 0.0
        self.res.setdefault("foreign_cpu_cores", {})[label] = round(other, 2)

    def close(self) -> None:
        for p, conn in self.pool:
            try:
                conn.send(("quit", None))
                conn.poll(5) and conn.recv()
            except (OSError, EOFError):
                pass
            p.join(5)
            if p.is_alive():
                p.kill()
        if self.manager is not None:
            self.manager.shutdown()
        if self.redis is not None:
            self.redis.close()
        shutil.rmtree(self.lmdb_dir, ignore_errors=True)

    # -- throughput cells ------------------------------------------------------------------

    def params(self, backend: str, n: int, load: bool = False) -> dict[str, Any]:
        prefix = C.cache_prefix(n)
        return {"backend": backend, "n": n, "prefix": prefix, "load": load, "cache": f"{self.run_id}-n{n}",
                "etcd_host": "127.0.0.1", "etcd_port": self.etcd.port,
                "redis_port": self.redis.port if self.redis else None,
                "lmdb_path": os.path.join(self.lmdb_dir, f"n{n}"),
                "manager_dict": self.manager_dicts.get(n) if backend == "manager" else None}

    def ops_for(self, backend: str, n: int, k: int) -> list[str]:
        ops = []
        for op in OPS:
            known = self.slow.get((backend, op))
            if known is not None:
                n0, secs = known
                if secs * (n / n0) * max(1, k / 2) > self.cfg["slow_cap"] * (3 if backend ==
                                                                               "shmcache" else 1):
                    self.res["skipped"].append({"backend": backend, "n": n, "k": k, "op": op,
                                                "reason": f"one op took {secs:.2f} s at {n0} keys"
                                                          f" with 1 reader"})
                    continue
            ops.append(op)
        return ops

    def cell(self, backend: str, n: int, k: int, load: bool) -> None:
        ops = self.ops_for(backend, n, k)
        label = backend + ("+load" if load else "")
        self.step(f"{n // 1000}k keys: {label} x{k}")
        if not ops:
            self.tick()
            return
        idx = list(range(k))
        p = self.params(backend, n, load)
        m0 = self.metrics()
        infos = self.call(idx, "setup", [p] * k)
        m1 = self.metrics()
        cfg = self.cfg
        dur = {"get": cfg["dur"], "list100": cfg["list_dur"], "whole": cfg["whole_dur"]}
        lat = {"get": cfg["lat"], "list100": 0.0, "whole": 0.0}
        t0 = time.monotonic() + 0.3
        plans = [{**p, "manager_dict": None, "ops": ops, "dur": dur, "lat_dur": lat,
                  "gap": 0.1, "t0": t0, "seed": hash((backend, n, k, i)) & 0xFFFF}
                 for i in idx]
        per = self.call(idx, "run", plans)
        m2 = self.metrics()
        for op in ops:
            rates = [w[op]["rate"] for w in per]
            lats = [w[op]["latency_us"] for w in per]
            row = {"backend": label, "n": n, "k": k, "op": op, "load": load,
                   "aggregate_per_s": sum(rates), "per_reader_per_s": sorted(rates),
                   "per_reader_median": C.pct(rates, 50),
                   "p50_us": C.pct([x["p50"] for x in lats], 50),
                   "p99_us": max(x["p99"] for x in lats),
                   "p90_us": C.pct([x["p90"] for x in lats], 50),
                   "ops": sum(w[op]["ops"] for w in per),
                   "cores_used": sum(w[op].get("cpu_share", 0.0) for w in per),
                   "workers": per if op == "get" else None}
            self.res["throughput"].append(row)
            if k == 1 and not load:
                self.slow[(backend, op)] = (n, row["p50_us"] / 1e6)
        self.res["throughput"][-1]["etcd"] = {
            "setup_delta": C.metrics_delta(m0, m1), "run_delta": C.metrics_delta(m1, m2),
            "run_seconds": max(w[o]["seconds"] for w in per for o in ops),
            "watchers": m1.get("etcd_debugging_mvcc_watcher_total"),
            "watch_streams": m1.get("etcd_debugging_mvcc_watch_stream_total"),
            "setup_seconds": [i.get("setup_seconds") for i in infos]}
        self.tick()

    def head_to_head(self, n: int) -> None:
        """Interleaved rounds of get throughput, so that noise from other processes on the
        machine hits every contender alike: single-reader get of every backend (worker 0
        holds them all), then shmcache with 1, 2 and max K readers. Medians of the rounds."""
        rounds = self.cfg["h2h_rounds"]
        dur = self.cfg["h2h_dur"]
        single = [b for b in ("shmcache", "lmdb", "dict", "redis", "manager", "etcd")
                  if b in self.alternatives() or b == "shmcache"]
        self.step(f"{n // 1000}k keys: head-to-head rounds")
        for b in single:
            self.call([0], "setup", [self.params(b, n)])
        ks = sorted({1, 2, max(self.cfg["ks"])})
        for i in range(1, max(ks)):
            self.call([i], "setup", [self.params("shmcache", n)])
        rates: dict[str, list[float]] = {}
        cores: dict[str, list[float]] = {}
        for r in range(rounds):
            order = single[r % len(single):] + single[:r % len(single)]
            for b in order:
                plan = {**self.params(b, n), "manager_dict": None, "ops": ["get"],
                        "dur": {"get": dur}, "lat_dur": {"get": 0.0}, "gap": 0.0,
                        "t0": time.monotonic() + 0.05, "seed": r}
                rates.setdefault(f"{b} x1", []).append(self.call([0], "run", [plan])[0]["get"]["rate"])
            for k in (ks if r % 2 == 0 else ks[::-1]):
                t0 = time.monotonic() + 0.1
                plans = [{**self.params("shmcache", n), "manager_dict": None, "ops": ["get"],
                          "dur": {"get": dur}, "lat_dur": {"get": 0.0}, "gap": 0.0, "t0": t0,
                          "seed": r * 100 + i} for i in range(k)]
                per = self.call(list(range(k)), "run", plans)
                rates.setdefault(f"shmcache aggregate x{k}", []).append(
                    sum(w["get"]["rate"] for w in per))
                cores.setdefault(f"shmcache aggregate x{k}", []).append(
                    sum(w["get"].get("cpu_share", 0.0) for w in per))
        self.res.setdefault("head_to_head", []).append(
            {"n": n, "rounds": rounds, "seconds_per_round": dur, "rates": rates,
             "median": {k: C.pct(v, 50) for k, v in rates.items()},
             "cores_used": {k: C.pct(v, 50) for k, v in cores.items()}})
        for b in single:
            self.call(list(range(len(self.pool))), "drop", [b] * len(self.pool))
        self.tick()

    def sweep(self, backend: str, n: int, ks: list[int], load: bool = False) -> None:
        for k in ks:
            try:
                self.cell(backend, n, k, load)
            except Exception:
                self.log(f"!! {backend} x{k} at {n} keys failed:\n{traceback.format_exc()}")
                self.res["skipped"].append({"backend": backend, "n": n, "k": k, "op": "*",
                                            "reason": "failed: " + traceback.format_exc()[-300:]})
                self.tick()
        self.call(list(range(len(self.pool))), "drop", [backend] * len(self.pool))

    # -- sections ------------------------------------------------------------------------

    def load_data(self, n: int) -> None:
        prefix = C.cache_prefix(n)
        self.step(f"{n // 1000}k keys: loading etcd")
        client = self.etcd.api_client()
        t0 = time.monotonic()
        C.load_etcd(client, prefix, n)
        client.close()
        self.res["timings"][f"etcd_load_{n}"] = time.monotonic() - t0
        self.step(f"{n // 1000}k keys: loading Redis, LMDB, Manager")
        t0 = time.monotonic()
        if self.redis is not None:
            self.redis.load(prefix, n)
        C.load_lmdb(os.path.join(self.lmdb_dir, f"n{n}"), prefix, n)
        d = self.manager.dict()
        for start in range(0, n, 20_000):
            d.update({C.key(prefix, i): C.value(i) for i in range(start, min(n, start + 20_000))})
        self.manager_dicts = {n: d}
        self.res["timings"][f"alt_load_{n}"] = time.monotonic() - t0
        self.tick()

    def start_writer(self, n: int) -> Any:
        from tests.helpers import WriterProcess

        self.step(f"{n // 1000}k keys: writer lists and publishes")
        w = WriterProcess(f"{self.run_id}-n{n}", self.etcd.endpoint, C.cache_prefix(n),
                          ring_size="64MiB",
                          extra=["--snapshot-interval", str(self.cfg["snapshot_interval"])])
        w.log_path = f"/tmp/shmcache-bench-writer-{w.name}.log"
        t0 = time.monotonic()
        w.start(wait=False)
        w.wait_ready(timeout=600)
        self.res["timings"][f"writer_ready_{n}"] = time.monotonic() - t0
        self.tick()
        return w

    def writer_log(self, w: Any, n: int) -> None:
        pat = re.compile(r"snapshot published: revision (\d+), (\d+) keys, (\d+) bytes, "
                         r"(?:built in )?([\d.]+) ms")
        try:
            with open(w.log_path, errors="replace") as f:
                text = f.read()
        except OSError:
            text = ""
        for line in text.splitlines():
            m = pat.search(line)
            if m:
                self.res["snapshots"].append({"n": n, "keys": int(m.group(2)),
                                              "bytes": int(m.group(3)),
                                              "ms": float(m.group(4))})

    def memory(self, n: int, counts: tuple[int, int]) -> None:
        import _workers

        for kind, workers in zip(("shmcache", "replica"), counts, strict=False):
            self.step(f"{n // 1000}k keys: memory of {workers} {kind} workers")
            if not workers:
                self.res["skipped"].append({"section": "memory", "backend": kind, "n": n,
                                            "reason": "replicas of this size take minutes "
                                                      "to list; see cold start for one"})
                self.tick()
                continue
            barrier = self.ctx.Barrier(workers)
            q = self.ctx.Queue()
            p = self.params(kind, n)
            procs = [self.ctx.Process(target=_workers.memory_main, args=(kind, p, barrier, q))
                     for _ in range(workers)]
            for pr in procs:
                pr.start()
            got = [q.get(timeout=900) for _ in procs]
            for pr in procs:
                pr.join(30)
            errs = [g["error"] for g in got if "error" in g]
            if errs:
                raise RuntimeError(errs[0])
            self.res["memory"].append({"kind": kind, "n": n, "workers": workers, "each": got})
            self.tick()

    def coldstart(self, n: int) -> None:
        import _workers

        for kind in ("shmcache", "replica"):
            self.step(f"{n // 1000}k keys: cold start, {kind}")
            runs = []
            procs = self.cfg["cold_procs"] if kind == "shmcache" else 1
            for _ in range(procs):
                q = self.ctx.Queue()
                pr = self.ctx.Process(target=_workers.coldstart_main,
                                      args=(kind, self.params(kind, n), q))
                pr.start()
                r = q.get(timeout=900)
                pr.join(30)
                if "error" in r:
                    raise RuntimeError(r["error"])
                runs.append(r)
            self.res["coldstart"].append({"kind": kind, "n": n, "runs": runs})
            self.tick()

    def watchers(self, n: int) -> tuple[list[Any], Any, Any]:
        import _workers

        prefix = C.cache_prefix(n)
        stop = self.ctx.Event()
        qs, procs = [], []
        for target, args in ((_workers.shm_watch_main, (f"{self.run_id}-n{n}", prefix)),
                             (_workers.etcd_watch_main, ("127.0.0.1", self.etcd.port, prefix))):
            ready, q = self.ctx.Event(), self.ctx.Queue()
            pr = self.ctx.Process(target=target, args=(*args, stop, ready, q), daemon=True)
            pr.start()
            ready.wait(60)
            qs.append(q)
            procs.append(pr)
        time.sleep(0.3)  # both watches are established on etcd / the ring
        return procs, stop, qs

    def collect_watchers(self, procs: list[Any], stop: Any, qs: list[Any]
                         ) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        time.sleep(0.5)  # the last events arrive
        stop.set()
        outs = [q.get(timeout=120) for q in qs]
        for pr in procs:
            pr.join(10)
        for o in outs:
            if "error" in o:
                self.log("!! watcher: " + o["error"][-500:])
        return outs[0]["events"], outs[1]["events"]

    @staticmethod
    def delays(ev: list[tuple[int, int]]) -> dict[str, Any]:
        d = [(a - b) / 1e6 for a, b in ev]
        arr = sorted(a for a, _ in ev)
        gaps = [(y - x) / 1e6 for x, y in zip(arr, arr[1:], strict=False)]
        return {"delay_ms": C.summary(d), "max_gap_ms": max(gaps) if gaps else None}

    def settle(self, n: int, timeout: float = 300) -> float:
        """Wait until the writer has published everything etcd holds (no backlog to drain)."""
        import shmcache
        from tests.helpers import etcd_current_revision

        t0 = time.monotonic()
        client = self.etcd.api_client()
        try:
            rev = etcd_current_revision(client)
        finally:
            client.close()
        for attempt in range(5):
            try:
                with shmcache.Reader(f"{self.run_id}-n{n}") as r:
                    if not r.wait(rev, timeout=timeout):
                        self.log(f"!! writer for {n} keys did not catch up with revision "
                                 f"{rev} in {timeout}s")
                break
            except shmcache.ShmCacheError as exc:
                # Seen once (quick run): a fresh Reader found the snapshot the control
                # segment points at missing. Recorded for the lead, then retried.
                self.res.setdefault("errors", []).append(
                    {"where": f"settle {n}", "attempt": attempt, "error": repr(exc)})
                self.log(f"!! attaching a Reader failed: {exc!r}")
                time.sleep(0.5)
        waited = time.monotonic() - t0
        self.res["timings"].setdefault("settle", []).append([n, round(waited, 2)])
        return waited

    def propagation(self, n: int) -> None:
        for rate in self.cfg["prop_rates"]:
            self.step(f"{n // 1000}k keys: propagation at {rate} puts/s")
            self.settle(n)
            procs, stop, qs = self.watchers(n)
            lt = C.LoadThread(self.ctx, "127.0.0.1", self.etcd.port, C.cache_prefix(n), n, rate,
                              max_events=int(rate * self.cfg["prop_seconds"]))
            achieved = lt.wait()
            shm, direct = self.collect_watchers(procs, stop, qs)
            self.res["propagation"].append({"n": n, "rate": rate, "achieved": achieved,
                                            "shmcache": self.delays(shm),
                                            "direct": self.delays(direct),
                                            "received": [len(shm), len(direct)]})
            self.tick()

    def ingest(self, n: int, w: Any) -> None:
        import _workers

        import shmcache

        self.step(f"{n // 1000}k keys: writer ingest")
        self.settle(n)
        events = self.cfg["ingest_events"]
        r = shmcache.Reader(f"{self.run_id}-n{n}")
        client = self.etcd.api_client()
        from tests.helpers import etcd_current_revision

        base = etcd_current_revision(client)
        assert r.wait(base, timeout=60)
        n_snap = len(self.res["snapshots"])
        os.kill(w.pid, signal.SIGSTOP)
        try:
            lt = C.LoadThread(self.ctx, "127.0.0.1", self.etcd.port, C.cache_prefix(n), n, 0,
                              max_events=events)
            wl = lt.wait()
        finally:
            t0 = time.monotonic()
            os.kill(w.pid, signal.SIGCONT)
        last = wl["last_revision"]
        ok = r.wait(last, timeout=600)
        dt = time.monotonic() - t0
        r.close()
        got = {"n": n, "events": last - base, "writer_seconds": dt, "writer_ok": ok,
               "writer_rate": (last - base) / dt, "backlog_write_rate": wl["rate"]}
        self.step(f"{n // 1000}k keys: python-etcd3 receive")
        for label, target, args in (
                ("etcd3_receive", _workers.etcd_receive_main,
                 ("127.0.0.1", self.etcd.port, C.cache_prefix(n), base + 1, last)),
                ("raw_grpc_receive", _workers.raw_receive_main,
                 (self.etcd.endpoint, C.cache_prefix(n), base + 1, last))):
            q = self.ctx.Queue()
            pr = self.ctx.Process(target=target, args=(*args, q))
            pr.start()
            out = q.get(timeout=600)
            pr.join(10)
            if "error" in out:
                raise RuntimeError(out["error"])
            got[label] = out
        # The same backlog path for python-etcd3: the writer's watch was open and its
        # process stopped while the backlog was written, which etcd serves through its
        # slow-watcher ("victim") path, not the unsynced-watch path a fresh watch from a
        # past revision takes. Measured here under the same conditions.
        self.step(f"{n // 1000}k keys: python-etcd3 receive, stopped like the writer")
        base2 = etcd_current_revision(client)
        last_v = self.ctx.Value("q", 0)
        ready, q = self.ctx.Queue(), self.ctx.Queue()
        pr = self.ctx.Process(target=_workers.etcd_receive_stopped_main,
                              args=("127.0.0.1", self.etcd.port, C.cache_prefix(n), base2 + 1,
                                    last_v, ready, q))
        pr.start()
        try:
            ready.get(timeout=60)
            time.sleep(0.2)
            os.kill(pr.pid, signal.SIGSTOP)
            try:
                lt = C.LoadThread(self.ctx, "127.0.0.1", self.etcd.port, C.cache_prefix(n), n, 0,
                                  max_events=events)
                wl2 = lt.wait()
                last_v.value = wl2["last_revision"]
            finally:
                t0 = time.monotonic()
                os.kill(pr.pid, signal.SIGCONT)
            out = q.get(timeout=600)
        finally:
            pr.join(10)
        if "error" in out:
            raise RuntimeError(out["error"])
        dt = out["t_end"] - t0
        got["etcd3_receive_stopped"] = {"events": wl2["last_revision"] - base2, "seconds": dt,
                                        "rate": (wl2["last_revision"] - base2) / dt}
        client.close()
        got["snapshot_index"] = n_snap
        self.res["ingest"].append(got)
        self.tick()

    def load_phase(self, n: int, w: Any, writer_ready: float) -> None:
        # The writer republishes its snapshot on the first change once snapshot_interval
        # has passed since the last one: waiting for that puts a snapshot at the start of
        # the load, inside the stall window.
        interval = self.cfg["snapshot_interval"]
        wait = writer_ready + interval + 1.0 - time.monotonic()
        if wait > 0:
            self.step(f"{n // 1000}k keys: waiting {wait:.0f}s for the snapshot interval")
            time.sleep(wait)
        # The stall window runs at a moderate rate: at 1,000 puts/s this 2-core machine
        # is saturated (etcd, load generator, writer, watchers) and a direct etcd watch
        # shows gaps of hundreds of ms with no snapshot involved.
        rate = self.cfg["stall_rate"]
        self.step(f"{n // 1000}k keys: snapshot stall under {rate} ev/s")
        self.settle(n)
        procs, stop, qs = self.watchers(n)
        lt = C.LoadThread(self.ctx, "127.0.0.1", self.etcd.port, C.cache_prefix(n), n, rate)
        try:
            time.sleep(self.cfg["stall_seconds"][n])
            shm, direct = self.collect_watchers(procs, stop, qs)
            achieved = lt.stop()
            self.res["stall"].append({"n": n, "seconds": self.cfg["stall_seconds"][n],
                                      "rate": rate, "achieved": achieved,
                                      "shmcache": self.delays(shm), "direct": self.delays(direct),
                                      "received": [len(shm), len(direct)]})
            self.tick()
            lt = C.LoadThread(self.ctx, "127.0.0.1", self.etcd.port, C.cache_prefix(n), n,
                              self.cfg["load_rate"])
            if self.cfg.get("only") and "throughput" not in self.cfg["only"]:
                return
            self.sweep("shmcache", n, self.cfg.get("load_ks", self.cfg["ks"]), load=True)
            if n <= self.cfg.get("replica_load_max_n", n):
                self.sweep("replica", n, [k for k in self.replica_ks(n)
                                          if k in self.cfg.get("load_ks", [k])], load=True)
            else:
                self.res["skipped"].append({"backend": "replica+load", "n": n, "op": "*",
                                            "reason": "not in this mode (time)"})
        finally:
            achieved = lt.stop()
        achieved["n"] = n
        self.res["write_load"].append(achieved)

    def replica_ks(self, n: int) -> list[int]:
        cap = self.cfg["replica_max_k"].get(n)
        return [k for k in self.cfg["alt_ks"] if cap is None or k <= cap]

    def size(self, n: int) -> None:
        cpu0 = C.cpu_sample()
        try:
            self._size(n)
        finally:
            self.foreign_cpu(cpu0, str(n))

    def _size(self, n: int) -> None:
        if n >= self.cfg.get("writer_first_min_n", 1 << 62):
            w = self.start_writer(n)
            t0 = time.monotonic()
            try:
                self.load_data(n)
                self.step(f"{n // 1000}k keys: writer follows the load")
                self.settle(n, timeout=1800)
            except BaseException:
                w.terminate()
                self.writer_log(w, n)
                w.close()
                raise
            self.res["timings"][f"writer_followed_load_{n}"] = time.monotonic() - t0
        else:
            self.load_data(n)
            w = self.start_writer(n)
        writer_ready = time.monotonic()
        only = self.cfg.get("only")

        def want(section: str) -> bool:
            return not only or section in only

        try:
            if want("throughput"):
                self.head_to_head(n)
                self.sweep("shmcache", n, self.cfg["ks"])
                for b in self.alternatives():
                    ks = self.replica_ks(n) if b == "replica" else self.cfg["alt_ks"]
                    self.sweep(b, n, ks)
            if n in self.cfg["memory"] and want("memory"):
                self.memory(n, self.cfg["memory"][n])
            if n in self.cfg["cold"] and want("cold"):
                self.coldstart(n)
            if want("load"):
                self.load_phase(n, w, writer_ready)
            if n == self.cfg["prop_size"] and want("propagation"):
                self.propagation(n)
            if n == self.cfg["ingest_size"] and want("ingest"):
                self.ingest(n, w)
        finally:
            w.terminate()
            self.writer_log(w, n)
            w.close()
        self.log(_report.throughput_table(self.res, n))
        self.save()  # after every size: a run stopped later keeps what it measured

    def save(self) -> None:
        """The results so far, to the temporary file (never to self.path: see publish)."""
        if self.partial is None:
            fd, self.partial = tempfile.mkstemp(prefix=f"shmcache-bench-{self.mode}-",
                                                suffix=".json")
            os.close(fd)
        with open(self.partial, "w") as f:
            json.dump(self.res, f, indent=1, default=repr)

    def publish(self) -> None:
        """Only for a completed run: self.path replaced whole (os.replace), never half-written."""
        os.makedirs(self.out, exist_ok=True)
        tmp = os.path.join(self.out, f".{os.path.basename(self.path)}.tmp")
        try:
            with open(tmp, "w") as f:
                json.dump(self.res, f, indent=1, default=repr)
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        if self.partial is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.partial)
            self.partial = None

    def total_steps(self) -> int:
        c = self.cfg
        steps = 0
        for n in c["sizes"]:
            rk = len(self.replica_ks(n))
            rl = rk if n <= c.get("replica_load_max_n", n) else 0
            lk = len(c.get("load_ks", c["ks"]))
            rl = min(rl, lk) if rl else 0
            steps += 3 + len(c["ks"]) + lk + len(c["alt_ks"]) * (len(self.alternatives()) - 1) \
                + rk + rl
            steps += 2 * (n in c["memory"]) + 2 * (n in c["cold"]) + 1
            steps += len(c["prop_rates"]) * (n == c["prop_size"]) + (n == c["ingest_size"])
        return steps


def problems(res: dict[str, Any]) -> list[str]:
    """What a run failed to produce: errors, failed cells, empty sections (--smoke fails on any).

    An alternative left out on purpose (Redis without redis-server) is not a problem.
    """
    out = [f"error in {e['where']}: {e['error'][-300:]}" for e in res.get("errors", [])]
    out += [f"{s.get('backend')} x{s.get('k')} at {s['n']} failed" for s in res.get("skipped", [])
            if str(s.get("reason", "")).startswith("failed")]
    for section in ("throughput", "head_to_head", "memory", "coldstart", "propagation",
                    "ingest", "snapshots", "stall", "write_load"):
        if not res.get(section):
            out.append(f"section {section} is empty")
    seen = {r["backend"] for r in res.get("throughput", [])}
    left_out = {s["backend"] for s in res.get("skipped", [])
                if str(s.get("reason", "")).startswith("not available")}
    for b in ["shmcache", "shmcache+load", "replica+load", *ALTERNATIVES]:
        if b not in seen and b not in left_out:
            out.append(f"no throughput figures for {b}")
    for p in res.get("propagation", []) + res.get("stall", []):
        if not all(p["received"]):
            out.append(f"a watcher received no events ({p.get('rate', 'stall')})")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="10k and 100k keys, K=1,2,8 (< 3 min)")
    g.add_argument("--smoke", action="store_true", help="toy sizes, every code path (< 40 s)")
    ap.add_argument("--out", default=RESULTS, help="directory for MODE.json and plots")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--sizes", default=None,
                    help="comma-separated key counts instead of the mode's (e.g. 1000000)")
    ap.add_argument("--tag", default=None, help="results file name (default: the mode)")
    ap.add_argument("--only", default=None,
                    help="comma-separated sections: throughput,memory,cold,load,propagation,"
                         "ingest (default: all)")
    args = ap.parse_args(argv)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    cfg = dict(MODES[mode])
    if args.sizes:
        cfg["sizes"] = [int(x) for x in args.sizes.split(",")]
    tag = args.tag or mode
    if args.only:
        cfg["only"] = set(args.only.split(","))
    from tqdm import tqdm

    from tests.etcdserver import EtcdServer

    ctx = mp.get_context("spawn")
    started = time.monotonic()
    bar = tqdm(total=1, unit="step", dynamic_ncols=True, file=sys.stderr,
               bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]")
    bench = Bench(mode, cfg, ctx, bar)
    bench.out = args.out
    bench.path = os.path.join(args.out, f"{tag}.json")
    bench.skip_redis = redis_missing()
    if bench.skip_redis:
        note = f"Redis alternative skipped: {bench.skip_redis}"
        bar.write(f"note: {note}", file=sys.stderr)
        bench.res["notes"].append(note)
        for n in cfg["sizes"]:
            bench.res["skipped"].append({"backend": "redis", "n": n, "op": "*",
                                         "reason": f"not available: {bench.skip_redis}"})
    bar.total = bench.total_steps() + 1
    bar.refresh()
    rc = 0
    try:
        bench.step("starting etcd, Redis, Manager, reader pool")
        with EtcdServer(extra_args=C.etcd_args()) as etcd:
            bench.etcd = etcd
            # etcd (and the write-load generator) stand for servers on other machines:
            # a higher priority keeps the 8 busy readers from starving them.
            os.setpriority(os.PRIO_PROCESS, etcd.pid, -10)
            if not bench.skip_redis:
                bench.redis = C.RedisServer()
            bench.manager = ctx.Manager()
            bench.start_pool(max(cfg["ks"] + cfg["alt_ks"]))
            bench.res["stamp"] = C.stamp(
                etcd=etcd.version, redis_server=bench.redis.version if bench.redis else None)
            bench.tick()
            for n in cfg["sizes"]:
                bench.size(n)
    except BaseException:
        bar.write("benchmark failed:\n" + traceback.format_exc(), file=sys.stderr)
        bench.res.setdefault("errors", []).append({"where": "main",
                                                   "error": traceback.format_exc()[-2000:]})
        rc = 1
    finally:
        bench.close()
        bar.close()
    bench.res["timings"]["total_seconds"] = time.monotonic() - started
    missing = problems(bench.res)
    if missing and mode == "smoke":
        rc = 1  # the smoke run is a test: every code path must have produced figures
    if rc != 0:
        # A failed (or interrupted) run never touches the results directory: the
        # committed MODE.json and plots stay as they were.
        bench.save()
        print(f"benchmark failed: {os.path.relpath(bench.path, C.ROOT)} not written; "
              f"what it measured is in {bench.partial}", file=sys.stderr)
        if missing:
            print("problems:\n  " + "\n  ".join(missing), file=sys.stderr)
        return rc
    bench.publish()
    print(_report.render_text(bench.res))
    if not args.no_plots:
        for p in _report.plots(bench.res, args.out, tag):
            print(f"plot: {os.path.relpath(p, C.ROOT)}")
    print(f"results: {os.path.relpath(bench.path, C.ROOT)} "
          f"({bench.res['timings']['total_seconds']:.0f} s)")
    if missing:
        print("problems:\n  " + "\n  ".join(missing), file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
