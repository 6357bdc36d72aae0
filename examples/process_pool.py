#!/usr/bin/env python3
"""Read a cache from worker pools: multiprocessing (spawn and fork) and ProcessPoolExecutor.

Shows: pass the cache *name* to workers and attach there (one Reader per
worker process, kept in a global by the pool initializer); a Reader created
before fork() also keeps working in forked children; and passing a Reader
itself to a worker fails at once with a clear TypeError, because it cannot be
pickled.

Run it against the demo (it prints its cache name, e.g. 'demo-12345'):

    shmcache demo --duration 300 &
    python examples/process_pool.py --cache demo-12345 --prefix /demo/key/000

or against your own writer: python examples/process_pool.py --cache mycache --prefix /registry/
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
from concurrent.futures import ProcessPoolExecutor

import shmcache

_reader: shmcache.Reader | None = None  # one per worker process


def attach(name: str) -> None:
    """Pool initializer: runs once in every worker process."""
    global _reader
    _reader = shmcache.Reader(name)


def lookup(key: bytes) -> tuple[int, shmcache.KeyValue | None]:
    assert _reader is not None, "attach() did not run in this worker"
    return os.getpid(), _reader.get(key)


def lookup_inherited(key: bytes) -> tuple[int, shmcache.KeyValue | None]:
    # Forked children inherit the parent's Reader (the global set before the pool forked).
    return lookup(key)


def use_reader(r: shmcache.Reader) -> int:  # never runs: the Reader cannot be pickled
    return r.revision


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", required=True, help="cache name (as given to `shmcache serve`)")
    ap.add_argument("--prefix", default="", help="look up the keys under this prefix")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()

    with shmcache.Reader(args.cache) as r:
        res = r.list(args.prefix, limit=50)
        keys = [kv.key for kv in res.items]
        want = {kv.key: kv for kv in res.items}
        print(f"{len(keys)} keys under {args.prefix!r} at revision {res.revision}")

        def check(label: str, results: list[tuple[int, shmcache.KeyValue | None]]) -> bool:
            # Keys may change after the list (workers attached later): an answer must be
            # the listed version, a newer one, or None (deleted since).
            consistent = all(
                kv is None or kv.mod_revision > want[key].mod_revision or kv == want[key]
                for key, (_pid, kv) in zip(keys, results, strict=False))
            pids = {pid for pid, _kv in results}
            ok = consistent and len(results) == len(keys) and os.getpid() not in pids
            print(f"{label}: {len(results)} lookups in {len(pids)} worker processes, "
                  f"all consistent with the list: {ok}")
            return ok

        ok = True
        # 1. multiprocessing.Pool with spawn (also the default on macOS, and on Linux
        #    from Python 3.14): fresh interpreters, the initializer attaches by name.
        with mp.get_context("spawn").Pool(args.workers, initializer=attach,
                                          initargs=(args.cache,)) as pool:
            ok &= check("multiprocessing spawn pool", pool.map(lookup, keys))
        # 2. ProcessPoolExecutor, same pattern.
        with ProcessPoolExecutor(args.workers, mp_context=mp.get_context("spawn"),
                                 initializer=attach, initargs=(args.cache,)) as ex:
            ok &= check("ProcessPoolExecutor (spawn)", list(ex.map(lookup, keys)))
        # 3. fork: a Reader made before the fork keeps working in the children.
        global _reader
        _reader = r
        with mp.get_context("fork").Pool(args.workers) as pool:
            ok &= check("multiprocessing fork pool, inherited Reader",
                        pool.map(lookup_inherited, keys))
        _reader = None
        # 4. The mistake: handing the Reader itself to a worker.
        with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as ex:
            try:
                ex.submit(use_reader, r).result(timeout=30)
                print("passing a Reader to a worker: no error (unexpected)")
                ok = False
            except TypeError as exc:
                print(f"passing a Reader to a worker: TypeError: {exc}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
