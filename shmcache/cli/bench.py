"""``shmcache bench``: multi-reader throughput of a live cache on this host, reading only.

The parent attaches one Reader, samples keys from the cache, spawns reader
processes (multiprocessing "spawn"; each attaches its own Reader by name), and
runs one timed window per reader count: the first K processes run the
operation from a start time the parent fixes (CLOCK_MONOTONIC is system-wide),
each measuring its own ops, wall time, CPU time (``time.process_time``) and
context switches around its timed loop. Nothing here writes to etcd or to the
cache: readers map every segment read-only. Only the base install is needed.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import platform
import random
import resource
import signal
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any, TextIO

from .. import __version__
from ..errors import CompactedError, ShmCacheError
from .output import plural

OPS = ("get", "list", "watch")
GET_BATCH = 32  # gets per timed batch; the first of each is timed alone for the latency
SAMPLES_PER_READER = 20_000  # latency reservoir per reader and reader count
ONE_LIST = 100_000  # caches up to this many keys are sampled from one list
LIST_PREFIXES = 1000  # distinct list prefixes derived from the sampled keys
WATCH_SAMPLE = 4  # watch: one delivery in this many is timed (see _sampled_delivery)
WARMUP_SECONDS = 0.2  # each reader process runs the op this long before the first window
MAX_READERS = 256

LATENCY_METHOD = {
    "get": f"one get in every {GET_BATCH} timed alone with perf_counter_ns (the timer's own "
           f"~50 ns included); the other {GET_BATCH - 1} untimed",
    "list": "every list(prefix, limit=LIST_SIZE) timed with perf_counter_ns",
    "watch": f"one delivery in {WATCH_SAMPLE}: from the reader process's wake-up on the "
             "writer's publish until the watch's poll() returns that publish's events (decode "
             "and hand-off in the process), not etcd-to-reader propagation",
}


@dataclass
class Plan:
    """What to measure. ``prefix`` None: the cache's whole range."""

    name: str
    op: str = "get"
    readers: list[int] = field(default_factory=lambda: [1, 2, 4])
    seconds: float = 5.0
    prefix: bytes | None = None
    list_size: int = 100
    sample: int = 100_000
    seed: int = 1


class Progress:
    """Progress on a stream (stderr): ``line`` writes a line that stays (start and end of
    each step), ``tick`` a status rewritten in place, on a terminal only."""

    def __init__(self, stream: TextIO | None) -> None:
        self.stream, self._open = stream, False
        self.tty = bool(stream is not None and stream.isatty())

    def line(self, text: str) -> None:
        if self.stream is not None:
            self.stream.write(("\r\x1b[K" if self._open else "") + text + "\n")
            self.stream.flush()
            self._open = False

    def tick(self, text: str) -> None:
        if self.stream is not None and self.tty:
            self.stream.write("\r\x1b[K" + text)
            self.stream.flush()
            self._open = True


def _cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _host_busy() -> tuple[float, float] | None:
    """(busy CPU seconds of the whole host, from /proc/stat; monotonic time), or None."""
    with contextlib.suppress(OSError, ValueError), open("/proc/stat") as f:
        user, nice, system, _idle, _io, irq, softirq, steal = map(int, f.readline().split()[1:9])
        busy = user + nice + system + irq + softirq + steal
        return busy / os.sysconf("SC_CLK_TCK"), time.monotonic()
    return None


def machine_facts() -> dict[str, Any]:
    from ..format import snapshot

    return {
        "cpu_model": _cpu_model(), "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "shmcache": __version__, "speedups": bool(snapshot.USE_SPEEDUPS),
        "kernel": platform.release(), "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def _text(b: bytes) -> str:
    return b.decode("utf-8", "backslashreplace")


def sample_keys(r: Any, prefix: bytes, n: int, seed: int, progress: Progress,
                total: int) -> tuple[list[bytes], int]:
    """Up to ``n`` keys under ``prefix``, a uniform random sample (reservoir, seeded), and the
    number of keys there. A cache of up to ONE_LIST keys (``total``) is read in one list;
    a larger one page by page at one revision (memory O(n)), and should the cache's history
    move past that revision meanwhile, again, then in one list."""
    ways = ["list"] if total <= ONE_LIST else ["pages", "pages", "list"]
    for way in ways:
        rnd, seen = random.Random(seed), 0
        out: list[bytes] = []
        kvs = r.iter_list(prefix, page_size=10_000) if way == "pages" else r.list(prefix).items
        try:
            for kv in kvs:
                seen += 1
                if len(out) < n:
                    out.append(kv.key)
                elif (j := rnd.randrange(seen)) < n:
                    out[j] = kv.key
                if seen % 100_000 == 0:
                    progress.tick(f"sampling keys: {seen:,} read")
            break
        except CompactedError:
            progress.line("sampling keys: the cache's history moved past the listing; again")
    rnd.shuffle(out)
    return out, seen


def list_prefixes(r: Any, base: bytes, keys: list[bytes], size: int) -> list[bytes]:
    """For each sampled key (up to LIST_PREFIXES), the longest prefix of it under ``base``
    that holds at least ``size`` keys (``base`` itself if no longer one does): so
    ``list(p, limit=size)`` returns ``size`` keys (fewer only if the range is smaller)."""
    out = []
    for k in keys[:LIST_PREFIXES]:
        lo, hi = len(base), len(k)  # k[:lo] holds >= size keys or is the base: the answer
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if len(r.list(k[:mid], limit=size).items) >= size:
                lo = mid
            else:
                hi = mid - 1
        out.append(k[:lo])
    return out


class _Reservoir:
    """A uniform sample of at most ``cap`` values, and how many were offered."""

    def __init__(self, cap: int, rnd: random.Random) -> None:
        self.cap, self.rnd, self.seen = cap, rnd, 0
        self.values: list[int] = []

    def add(self, x: int) -> None:
        self.seen += 1
        if len(self.values) < self.cap:
            self.values.append(x)
        else:
            j = self.rnd.randrange(self.seen)
            if j < self.cap:
                self.values[j] = x


def _loop_get(r: Any, work: list[bytes], end_ns: int, res: _Reservoir) -> dict[str, Any]:
    get, pc = r.get, time.perf_counter_ns
    keys = list(work)
    while len(keys) % GET_BATCH:  # whole batches, cycling through the sample
        keys.append(work[len(keys) % len(work)])
    n, i, ops = len(keys), 0, 0
    while True:
        a = pc()
        if a >= end_ns:
            break
        get(keys[i])
        res.add(pc() - a)
        for k in keys[i + 1:i + GET_BATCH]:
            get(k)
        ops += GET_BATCH
        i = (i + GET_BATCH) % n
    return {"ops": ops}


def _loop_list(r: Any, work: list[bytes], end_ns: int, res: _Reservoir,
               limit: int) -> dict[str, Any]:
    lst, pc = r.list, time.perf_counter_ns
    n, i, ops, items = len(work), 0, 0, 0
    while True:
        a = pc()
        if a >= end_ns:
            break
        items += len(lst(work[i], limit=limit).items)
        res.add(pc() - a)
        ops += 1
        i = i + 1 if i + 1 < n else 0
    return {"ops": ops, "items": items}


def _sampled_delivery(ctl: Any, w: Any, left: float, res: _Reservoir) -> list[Any]:
    """One delivery, timed from the process's wake-up on the writer's publish (a futex wait
    on the control word, as the watch machinery does) until ``poll`` hands its events over;
    sampled only when they are exactly what was published between the wait and the wake."""
    word = ctl.word()
    b = ctl.block()
    before = b.revision if b is not None else 0
    evs: list[Any] = w.poll(0)
    if evs:
        return evs  # already there: delivered, not timed
    ctl.wait(word, min(left, 0.1))
    t_wake = time.perf_counter_ns()
    b = ctl.block()
    at_wake = b.revision if b is not None else 0
    evs = w.poll(min(left, 0.1))
    if evs and before < evs[0].revision and evs[-1].revision <= at_wake:
        res.add(time.perf_counter_ns() - t_wake)
    return evs


def _loop_watch(r: Any, prefix: bytes, end_ns: int, res: _Reservoir) -> dict[str, Any]:
    """Events delivered by a Watch read as ``for ev in watch`` would (``poll(timeout)``),
    one delivery in WATCH_SAMPLE timed by ``_sampled_delivery``."""
    pc, ctl = time.perf_counter_ns, r.control
    events = deliveries = compacted = 0
    w = r.watch(prefix)
    try:
        while (now := pc()) < end_ns:
            left = (end_ns - now) / 1e9
            try:
                if deliveries % WATCH_SAMPLE:
                    evs = w.poll(min(left, 0.1))
                else:
                    evs = _sampled_delivery(ctl, w, left, res)
            except CompactedError:  # fell behind: count it, go on from now
                compacted += 1
                w.close()
                w = r.watch(prefix)
                continue
            if evs:
                events += len(evs)
                deliveries += 1
    finally:
        w.close()
    return {"ops": events, "deliveries": deliveries, "compacted": compacted}


def _timed(r: Any, op: str, work: list[bytes], prefix: bytes, limit: int, start_at: float,
           seconds: float, rnd: random.Random) -> dict[str, Any]:
    """One window: wait for ``start_at`` (monotonic), run ``seconds``, measure around it."""
    while (d := start_at - time.monotonic()) > 0:
        time.sleep(min(d, 0.05))
    res = _Reservoir(SAMPLES_PER_READER, rnd)
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    cpu0, t0 = time.process_time(), time.perf_counter_ns()
    end_ns = t0 + int(seconds * 1e9)
    out: dict[str, Any]
    if op == "get":
        out = _loop_get(r, work, end_ns, res)
    elif op == "list":
        out = _loop_list(r, work, end_ns, res, limit)
    else:
        out = _loop_watch(r, prefix, end_ns, res)
    t1, cpu1 = time.perf_counter_ns(), time.process_time()
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    out.update(wall_s=(t1 - t0) / 1e9, cpu_s=cpu1 - cpu0,
               voluntary_switches=ru1.ru_nvcsw - ru0.ru_nvcsw,
               involuntary_switches=ru1.ru_nivcsw - ru0.ru_nivcsw,
               samples=res.values, timed=res.seen)
    return out


def reader_main(conn: Connection, name: str, op: str, work: list[bytes], prefix: bytes,
                limit: int, seed: int) -> None:
    """A reader process: attach, warm up, say ready, then run the windows it is sent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the parent stops us
    try:
        from ..reader.reader import Reader

        rnd = random.Random(seed)
        work = list(work)
        rnd.shuffle(work)
        with Reader(name, timeout=5.0) as r:
            if op != "watch":  # warm up: the mapped pages, the interpreter's caches
                _timed(r, op, work, prefix, limit, 0.0, WARMUP_SECONDS, rnd)
            conn.send(("ready", None))
            while True:
                msg = conn.recv()
                if msg[0] != "run":
                    break
                conn.send(("result", _timed(r, op, work, prefix, limit, msg[1], msg[2], rnd)))
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        pass  # the parent went away or stops us
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises
        message = str(exc) if isinstance(exc, ShmCacheError) else f"{type(exc).__name__}: {exc}"
        with contextlib.suppress(OSError):
            conn.send(("error", message))
    finally:
        conn.close()


class _Pool:
    """The reader processes; ``close()`` stops, joins (and if need be kills) every one."""

    def __init__(self, count: int, args: tuple[Any, ...], seed: int) -> None:
        ctx = mp.get_context("spawn")
        self.procs: list[Any] = []
        self.conns: list[Connection] = []
        try:
            for i in range(count):
                parent, child = ctx.Pipe()
                p = ctx.Process(target=reader_main, args=(child, *args, seed + 1000 * (i + 1)),
                                name=f"shmcache-bench-{i}", daemon=True)
                self.conns.append(parent)
                p.start()
                self.procs.append(p)
                child.close()
        except BaseException:  # (Ctrl-C while spawning) stop the ones started
            self.close()
            raise

    def _recv(self, i: int, deadline: float, what: str) -> Any:
        conn, proc = self.conns[i], self.procs[i]
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ShmCacheError(f"reader process {i} did not {what} in time")
            ready = wait([conn, proc.sentinel], timeout=min(left, 1.0))
            if conn in ready:
                try:
                    kind, payload = conn.recv()
                except EOFError:
                    proc.join(1.0)
                    raise ShmCacheError(f"reader process {i} exited with code "
                                        f"{proc.exitcode}") from None
                if kind == "error":
                    raise ShmCacheError(f"reader process {i}: {payload}")
                return payload
            if proc.sentinel in ready and not conn.poll():
                proc.join(1.0)
                raise ShmCacheError(f"reader process {i} exited with code {proc.exitcode}")

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for i in range(len(self.procs)):
            self._recv(i, deadline, "start")

    def run(self, k: int, start_at: float, seconds: float) -> None:
        for conn in self.conns[:k]:
            conn.send(("run", start_at, seconds))

    def results(self, k: int, deadline: float) -> list[dict[str, Any]]:
        return [self._recv(i, deadline, "finish") for i in range(k)]

    def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.send(("stop",))
        end = time.monotonic() + 2.0
        for p in self.procs:
            p.join(max(0.0, end - time.monotonic()))
        for p in self.procs:
            if p.is_alive():  # stuck: SIGTERM, then SIGKILL
                p.terminate()
                p.join(2.0)
            if p.is_alive():
                p.kill()
                p.join()
        for conn in self.conns:
            conn.close()


def _percentile(parts: list[tuple[list[int], int]], q: float) -> float | None:
    """Nearest-rank percentile of the readers' samples merged, each sample weighted by the
    number of timed ops it stands for (readers that did more ops count for more)."""
    pairs = [(x, seen / len(xs)) for xs, seen in parts if xs for x in xs]
    if not pairs:
        return None
    pairs.sort()
    target, acc = q * sum(w for _, w in pairs), 0.0
    for x, w in pairs:
        acc += w
        if acc >= target:
            return float(x)
    return float(pairs[-1][0])


def _summarise(k: int, per: list[dict[str, Any]], window: float, busy: float | None,
               revisions: int) -> dict[str, Any]:
    ops = sum(p["ops"] for p in per)
    cpu = sum(p["cpu_s"] for p in per)
    rates = [p["ops"] / p["wall_s"] if p["wall_s"] > 0 else 0.0 for p in per]
    parts = [(p["samples"], p["timed"]) for p in per]
    p50, p99 = _percentile(parts, 0.50), _percentile(parts, 0.99)
    cores = cpu / window if window > 0 else 0.0
    row: dict[str, Any] = {
        "readers": k, "ops": ops, "seconds": round(window, 4), "ops_per_s": sum(rates),
        "per_reader_median_ops_per_s": statistics.median(rates),
        "p50_us": None if p50 is None else p50 / 1e3, "p99_us": None if p99 is None else p99 / 1e3,
        "cpu_seconds": cpu, "cpu_us_per_op": cpu / ops * 1e6 if ops else None, "cores_used": cores,
        "other_cores": None if busy is None else max(0.0, busy - cores),
        "revisions": revisions, "revisions_per_s": revisions / window if window > 0 else 0.0,
        "latency_samples": sum(len(p["samples"]) for p in per),
        "per_reader": [{"ops": p["ops"], "ops_per_s": rate, "wall_s": p["wall_s"],
                        "cpu_s": p["cpu_s"], "voluntary_switches": p["voluntary_switches"],
                        "involuntary_switches": p["involuntary_switches"],
                        **{x: p[x] for x in ("items", "deliveries", "compacted") if x in p}}
                       for p, rate in zip(per, rates, strict=True)],
    }
    if "items" in per[0]:
        row["keys_per_list"] = sum(p["items"] for p in per) / ops if ops else None
    if "deliveries" in per[0]:
        row["events"], row["deliveries"] = ops, sum(p["deliveries"] for p in per)
        row["compacted"] = sum(p["compacted"] for p in per)
    return row


def _round(pool: _Pool, r: Any, k: int, seconds: float, progress: Progress) -> dict[str, Any]:
    start_at = time.monotonic() + 0.1
    pool.run(k, start_at, seconds)
    while (d := start_at - time.monotonic()) > 0:
        time.sleep(d)
    busy0, rev0 = _host_busy(), r.revision
    end_at = start_at + seconds
    while (now := time.monotonic()) < end_at:
        progress.tick(f"readers {k}: {min(now - start_at, seconds):.1f}/{seconds:.1f} s")
        time.sleep(min(0.25, end_at - now))
    busy1, rev1 = _host_busy(), r.revision
    per = pool.results(k, end_at + 30.0 + seconds)
    window = max(p["wall_s"] for p in per)
    busy = None
    if busy0 is not None and busy1 is not None and busy1[1] > busy0[1]:
        busy = (busy1[0] - busy0[0]) / (busy1[1] - busy0[1])
    return _summarise(k, per, window, busy, rev1 - rev0)


def run(plan: Plan, progress: Progress | None = None) -> dict[str, Any]:
    """Measure; returns the results document (what ``--json`` writes)."""
    from ..reader.reader import Reader

    progress = progress or Progress(None)
    if plan.op not in OPS:
        raise ValueError(f"op must be one of {', '.join(OPS)}, not {plan.op!r}")
    prev_term = None
    if threading.current_thread() is threading.main_thread():
        # SIGTERM stops and cleans up as Ctrl-C does (default_int_handler: KeyboardInterrupt)
        prev_term = signal.signal(signal.SIGTERM, signal.default_int_handler)
    pool: _Pool | None = None
    try:
        with Reader(plan.name) as r:
            st = r.status()
            prefix = r.prefix if plan.prefix is None else plan.prefix
            r.list(prefix, limit=0)  # ValueError now if the prefix is outside the cache's range
            doc: dict[str, Any] = {
                "command": "shmcache bench", "op": plan.op, "readers": plan.readers,
                "seconds": plan.seconds, "list_size": plan.list_size if plan.op == "list" else None,
                "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "machine": machine_facts(),
                "cache": {"name": plan.name, "prefix": _text(st.prefix), "keys": st.key_count,
                          "revision": r.revision, "writer_alive": st.writer_alive},
                "prefix": _text(prefix), "latency": LATENCY_METHOD[plan.op],
            }
            work: list[bytes] = []
            if plan.op != "watch":
                progress.line(f"sampling up to {plural(plan.sample, 'key')} under {_text(prefix)!r} "
                              f"of cache {plan.name!r}")
                keys, under = sample_keys(r, prefix, plan.sample, plan.seed, progress,
                                          st.key_count)
                if not keys:
                    raise ShmCacheError(f"cache {plan.name!r} has no keys under "
                                        f"{_text(prefix)!r} to sample")
                doc["keys_under_prefix"], doc["sampled_keys"] = under, len(keys)
                work = keys if plan.op == "get" else list_prefixes(r, prefix, keys,
                                                                   plan.list_size)
                if plan.op == "list":
                    doc["list_prefixes"] = len(work)
            progress.line(f"starting {plural(max(plan.readers), 'reader process', 'reader processes')}")
            pool = _Pool(max(plan.readers), (plan.name, plan.op, work, prefix, plan.list_size),
                         plan.seed)
            pool.wait_ready(60.0)
            rows = []
            for k in plan.readers:
                progress.line(f"readers {k}: {plan.op} for {plan.seconds:g} s")
                row = _round(pool, r, k, plan.seconds, progress)
                progress.line(f"readers {k}: done, {row['ops_per_s']:,.0f} ops/s")
                rows.append(row)
        base = rows[0] if 1 not in plan.readers else rows[plan.readers.index(1)]
        for row in rows:
            row["scaling"] = (row["ops_per_s"] / base["ops_per_s"]
                              if base["ops_per_s"] > 0 else None)
        doc["scaling_base_readers"] = base["readers"]
        doc["results"] = rows
        return doc
    finally:
        if pool is not None:
            pool.close()
        if prev_term is not None:
            signal.signal(signal.SIGTERM, prev_term)


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def table(doc: dict[str, Any]) -> list[str]:
    """The text report: the stamp, one row per reader count, and what the columns mean."""
    m, c, op = doc["machine"], doc["cache"], doc["op"]
    what = {"get": "get of a random sampled key",
            "list": f"list(prefix, limit={doc['list_size']}) over "
                    f"{doc.get('list_prefixes', 0)} prefixes from the sampled keys",
            "watch": "watch of the prefix; an op is an event delivered to a reader"}[op]
    lines = [
        f"shmcache bench: {op}, {doc['seconds']:g} s per reader count, cache {c['name']!r} "
        f"({plural(c['keys'], 'key')} at revision {c['revision']}), prefix {doc['prefix']!r}",
        f"machine: {m['cpu_model']}, {m['cpu_count']} cores ({m['usable_cpus']} usable), "
        f"{m['python']}, shmcache {m['shmcache']}"
        f"{'' if m['speedups'] else ' (pure Python)'}, load average "
        f"{m['load_average'][0]:.2f} at start",
        f"op: {what}" + (f"; {plural(doc['sampled_keys'], 'key')} sampled of "
                         f"{doc['keys_under_prefix']:,}" if "sampled_keys" in doc else ""),
        f"latency: {doc['latency']}",
        "",
    ]
    base = doc["scaling_base_readers"]
    head = ("readers", "total ops/s", "per reader", "p50 us", "p99 us", "CPU us/op",
            "cores used", "others", "rev/s", f"vs {base}")
    rows = [head]
    for r in doc["results"]:
        rows.append((str(r["readers"]), f"{r['ops_per_s']:,.0f}",
                     f"{r['per_reader_median_ops_per_s']:,.0f}", _num(r["p50_us"], ".2f"),
                     _num(r["p99_us"], ".2f"), _num(r["cpu_us_per_op"], ".2f"),
                     f"{r['cores_used']:.2f}", _num(r["other_cores"], ".2f"),
                     f"{r['revisions_per_s']:,.0f}",
                     "-" if r["scaling"] is None else f"{r['scaling']:.2f}x"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines += ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True))
              for row in rows]
    lines += [
        "",
        "per reader: median of the readers' ops/s. CPU us/op: the readers' CPU time "
        "(user+system, measured in each reader around its timed loop) per op.",
        "cores used: the readers' CPU seconds / wall seconds. others: cores busy on this host "
        "outside the readers (writer, etcd, other load; /proc/stat).",
        f"rev/s: the cache's revision rate during the run. vs {base}: total ops/s against "
        f"{base} reader{'s' if base != 1 else ''}"
        + ("" if base == 1 else " (the smallest count: 1 was not measured)") + ".",
    ]
    if op == "watch" and any(r["ops"] == 0 for r in doc["results"]):
        lines.append("watch: no events delivered in some runs (0 events): the cache saw no "
                     "writes under the prefix then; run it under a write load.")
    if any(r.get("compacted") for r in doc["results"]):
        lines.append("watch: some readers fell behind the ring (CompactedError) and went on "
                     "from the current revision; see 'compacted' in --json.")
    return lines


def write_json(path: str, doc: dict[str, Any]) -> None:
    """Write the document to ``path`` whole or not at all (a temporary file, then rename)."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".shmcache-bench-", suffix=".json", dir=d)
    umask = os.umask(0o022)
    os.umask(umask)
    try:
        os.fchmod(fd, 0o666 & ~umask)  # as open() would have made it, not mkstemp's 0600
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def check_json_path(path: str) -> None:
    """Fail before measuring when ``--json FILE`` could not be written afterwards."""
    d = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path) or not os.path.isdir(d) or not os.access(d, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write --json {path}: not a file in a writable directory")
