"""Shared pieces of the benchmark harness: data, percentiles, version stamp, etcd/Redis helpers."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

VALUE_SIZE = 256
LIST_PREFIX_KEYS = 100  # keys under one "prefix of 100 keys"


# -- data: every backend holds exactly these keys and values ------------------------------

def cache_prefix(n: int) -> bytes:
    """Each data set size gets its own etcd prefix (and its own cache)."""
    return b"/bench/n%d/" % n


def key(prefix: bytes, i: int) -> bytes:
    return prefix + b"k/%07d" % i


def value(i: int) -> bytes:
    return (b"%010d|" % i).ljust(VALUE_SIZE, b"v")


def group_prefix(prefix: bytes, j: int) -> bytes:
    """The prefix of exactly 100 keys: ``key/%05d`` covers ``key/%05d00`` .. ``key/%05d99``."""
    return prefix + b"k/%05d" % j


def stamped_value(seq: int = 0) -> bytes:
    """A 256-byte value carrying CLOCK_MONOTONIC ns (system-wide) for propagation timing."""
    return (b"%020d|%010d|" % (time.monotonic_ns(), seq)).ljust(VALUE_SIZE, b"s")


def stamp_of(v: bytes) -> int:
    return int(v[:20])


# -- statistics: percentiles only, never means --------------------------------------------

def pct(xs: list[float], p: float) -> float:
    """Nearest-rank percentile of an unsorted list."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, int(round(p / 100 * len(s) + 0.5)) - 1))]


def summary(xs: list[float]) -> dict[str, float]:
    if not xs:
        return {"n": 0}
    s = sorted(xs)
    n = len(s)

    def at(p: float) -> float:
        return s[min(n - 1, max(0, int(round(p / 100 * n + 0.5)) - 1))]

    return {"n": n, "p50": at(50), "p90": at(90), "p99": at(99), "max": s[-1]}


# -- version stamp --------------------------------------------------------------------------

def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git() -> dict[str, Any]:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "shmcache"], cwd=ROOT,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        import hashlib

        h = hashlib.sha256()
        pkg = os.path.join(ROOT, "shmcache")
        for name in sorted(os.listdir(pkg)):
            if name.endswith(".py"):
                with open(os.path.join(pkg, name), "rb") as f:
                    h.update(name.encode() + b"\0" + f.read())
        # The work tree may hold uncommitted changes to the library: the digest of
        # its sources says exactly which code was measured.
        return {"commit": head or None, "shmcache_dirty": bool(dirty),
                "shmcache_sources_sha256": h.hexdigest()[:16]}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None}


def stamp(**extra: Any) -> dict[str, Any]:
    import psutil

    import shmcache

    return {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpu": _cpu_model(), "cores": os.cpu_count(),
                    "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
                    "platform": platform.platform()},
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "versions": {
            "shmcache": shmcache.__version__, **_git(),
            "etcd3 (python-etcd3)": _version("etcd3"), "grpcio": _version("grpcio"),
            "protobuf": _version("protobuf"), **protobuf_implementations(),
            "msgpack": _version("msgpack"),
            "redis-py": _version("redis"), "lmdb (py-lmdb)": _version("lmdb"),
            "sortedcontainers": _version("sortedcontainers"), "psutil": _version("psutil"),
        },
        **extra,
    }


def protobuf_implementations() -> dict[str, str]:
    """Which protobuf implementation decoded etcd's messages: this process's (shmcache's
    writer and the harness's etcdapi clients run the same), and that of the processes
    that measure python-etcd3, whose generated modules need the pure-Python one under
    protobuf>=4 (``python_etcd3``)."""
    from google.protobuf.internal import api_implementation

    major = int((_version("protobuf") or "0").split(".")[0])
    return {"protobuf implementation": api_implementation.Type(),
            "protobuf implementation (python-etcd3's processes)":
                "python (forced: PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python)" if major >= 4
                else api_implementation.Type()}


def python_etcd3() -> Any:
    """The ``etcd3`` module, for a process that measures python-etcd3 (an alternative a
    user would pick): under protobuf>=4 it switches *this* process to the pure-Python
    protobuf before anything imports protobuf (tests/python_etcd3.py). Call it first
    thing in such a child, never in the parent (its children, the writer among them,
    would inherit the setting)."""
    from tests.python_etcd3 import import_python_etcd3

    return import_python_etcd3()


# -- etcd ------------------------------------------------------------------------------------

def etcd_client(host: str, port: int) -> Any:
    """The harness's own etcd client (``tests.etcdserver.ApiClient``: shmcache.etcdapi,
    under whichever protobuf implementation is installed)."""
    from tests.etcdserver import ApiClient

    return ApiClient(host, port)


def etcd_args(quota_gib: int = 8) -> list[str]:
    # 1.1M keys of 256 bytes plus their history exceed etcd's 2 GiB default quota on
    # some runs; fsync is off because the benchmark measures the cache, not the disk.
    return ["--quota-backend-bytes", str(quota_gib << 30), "--unsafe-no-fsync",
            "--metrics", "basic"]


def grpc_options() -> list[tuple[str, int]]:
    return [("grpc.max_receive_message_length", 1 << 30),
            ("grpc.max_send_message_length", 1 << 30)]


def load_etcd(client: Any, prefix: bytes, n: int, progress: Any = None) -> int:
    """Put n keys in Txn requests of 100 puts (etcd allows 128), pipelined; returns the
    revision. ``client``: an ``ApiClient``."""
    from shmcache.etcdapi import rpc

    stub, md = client.kv, client.metadata
    inflight: list[Any] = []
    rev = 0
    for start in range(0, n, 100):
        ops = [rpc.RequestOp(request_put=rpc.PutRequest(key=key(prefix, i), value=value(i)))
               for i in range(start, min(n, start + 100))]
        inflight.append(stub.Txn.future(rpc.TxnRequest(success=ops), 60, metadata=md))
        if len(inflight) >= 8:
            rev = max(rev, inflight.pop(0).result().header.revision)
            if progress is not None:
                progress(100)
    for f in inflight:
        rev = max(rev, f.result().header.revision)
        if progress is not None:
            progress(100)
    return int(rev)


def range_all(client: Any, start: bytes, end: bytes, page: int = 5000,
              serializable: bool = True) -> tuple[int, list[Any]]:
    """[start, end) from etcd in key-sorted pages at one revision: what a replica must do.
    ``client``: an ``ApiClient``, or a python-etcd3 client where python-etcd3 is the
    alternative measured (then its own stub and messages do the work)."""
    if hasattr(client, "kvstub"):  # python-etcd3's (already imported by its caller)
        from etcd3 import etcdrpc as rpc

        stub = client.kvstub
    else:
        from shmcache.etcdapi import rpc

        stub = client.kv
    out: list[Any] = []
    rev = 0
    while True:
        req = rpc.RangeRequest(key=start, range_end=end, limit=page, revision=rev,
                               serializable=serializable, sort_order=rpc.RangeRequest.ASCEND,
                               sort_target=rpc.RangeRequest.KEY)
        resp = stub.Range(req, 120, metadata=client.metadata)
        if rev == 0:
            rev = int(resp.header.revision)
        out.extend(resp.kvs)
        if not resp.more or not resp.kvs:
            return rev, out
        start = resp.kvs[-1].key + b"\0"


_METRIC_RE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([0-9.eE+-]+|NaN)$')
_WANTED = ("etcd_debugging_mvcc_watcher_total", "etcd_debugging_mvcc_watch_stream_total",
           "grpc_server_handled_total", "grpc_server_started_total",
           "grpc_server_msg_received_total", "grpc_server_msg_sent_total",
           "etcd_debugging_mvcc_range_total", "etcd_network_client_grpc_sent_bytes_total",
           "process_cpu_seconds_total")


def etcd_metrics(endpoint: str) -> dict[str, float]:
    """etcd's /metrics (served on the client URL), reduced to the series the bench reports."""
    with urllib.request.urlopen(endpoint + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        m = _METRIC_RE.match(line)
        if not m or m.group(1) not in _WANTED:
            continue
        name, labels, val = m.group(1), m.group(2) or "", m.group(3)
        if name.startswith("grpc_server"):
            meth = re.search(r'grpc_method="([^"]+)"', labels)
            if not meth:
                continue
            name = f"{name}[{meth.group(1)}]"
        out[name] = out.get(name, 0.0) + float(val)
    return out


def metrics_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after
            if after.get(k, 0.0) != before.get(k, 0.0)}


# -- redis -----------------------------------------------------------------------------------

class RedisServer:
    """Debian's redis-server on a free loopback port, no persistence, stopped by close()."""

    def __init__(self) -> None:
        self.binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not os.path.exists(self.binary):
            raise RuntimeError("redis-server not found: apt-get install -y redis-server")
        self.dir = tempfile.mkdtemp(prefix="shmcache-bench-redis-")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = subprocess.Popen(
            [self.binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
             "--appendonly", "no", "--dir", self.dir, "--daemonize", "no",
             "--protected-mode", "yes", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)
        self.version = subprocess.run([self.binary, "--version"], capture_output=True,
                                      text=True).stdout.split()[2].removeprefix("v=")

    def client(self) -> Any:
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port)

    def load(self, prefix: bytes, n: int) -> None:
        """Keys as strings plus a lexicographic index (sorted set) for prefix listing."""
        r = self.client()
        r.flushall()
        idx = b"idx:" + prefix
        for start in range(0, n, 5000):
            stop = min(n, start + 5000)
            p = r.pipeline(transaction=False)
            p.mset({key(prefix, i): value(i) for i in range(start, stop)})
            p.zadd(idx, {key(prefix, i): 0 for i in range(start, stop)})
            p.execute()
        r.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


# -- LMDB ------------------------------------------------------------------------------------

def load_lmdb(path: str, prefix: bytes, n: int) -> None:
    import lmdb

    env = lmdb.open(path, map_size=max(1 << 28, n * 1024), subdir=True, sync=False,
                    max_readers=256, lock=True)
    for start in range(0, n, 50_000):
        with env.begin(write=True) as txn:
            txn.cursor().putmulti([(key(prefix, i), value(i))
                                   for i in range(start, min(n, start + 50_000))],
                                  append=True)
    env.sync(True)
    env.close()


# -- write load -------------------------------------------------------------------------------

def write_load(host: str, port: int, prefix: bytes, n_keys: int, rate: float,
               stop: Any, out: Any, max_events: int | None = None, seed: int = 7) -> None:
    """Process: single-key puts of stamped 256-byte values to existing keys at ``rate``/s.

    Puts are pipelined (gRPC futures, at most 64 in flight) so that one round trip
    does not cap the rate; each put is its own etcd revision (one event).
    """
    import random

    from shmcache.etcdapi import rpc

    try:
        os.nice(-10)  # see run.py: the load stands for writers on other machines
    except OSError:
        pass
    client = etcd_client(host, port)
    stub, md = client.kv, client.metadata
    rnd = random.Random(seed)
    inflight: list[Any] = []
    t0 = time.monotonic()
    sent = 0
    last_rev = 0
    first_rev = 0
    while not stop.is_set() and (max_events is None or sent < max_events):
        if rate > 0:
            due = t0 + sent / rate
            now = time.monotonic()
            if due > now:
                time.sleep(min(due - now, 0.05))
                continue
        req = rpc.PutRequest(key=key(prefix, rnd.randrange(n_keys)), value=stamped_value(sent))
        inflight.append(stub.Put.future(req, 30, metadata=md))
        sent += 1
        while len(inflight) >= 64 or (inflight and inflight[0].done()):
            rev = inflight.pop(0).result().header.revision
            first_rev = first_rev or rev
            last_rev = max(last_rev, rev)
    for f in inflight:
        rev = f.result().header.revision
        first_rev = first_rev or rev
        last_rev = max(last_rev, rev)
    dt = time.monotonic() - t0
    client.close()
    out.put({"events": sent, "seconds": dt, "rate": sent / dt if dt else 0.0,
             "first_revision": first_rev, "last_revision": last_rev})


class LoadThread:
    """Helper for the parent: a write_load process with start/stop."""

    def __init__(self, ctx: Any, host: str, port: int, prefix: bytes, n_keys: int, rate: float,
                 max_events: int | None = None) -> None:
        self.stop_ev = ctx.Event()
        self.q = ctx.Queue()
        self.proc = ctx.Process(target=write_load, args=(host, port, prefix, n_keys, rate,
                                                         self.stop_ev, self.q, max_events),
                                daemon=True)
        self.proc.start()

    def stop(self, timeout: float = 60) -> dict[str, Any]:
        self.stop_ev.set()
        res: dict[str, Any] = self.q.get(timeout=timeout)
        self.proc.join(10)
        return res

    def wait(self, timeout: float = 600) -> dict[str, Any]:
        res: dict[str, Any] = self.q.get(timeout=timeout)
        self.proc.join(10)
        return res


def sleep_until(t: float) -> None:
    while True:
        d = t - time.monotonic()
        if d <= 0:
            return
        time.sleep(min(d, 0.05))



def write_json(path: str, obj: Any, indent: int = 2) -> None:
    """Write obj to path via a temporary file and a rename: a failed or interrupted run
    never leaves a half-written results file, nor replaces committed results."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=indent, default=str)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def cpu_sample() -> tuple[float, float, float]:
    """(wall, CPU seconds of the whole machine, CPU seconds of this process tree): two
    samples give the cores used by processes outside the benchmark (a shared machine)."""
    import psutil

    t = psutil.cpu_times()
    busy = t.user + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0) + \
        getattr(t, "nice", 0)
    me = psutil.Process()
    ct = me.cpu_times()
    ours = ct.user + ct.system + ct.children_user + ct.children_system
    for c in me.children(recursive=True):
        try:
            cc = c.cpu_times()
            ours += cc.user + cc.system
        except psutil.Error:
            pass
    return time.monotonic(), busy, ours


__all__ = [name for name in dir() if not name.startswith("_") and name not in
           ("annotations", "Any", "importlib", "json", "os", "platform", "re", "shutil", "signal",
            "socket", "subprocess", "sys", "tempfile", "time", "urllib")]
