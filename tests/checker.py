"""A seeded checker that holds the cache against etcd itself while faults are injected.

A workload process writes random puts, deletes, range deletes, multi-op
transactions and leases (expiring and revoked) with values from empty to 1 MiB
and binary keys. Reader processes loop list -> watch -> get -> paginated listing ->
past-revision list -> sync, and verify every answer against etcd: the list (and a
by_index read, now or at a past revision, of the ``top=segment:0`` index, and the pages
of a list or by_index read while writes go on, together) against etcd's
Range at the revision the cache reported, the watch event by event against
etcd's own watch from the same start, the get against etcd at the reader's
revision, and that a reader's revision never goes backwards within an epoch.
Meanwhile the main process injects faults: writer SIGKILL (also at fault
points inside an append and a snapshot publish), writer SIGSTOP longer than the
ring holds, etcd SIGKILL + restart, etcd unreachable (SIGSTOP), compaction past
the writer's revision while it is down, a reader killed mid-read, readers
attaching and detaching, a Reader closed from another thread or a signal handler
in the middle of its calls, a writer whose publishing fails with ENOSPC at some
steps, a byte flipped for a moment in the ring, the snapshot, the overlay or
the index segment or the control segment's block or prefix, and another etcd
cluster, ahead in revision, put behind the writer's etcd address (cluster_swap)
(tests/checker_faults.py, tests/checker_etcd.py). Every interruption must be seamless or an explicit
error (CompactedError, StaleError, TimeoutError; the closed error from a closed
Reader; CorruptSegmentError from a read that overlapped a flipped byte);
anything else, a wrong answer above all, is a divergence.
A fault step that overruns its time (a loaded machine) is a finding: reported
with the writer's log kept, and the run goes on.

Run a short check from pytest (tests/test_consistency.py::
test_checker_finds_no_divergence_under_faults, tests/test_checker.py) or a soak from the shell:
``python -m tests.soak --seconds 600 --seed 7``.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue
import random
import shutil
import signal
import subprocess
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import shmcache
from tests import checker_faults
from tests.checker_etcd import UNVERIFIABLE, Clusters, verify_watch
from tests.checker_faults import StepOverrun
from tests.checker_workload import KEYS, PREFIX, workload
from tests.helpers import WriterProcess, etcd_current_revision, etcd_get, etcd_range


@dataclass
class Report:
    seed: int
    seconds: float
    events_verified: int = 0
    lists_verified: int = 0
    gets_verified: int = 0
    past_reads_verified: int = 0
    index_reads_verified: int = 0
    paged_listings_verified: int = 0
    syncs_verified: int = 0
    explicit_errors: int = 0
    # Calls ended by closing their Reader (reader_close_*), and CorruptSegmentError while a
    # byte was flipped (flip_*): both expected, neither a divergence.
    closed_calls: int = 0
    corrupt_errors: int = 0
    enospc_logged: int = 0  # the writer's log lines about an ENOSPC (writer_enospc)
    swaps_ahead: int = 0  # cluster swaps whose new cluster was ahead of the old one's revision
    faults: dict[str, int] = field(default_factory=dict)
    # flip_* faults that found no such segment (no overlay while indexes are kept).
    no_segment: dict[str, int] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # fault kinds this shmcache cannot inject
    divergences: list[str] = field(default_factory=list)
    # What went wrong in the harness rather than the cache (a fault step that overran its
    # time): reported, not a divergence; the writer's log is then kept at ``kept_log``.
    findings: list[str] = field(default_factory=list)
    kept_log: str | None = None

    # What a reader's counts (reader_loop, checker_faults.close_under_reads) add up to.
    _COUNTS = {"events": "events_verified", "lists": "lists_verified", "gets": "gets_verified",
               "past": "past_reads_verified", "syncs": "syncs_verified",
               "indexed": "index_reads_verified", "paged": "paged_listings_verified",
               "explicit": "explicit_errors", "closed": "closed_calls",
               "corrupt": "corrupt_errors"}

    def add(self, counts: dict[str, int], problems: list[str]) -> None:
        """Add one reader's counts and divergences (main thread only)."""
        for k, v in counts.items():
            setattr(self, self._COUNTS[k], getattr(self, self._COUNTS[k]) + v)
        self.divergences.extend(problems)

    def summary(self) -> str:
        faults = ", ".join(f"{k} {v}" for k, v in sorted(self.faults.items())) or "none"
        if self.no_segment:
            faults += " (no segment to flip: " + ", ".join(
                f"{k} {v}" for k, v in sorted(self.no_segment.items())) + ")"
        skipped = "".join(f"\n  {s}" for s in self.skipped)
        findings = "".join(f"\n  finding: {f}" for f in self.findings)
        kept = f"\n  writer log kept at {self.kept_log}" if self.kept_log else ""
        if self.faults.get("cluster_swap"):
            faults += f" (the new cluster ahead in revision: {self.swaps_ahead})"
        return (f"seed {self.seed}, {self.seconds:.0f}s: events verified {self.events_verified}, "
                f"lists verified {self.lists_verified}, gets verified {self.gets_verified}, "
                f"past-revision reads verified {self.past_reads_verified}, by_index reads "
                f"verified {self.index_reads_verified}, paginated listings verified "
                f"{self.paged_listings_verified}, syncs verified "
                f"{self.syncs_verified}, explicit errors {self.explicit_errors}, calls ended "
                f"by close {self.closed_calls}, CorruptSegmentError on a flipped byte "
                f"{self.corrupt_errors}, ENOSPC in the writer's log {self.enospc_logged}; "
                f"faults injected: {faults}; divergences "
                f"{len(self.divergences)}; findings {len(self.findings)}{findings}{kept}"
                f"{skipped}")


def reader_loop(name: str, endpoint: str, seed: int, stop: Any, results: Any, idx: int,
                flips: Any, indexed: bool, swaps: Any, cluster: Any) -> None:
    """List, watch, get, read the past and sync, verifying each against etcd.

    ``flips`` counts flipped bytes applied and restored (odd while one is in a segment):
    a CorruptSegmentError is expected only from reads that overlapped one. ``indexed``:
    the writer keeps the index ``top=segment:0``. ``swaps`` and ``cluster``: cluster swaps
    begun and ended, and the id of the cluster behind ``endpoint`` (checker_faults.Clusters):
    an answer is held against the cluster it came from.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from tests.etcdserver import use_pure_python_protobuf

    use_pure_python_protobuf()
    import etcd3

    rnd = random.Random(seed * 1000 + idx)
    host, port = endpoint.rsplit(":", 1)
    client = etcd3.client(host=host.split("//")[-1], port=int(port), timeout=5)
    counts = {"events": 0, "lists": 0, "gets": 0, "past": 0, "syncs": 0, "explicit": 0,
              "indexed": 0, "paged": 0, "corrupt": 0}
    problems: list[str] = []
    last_seen: dict[int, int] = {}  # epoch -> highest revision reported

    def monotonic(r: shmcache.Reader, rev: int) -> None:
        epoch = r._v.epoch  # the epoch of the view that answered (internal: shmcache.reader.view)
        if rev < last_seen.get(epoch, 0):
            problems.append(f"reader {idx}: revision went back from {last_seen[epoch]} to {rev} "
                            f"in epoch {epoch}")
        last_seen[epoch] = max(rev, last_seen.get(epoch, 0))

    def answered_by(r: shmcache.Reader) -> int:
        """The etcd cluster the view that answered last was loaded from."""
        assert r._v.block is not None  # (internal: the block of that view)
        return r._v.block.cluster_id

    def settled(swaps_before: int, cid: int) -> bool:
        """No cluster swap ran since ``swaps_before``, and ``cid`` is the live cluster."""
        return swaps_before % 2 == 0 and swaps.value == swaps_before and cluster.value == cid

    def etcd_call(cid: int, fn: Any, *args: Any) -> Any:
        """etcd's answer, or UNVERIFIABLE if etcd compacted that history meanwhile, or if it
        is not cluster ``cid`` (the one the answer to check came from) that answered."""
        for _ in range(50):  # etcd may be down (a fault): retry, it comes back
            swaps_before = swaps.value
            try:
                out = fn(*args)
            except Exception as exc:
                if "compacted" in str(exc):
                    return UNVERIFIABLE
                time.sleep(0.2)
                continue
            return out if settled(swaps_before, cid) else UNVERIFIABLE
        return UNVERIFIABLE

    r: shmcache.Reader | None = None
    while not stop.is_set():
        flips_before = flips.value
        try:
            if r is None:
                r = shmcache.Reader(name, timeout=30)
            res = r.list(PREFIX)
            monotonic(r, res.revision)
            cid = answered_by(r)  # (the watch below goes on in the list's epoch, or raises)
            at_start = etcd_call(cid, etcd_range, client, PREFIX, res.revision)
            if at_start is not UNVERIFIABLE:
                if res.items != at_start:
                    problems.append(f"reader {idx}: list at {res.revision} differs from etcd "
                                    f"({len(res.items)} vs {len(at_start)} keys)")
                counts["lists"] += 1
            with r.watch(PREFIX, since_revision=res.revision) as w:
                got: list[shmcache.Event] = []
                deadline = time.monotonic() + rnd.uniform(0.2, 1.5)
                while time.monotonic() < deadline and not stop.is_set():
                    got.extend(w.poll(timeout=0.1))
                if got:
                    problem = verify_watch(idx, endpoint, res.revision, got, at_start,
                                           lambda fn, *a, cid=cid: etcd_call(cid, fn, *a))
                    if problem is not UNVERIFIABLE:
                        if problem is not None:
                            problems.append(str(problem))
                        counts["events"] += len(got)
            for _ in range(5):
                k = rnd.choice(KEYS)
                before = r.revision
                kv = r.get(k)
                after = r.revision
                monotonic(r, after)
                if before == after:
                    want_kv = etcd_call(answered_by(r), etcd_get, client, k, after)
                    if want_kv is not UNVERIFIABLE:
                        if kv != want_kv:
                            problems.append(f"reader {idx}: get {k!r} at {after}: {kv} != "
                                            f"{want_kv}")
                        counts["gets"] += 1
            # The index (--index top=segment:0): a by_index answer, now or at a past
            # revision, equals etcd's range at that revision filtered by the segment.
            top = rnd.choice([b"sub", b"bin", b"k007"])
            st = r.status()
            at = rnd.choice([None, rnd.randrange(st.oldest_watchable_revision,
                                                 st.revision + 1)])
            try:
                if indexed:
                    ires = r.by_index("top", top, revision=at)
                    want = etcd_call(answered_by(r), etcd_range, client, PREFIX, ires.revision)
                    if want is not UNVERIFIABLE:
                        want = [kv for kv in want
                                if kv.key[len(PREFIX):].split(b"/")[0] == top]
                        if ires.items != want:
                            problems.append(f"reader {idx}: by_index top={top!r} at "
                                            f"{ires.revision} differs from etcd")
                        counts["indexed"] += 1
            except shmcache.CompactedError:
                counts["explicit"] += 1
            if rnd.random() < 0.5:
                # A paginated listing (list, or by_index of the index): small pages read
                # while the workload writes on and faults strike, so the pages after the
                # first are reads at the first page's revision; together they equal etcd's
                # range at that revision.
                size = rnd.choice([1, 3, 7, 40])
                top = rnd.choice([b"sub", b"bin", b"k007", None] if indexed else [None])
                def read(tok: str | None, r: shmcache.Reader = r, size: int = size,
                         top: bytes | None = top) -> shmcache.ListResult:
                    if top is None:
                        return r.list(PREFIX, limit=size, continue_token=tok)
                    return r.by_index("top", top, limit=size, continue_token=tok)
                try:
                    page = read(None)
                    first_rev, items, cid = page.revision, list(page.items), answered_by(r)
                    while page.continue_token is not None and not stop.is_set():
                        time.sleep(rnd.choice([0, 0, 0.01, 0.05]))
                        page = read(page.continue_token)
                        if page.revision != first_rev:
                            problems.append(f"reader {idx}: a page at {page.revision}, the "
                                            f"first at {first_rev}")
                        items.extend(page.items)
                    if page.continue_token is None:
                        want = etcd_call(cid, etcd_range, client, PREFIX, first_rev)
                        if want is not UNVERIFIABLE:
                            if top is not None:
                                want = [kv for kv in want
                                        if kv.key[len(PREFIX):].split(b"/")[0] == top]
                            if items != want:
                                problems.append(
                                    f"reader {idx}: pages of {size} ({'list' if top is None else top}"
                                    f") at {first_rev} differ from etcd ({len(items)} vs "
                                    f"{len(want)} keys)")
                            counts["paged"] += 1
                except shmcache.CompactedError:
                    counts["explicit"] += 1
            if st.revision > st.oldest_watchable_revision:
                past = rnd.randrange(st.oldest_watchable_revision, st.revision + 1)
                try:
                    pres = r.list(PREFIX, revision=past)
                    want = etcd_call(answered_by(r), etcd_range, client, PREFIX, past)
                    if want is not UNVERIFIABLE:
                        if pres.items != want:
                            problems.append(f"reader {idx}: list at past revision {past} differs "
                                            f"from etcd")
                        counts["past"] += 1
                except shmcache.CompactedError:
                    counts["explicit"] += 1
            if rnd.random() < 0.3:
                swaps_before = swaps.value
                now = etcd_call(cluster.value, etcd_current_revision, client)
                if now is not UNVERIFIABLE:
                    try:
                        s = r.sync(timeout=5)
                        if settled(swaps_before, answered_by(r)):
                            if s < now:
                                problems.append(f"reader {idx}: sync returned {s} below "
                                                f"etcd's {now}")
                            counts["syncs"] += 1
                    except shmcache.TimeoutError:
                        counts["explicit"] += 1
            if rnd.random() < 0.05:  # detach and attach again
                r.close()
                r = None
        except (shmcache.CompactedError, shmcache.StaleError, shmcache.TimeoutError,
                shmcache.NotFoundError):
            counts["explicit"] += 1
        except shmcache.CorruptSegmentError as exc:
            if flips_before % 2 or flips.value != flips_before:
                counts["corrupt"] += 1  # a byte was flipped meanwhile: exact or an error
                time.sleep(0.01)  # (until it is restored: not a busy loop meanwhile)
            else:
                problems.append(f"reader {idx}: CorruptSegmentError with no byte flipped: "
                                f"{exc}")
        except Exception:
            problems.append(f"reader {idx}: unexpected {traceback.format_exc(limit=4)}")
            time.sleep(0.2)
        results.put((idx, dict(counts), list(problems)))
        problems.clear()
        counts = dict.fromkeys(counts, 0)
    if r is not None:
        r.close()
    client.close()


def victim_reader(name: str) -> None:
    """A reader that is killed in the middle of its reads."""
    r = shmcache.Reader(name, timeout=30)
    while True:
        r.list(PREFIX)
        for k in KEYS:
            r.get(k)


FAULTS = ["writer_kill", "writer_fault_point", "writer_stop_long", "etcd_kill",
          "etcd_unreachable", "compact_while_down", "reader_killed", "readers_attach_detach",
          "reader_close_thread", "reader_close_signal", "writer_enospc",
          "flip_ring", "flip_snapshot", "flip_overlay", "flip_index", "flip_control_block",
          "flip_control_prefix", "cluster_swap"]


def run(seconds: float, seed: int, readers: int = 3, ring_size: str = "256KiB",
        etcd_binary: str | None = None, fault_every: float = 2.0, log: Any = print,
        faults: list[str] | None = None,
        fault_points: tuple[str, ...] = ("append", "snapshot", "snapshot_publish"),
        step_limit: float = 30.0, indexed: bool = True, shm_full: bool = False) -> Report:
    """Run the workload, the readers and the fault injector; return what was verified.

    ``faults``: the kinds to draw from (default FAULTS); ``fault_points``: where a
    ``writer_fault_point`` writer kills itself (shmcache/writer/faults.py). A fault step
    that takes longer than ``step_limit`` seconds (a writer that has not reached its
    fault point, or not become ready, on a loaded machine) is a finding: the writer
    is restarted without faults and the run goes on. ``indexed``: the writer keeps the
    index ``top=segment:0`` (then it builds no overlay segments: ``flip_overlay`` needs
    ``indexed=False``). ``writer_enospc`` is skipped, and said so in the report, where
    this shmcache's SHMCACHE_FAULT has no ``enospc`` action. ``shm_full``: also fill
    /dev/shm for a while (fault ``dev_shm_full``, the run's first fault). Only where
    /dev/shm is this run's own tmpfs (the caller runs it in a mount namespace:
    test_consistency.py), never the host's.
    """
    rnd = random.Random(seed)
    report = Report(seed=seed, seconds=seconds)
    ctx = mp.get_context("spawn")
    name = f"chk-{os.getpid()}-{seed}"

    def fault(kind: str) -> None:
        report.faults[kind] = report.faults.get(kind, 0) + 1
        log(f"  fault: {kind}")

    swaps, cluster = ctx.Value("q", 0), ctx.Value("Q", 0)
    clusters = Clusters(etcd_binary, swaps, cluster)
    clusters.start()
    endpoint = clusters.live.endpoint  # (a cluster swap keeps it)
    with contextlib.closing(clusters):
        # The writer checks itself against etcd every 2 s meanwhile: under every fault
        # below it must never report a mismatch (a false alarm would relist for nothing).
        writer = WriterProcess(name, endpoint, PREFIX, ring_size=ring_size,
                               extra=["--verify-interval", "2"]
                               # Without indexes the writer builds overlay segments,
                               # every 128 KiB of records (_overlays.OVERLAY_BYTES): let
                               # that come before the next snapshot.
                               + (["--index", "top=segment:0"] if indexed
                                  else ["--snapshot-bytes", "192KiB"]))
        stop = ctx.Event()
        counter = ctx.Value("q", 0)
        flips = ctx.Value("q", 0)  # odd while a flipped byte is in a segment
        results = ctx.Queue()
        procs: list[Any] = []
        try:
            writer.start()
            wl = ctx.Process(target=workload, args=(endpoint, seed, stop, counter))
            wl.start()
            procs.append(wl)
            for i in range(readers):
                p = ctx.Process(target=reader_loop,
                                args=(name, endpoint, seed, stop, results, i, flips,
                                      indexed, swaps, cluster))
                p.start()
                procs.append(p)
            def start_writer() -> None:
                writer.start(wait=False)
                try:
                    writer.wait_ready(timeout=step_limit)
                except RuntimeError:
                    assert writer.proc is not None
                    if writer.proc.poll() is not None:
                        raise  # it exited: the run ends with its log kept
                    raise StepOverrun(f"the writer was not ready after {step_limit:.0f}s") from None

            def inject(kind: str) -> None:
                if kind == "writer_kill":
                    writer.kill()
                    time.sleep(rnd.uniform(0, 1))
                    start_writer()
                elif kind == "writer_fault_point":
                    # Let the writer SIGKILL itself inside an append or a snapshot publish.
                    writer.kill()
                    point = rnd.choice(fault_points)
                    # Appends come many a second, snapshots a few: a probability each that
                    # makes the writer die within seconds either way (a step that takes
                    # longer than step_limit is a finding, and costs the run its time).
                    prob = 0.05 if point == "append" else 0.5
                    writer.env = {"SHMCACHE_FAULT": f"{point}:{prob}"}
                    writer.start(wait=False)
                    assert writer.proc is not None
                    try:
                        writer.proc.wait(timeout=step_limit)  # dies at the fault point
                    except subprocess.TimeoutExpired:
                        raise StepOverrun(f"the writer had not reached fault point {point!r} "
                                          f"after {step_limit:.0f}s") from None
                    writer.env = {}
                    start_writer()
                elif kind == "writer_stop_long":
                    os.kill(writer.pid, signal.SIGSTOP)
                    time.sleep(rnd.uniform(1, 3))  # the workload overruns the small ring
                    os.kill(writer.pid, signal.SIGCONT)
                elif kind == "etcd_kill":
                    clusters.live.kill()
                    time.sleep(rnd.uniform(0, 1))
                    clusters.live.restart()
                elif kind == "etcd_unreachable":
                    clusters.live.pause()
                    time.sleep(rnd.uniform(0.5, 2))
                    clusters.live.resume()
                elif kind == "compact_while_down":
                    writer.kill()
                    time.sleep(0.5)
                    c = clusters.client()
                    try:
                        c.compact(etcd_current_revision(c), physical=True)
                    finally:
                        c.close()
                    start_writer()
                elif kind == "reader_killed":
                    v = ctx.Process(target=victim_reader, args=(name,))
                    v.start()
                    time.sleep(rnd.uniform(0.1, 0.5))
                    v.kill()
                    v.join()
                elif kind == "dev_shm_full":
                    checker_faults.fill_dev_shm(rnd.uniform(1, 3))
                elif kind == "readers_attach_detach":
                    for _ in range(10):
                        with shmcache.Reader(name, timeout=30) as r:
                            r.list(PREFIX)
                elif kind.startswith("reader_close_"):
                    # A Reader closed under its calls, from a thread or a signal handler.
                    report.divergences.extend(checker_faults.close_round(
                        ctx, name, endpoint, PREFIX, kind.rsplit("_", 1)[1],
                        rnd.randrange(1 << 30), indexed, results, step_limit + 60))
                elif kind.startswith("flip_"):
                    flips.value += 1
                    try:
                        got = checker_faults.flip_round(name, kind[len("flip_"):], clusters.client,
                                                        PREFIX, rnd)
                    finally:
                        flips.value += 1
                    if got is None:
                        report.no_segment[kind] = report.no_segment.get(kind, 0) + 1
                    else:
                        report.add(*got)
                elif kind == "cluster_swap":
                    # Another cluster, ahead in revision, behind the writer's etcd address.
                    report.add(*clusters.swap(name, PREFIX, writer.log_path, step_limit, rnd))
                    report.swaps_ahead = clusters.ahead
                elif kind == "writer_enospc":
                    # Publishing fails for lack of space at some steps, part of the time:
                    # readers keep exact answers and the cache still catches up with etcd.
                    writer.kill()
                    writer.env = {"SHMCACHE_FAULT": checker_faults.enospc_spec(rnd)}
                    start_writer()
                    time.sleep(rnd.uniform(2, 5))  # (a snapshot every few seconds)
                    report.divergences.extend(checker_faults.catches_up(
                        name, clusters.client, step_limit, writer.env["SHMCACHE_FAULT"]))
                    writer.kill()
                    writer.env = {}
                    start_writer()

            t_end = time.monotonic() + seconds
            kinds = list(faults or FAULTS) + (["dev_shm_full"] if shm_full else [])
            for kind, why in checker_faults.unsupported(kinds, indexed).items():
                kinds.remove(kind)
                report.skipped.append(f"{kind} skipped: {why}")
                log(f"  {kind} skipped: {why}")
            # Asked for on its own (shm_full), a full /dev/shm comes first, so that every
            # run has it however the draws fall.
            first = ["dev_shm_full"] if shm_full else []
            while time.monotonic() < t_end:
                time.sleep(rnd.uniform(0.5, fault_every))
                kind = first.pop() if first else rnd.choice(kinds)
                fault(kind)
                t0 = time.monotonic()
                try:
                    inject(kind)
                except StepOverrun as exc:
                    report.findings.append(f"fault {kind} overran: {exc}; the writer was "
                                           "restarted without faults")
                    writer.kill()
                    writer.env = {}
                    writer.start()
                else:
                    took = time.monotonic() - t0
                    if took > step_limit:
                        report.findings.append(f"fault {kind} took {took:.0f}s, more than "
                                               f"{step_limit:.0f}s")
                _collect(results, report)
            stop.set()
            for p in procs:
                p.join(timeout=30)
                if p.is_alive():
                    p.kill()
                    p.join()
            _collect(results, report)
            # The cache ends equal to etcd.
            c = clusters.client()
            try:
                rev = etcd_current_revision(c)
                with shmcache.Reader(name, timeout=30) as r:
                    if not r.wait(rev, timeout=30):
                        report.divergences.append(f"cache stuck at {r.revision} < {rev}")
                    res = r.list(PREFIX)
                    if res.items != etcd_range(c, PREFIX, res.revision):
                        report.divergences.append("final list differs from etcd")
                    report.lists_verified += 1
            except shmcache.ShmCacheError as exc:
                from shmcache.cli import check as _check
                from shmcache.ipc import shm as _shm

                facts, problems = _check.check_cache(name)
                report.divergences.append(
                    f"final read failed: {exc}; segments {_shm.list_segments(name)}; check: "
                    f"{facts} {problems}; writer log:\n{writer.log()[-3000:]}")
            finally:
                c.close()
            log(f"  workload wrote {counter.value} operations")
            with open(writer.log_path, errors="replace") as f:
                whole_log = f.read()
            if "verification failed" in whole_log:
                report.divergences.append("the writer's check against etcd found a mismatch: "
                                          + whole_log[whole_log.index("verification failed"):][:500])
            report.divergences.extend(checker_faults.log_divergences(whole_log))
            report.enospc_logged = whole_log.count("[Errno 28]")
        except Exception:  # (a writer that exited, etcd that would not restart): report it
            report.divergences.append(f"the run aborted: {traceback.format_exc(limit=4)}")
        finally:
            stop.set()
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join()
            if report.findings or report.divergences:
                # (writer.close() deletes the log)
                report.kept_log = f"/tmp/shmcache-checker-{name}.log"
                shutil.copyfile(writer.log_path, report.kept_log)
            writer.close()
    return report


def _collect(results: Any, report: Report) -> None:
    while True:
        try:
            _idx, counts, problems = results.get_nowait()
        except queue.Empty:
            return
        report.add(counts, problems)
