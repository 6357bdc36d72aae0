"""Cost of a flood of consistent-read requests on etcd and on the writer, same run.

    python bench/sync_flood.py [--seconds 3] [--flooders 1,8] [--as-uid 65534]

Starts a throwaway etcd and a writer (mode 600: only root reads), then runs, for
--seconds each: nothing (idle), and N flooder processes sending request datagrams
as fast as they can to every address a writer may listen at (the abstract socket
and the socket file), as root (may read the segments) and, when run as root with
setpriv, as --as-uid (may not). Meanwhile this process calls ``Reader.sync()``
ten times a second (so that it drives few rounds itself). Reports etcd's Range
requests per second (from its /metrics), the writer's CPU (cores, from /proc),
consistent-read rounds per second (SYNC_STARTED), what the flooders' sends
returned, and the legitimate caller's sync() latency (median, p99, max).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import shmcache  # noqa: E402
from shmcache.format import control, layout
from shmcache.ipc import shm as _shm  # noqa: E402
from tests.etcdserver import EtcdServer  # noqa: E402
from tests.helpers import WriterProcess  # noqa: E402

NAME = "bench-syncflood"
PREFIX = b"/bench/syncflood/"

# A flooder: what an attacker runs. Counts what each send returned; prints JSON.
FLOODER = r"""
import errno, json, socket, sys, time
name, seconds = sys.argv[1], float(sys.argv[2])
addrs = [b"\0shmcache." + name.encode() + b".sync", "/dev/shm/shmcache." + name + ".sync"]
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.setblocking(False)
counts = {}
end = time.monotonic() + seconds
while time.monotonic() < end:
    for a in addrs:
        try:
            s.sendto(b"s", a)
            k = "sent"
        except BlockingIOError:
            k = "queue full"
        except OSError as exc:
            k = errno.errorcode.get(exc.errno, str(exc.errno))
        counts[k] = counts.get(k, 0) + 1
print(json.dumps(counts))
"""


def etcd_ranges(etcd: EtcdServer) -> int:
    """Range requests etcd has answered (gRPC server metric, every code)."""
    with urllib.request.urlopen(etcd.endpoint + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return sum(int(float(m.group(1))) for m in re.finditer(
        r'^grpc_server_handled_total\{[^}]*grpc_method="Range"[^}]*\} (\S+)$', text, re.M))


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rounds_started() -> int:
    seg = _shm.open_readonly(layout.control_name(NAME))
    assert seg is not None
    try:
        while (b := control.read_block(seg.buf)) is None:
            time.sleep(0.001)
        return b.sync_started
    finally:
        seg.close()


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(p / 100 * len(xs)) - 1))] if xs else float("nan")


def scenario(etcd: EtcdServer, writer_pid: int, seconds: float, flooders: int,
             uid: int | None) -> dict[str, object]:
    argv = [sys.executable, "-c", FLOODER, NAME, str(seconds)]
    if uid is not None:
        argv = ["setpriv", "--reuid", str(uid), "--regid", str(uid), "--clear-groups", *argv]
    r0, c0, s0, t0 = etcd_ranges(etcd), cpu_seconds(writer_pid), rounds_started(), time.monotonic()
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, cwd="/")
             for _ in range(flooders)]
    latencies = []
    with shmcache.Reader(NAME) as r:
        end = t0 + seconds
        while (a := time.monotonic()) < end:
            r.sync(timeout=10)
            latencies.append(time.monotonic() - a)
            time.sleep(max(0.0, a + 0.1 - time.monotonic()))
    sends: dict[str, int] = {}
    for p in procs:
        out, _ = p.communicate(timeout=60)
        for k, v in json.loads(out).items():
            sends[k] = sends.get(k, 0) + v
    elapsed = time.monotonic() - t0
    r1, c1, s1 = etcd_ranges(etcd), cpu_seconds(writer_pid), rounds_started()
    return {"flooders": flooders, "as": "root" if uid is None else f"uid {uid}",
            "seconds": round(elapsed, 2),
            "etcd_range_per_s": round((r1 - r0) / elapsed, 1),
            "writer_cores": round((c1 - c0) / elapsed, 3),
            "rounds_per_s": round((s1 - s0) / elapsed, 1),
            "sends": sends,
            "legit_syncs": len(latencies),
            "legit_sync_ms": {"p50": round(pct(latencies, 50) * 1e3, 1),
                              "p99": round(pct(latencies, 99) * 1e3, 1),
                              "max": round(max(latencies) * 1e3, 1)}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--flooders", default="1,8")
    ap.add_argument("--as-uid", type=int, default=65534,
                    help="also flood as this uid (a user who may not read the segments)")
    args = ap.parse_args()
    other = args.as_uid if os.geteuid() == 0 and shutil.which("setpriv") else None
    results = []
    with EtcdServer(extra_args=["--unsafe-no-fsync"]) as etcd:
        w = WriterProcess(NAME, etcd.endpoint, PREFIX, extra=["--mode", "600"])
        try:
            w.start()
            results.append(scenario(etcd, w.pid, args.seconds, 0, None))
            for n in (int(x) for x in args.flooders.split(",")):
                results.append(scenario(etcd, w.pid, args.seconds, n, None))
                if other is not None:
                    results.append(scenario(etcd, w.pid, args.seconds, n, other))
        finally:
            w.close()
    print(json.dumps({"machine": platform.machine(), "cpus": os.cpu_count(),
                      "python": platform.python_version(), "shmcache": shmcache.__version__,
                      "loadavg": os.getloadavg()[0], "results": results}, indent=1))


if __name__ == "__main__":
    main()
