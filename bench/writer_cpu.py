"""Writer CPU per revision at saturation, beside a bare python-etcd3 watch and etcdctl watch.

    python bench/writer_cpu.py [--rounds 3] [--seconds 15] [--rate 0] [--load-procs 3]
                               [--tree LABEL=DIR ...] [--stream-tree DIR] [--backlog]
                               [--png] [--tag NAME]
    python bench/writer_cpu.py --profile [LABEL] [--tree LABEL=DIR] [--perf | --native]

A throwaway etcd (``--unsafe-no-fsync``) holds --keys keys of 256-byte values
under one prefix. A load of single-put revisions (updates of those keys, so
every event carries a prev_kv) comes from --load-procs processes, each with
up to 64 puts in flight over shmcache.etcdapi's gRPC stubs, as fast as etcd takes
them (--rate caps the total), or, with ``--load checkperf:l``, from
``etcdctl check perf --load l`` (new keys, no prev_kv) stopped before its
final delete.

Consumers of that key range, one at a time in interleaved rounds (the order
rotates every round), each with the same load:

* ``writer``: ``python -m shmcache serve`` of this checkout (64 MiB ring,
  metrics on a loopback port for the watch-response count), or instead one
  writer per ``--tree LABEL=DIR`` run from that tree (e.g. git worktrees of the
  commits before and after a change; build the C speedups there first,
  ``python setup.py build_ext --inplace``);
* ``python-etcd3 watch``: python-etcd3's own watch (``add_watch_prefix_callback``
  with ``prev_kv=True``), whose callback only stores the last revision; under
  protobuf>=4 its process runs the pure-Python protobuf (python-etcd3's generated
  modules load with nothing else: ``PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python``
  in that child's environment only; the results' stamp says so);
* ``etcdctl watch``: ``etcdctl watch --prefix --prev-kv -w json``, its output
  read by this process;
* with ``--stream-tree DIR``, ``shmcache watch stream alone``: the writer's watch
  stream (``_etcd``) from DIR, decoding every response and publishing nothing.

Per window: the consumer is started and a probe put shows that its watch is
live; its CPU time (utime + stime from /proc/PID/stat) is read, the load runs
--seconds, and the window ends when the consumer has reached the load's last
revision. CPU µs per revision = CPU time over the window / revisions received.
Lag (etcd's current revision minus the consumer's) is sampled every 0.5 s; the
writer's revision is the published one (``Reader.status().revision``). With
``--backlog`` the consumer is stopped (SIGSTOP) while the load runs and
continued after it; its rate is then the catch-up rate, the most it follows.
etcd's CPU per revision (load start to caught up), the load's, context switches
and revisions per watch response are recorded beside. Medians over the rounds.
The results file is written only when the run completes (temp file, then
``os.replace``). ``--profile`` runs the writer alone under the load and samples
it with py-spy (``--native`` adds C frames) or ``perf record`` (``--perf``: CPU
samples by library and symbol, kernel included), printing the shares.
"""

from __future__ import annotations

import argparse
import json
import mmap
import multiprocessing as mp
import os
import re
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C  # noqa: E402

PREFIX = b"/bench/wcpu/"
TICK = os.sysconf("SC_CLK_TCK")
HERE = os.path.dirname(os.path.abspath(__file__))


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads) from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    fields = data[data.rindex(b")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def ctx_switches(pid: int) -> int:
    """Context switches (voluntary and not) summed over the threads a process has now."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.endswith("ctxt_switches:\t" + line.split("\t")[-1]):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


# -- load ---------------------------------------------------------------------------------

def put_load(host: str, port: int, prefix: bytes, n_keys: int, rate: float, seed: int,
             go: Any, stop: Any, out: Any) -> None:
    """Process: single-key puts to existing keys, up to 64 in flight, from ``go`` to ``stop``."""
    import random

    from shmcache.etcdapi import rpc

    client = C.etcd_client(host, port)
    stub, md = client.kv, client.metadata
    rnd = random.Random(seed)
    value = b"x" * C.VALUE_SIZE
    keys = [C.key(prefix, i) for i in range(n_keys)]
    reqs = [rpc.PutRequest(key=keys[rnd.randrange(n_keys)], value=value)
            for _ in range(4096)]
    out.put(("ready", os.getpid()))
    go.wait()
    inflight: list[Any] = []
    sent = last = 0
    t0 = time.monotonic()
    while not stop.is_set():
        if rate > 0:
            due = t0 + sent / rate
            now = time.monotonic()
            if due > now:
                time.sleep(min(due - now, 0.01))
                continue
        inflight.append(stub.Put.future(reqs[sent & 4095], 30, metadata=md))
        sent += 1
        while len(inflight) >= 64 or (inflight and inflight[0].done()):
            last = max(last, inflight.pop(0).result().header.revision)
    for f in inflight:
        last = max(last, f.result().header.revision)
    client.close()
    out.put(("done", sent, last))


class Load:
    """--load-procs put_load processes (started once, released per window), or etcdctl check perf."""

    def __init__(self, args: Any, etcd: Any, etcdctl: str) -> None:
        self.args, self.etcd, self.etcdctl = args, etcd, etcdctl
        self.kind = args.load
        self.pids: list[int] = []
        self.procs: list[Any] = []
        self.window = 0

    def start(self) -> None:
        """Start the window's load (returns once it is writing)."""
        self.window += 1
        if self.kind.startswith("checkperf"):
            level = self.kind.partition(":")[2] or "l"
            self.cp_prefix = PREFIX + b"cp%d/" % self.window
            self.cp = subprocess.Popen(
                [self.etcdctl, "--endpoints", self.etcd.endpoint, "check", "perf", "--load", level,
                 "--prefix", self.cp_prefix.decode()],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.pids = [self.cp.pid]
            return
        ctx = mp.get_context("spawn")
        self.go, self.stop_ev, self.q = ctx.Event(), ctx.Event(), ctx.Queue()
        rate = self.args.rate / self.args.load_procs if self.args.rate else 0.0
        self.procs = [ctx.Process(target=put_load, daemon=True, args=(
            "127.0.0.1", self.etcd.port, PREFIX, self.args.keys, rate, 7 + i + 100 * self.window,
            self.go, self.stop_ev, self.q)) for i in range(self.args.load_procs)]
        for p in self.procs:
            p.start()
        self.pids = []
        for _ in self.procs:
            tag, pid = self.q.get(timeout=60)
            assert tag == "ready"
            self.pids.append(pid)

    def go_now(self) -> None:
        if not self.kind.startswith("checkperf"):
            self.go.set()

    def stop(self) -> None:
        if self.kind.startswith("checkperf"):
            # Stopped before its final delete: one revision deleting every key it wrote
            # would weigh as much as all the puts together.
            self.cp.kill()
            self.cp.wait()
            return
        self.stop_ev.set()
        for _ in self.procs:
            self.q.get(timeout=60)
        for p in self.procs:
            p.join(10)

    def cleanup(self, client: Any) -> None:
        """After the window (no consumer runs): drop the keys check perf created."""
        if self.kind.startswith("checkperf"):
            from tests.helpers import delete

            delete(client, self.cp_prefix, prefix=True)


# -- consumers ----------------------------------------------------------------------------

def child_main(kind: str, port: int, start: int, path: str) -> None:
    """Child: a bare watch of PREFIX that stores its last revision (and response count) in
    the 16 bytes at ``path``. ``python-etcd3``: python-etcd3's own watch, the callback doing
    nothing else; ``stream``: shmcache's watch stream (_etcd, as the writer opens it) with
    nothing published."""
    with open(path, "r+b") as f:
        m = mmap.mmap(f.fileno(), 16)
    pack = struct.pack_into
    n = 0
    if kind == "stream":
        from shmcache.format import layout
        from shmcache.writer.etcd import connection as _etcd

        conn = _etcd.Connection(_etcd.EtcdSettings(endpoints=[f"127.0.0.1:{port}"]))
        conn.connect()
        for resp in conn.watch_decoded(PREFIX, layout.prefix_range_end(PREFIX), start):
            n += 1
            if resp[5]:
                pack("<QQ", m, 0, resp[5][-1][4], n)
        os._exit(3)
    etcd3 = C.python_etcd3()
    # Blocked before python-etcd3 starts its threads, then taken with sigwait below.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    client = etcd3.client(host="127.0.0.1", port=port,
                          grpc_options=[("grpc.max_receive_message_length", 2**31 - 1)])

    def callback(resp: Any) -> None:
        nonlocal n
        if isinstance(resp, Exception):
            os._exit(3)
        n += 1
        if resp.events:
            pack("<QQ", m, 0, resp.events[-1].mod_revision, n)

    client.add_watch_prefix_callback(PREFIX, callback, prev_kv=True, start_revision=start)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    os._exit(0)


class Consumer:
    label = ""
    proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, etcd: Any, start: int) -> None:
        """Start consuming revisions from ``start`` on."""
        raise NotImplementedError

    def revision(self) -> int:
        raise NotImplementedError

    def responses(self) -> int | None:
        return None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


class WriterConsumer(Consumer):
    def __init__(self, label: str, tree: str, suffix: str = "") -> None:
        self.label, self.tree = label, tree
        self.name = f"wcpu{os.getpid()}{suffix}"
        self.reader: Any = None

    def start(self, etcd: Any, start: int) -> None:
        import shmcache
        from shmcache.cli.demo_etcd import free_port
        from shmcache.writer.lock import remove_cache

        remove_cache(self.name, force=True)
        self.port = free_port()
        env = {**os.environ, "PYTHONPATH": self.tree}
        self.log = open(f"/tmp/shmcache-wcpu-{self.name}.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "shmcache", "serve", self.name, "--endpoints", etcd.endpoint,
             "--prefix", PREFIX.decode(), "--ring-size", "64MiB", "--remove-on-exit",
             "--log-level", "warning", "--metrics", f"127.0.0.1:{self.port}"],
            cwd=self.tree, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.reader = shmcache.Reader(self.name, timeout=60)

    def revision(self) -> int:
        return int(self.reader.status().revision)

    def responses(self) -> int | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
                text = r.read().decode()
        except OSError:
            return None
        m = re.search(r"^shmcache_watch_responses_total\{[^}]*\} ([0-9.e+]+)$", text, re.M)
        return int(float(m.group(1))) if m else None

    def stop(self) -> None:
        from shmcache.writer.lock import remove_cache

        if self.reader is not None:
            self.reader.close()
            self.reader = None
        super().stop()
        self.log.close()
        remove_cache(self.name, force=True)
        os.unlink(self.log.name)


class ChildWatch(Consumer):
    """A ``child_main`` process (``kind``), run from ``tree``."""

    def __init__(self, label: str, kind: str, tree: str = C.ROOT) -> None:
        self.label, self.kind, self.tree = label, kind, tree

    def start(self, etcd: Any, start: int) -> None:
        fd, self.path = tempfile.mkstemp(prefix="shmcache-wcpu-")
        os.write(fd, b"\0" * 16)
        os.close(fd)
        with open(self.path, "r+b") as f:
            self.m = mmap.mmap(f.fileno(), 16)
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--child", self.kind, str(etcd.port),
             str(start), self.path], env={**os.environ, "PYTHONPATH": self.tree})

    def revision(self) -> int:
        return int(struct.unpack_from("<Q", self.m, 0)[0])

    def responses(self) -> int | None:
        return int(struct.unpack_from("<Q", self.m, 8)[0])

    def stop(self) -> None:
        super().stop()
        self.m.close()
        os.unlink(self.path)


class EtcdctlConsumer(Consumer):
    label = "etcdctl watch"

    def __init__(self, etcdctl: str) -> None:
        self.etcdctl = etcdctl

    def start(self, etcd: Any, start: int) -> None:
        self.rev = 0
        self.n = 0
        self.proc = subprocess.Popen(
            [self.etcdctl, "--endpoints", etcd.endpoint, "watch", "--prefix", PREFIX.decode(),
             "--rev", str(start), "--prev-kv", "-w", "json"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        """Read etcdctl's output in large chunks; the last complete line gives the revision."""
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        pat = re.compile(rb'"mod_revision":(\d+)')
        rest = b""
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                return
            data = rest + chunk
            end = data.rfind(b"\n")
            if end < 0:
                rest = data
                continue
            self.n += data.count(b"\n", 0, end + 1)
            start = data.rfind(b"\n", 0, end) + 1
            revs = [int(x) for x in pat.findall(data, start, end)]
            if revs:
                self.rev = max(self.rev, max(revs))
            rest = data[end + 1:]

    def revision(self) -> int:
        return self.rev

    def responses(self) -> int | None:
        return self.n

    def stop(self) -> None:
        super().stop()
        self.thread.join(5)


# -- one window -----------------------------------------------------------------------------

def wait_for(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.01)


def window(cons: Consumer, etcd: Any, client: Any, load: Load, seconds: float,
           backlog: bool = False) -> dict[str, Any]:
    """One consumer under the load for ``seconds``, until it has every revision. With
    ``backlog`` the consumer is stopped (SIGSTOP) while the load runs and continued after
    it: its rate is then how fast it catches up."""
    from tests.helpers import etcd_current_revision, put

    def lag_now() -> int:  # (the consumer first: etcd's revision read after it is >= it)
        mine = cons.revision()
        return int(etcd_current_revision(client)) - mine

    cons.start(etcd, etcd_current_revision(client) + 1)
    try:
        time.sleep(0.5)
        # The probe shows the watch is live (a watch created after the load began
        # would catch up in large batches, which are cheaper per revision).
        probe = put(client, PREFIX + b"probe", b"%f" % time.time())
        wait_for(lambda: cons.revision() >= probe, 60, f"{cons.label} to see the probe")
        time.sleep(0.5)
        load.start()
        r0 = etcd_current_revision(client)
        wait_for(lambda: cons.revision() >= r0, 30, f"{cons.label} to be current")
        resp0 = cons.responses()
        c0 = cpu_seconds(cons.pid)
        s0 = ctx_switches(cons.pid)
        e0 = cpu_seconds(etcd.pid)
        if backlog:
            os.kill(cons.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        load.go_now()
        lag: list[tuple[float, int]] = []
        next_sample = t0
        while time.monotonic() < t0 + seconds:
            now = time.monotonic()
            if now >= next_sample:
                lag.append((round(now - t0, 2), lag_now()))
                next_sample += 0.5
            time.sleep(max(0.0, min(next_sample, t0 + seconds) - time.monotonic()))
        load_cpu = sum(cpu_seconds(p) for p in load.pids)
        load.stop()
        t_load = time.monotonic() - t0
        final = etcd_current_revision(client)
        if backlog:
            os.kill(cons.pid, signal.SIGCONT)
        while cons.revision() < final:
            now = time.monotonic()
            if now >= next_sample:
                lag.append((round(now - t0, 2), final - cons.revision()))
                next_sample += 0.5
            if now - t0 > seconds + 300:
                raise RuntimeError(f"{cons.label} did not catch up: {cons.revision()} < {final}")
            time.sleep(0.005)
        t_done = time.monotonic() - t0
        e1 = cpu_seconds(etcd.pid)
        c1 = cpu_seconds(cons.pid)
        s1 = ctx_switches(cons.pid)
        resp1 = cons.responses()
        lag.append((round(t_done, 2), 0))
        revs = final - r0
        out = {
            "revisions": revs, "load_seconds": round(t_load, 3),
            "catch_up_seconds": round(t_done - t_load, 3),
            "cpu_s": round(c1 - c0, 3), "cpu_us_per_rev": round((c1 - c0) / revs * 1e6, 2),
            "switches_per_rev": round((s1 - s0) / revs, 2),
            "load_rate": round(revs / t_load, 1),
            "received_rate": round(revs / ((t_done - t_load) if backlog else t_done), 1),
            "etcd_cpu_us_per_rev": round((e1 - e0) / revs * 1e6, 2),
            "load_cpu_us_per_rev": round(load_cpu / revs * 1e6, 2),
            "max_lag": max(x[1] for x in lag), "lag": lag,
        }
        if resp0 is not None and resp1 is not None and resp1 > resp0:
            out["revs_per_response"] = round(revs / (resp1 - resp0), 2)
        return out
    finally:
        if backlog and cons.proc is not None and cons.proc.poll() is None:
            os.kill(cons.pid, signal.SIGCONT)
        cons.stop()
        load.cleanup(client)


# -- profile --------------------------------------------------------------------------------

def tree_version(path: str) -> str:
    """The tree's commit, and the files that differ from it (a 'before' tree may be a
    commit with some files taken from an older one)."""
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=path, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "HEAD") or path
    changed = git("status", "--porcelain", "--", "shmcache").splitlines()
    return head + (f" with changes: {', '.join(ln[3:] for ln in changed)}" if changed else "")


def writers(args: Any) -> list[Consumer]:
    if not args.tree:
        return [WriterConsumer("writer", C.ROOT)]
    out: list[Consumer] = []
    for i, spec in enumerate(args.tree):
        label, _, path = spec.partition("=")
        out.append(WriterConsumer(label, os.path.abspath(path), f"t{i}"))
    return out


def profile(args: Any, etcd: Any, client: Any, etcdctl: str) -> None:
    from profile_writer import summarize_raw  # (bench/ is on sys.path, see the top)

    pyspy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    found = [w for w in writers(args) if w.label == args.profile] or writers(args)[:1]
    cons = found[0]
    assert isinstance(cons, WriterConsumer)
    load = Load(args, etcd, etcdctl)
    raw = f"/tmp/shmcache-wcpu-pyspy-{os.getpid()}.txt"
    orig_start = cons.start

    def start_and_sample(e: Any, start: int) -> None:
        orig_start(e, start)
        if args.perf:  # CPU samples (kernel and C frames; Python 3.11 frames show as the eval loop)
            cmd = ["perf", "record", "-F", "499", "-g", "-o", raw + ".perf", "-p", str(cons.pid),
                   "--", "sleep", str(int(args.seconds) + 3)]
        else:
            cmd = [pyspy, "record", "--pid", str(cons.pid), "--rate", "250", "--format", "raw",
                   "--output", raw, "--threads", "--duration", str(int(args.seconds) + 3)]
            if args.native:
                cmd.append("--native")
        cons.spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL,  # type: ignore[attr-defined]
                                    stderr=subprocess.DEVNULL)

    cons.start = start_and_sample  # type: ignore[method-assign]
    res = window(cons, etcd, client, load, args.seconds)
    cons.spy.wait(60)  # type: ignore[attr-defined]
    print(json.dumps({k: v for k, v in res.items() if k != "lag"}))
    if os.path.exists(raw + ".perf"):
        for sort in ("dso", "dso,sym"):
            rep = subprocess.run(["perf", "report", "-i", raw + ".perf", "--no-children",
                                  "--sort", sort, "--stdio", "-g", "none", "--percent-limit", "0.7"],
                                 capture_output=True, text=True).stdout
            print("\n".join(ln for ln in rep.splitlines() if ln and not ln.startswith("#")))
        if args.keep_raw:
            shutil.copy(raw + ".perf", args.keep_raw)
        os.unlink(raw + ".perf")
    if os.path.exists(raw):
        if args.keep_raw:
            shutil.copy(raw, args.keep_raw)
        summary = summarize_raw(raw, top=40)
        os.unlink(raw)
        print(summary)


# -- main -----------------------------------------------------------------------------------

def plot(results: dict[str, Any], path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, r in results["consumers"].items():
        rounds = r["rounds"]
        mid = sorted(rounds, key=lambda x: x["cpu_us_per_rev"])[len(rounds) // 2]
        ax.plot([p[0] for p in mid["lag"]], [p[1] for p in mid["lag"]], label=label)
    ax.set_xlabel("seconds since the load started")
    ax.set_ylabel("lag (revisions behind etcd)")
    ax.set_yscale("symlog", linthresh=10)
    ax.set_ylim(bottom=0)
    st = results["settings"]
    what = (f"{st['rate']:.0f} puts/s" if st["rate"] else "puts as fast as etcd takes them")
    if st["backlog"]:
        what += ", each consumer stopped during the load"
    ax.set_title(f"Lag behind etcd, {what} (median round)", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def report(paths: list[str]) -> None:
    """Markdown tables of results files: medians (and range) per consumer, then lag over time."""
    for path in paths:
        with open(path) as f:
            res = json.load(f)
        st = res["settings"]
        load = (f"{st['rate']:.0f} puts/s" if st["rate"] else "as fast as etcd takes them")
        print(f"\n{os.path.basename(path)}: load {load}, {st['load_procs']} load processes, "
              f"{st['rounds']} rounds of {st['seconds']:.0f} s{', backlog' if st['backlog'] else ''}"
              f"; {res['when']}, load average {res['load_average'][0]:.1f}\n")
        print("| consumer | CPU µs/revision (range) | revisions/s received | load revisions/s | "
              "revisions/response | switches/revision | max lag |")
        print("|---|---|---|---|---|---|---|")
        for label, r in res["consumers"].items():
            m, rs = r["median"], r["rounds"]
            lo = min(x["cpu_us_per_rev"] for x in rs)
            hi = max(x["cpu_us_per_rev"] for x in rs)
            def f(x: float) -> str:
                return f"{x:.1f}" if x < 20 else f"{x:.0f}"

            print(f"| {label} | **{m['cpu_us_per_rev']:.1f}** ({f(lo)}–{f(hi)}) | "
                  f"{m['received_rate']:,.0f} | {m['load_rate']:,.0f} | "
                  f"{m['revs_per_response'] or 0:.2f} | {m['switches_per_rev']:.2f} | "
                  f"{m['max_lag']:,.0f} |")
        times = [1.0, 2.0, 4.0, 6.0, 8.0, 10.0]
        print("\n| lag (revisions) at | " + " | ".join(f"{t:.0f} s" for t in times)
              + " | caught up after |")
        print("|---|" + "---|" * (len(times) + 1))
        for label, r in res["consumers"].items():
            rs = sorted(r["rounds"], key=lambda x: x["cpu_us_per_rev"])
            mid = rs[len(rs) // 2]
            cells = []
            for t in times:
                near = [v for (ts, v) in mid["lag"] if abs(ts - t) < 0.26]
                cells.append(f"{near[0]:,}" if near else "–")
            print(f"| {label} | " + " | ".join(cells)
                  + f" | {mid['load_seconds'] + mid['catch_up_seconds']:.1f} s |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=15.0, help="load per window")
    ap.add_argument("--keys", type=int, default=1000)
    ap.add_argument("--load", default="put", help="put (default) or checkperf:s|m|l|xl")
    ap.add_argument("--load-procs", type=int, default=3)
    ap.add_argument("--rate", type=float, default=0.0, help="total puts/s cap (0: none)")
    ap.add_argument("--tree", action="append", default=[],
                    help="LABEL=DIR: a writer run from the source tree DIR (repeatable)")
    ap.add_argument("--only", default="", help="comma-separated consumer labels")
    ap.add_argument("--tag", default="writer-cpu")
    ap.add_argument("--backlog", action="store_true",
                    help="stop each consumer while the load runs: measure its catch-up")
    ap.add_argument("--png", action="store_true", help="plot lag over time (matplotlib)")
    ap.add_argument("--profile", nargs="?", const="writer", metavar="LABEL",
                    help="profile one writer (default: 'writer', or the first --tree)")
    ap.add_argument("--native", action="store_true", help="with --profile: py-spy --native")
    ap.add_argument("--perf", action="store_true", help="with --profile: perf record, not py-spy")
    ap.add_argument("--keep-raw", help="with --profile: keep py-spy's raw output here")
    ap.add_argument("--stream-tree", metavar="DIR",
                    help="also run shmcache's watch stream alone (no publishing) from DIR")
    ap.add_argument("--report", nargs="+", metavar="JSON",
                    help="print markdown tables of results files and exit")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.report:
        report(args.report)
        for path in args.report if args.png else []:
            with open(path) as f:
                plot(json.load(f), path.removesuffix(".json") + "-lag.png")
        return 0
    if args.child:
        child_main(args.child[0], int(args.child[1]), int(args.child[2]), args.child[3])
        return 0
    from tests.etcdserver import EtcdServer

    etcdctl = shutil.which("etcdctl") or os.path.join(os.path.dirname(sys.executable), "etcdctl")
    with EtcdServer(extra_args=C.etcd_args()) as etcd:
        client = etcd.api_client()
        C.load_etcd(client, PREFIX, args.keys)
        if args.profile:
            profile(args, etcd, client, etcdctl)
            client.close()
            return 0
        consumers: list[Consumer] = writers(args)
        if args.stream_tree:
            consumers.append(ChildWatch("shmcache watch stream alone", "stream",
                                        os.path.abspath(args.stream_tree)))
        consumers += [ChildWatch("python-etcd3 watch", "python-etcd3"), EtcdctlConsumer(etcdctl)]
        if args.only:
            keep = {s.strip() for s in args.only.split(",")}
            consumers = [c for c in consumers if c.label in keep]
        load = Load(args, etcd, etcdctl)
        rows: dict[str, list[dict[str, Any]]] = {c.label: [] for c in consumers}
        t_start = time.monotonic()
        for rnd in range(args.rounds):
            order = consumers[rnd % len(consumers):] + consumers[:rnd % len(consumers)]
            for cons in order:
                res = window(cons, etcd, client, load, args.seconds, args.backlog)
                rows[cons.label].append(res)
                print(f"round {rnd + 1} {cons.label:20s} {res['cpu_us_per_rev']:7.1f} us/rev  "
                      f"load {res['load_rate']:8.0f} rev/s  received {res['received_rate']:8.0f}"
                      f" rev/s  max lag {res['max_lag']:6d}  revs/resp "
                      f"{res.get('revs_per_response', '-')}  etcd {res['etcd_cpu_us_per_rev']}"
                      f" us/rev  switches/rev {res['switches_per_rev']}", flush=True)
        etcd_version = etcd.version
        client.close()

    def med(label: str, key: str) -> float | None:
        xs = [r[key] for r in rows[label] if key in r]
        return round(statistics.median(xs), 2) if xs else None

    results = C.stamp(
        benchmark="writer CPU per revision", etcd=etcd_version,
        nproc=os.cpu_count(), load_average=os.getloadavg(),
        settings={k: v for k, v in vars(args).items() if k not in ("child",)},
        trees={label: tree_version(path) for label, path in (t.split("=", 1) for t in args.tree)},
        seconds=round(time.monotonic() - t_start, 1),
        consumers={label: {
            "median": {k: med(label, k) for k in (
                "cpu_us_per_rev", "load_rate", "received_rate", "max_lag", "revs_per_response",
                "switches_per_rev", "catch_up_seconds", "etcd_cpu_us_per_rev", "load_cpu_us_per_rev")},
            "rounds": rs} for label, rs in rows.items()})
    print(f"\n{'consumer':22s} {'CPU us/rev':>10s} {'load rev/s':>10s} {'recv rev/s':>10s} "
          f"{'max lag':>8s} {'revs/resp':>9s}")
    for label, r in results["consumers"].items():
        m = r["median"]
        print(f"{label:22s} {m['cpu_us_per_rev']:10.1f} {m['load_rate']:10.0f} "
              f"{m['received_rate']:10.0f} {m['max_lag']:8.0f} {m['revs_per_response'] or '-'!s:>9}")
    outdir = os.path.join(HERE, "results")
    path = os.path.join(outdir, f"{args.tag}.json")
    C.write_json(path, results, indent=1)
    print(f"wrote {path}")
    if args.png and plot(results, os.path.join(outdir, f"{args.tag}-lag.png")):
        print(f"wrote {os.path.join(outdir, args.tag + '-lag.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
