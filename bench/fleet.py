"""Many writers, one etcd: N caches of one prefix direct to etcd and through etcd's gRPC proxy.

    python bench/fleet.py                 # N = 1, 10, 50; writes bench/results/fleet.json
    python bench/fleet.py --sizes 1,10 --rounds 1 --out /tmp/x   # smaller
    python bench/fleet.py --smoke --out DIR                     # every path at toy sizes
    python bench/fleet.py --only proof                           # part 4 alone: fleet-proof-KEYS.json

Each simulated host is one ``python -m shmcache serve`` process with a cache of its
own (256 KiB ring) on the same prefix of --keys keys (256-byte values). Modes
``direct`` (every writer dials etcd) and ``proxy`` (every writer dials one ``etcd
grpc-proxy start`` in front of etcd) alternate round by round (direct, proxy,
proxy, direct, ...); figures are medians over the rounds.

1. steady: etcd's watchers and watch streams added by the N writers (etcd's
   ``etcd_debugging_mvcc_*`` gauges), and while a loader puts --rate puts/s into
   the prefix for --seconds: etcd's CPU (psutil, user+system of its pid) per
   second and per put, bytes etcd sent to clients per second
   (``etcd_network_client_grpc_sent_bytes_total``), the proxy's and the writers' CPU.
2. restart storm: every writer SIGKILLed, its cache removed, and all N started
   at once (each lists the whole prefix): time until every cache serves at
   etcd's revision, etcd's peak CPU (0.1 s samples, % of one core).
3. failover: a 3-member cluster, the writers (or the proxy) given every member;
   the leader is SIGKILLed: time until every cache has a put made after the
   kill, and the surviving members' peak CPU.
4. proof: the cost of the writer's fallback for progress requests the proxy drops
   (writer/range_proof.py): one proof at --keys keys, and --idle-writers writers
   idling behind a proxy, and direct, while etcd moves on outside the prefix.

The results are written only when the whole run completes (to a temporary file
until then): a failed run never overwrites committed results.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C  # noqa: E402
import psutil  # noqa: E402

import shmcache  # noqa: E402
from shmcache.writer.lock import remove_cache  # noqa: E402
from tests.etcdserver import EtcdCluster, EtcdServer  # noqa: E402
from tests.grpcproxy import GrpcProxy, parse_metrics  # noqa: E402

PREFIX = b"/fleet/"
RESULTS = os.path.join(C.ROOT, "bench", "results")


# -- the writers ---------------------------------------------------------------------------

class Fleet:
    """N ``shmcache serve`` processes, one cache each, on PREFIX; started and killed together."""

    def __init__(self, n: int, endpoints: list[str], tag: str) -> None:
        self.names = [f"fleet-{tag}-{i}" for i in range(n)]
        self.endpoints = endpoints
        self.procs: list[subprocess.Popen[bytes]] = []
        self.log = tempfile.TemporaryFile()

    def start(self) -> None:
        for name in self.names:
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "shmcache", "serve", name, "--endpoints",
                 ",".join(self.endpoints), "--prefix", PREFIX.decode(), "--ring-size", "256KiB",
                 "--verify-interval", "0", "--log-level", "warning"],
                stdout=self.log, stderr=subprocess.STDOUT))

    def wait_serving(self, revision: int, timeout: float) -> float:
        """Seconds until every cache serves at ``revision`` or later (from now)."""
        t0 = time.monotonic()
        waiting = set(self.names)
        while waiting:
            for name in list(waiting):
                with contextlib.suppress(shmcache.ShmCacheError):
                    with shmcache.Reader(name, timeout=0.5) as r:
                        if r.revision >= revision:
                            waiting.discard(name)
            if not waiting:
                break
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"a writer exited with {p.returncode}: {self.tail()}")
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"{len(waiting)} caches not at {revision} after {timeout}s: "
                                   f"{self.tail()}")
            time.sleep(0.05)
        return time.monotonic() - t0

    def cpu(self) -> float:
        return sum(_cpu(p.pid) for p in self.procs)

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
        for p in self.procs:
            p.wait()
        self.procs = []

    def close(self) -> None:
        self.kill()
        for name in self.names:
            remove_cache(name, force=True)
        self.log.close()

    def tail(self) -> str:
        self.log.seek(0)
        return self.log.read()[-2000:].decode(errors="replace")


def _cpu(pid: int | None) -> float:
    if pid is None:
        return 0.0
    try:
        t = psutil.Process(pid).cpu_times()
        return float(t.user + t.system)
    except psutil.Error:
        return 0.0


class PeakCPU:
    """Samples the summed CPU of ``pids`` every 0.1 s on a thread; ``peak`` in % of one core."""

    def __init__(self, pids: list[int]) -> None:
        self.procs = [psutil.Process(p) for p in pids]
        self.peak = 0.0
        self._stop = threading.Event()
        for p in self.procs:
            with contextlib.suppress(psutil.Error):
                p.cpu_percent(None)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            total = 0.0
            for p in self.procs:
                with contextlib.suppress(psutil.Error):
                    total += p.cpu_percent(None)
            self.peak = max(self.peak, total)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak


def _metrics(endpoint: str) -> dict[str, float]:
    import urllib.request

    with urllib.request.urlopen(endpoint + "/metrics", timeout=10) as resp:
        return parse_metrics(resp.read().decode())


def _sent_bytes(m: dict[str, float]) -> float:
    return sum(v for k, v in m.items() if k.startswith("etcd_network_client_grpc_sent_bytes_total"))


def _watch_gauges(m: dict[str, float]) -> tuple[int, int]:
    return (int(m.get("etcd_debugging_mvcc_watcher_total", 0)),
            int(m.get("etcd_debugging_mvcc_watch_stream_total", 0)))


def _settled_gauges(endpoint: str, timeout: float = 60.0) -> tuple[int, int]:
    """etcd's watch gauges once the last round's clients are gone (etcd notices a killed
    proxy's or writer's connection a moment later): until two reads 1 s apart agree and
    no watcher is left, or ``timeout``."""
    deadline = time.monotonic() + timeout
    last = _watch_gauges(_metrics(endpoint))
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = _watch_gauges(_metrics(endpoint))
        if now == last and now == (0, 0):
            break
        last = now
    return last


def _revision(client: Any) -> int:
    from etcd3.etcdrpc import rpc_pb2

    resp = client.kvstub.Range(rpc_pb2.RangeRequest(key=b"\0", count_only=True), 10,
                               metadata=client.metadata)
    return int(resp.header.revision)


def _paced_puts(client: Any, rate: float, seconds: float) -> tuple[int, int]:
    """Put ``rate`` puts/s into PREFIX for ``seconds``; returns (puts, last revision)."""
    from etcd3.etcdrpc import rpc_pb2

    n, rev = 0, 0
    t0 = time.monotonic()
    while (elapsed := time.monotonic() - t0) < seconds:
        due = int(elapsed * rate) + 1
        while n < due:
            req = rpc_pb2.PutRequest(key=C.key(PREFIX, n % 1000), value=C.stamped_value(n))
            rev = int(client.kvstub.Put(req, 10, metadata=client.metadata).header.revision)
            n += 1
        time.sleep(max(0.0, (n / rate) - (time.monotonic() - t0)))
    return n, rev


# -- the measurements ----------------------------------------------------------------------

def steady_and_storm(etcd: EtcdServer, n: int, mode: str, args: argparse.Namespace,
                     tag: str) -> dict[str, Any]:
    """One round of (1) and (2) for ``n`` writers in ``mode``."""
    client = etcd.client()
    idle = _settled_gauges(etcd.endpoint)
    proxy = GrpcProxy([etcd.endpoint]).start() if mode == "proxy" else None
    fleet = Fleet(n, [proxy.endpoint if proxy else etcd.endpoint], tag)
    out: dict[str, Any] = {"n": n, "mode": mode}
    try:
        base = _watch_gauges(_metrics(etcd.endpoint))  # (with the proxy's own watches)
        out["proxy_own_watchers"], out["proxy_own_watch_streams"] = (base[0] - idle[0],
                                                                     base[1] - idle[1])
        rev = _revision(client)
        t0 = time.monotonic()
        fleet.start()
        out["first_start_s"] = fleet.wait_serving(rev, args.timeout)
        m0 = _metrics(etcd.endpoint)
        w = _watch_gauges(m0)
        out["etcd_watchers_added"], out["etcd_watch_streams_added"] = (w[0] - base[0],
                                                                         w[1] - base[1])
        # Steady writes.
        cpu0, pcpu0, wcpu0 = _cpu(etcd.pid), _cpu(proxy.pid if proxy else None), fleet.cpu()
        t0 = time.monotonic()
        puts, last = _paced_puts(client, args.rate, args.seconds)
        fleet.wait_serving(last, args.timeout)
        wall = time.monotonic() - t0
        m1 = _metrics(etcd.endpoint)
        etcd_cpu = _cpu(etcd.pid) - cpu0
        out.update(puts=puts, wall_s=wall, puts_per_s=puts / wall,
                   etcd_cpu_per_s=etcd_cpu / wall, etcd_cpu_us_per_put=etcd_cpu / puts * 1e6,
                   etcd_sent_bytes_per_s=(_sent_bytes(m1) - _sent_bytes(m0)) / wall,
                   proxy_cpu_per_s=(_cpu(proxy.pid if proxy else None) - pcpu0) / wall,
                   writers_cpu_per_s=(fleet.cpu() - wcpu0) / wall)
        # Restart storm: every cache gone, every writer started at once: N full lists.
        fleet.kill()
        for name in fleet.names:
            remove_cache(name, force=True)
        target = _revision(client)
        peak = PeakCPU([p for p in (etcd.pid, proxy.pid if proxy else None) if p])
        cpu0, m0 = _cpu(etcd.pid), _metrics(etcd.endpoint)
        fleet.start()
        out["storm_serving_s"] = fleet.wait_serving(target, args.timeout)
        out["storm_etcd_peak_cpu_pct"] = peak.stop()
        out["storm_etcd_cpu_s"] = _cpu(etcd.pid) - cpu0
        out["storm_etcd_sent_bytes"] = _sent_bytes(_metrics(etcd.endpoint)) - _sent_bytes(m0)
    finally:
        fleet.close()
        if proxy is not None:
            proxy.close()
        client.close()
    return out


def leader_of(cluster: EtcdCluster) -> EtcdServer:
    from shmcache.etcdapi import Stub, rpc
    from shmcache.etcdapi.dial import open_channel

    for m in cluster.members:
        if not m.running:
            continue
        ch = open_channel(m.host, m.port)
        try:
            st = Stub(ch, "Maintenance").Status(rpc.StatusRequest(), timeout=10)
            if st.leader == st.header.member_id:
                return m
        except Exception:
            continue
        finally:
            ch.close()
    raise RuntimeError("no leader found")


def failover(n: int, mode: str, args: argparse.Namespace, tag: str) -> dict[str, Any]:
    """One round of (3): kill the leader of a 3-member cluster under ``n`` writers."""
    out: dict[str, Any] = {"n": n, "mode": mode}
    with EtcdCluster(3, extra_args=C.etcd_args(1)) as cluster:
        client = cluster.client()
        C.load_etcd(client, PREFIX, args.keys)
        client.close()
        proxy = GrpcProxy(cluster.endpoints).start() if mode == "proxy" else None
        fleet = Fleet(n, [proxy.endpoint] if proxy else cluster.endpoints, tag)
        try:
            fleet.start()
            c = cluster.client()
            fleet.wait_serving(_revision(c), args.timeout)
            c.close()
            leader = leader_of(cluster)
            others = [m for m in cluster.members if m is not leader]
            peak = PeakCPU([m.pid for m in others if m.pid])
            cpu0 = sum(_cpu(m.pid) for m in others)
            t0 = time.monotonic()
            leader.kill()
            client = others[0].client()
            try:
                from etcd3.etcdrpc import rpc_pb2

                deadline = time.monotonic() + args.timeout
                while True:  # a put once a new leader is elected
                    try:
                        rev = int(client.kvstub.Put(rpc_pb2.PutRequest(
                            key=PREFIX + b"after-failover", value=b"x"), 1,
                            metadata=client.metadata).header.revision)
                        break
                    except Exception:
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.05)
            finally:
                client.close()
            out["put_after_kill_s"] = time.monotonic() - t0
            fleet.wait_serving(rev, args.timeout)
            out["all_serving_s"] = time.monotonic() - t0
            out["members_peak_cpu_pct"] = peak.stop()
            out["members_cpu_s"] = sum(_cpu(m.pid) for m in others) - cpu0
        finally:
            fleet.close()
            if proxy is not None:
                proxy.close()
    return out


def _ranges_served(m: dict[str, float]) -> float:
    return sum(v for k, v in m.items() if k.startswith("grpc_server_handled_total")
               and 'grpc_method="Range"' in k)


def proof_cost(args: argparse.Namespace, tag: str) -> dict[str, Any]:
    """(4) The fallback's cost: one range proof (writer/range_proof.py) through a proxy at
    --keys keys, and --idle-writers idle writers behind a proxy (or direct) while etcd
    moves on outside the prefix: etcd's CPU and Range requests per second."""
    from etcd3.etcdrpc import rpc_pb2

    from shmcache.format import layout
    from shmcache.writer import range_proof
    from shmcache.writer.etcd import connection as _etcd

    out: dict[str, Any] = {"keys": args.keys}
    end = layout.prefix_range_end(PREFIX)
    with EtcdServer(extra_args=C.etcd_args(1)) as etcd, \
            GrpcProxy([etcd.endpoint]) as proxy:
        client = etcd.client()
        C.load_etcd(client, PREFIX, args.keys)
        conn = _etcd.Connection(_etcd.EtcdSettings(endpoints=[proxy.endpoint]))
        conn.connect()
        walls, cpus = [], []
        for _ in range(20):
            client.kvstub.Put(rpc_pb2.PutRequest(key=b"/outside", value=b"x"), 10,
                              metadata=client.metadata)
            since = _revision(client) - 1
            c0, t0 = _cpu(etcd.pid), time.perf_counter()
            assert range_proof.prove(conn, PREFIX, end, since, args.keys) == since + 1
            walls.append(time.perf_counter() - t0)
            cpus.append(_cpu(etcd.pid) - c0)
        conn.close()
        out["proof_wall_ms"] = statistics.median(walls) * 1e3
        out["proof_etcd_cpu_ms"] = sum(cpus) / len(cpus) * 1e3  # (10 ms clock ticks: a mean)
        for mode in ("direct", "proxy"):
            fleet = Fleet(args.idle_writers, [proxy.endpoint if mode == "proxy"
                                              else etcd.endpoint], f"{tag}i")
            try:
                fleet.start()
                fleet.wait_serving(_revision(client), args.timeout)
                time.sleep(8)  # (past the first unanswered request and idle proofs)
                m0, c0, t0 = _metrics(etcd.endpoint), _cpu(etcd.pid), time.monotonic()
                n = 0
                while time.monotonic() - t0 < args.seconds:
                    client.kvstub.Put(rpc_pb2.PutRequest(key=b"/outside", value=b"%d" % n), 10,
                                      metadata=client.metadata)
                    n += 1
                    time.sleep(0.02)
                wall = time.monotonic() - t0
                m1 = _metrics(etcd.endpoint)
                out[f"idle_{mode}_etcd_cpu_per_s"] = (_cpu(etcd.pid) - c0) / wall
                out[f"idle_{mode}_ranges_per_s"] = (_ranges_served(m1) - _ranges_served(m0)) / wall
                out[f"idle_{mode}_outside_puts_per_s"] = n / wall
                rev = _revision(client)
                t0 = time.monotonic()
                fleet.wait_serving(rev, args.timeout)
                out[f"idle_{mode}_catch_up_s"] = time.monotonic() - t0
            finally:
                fleet.close()
        out["idle_writers"] = args.idle_writers
        client.close()
    return out


def _median(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"n": rows[0]["n"], "mode": rows[0]["mode"], "rounds": len(rows)}
    for k in rows[0]:
        if k not in ("n", "mode"):
            out[k] = statistics.median(r[k] for r in rows)
    return out


def report(results: dict[str, Any]) -> str:
    """The results as the markdown tables of docs/benchmarks.md."""
    out = []
    if results.get("steady"):
        out.append("| N | mode | etcd watchers / streams | puts/s | etcd CPU ms/s | etcd µs/put | etcd sent "
                   "KB/s | proxy CPU ms/s | writers CPU ms/s | storm: all serving s | storm: "
                   "etcd peak CPU % | storm: etcd CPU s | storm: etcd sent MB |")
        out.append("|" + "---|" * 13)
        for r in results["steady"]:
            watchers = (f"{r['etcd_watchers_added'] + r.get('proxy_own_watchers', 0):.0f} / "
                        f"{r['etcd_watch_streams_added'] + r.get('proxy_own_watch_streams', 0):.0f}")
            out.append(
                f"| {r['n']} | {r['mode']} | {watchers} | {r['puts_per_s']:.0f} | "
                f"{r['etcd_cpu_per_s'] * 1e3:.0f} | "
                f"{r['etcd_cpu_us_per_put']:.0f} | {r['etcd_sent_bytes_per_s'] / 1e3:.0f} | "
                f"{r['proxy_cpu_per_s'] * 1e3:.0f} | {r['writers_cpu_per_s'] * 1e3:.0f} | "
                f"{r['storm_serving_s']:.1f} | {r['storm_etcd_peak_cpu_pct']:.0f} | "
                f"{r['storm_etcd_cpu_s']:.2f} | {r['storm_etcd_sent_bytes'] / 1e6:.1f} |")
    if results.get("failover"):
        out.append("")
        out.append("| N | mode | first put after the kill s | every cache has it s | "
                   "members' peak CPU % | members' CPU s |")
        out.append("|" + "---|" * 6)
        for r in results["failover"]:
            out.append(f"| {r['n']} | {r['mode']} | {r['put_after_kill_s']:.2f} | "
                       f"{r['all_serving_s']:.2f} | {r['members_peak_cpu_pct']:.0f} | "
                       f"{r['members_cpu_s']:.2f} |")
    if results.get("proof"):
        out.append("")
        out.append("```\n" + json.dumps(results["proof"], indent=1) + "\n```")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1,10,50", help="writer counts N, comma-separated")
    ap.add_argument("--rounds", type=int, default=2, help="rounds per mode (interleaved)")
    ap.add_argument("--keys", type=int, default=5000, help="keys under the prefix")
    ap.add_argument("--rate", type=float, default=100.0, help="steady puts per second")
    ap.add_argument("--seconds", type=float, default=10.0, help="steady window")
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--failover-sizes", default=None,
                    help="writer counts for the failover rounds (default: --sizes)")
    ap.add_argument("--idle-writers", type=int, default=10,
                    help="idle writers for the fallback's cost (part 4)")
    ap.add_argument("--only", default="steady,failover,proof",
                    help="parts to run: steady (1, 2), failover (3), proof (4)")
    ap.add_argument("--smoke", action="store_true", help="toy sizes, every code path")
    ap.add_argument("--out", default=RESULTS, help="directory for fleet.json")
    ap.add_argument("--report", metavar="JSON", help="print a results file's tables and exit")
    args = ap.parse_args()
    if args.report:
        with open(args.report) as f:
            print(report(json.load(f)))
        return
    # SIGTERM (a timeout) unwinds like Ctrl-C: every writer, proxy and etcd is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    if args.smoke:
        args.sizes, args.rounds, args.keys, args.rate, args.seconds = "1,2", 1, 100, 20.0, 2.0
        args.idle_writers = 2
    sizes = [int(x) for x in args.sizes.split(",")]
    fsizes = [int(x) for x in (args.failover_sizes or args.sizes).split(",")]
    tag = secrets.token_hex(3)
    only = set(args.only.split(","))
    results: dict[str, Any] = {"stamp": C.stamp(), "params": vars(args), "steady": [],
                               "failover": []}
    if "proof" in only:
        results["proof"] = proof_cost(args, tag)
        print(json.dumps(results["proof"]), flush=True)
    with EtcdServer(extra_args=C.etcd_args(2)) as etcd:
        results["stamp"]["versions"]["etcd"] = etcd.version
        c = etcd.client()
        C.load_etcd(c, PREFIX, args.keys)
        c.close()
        for n in sizes if "steady" in only else []:
            rows: dict[str, list[dict[str, Any]]] = {"direct": [], "proxy": []}
            order = ["direct", "proxy", "proxy", "direct"] * args.rounds
            for mode in order[:2 * args.rounds]:
                row = steady_and_storm(etcd, n, mode, args, tag)
                print(json.dumps(row), flush=True)
                rows[mode].append(row)
            results["steady"] += [_median(rows["direct"]), _median(rows["proxy"])]
    for n in fsizes if "failover" in only else []:
        rows = {"direct": [], "proxy": []}
        for mode in (["direct", "proxy", "proxy", "direct"] * args.rounds)[:2 * args.rounds]:
            row = failover(n, mode, args, tag)
            print(json.dumps(row), flush=True)
            rows[mode].append(row)
        results["failover"] += [_median(rows["direct"]), _median(rows["proxy"])]
    os.makedirs(args.out, exist_ok=True)
    name = ("fleet-smoke" if args.smoke else "fleet" if only == {"steady", "failover", "proof"}
            else f"fleet-proof-{args.keys}" if only == {"proof"}
            else "fleet-" + "-".join(sorted(only)))
    final = os.path.join(args.out, name + ".json")
    fd, tmp = tempfile.mkstemp(dir=args.out, prefix=".fleet-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(results, f, indent=1)
    os.replace(tmp, final)  # (only a completed run gets here)
    print(f"wrote {final}")


if __name__ == "__main__":
    main()
