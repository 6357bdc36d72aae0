"""Range through ``shmcache proxy`` beside etcd itself and ``etcd grpc-proxy``, same run.

    python bench/proxy_range.py [--keys 10000] [--clients 4] [--seconds 3] [--rounds 3]
                                [--proxies 1,2] [--out bench/results/proxy_range.json] [--smoke]

Starts a throwaway etcd on loopback, loads ``--keys`` keys of 256 bytes, starts a
writer for them, ``shmcache proxy`` (one process, and with ``--proxies 2`` two on
one port through SO_REUSEPORT) and ``etcd grpc-proxy start`` (etcd's own proxy,
which caches serializable ranges). Then, in interleaved rounds (every target
and case once per round, so a neighbour's load on this shared machine hits all
alike), ``--clients`` load-generator processes call KV.Range in a closed loop
for ``--seconds`` each: a single random key, and a prefix of 100 keys;
serializable and linearizable. The clients send pre-serialized requests and
do not parse responses (raw bytes), so their cost is the same for every target.

Per target and case it reports the medians over rounds of: requests/s, p50 and
p99 latency, server CPU per request and cores used (the processes that serve:
etcd alone; grpc-proxy + etcd; proxy(s) + writer + etcd), and the clients' CPU
per request. Writes nothing to etcd while measuring.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench._common import pct, stamp, write_json  # noqa: E402
from shmcache.cli.demo_etcd import free_port  # noqa: E402
from tests.etcdserver import EtcdServer  # noqa: E402
from tests.helpers import WriterProcess  # noqa: E402
from tests.proxyproc import ProxyProcess  # noqa: E402

NAME = "bench-proxyrange"
PREFIX = b"/bench/proxy/"
VALUE = b"v" * 256
CASES = [("1 key", 1, True), ("1 key", 1, False), ("100 keys", 100, True),
         ("100 keys", 100, False)]


def _key(i: int) -> bytes:
    return PREFIX + b"k/%07d" % i


def _requests(n_keys: int, width: int, serializable: bool, seed: int) -> list[bytes]:
    from shmcache.etcdapi import rpc

    rnd = random.Random(seed)
    out = []
    for _ in range(1000):
        if width == 1:
            req = rpc.RangeRequest(key=_key(rnd.randrange(n_keys)), serializable=serializable)
        else:
            j = rnd.randrange(n_keys // 100)
            start = PREFIX + b"k/%05d" % j
            req = rpc.RangeRequest(key=start, range_end=start[:-1] + bytes([start[-1] + 1]),
                                   serializable=serializable)
        out.append(req.SerializeToString())
    return out


def _client(target: str, requests: list[bytes], seconds: float, ready: Any, go: Any,
            queue: Any) -> None:
    """One closed-loop client: Range calls as bytes for ``seconds`` after ``go``."""
    import grpc

    ch = grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", 2**30)])
    call = ch.unary_unary("/etcdserverpb.KV/Range")
    call(requests[0], timeout=30)  # connected before the clock starts
    ready.put(1)
    go.wait()
    lat: list[float] = []
    cpu0 = time.process_time()
    end = time.monotonic() + seconds
    i = errors = 0
    n = len(requests)
    while time.monotonic() < end:
        t0 = time.perf_counter()
        try:
            call(requests[i % n], timeout=30)
        except grpc.RpcError:
            errors += 1
        lat.append(time.perf_counter() - t0)
        i += 1
    queue.put((lat, time.process_time() - cpu0, errors))
    ch.close()


def _cpu(pids: list[int]) -> float:
    import psutil

    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def _measure(target: str, pids: list[int], requests: list[list[bytes]], seconds: float) -> dict[
        str, Any]:
    ctx = multiprocessing.get_context("spawn")
    q, ready, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_client, args=(target, reqs, seconds, ready, go, q))
             for reqs in requests]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=120)
    cpu0 = _cpu(pids)
    go.set()
    results = [q.get(timeout=seconds + 120) for _ in procs]
    cpu1 = _cpu(pids)
    for p in procs:
        p.join(30)
    lat = [x for r in results for x in r[0]]
    ops = len(lat)
    return {"ops_per_s": ops / seconds, "p50_ms": pct(lat, 50) * 1e3,
            "p99_ms": pct(lat, 99) * 1e3, "server_cpu_us_per_op": (cpu1 - cpu0) / ops * 1e6,
            "server_cores": (cpu1 - cpu0) / seconds,
            "client_cpu_us_per_op": sum(r[1] for r in results) / ops * 1e6,
            "errors": sum(r[2] for r in results)}


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2


def _load(etcd: EtcdServer, n: int) -> None:
    from shmcache.etcdapi import Stub, dial, rpc

    kv = Stub(dial.open_channel(etcd.host, etcd.port), "KV")
    for lo in range(0, n, 100):
        ops = [rpc.RequestOp(request_put=rpc.PutRequest(key=_key(i), value=VALUE))
               for i in range(lo, min(n, lo + 100))]
        kv.Txn(rpc.TxnRequest(success=ops), timeout=30)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keys", type=int, default=10_000)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--proxies", default="1,2", help="shmcache proxy process counts")
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true", help="toy sizes: every code path once")
    args = ap.parse_args()
    if args.smoke:
        args.keys, args.clients, args.seconds, args.rounds, args.proxies = 200, 2, 0.5, 1, "1"
    proxies = [int(x) for x in args.proxies.split(",")]
    tmp = tempfile.mkdtemp(prefix="bench-proxyrange-")
    started: list[Any] = []
    etcd = EtcdServer(data_dir=os.path.join(tmp, "etcd"))
    try:
        etcd.start()
        _load(etcd, args.keys)
        w = WriterProcess(NAME, etcd.endpoint, PREFIX, ring_size="64MiB")
        started.append(w)
        w.start()
        gp_port = free_port()
        gp = subprocess.Popen([etcd.binary, "grpc-proxy", "start", f"--endpoints={etcd.host}:"
                               f"{etcd.port}", f"--listen-addr=127.0.0.1:{gp_port}",
                               f"--data-dir={os.path.join(tmp, 'grpc-proxy')}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started.append(gp)
        targets: dict[str, tuple[str, list[int]]] = {
            "etcd": (f"127.0.0.1:{etcd.port}", [etcd.pid or 0]),
            "etcd grpc-proxy": (f"127.0.0.1:{gp_port}", [gp.pid, etcd.pid or 0]),
        }
        for n in proxies:  # each count on a port of its own, all serving one cache
            port = free_port()
            group = [ProxyProcess(NAME, etcd.endpoint, port=port) for _ in range(n)]
            for p in group:
                started.append(p)
                p.start()
            label = "shmcache proxy" + (f" x{n}" if n > 1 else "")
            pids = [p.proc.pid for p in group if p.proc is not None]
            targets[label] = (f"127.0.0.1:{port}", [*pids, w.pid, etcd.pid or 0])
        raw: dict[str, dict[str, list[dict[str, Any]]]] = {}
        for rnd in range(args.rounds):
            for label, (target, pids) in targets.items():
                for case, width, ser in CASES:
                    name = f"{case}, {'serializable' if ser else 'linearizable'}"
                    reqs = [_requests(args.keys, width, ser, seed=rnd * 100 + c)
                            for c in range(args.clients)]
                    res = _measure(target, pids, reqs, args.seconds)
                    raw.setdefault(label, {}).setdefault(name, []).append(res)
                    print(f"round {rnd + 1} {label:18} {name:26} {res['ops_per_s']:8.0f}/s "
                          f"p99 {res['p99_ms']:6.2f} ms  server {res['server_cpu_us_per_op']:6.0f}"
                          f" us/op ({res['server_cores']:.2f} cores)", flush=True)
        table = {label: {case: {k: _median([r[k] for r in rs]) for k in rs[0]}
                         for case, rs in cases.items()} for label, cases in raw.items()}
        doc = stamp(benchmark="proxy_range", keys=args.keys, clients=args.clients,
                    seconds=args.seconds, rounds=args.rounds, etcd=etcd.version,
                    medians=table, rounds_raw=raw)
        print("\nmedians over rounds:")
        for label, cases in table.items():
            for case, m in cases.items():
                print(f"{label:18} {case:26} {m['ops_per_s']:8.0f}/s p50 {m['p50_ms']:6.2f} ms "
                      f"p99 {m['p99_ms']:6.2f} ms server {m['server_cpu_us_per_op']:6.0f} us/op "
                      f"{m['server_cores']:.2f} cores client {m['client_cpu_us_per_op']:5.0f}"
                      f" us/op")
        if args.out:
            write_json(args.out, doc)
        return 0
    finally:
        for s in reversed(started):
            if isinstance(s, subprocess.Popen):
                s.terminate()
                s.wait(10)
            else:
                s.close()
        etcd.close()


if __name__ == "__main__":
    sys.exit(main())
