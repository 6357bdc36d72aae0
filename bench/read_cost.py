"""CPU time of one get and one list(prefix of 100), in one process, beside the alternatives.

    python bench/read_cost.py [--keys 10000,100000,1000000] [--rounds 5] [--json PATH]

For each key count: a throwaway etcd (--unsafe-no-fsync) loaded with keys of the
bench layout (bench/_common.key/value: 256-byte values), a writer, and in this
process, side by side in interleaved rounds:

- shmcache: ``Reader.get(key)`` and ``Reader.list(prefix of 100)``;
- an in-process dict: ``dict.get`` and, for ranges, a SortedDict's
  ``irange`` with a ``(key, value)`` pair per entry (bench/_workers.py's "dict");
- py-lmdb: a read transaction per get, and a cursor walk per list (the same
  data written to a temporary LMDB environment).

Each figure is CPU time (time.process_time) per operation over a timed batch,
median over rounds; the ratios are the issue's targets (list within 2x of the
dict, get at least 1.5x faster than py-lmdb). Needs the bench extra (lmdb). The
JSON is written only if every step succeeded.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

PREFIX = b"/bench/read/"


def per_op_us(f: Callable[[Any], Any], args: list[Any], n: int) -> float:
    c0 = time.process_time()
    for i in range(n):
        f(args[i % len(args)])
    return (time.process_time() - c0) / n * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", default="10000,100000,1000000")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", default=None, metavar="PATH")
    args = ap.parse_args()

    import lmdb
    from sortedcontainers import SortedDict

    import shmcache
    from bench._common import key, load_etcd, stamp, value, write_json
    from tests.etcdserver import EtcdServer
    from tests.helpers import WriterProcess

    results: dict[str, Any] = {}
    for n in [int(x) for x in args.keys.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            server = EtcdServer(data_dir=os.path.join(tmp, "etcd"),
                                extra_args=["--unsafe-no-fsync", "--quota-backend-bytes",
                                            str(8 << 30)])
            server.start()
            w = WriterProcess(f"bench-read-{n}", server.endpoint, PREFIX, ring_size="64MiB")
            env = None
            try:
                client = server.api_client()
                load_etcd(client, PREFIX, n)
                client.close()
                w.start(wait=False)
                w.wait_ready(timeout=900)  # a 1M-key list takes minutes here
                r = shmcache.Reader(w.name)
                assert r.wait(1, 5)
                while r.status().key_count < n:
                    time.sleep(0.2)
                d = {key(PREFIX, i): value(i) for i in range(n)}
                sd = SortedDict(d)
                env = lmdb.open(os.path.join(tmp, "lmdb"), map_size=4 << 30)
                with env.begin(write=True) as txn:
                    for k, v in sd.items():
                        txn.put(k, v)
                rng = random.Random(1)
                keys = [key(PREFIX, rng.randrange(n)) for _ in range(10_000)]
                # "prefix of 100": key(PREFIX, i) = PREFIX + b"k/%07d", so 5 digits name 100.
                prefixes = [PREFIX + b"k/%05d" % rng.randrange(n // 100) for _ in range(1_000)]
                begin = env.begin

                def lmdb_get(k: bytes, begin: Any = begin) -> Any:
                    with begin() as txn:
                        return txn.get(k)

                def lmdb_list(pfx: bytes, begin: Any = begin) -> list[tuple[bytes, bytes]]:
                    out = []
                    with begin() as txn:
                        cur = txn.cursor()
                        if cur.set_range(pfx):
                            for k, v in cur:
                                if not k.startswith(pfx):
                                    break
                                out.append((k, v))
                    return out

                def dict_list(pfx: bytes, sd: Any = sd) -> list[tuple[bytes, bytes]]:
                    end = pfx[:-1] + bytes([pfx[-1] + 1])
                    return [(k, sd[k]) for k in sd.irange(pfx, end, inclusive=(True, False))]

                assert len(r.list(prefixes[0]).items) == len(dict_list(prefixes[0])) == \
                    len(lmdb_list(prefixes[0])) == 100
                assert r.get(keys[0]).value == d.get(keys[0]) == lmdb_get(keys[0])  # type: ignore[union-attr]
                cases = {"shmcache get": (r.get, keys, 100_000),
                         "dict get": (d.get, keys, 100_000),
                         "lmdb get": (lmdb_get, keys, 100_000),
                         "shmcache list100": (r.list, prefixes, 3_000),
                         "dict list100": (dict_list, prefixes, 3_000),
                         "lmdb list100": (lmdb_list, prefixes, 3_000)}
                rows: dict[str, list[float]] = {c: [] for c in cases}
                for _ in range(args.rounds):
                    for c, (f, a, reps) in cases.items():
                        rows[c].append(per_op_us(f, a, reps))
                med = {c: statistics.median(v) for c, v in rows.items()}
                results[str(n)] = {"cpu_us_per_op": med, "rounds": rows,
                                   "list_vs_dict": med["shmcache list100"] / med["dict list100"],
                                   "lmdb_get_vs_shmcache": med["lmdb get"] / med["shmcache get"]}
                print(f"{n:>9} keys: " + ", ".join(f"{c} {v:.2f} us" for c, v in med.items())
                      + f"; list/dict {results[str(n)]['list_vs_dict']:.2f}x, "
                        f"lmdb get/shmcache get {results[str(n)]['lmdb_get_vs_shmcache']:.2f}x",
                      flush=True)
                r.close()
            finally:
                if env is not None:
                    env.close()
                w.close()
                server.close()
    if args.json:
        write_json(args.json, {"stamp": stamp(), "args": vars(args), "results": results},
                   indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
