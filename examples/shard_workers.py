#!/usr/bin/env python3
"""A pre-fork worker pool in which each of N workers owns one shard of the keys.

Shows: ``list(prefix, shard=(i, n))`` and ``watch(prefix, since_revision=...,
shard=(i, n))``, the pattern of sharded controllers, queue consumers and
per-tenant reconcilers: worker i keeps an in-memory copy of exactly the keys
with ``zlib.crc32(key) % n == i`` and is handed only their events, so the
workers together see every key and every change exactly once, and none of them
pays for the others' keys. The parent forks the workers first, and each one
attaches its own Reader (after fork, as a pre-fork server's workers do).

Run it against the demo (it prints its cache name, e.g. 'demo-12345'):

    shmcache demo --duration 300 &
    python examples/shard_workers.py --cache demo-12345 --prefix /demo/ --workers 4 --events 20

or against your own writer: python examples/shard_workers.py --cache mycache --prefix /registry/
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import queue
import sys
import zlib
from typing import Any

import shmcache


def worker(cache: str, prefix: str, i: int, n: int, out: Any, stop: Any) -> None:
    """Own shard i of n: list it, then follow its events until told to stop."""
    with shmcache.Reader(cache) as r:
        res = r.list(prefix, shard=(i, n))
        mirror = {kv.key: kv for kv in res}
        out.put(("ready", i, len(mirror), res.revision))
        with r.watch(prefix, since_revision=res.revision, shard=(i, n)) as w:
            while not stop.is_set():
                for ev in w.poll(timeout=0.2):
                    key = ev.kv.key
                    if zlib.crc32(key) % n != i:
                        out.put(("foreign", i, key.decode(errors="replace"), ev.revision))
                    if ev.type == "PUT":
                        mirror[key] = ev.kv
                    else:
                        mirror.pop(key, None)
                    out.put(("event", i, f"{ev.type} {key.decode(errors='replace')}",
                             ev.revision))
            rev = w.revision
        # The copy equals the shard as etcd had it at the watch's revision.
        same = mirror == {kv.key: kv for kv in r.list(prefix, shard=(i, n), revision=rev)}
        out.put(("done", i, len(mirror), rev, same))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", required=True, help="cache name (as given to `shmcache serve`)")
    ap.add_argument("--prefix", default="", help="the keys the pool shares out")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--events", type=int, default=20,
                    help="stop once the workers together have seen this many events")
    args = ap.parse_args()
    n = args.workers

    ctx = mp.get_context("fork")  # pre-fork: the workers start before any Reader exists
    out = ctx.Queue()
    stop = ctx.Event()
    procs = [ctx.Process(target=worker, args=(args.cache, args.prefix, i, n, out, stop))
             for i in range(n)]
    for p in procs:
        p.start()
    ok = True
    try:
        owned = 0
        for _ in range(n):
            _kind, i, count, rev = out.get(timeout=30)
            owned += count
            print(f"worker {i} owns {count} keys at revision {rev}", flush=True)
        print(f"pool ready: {n} workers, {owned} keys", flush=True)
        seen = 0
        while seen < args.events:
            msg = out.get(timeout=60)
            if msg[0] == "foreign":
                print(f"worker {msg[1]} got {msg[2]} of another shard", flush=True)
                ok = False
            elif msg[0] == "event":
                seen += 1
                print(f"worker {msg[1]}: {msg[2]} (revision {msg[3]})", flush=True)
        stop.set()
        done = 0
        while done < n:
            msg = out.get(timeout=30)
            if msg[0] == "event":
                print(f"worker {msg[1]}: {msg[2]} (revision {msg[3]})", flush=True)
            elif msg[0] == "done":
                done += 1
                _kind, i, count, rev, same = msg
                ok &= same
                print(f"worker {i}: {count} keys, equal to shard {i}/{n} at revision {rev}: "
                      f"{same}", flush=True)
    except queue.Empty:
        print("a worker did not answer in time", flush=True)
        ok = False
    finally:
        stop.set()
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()
    return 0 if ok and all(p.exitcode == 0 for p in procs) else 1


if __name__ == "__main__":
    sys.exit(main())
