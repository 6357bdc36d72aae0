"""The cost of one page of a paginated list or by_index, by offset, key count and writes.

    python bench/page_cost.py [--keys 100000,1000000] [--limits 100,1000] [--rounds 5]
                              [--writes 200,2000,20000] [--json bench/results/page-cost.json]

For each key count n (default 100k and 1M, in one etcd under their own prefixes)
loads n pod-like JSON values (bench/_pods.py: ``metadata.namespace`` one of 10,
so the value ``ns-3`` has n/10 keys spread over the whole range) into a
throwaway etcd (--unsafe-no-fsync) and starts two writers on that prefix: one
with ``--index node=json:/spec/nodeName --index ns=json:/metadata/namespace``,
one without indexes (such a writer also publishes the keys changed since the
snapshot as overlay segments; a writer with indexes keeps them in ring records
only). Both run with ``--snapshot-interval 3600 --snapshot-bytes 48MiB`` so
that keys written later stay "changed since the snapshot" for the whole run
(with the defaults, 30 s or 16 MiB of records, a writer folds them into a new
snapshot sooner). Then, in this one process, for page sizes N (default 100 and
1000):

- ``list(range, limit=N, continue_token=tok)`` from each of the two caches, where
  tok is the token after the first 1,000 keys ("start"), after n/2 ("middle")
  and after n - 1,000 ("end"), and the first page (offset 0, no token);
- ``by_index("ns", "ns-3", limit=N, continue_token=tok)`` likewise at offsets
  1,000, n/20 and n/10 - 1,000 of its run of n/10 keys;
- for contrast (N = 100, idle phase only), what a page at an offset costs without
  a token: ``list(range, limit=offset+N)`` keeping the last N.

Tokens come from paging through the whole range (and run) once with
``limit=1000`` (a token holds the revision and the last key, not the page size,
so one walk serves every N); the walk is timed too (CPU per page over all pages).
The same token is read again on every call. Phases:

1. idle: the snapshot holds every key, nothing changed since;
2. for each count W in --writes (cumulative): W keys rewritten (one etcd revision
   each, same node and namespace, so index membership is unchanged), then
   (a) "W keys changed since the snapshot": tokens taken afresh at the new
   revision, so pages read the snapshot plus W overlay entries; (b) "token W
   revisions old": the idle phase's tokens, now W revisions behind, so every
   page is a read at a past revision (what a client paging while the writer
   takes writes gets). Every page is first checked against the page read with
   the same token when it was made. A reader keeps what changed after the
   revisions it read at recently (its undo maps, docs/design.md "Reads at a
   past revision"), so repeated pages at one revision cost what the page
   needs; "first page at that revision" rows (N = min --limits, offset start)
   forget the maps before each call: the cost of the first past page in a
   process, which reads every ring record after the revision once.

Every measurement is a batch of calls (as many as take about 50 ms, at least
one): CPU time per call is time.process_time around the batch (median and range
over --rounds rounds), wall time is each call timed (p50/p99 over every call).
Within a phase the rounds interleave all key counts, page sizes, offsets and
kinds, the order rotating each round; the script's own heap is frozen out of
the garbage collector's passes (gc.freeze) meanwhile. Seeded (--seed). The
JSON is written only if every step succeeded (temporary file, then rename),
stamped with the machine (bench/_common.stamp) and etcd's version.
Default run: 7.3-9.2 minutes measured here on 2 shared cores, of which loading
1.1M keys into etcd and the 1M writers' first snapshots take 2-3.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import shmcache  # noqa: E402
from bench._common import pct, stamp, write_json  # noqa: E402
from bench._pods import (  # noqa: E402
    NAMESPACES,
    CpuMeter,
    library_facts,
    load,
    pod_key,
    pod_value,
    put_each,
    timed,
)
from tests.etcdserver import EtcdServer  # noqa: E402
from tests.helpers import WriterProcess  # noqa: E402

NS = "ns-3"  # n/10 keys: pods 3, 13, 23, ...


def prefix_of(n: int) -> bytes:
    return b"/bench/pages/n%d/" % n


def name_of(n: int) -> str:
    return f"bench-pages-{n}"


def calibrate(fn: Callable[[], Any], budget_s: float = 0.05) -> int:
    """Calls per batch: about ``budget_s`` of work (at least 1, at most 2000)."""
    fn()
    t0 = time.perf_counter()
    for _ in range(3):
        fn()
    per = (time.perf_counter() - t0) / 3
    return max(1, min(2000, int(budget_s / per) if per > 0 else 2000))


WALK = 1000  # page size of the walk that collects the tokens


class Cache:
    """One key count: readers of its two caches, and where its pages start."""

    def __init__(self, n: int, reader: shmcache.Reader, plain: shmcache.Reader) -> None:
        self.n = n
        self.r = reader  # the cache with secondary indexes
        self.plain = plain  # the same keys, a writer without indexes
        self.prefix = prefix_of(n)
        self.run = n // NAMESPACES

    def offsets(self, kind: str) -> dict[str, int]:
        total = self.run if kind == "by_index" else self.n
        return {"start": WALK, "middle": total // 2 // WALK * WALK, "end": total - WALK}

    def read(self, kind: str) -> Callable[[int, str | None], Any]:
        if kind == "by_index":
            return lambda limit, tok: self.r.by_index("ns", NS, limit=limit, continue_token=tok)
        r = self.r if kind == "list" else self.plain
        return lambda limit, tok: r.list(self.prefix, limit=limit, continue_token=tok)


# "list" reads the cache with indexes (whose writer keeps the keys changed since the
# snapshot in ring records only), "list, no indexes" the same keys from a writer without
# indexes (which also publishes them as overlay segments every 128 KiB of records).
KINDS = ("list", "list, no indexes", "by_index")
Tokens = dict[tuple[int, str], dict[str, str]]
Pages = dict[tuple[int, str, int, str], list[Any]]


def page_through(read: Callable[[int, str | None], Any], offsets: dict[str, int],
                 expect: list[bytes]) -> tuple[dict[str, str], dict[str, Any]]:
    """Read every page of WALK keys; the token at each wanted offset, and the walk's cost.
    Checks that the pages together are ``expect``, in order."""
    want = {off: label for label, off in offsets.items()}
    found: dict[str, str] = {}
    n_keys = 0
    pages = 0
    ok = True
    cpu = wall = 0.0
    tok: str | None = None
    while True:
        # Only the read is timed, not the check of its page.
        c0, t0 = time.process_time(), time.perf_counter()
        res = read(WALK, tok)
        cpu += time.process_time() - c0
        wall += time.perf_counter() - t0
        pages += 1
        ok = ok and [kv.key for kv in res.items] == expect[n_keys:n_keys + len(res.items)]
        n_keys += len(res.items)
        tok = res.continue_token
        if tok is None:
            break
        if n_keys in want:
            found[want[n_keys]] = tok
    if not ok or n_keys != len(expect):
        raise AssertionError(f"paging returned {n_keys} keys, not the {len(expect)} expected")
    return found, {"pages": pages, "keys_read": n_keys, "cpu_s": cpu, "wall_s": wall,
                   "cpu_us_per_page": cpu / pages * 1e6}


def measure(ops: list[tuple[dict[str, Any], Callable[[], Any]]], rounds: int,
            meter_label: str, results: list[dict[str, Any]], foreign: dict[str, float]) -> None:
    """Interleaved rounds of every op (rotating order); one result row per op."""
    # The bench's own heap (expected key lists, tokens, pages) out of the collector's
    # full passes: what a page costs should not depend on what this script holds.
    gc.collect()
    gc.freeze()
    counts = [calibrate(fn) for _row, fn in ops]
    walls: list[list[float]] = [[] for _ in ops]
    cpus: list[list[float]] = [[] for _ in ops]
    meter = CpuMeter()
    order = list(range(len(ops)))
    for rd in range(rounds):
        shift = rd * max(1, len(order) // rounds) % len(order)
        for j in order[shift:] + order[:shift]:
            ws, cpu = timed(ops[j][1], counts[j])
            walls[j].extend(ws)
            cpus[j].append(cpu)
    foreign[meter_label] = meter.foreign_cores()
    gc.unfreeze()
    for j, (row, _fn) in enumerate(ops):
        results.append({**row, "calls_per_round": counts[j],
                        "cpu_us": statistics.median(cpus[j]),
                        "cpu_us_range": [min(cpus[j]), max(cpus[j])],
                        "wall_us": {"p50": pct(walls[j], 50), "p99": pct(walls[j], 99)}})


def page_ops(phase: str, caches: list[Cache], limits: list[int], tokens: Tokens,
             pages: Pages | None) -> list[tuple[dict[str, Any], Callable[[], Any]]]:
    """One op per key count, kind, page size and offset, reading its token's page.
    ``pages``: what each page must hold (read when its token was made), checked first."""
    ops: list[tuple[dict[str, Any], Callable[[], Any]]] = []
    for c in caches:
        for limit in limits:
            for kind in KINDS:
                read = c.read(kind)
                if phase == "idle":
                    ops.append(({"phase": phase, "keys": c.n, "kind": kind, "limit": limit,
                                 "offset": "0 (first page)", "offset_keys": 0},
                                (lambda rd=read, lim=limit: rd(lim, None))))
                for label, off in c.offsets(kind).items():
                    tok = tokens[(c.n, kind)][label]
                    if pages is not None:
                        got = read(limit, tok).items
                        if got != pages[(c.n, kind, limit, label)] or len(got) != limit:
                            raise AssertionError(f"{phase} {c.n} {kind} {limit} {label}: page "
                                                 f"differs from the page at the token's revision")
                    ops.append(({"phase": phase, "keys": c.n, "kind": kind, "limit": limit,
                                 "offset": label, "offset_keys": off},
                                (lambda rd=read, lim=limit, t=tok: rd(lim, t))))
    return ops


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keys", default="100000,1000000",
                    help="comma-separated key counts, each a multiple of 100 (default %(default)s)")
    ap.add_argument("--limits", default="100,1000", help="page sizes (default %(default)s)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--writes", default="200,2000,20000",
                    help="cumulative counts of keys rewritten after the idle phase ('' for none)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    sizes = [int(x) for x in args.keys.split(",")]
    limits = [int(x) for x in args.limits.split(",")]
    writes = [int(x) for x in args.writes.split(",") if x]
    if any(n < 40 * WALK or n % (NAMESPACES * WALK) for n in sizes):
        ap.error(f"--keys: each count a multiple of {NAMESPACES * WALK}, at least {40 * WALK}")
    if any(lim < 1 or lim > WALK for lim in limits):
        ap.error(f"--limits: each page size from 1 to {WALK}")
    if writes != sorted(writes) or any(w > min(sizes) for w in writes):
        ap.error("--writes: increasing, each at most the smallest key count")
    rnd = random.Random(args.seed)
    t_start = time.monotonic()
    lib = library_facts()  # what this run measures; must not change under it
    machine = stamp()
    results: list[dict[str, Any]] = []
    walks: list[dict[str, Any]] = []
    foreign: dict[str, float] = {}
    setup: dict[str, Any] = {}
    ring_used: dict[str, Any] = {}
    writers: list[WriterProcess] = []
    readers: list[shmcache.Reader] = []
    with EtcdServer(extra_args=["--unsafe-no-fsync", "--quota-backend-bytes",
                                str(8 << 30)]) as etcd:
        client = etcd.api_client()
        try:
            caches: list[Cache] = []
            for n in sizes:
                t0 = time.perf_counter()
                last = load(client, prefix_of(n), n, n // 100)
                load_s = time.perf_counter() - t0
                print(f"loaded {n} keys in {load_s:.1f}s", file=sys.stderr)
                snap_args = ["--snapshot-interval", "3600", "--snapshot-bytes", "48MiB",
                             "--verify-interval", "0"]
                t0 = time.perf_counter()
                w = WriterProcess(name_of(n), etcd.endpoint, prefix_of(n), ring_size="64MiB",
                                  extra=["--index", "node=json:/spec/nodeName",
                                         "--index", "ns=json:/metadata/namespace", *snap_args])
                writers.append(w)
                w.start(wait=False)
                w.wait_ready(timeout=1800)
                r = shmcache.Reader(name_of(n), timeout=600)
                readers.append(r)
                assert r.wait(last, timeout=1800)
                # Map the index segment now and keep it mapped: an unmapped segment can be
                # taken for a leak by the cleanup of a test session ending on this host
                # (tests/conftest.py reads "NAME.idx.N" as a cache named "NAME.idx").
                assert len(r.by_index("ns", NS, limit=1)) == 1
                ready_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                wp = WriterProcess(name_of(n) + "-plain", etcd.endpoint, prefix_of(n),
                                   ring_size="64MiB", extra=snap_args)
                writers.append(wp)
                wp.start(wait=False)
                wp.wait_ready(timeout=1800)
                rp = shmcache.Reader(name_of(n) + "-plain", timeout=600)
                readers.append(rp)
                assert rp.wait(last, timeout=1800)
                plain_s = time.perf_counter() - t0
                print(f"writers of {n} keys ready in {ready_s:.1f}s (indexes), {plain_s:.1f}s "
                      f"(none)", file=sys.stderr)
                setup[str(n)] = {"load_s": load_s, "writer_ready_s": ready_s,
                                 "plain_writer_ready_s": plain_s, "revision": last}
                caches.append(Cache(n, r, rp))
            expect_list = {c.n: sorted(pod_key(c.prefix, i) for i in range(c.n)) for c in caches}
            expect_run = {c.n: sorted(pod_key(c.prefix, i) for i in range(3, c.n, NAMESPACES))
                          for c in caches}

            def take_tokens(phase: str) -> tuple[Tokens, Pages]:
                toks: Tokens = {}
                pages: Pages = {}
                for c in caches:
                    for kind in KINDS:
                        expect = expect_run[c.n] if kind == "by_index" else expect_list[c.n]
                        toks[(c.n, kind)], walk = page_through(c.read(kind), c.offsets(kind),
                                                               expect)
                        walks.append({"phase": phase, "keys": c.n, "kind": kind,
                                      "limit": WALK, **walk})
                        for limit in limits:
                            for label, tok in toks[(c.n, kind)].items():
                                pages[(c.n, kind, limit, label)] = c.read(kind)(limit, tok).items
                return toks, pages

            # 1. idle
            idle_tokens, idle_pages = take_tokens("idle")
            ops = page_ops("idle", caches, limits, idle_tokens, None)
            small = min(limits)
            for c in caches:
                for label, off in c.offsets("list").items():
                    def skip(c: Cache = c, off: int = off) -> Any:
                        return c.r.list(c.prefix, limit=off + small).items[-small:]
                    if skip() != idle_pages[(c.n, "list", small, label)]:
                        raise AssertionError("list(limit=offset+N)[-N:] is not the token's page")
                    ops.append(({"phase": "idle", "keys": c.n,
                                 "kind": "list(limit=offset+N)[-N:], no token", "limit": small,
                                 "offset": label, "offset_keys": off}, skip))
            measure(ops, args.rounds, "idle", results, foreign)
            print("idle phase done", file=sys.stderr)

            # 2. writes
            snap_revs = {(c.n, i): r.status().snapshot_revision
                         for c in caches for i, r in enumerate((c.r, c.plain))}
            order = {c.n: rnd.sample(range(c.n), max(writes, default=0)) for c in caches}
            done = 0
            for w_count in writes:
                for c in caches:
                    idx = order[c.n][done:w_count]
                    rev = put_each(client, [(pod_key(c.prefix, i), pod_value(i, c.n // 100, 1))
                                            for i in idx])
                    assert c.r.wait(rev, timeout=600) and c.plain.wait(rev, timeout=600)
                done = w_count
                for c in caches:
                    for r in (c.r, c.plain):
                        v = r._view  # (internal, for the record: what a page has to merge)
                        ring_used[f"{r.name}, {w_count} writes"] = {
                            "ring_bytes": r.status().ring_used,
                            "private_overlay_keys": len(v.recent),
                            "overlay_segment_seq": getattr(v, "ovl_seq", None)}
                phase = f"{w_count} keys changed since the snapshot"
                fresh, fresh_pages = take_tokens(phase)
                measure(page_ops(phase, caches, limits, fresh, fresh_pages), args.rounds, phase,
                        results, foreign)
                phase = f"token {w_count} revisions old"
                ops = page_ops(phase, caches, limits, idle_tokens, idle_pages)
                for c in caches:
                    # The first page at that revision in a process: the undo map is read
                    # from the ring (every record after the revision), then kept for the
                    # pages after it. Forgotten before each call and put back after it
                    # (internal: View.undos), so that the other rows keep theirs.
                    for kind in KINDS:
                        def cold(c: Cache = c, kind: str = kind) -> Any:
                            v = (c.plain if kind == "list, no indexes" else c.r)._view
                            kept = v.undos[:]
                            v.undos.clear()
                            try:
                                return c.read(kind)(small, idle_tokens[(c.n, kind)]["start"])
                            finally:
                                v.undos[:] = kept
                        ops.append(({"phase": phase, "keys": c.n,
                                     "kind": f"{kind}, first page at that revision",
                                     "limit": small, "offset": "start",
                                     "offset_keys": c.offsets(kind)["start"]}, cold))
                measure(ops, args.rounds, phase, results, foreign)
                for (n, i), rev0 in snap_revs.items():
                    c = next(c for c in caches if c.n == n)
                    if (c.r, c.plain)[i].status().snapshot_revision != rev0:
                        raise AssertionError(f"a writer of {n} keys republished its snapshot: "
                                             f"the figures after writes are not what they say")
                print(f"{w_count} writes done", file=sys.stderr)
            etcd_version = etcd.version
        finally:
            for r in readers:
                r.close()
            for w in writers:
                w.close()
            client.close()
    if library_facts() != lib:
        raise RuntimeError(f"the shmcache library changed during the run ({lib} -> "
                           f"{library_facts()}): figures not written")
    out = dict(machine, library=lib, benchmark="page_cost", keys=sizes, limits=limits,
               rounds=args.rounds, writes=writes, seed=args.seed, index_value=NS,
               token_walk_page=WALK, etcd=etcd_version, setup=setup,
               ring_used_after_writes=ring_used, total_s=time.monotonic() - t_start,
               foreign_cpu_cores=foreign, pages=results, walks=walks)
    report(out)
    if args.json:
        write_json(args.json, out)
    return 0


def report(out: dict[str, Any]) -> None:
    print(f"medians of {out['rounds']} interleaved rounds; other processes used "
          f"{out['foreign_cpu_cores']} cores")
    phase = None
    for row in out["pages"]:
        if row["phase"] != phase:
            phase = row["phase"]
            print(f"\n{phase}\n  {'keys':>8} {'kind':<38} {'N':>5} {'offset':>16} "
                  f"{'CPU µs':>10} {'range':>21} {'wall p50':>9} {'p99':>9}")
        lo, hi = row["cpu_us_range"]
        off = f"{row['offset']}" if row["offset"].startswith("0") else \
            f"{row['offset']} {row['offset_keys']}"
        print(f"  {row['keys']:>8} {row['kind']:<38} {row['limit']:>5} {off:>16} "
              f"{row['cpu_us']:>10.1f} {f'({lo:.1f}–{hi:.1f})':>21} "
              f"{row['wall_us']['p50']:>9.1f} {row['wall_us']['p99']:>9.1f}")
    print("\nwhole walks (every page once):")
    for wk in out["walks"]:
        print(f"  {wk['phase']:<36} {wk['keys']:>8} {wk['kind']:<16} {wk['keys_read']:>8} keys "
              f"in {wk['pages']:>5} pages of {wk['limit']}: {wk['cpu_us_per_page']:>8.1f} µs "
              f"CPU/page")
    print(f"total {out['total_s']:.0f}s")


if __name__ == "__main__":
    sys.exit(main())
