#!/usr/bin/env python3
"""Read a cache from a plain script: get one key, list a prefix, then watch it.

Shows: attaching with shmcache.Reader(name), get/list answers exact at a
revision, and a watch started at the list's revision so no change is missed
between the two (the list-then-watch pattern).

Run it against the demo (it prints its cache name, e.g. 'demo-12345'):

    shmcache demo --duration 300 &
    python examples/basic.py --cache demo-12345 --prefix /demo/key/000 --events 5

or against a writer of your own (`shmcache serve mycache --endpoints ... --prefix /registry/`):

    python examples/basic.py --cache mycache --prefix /registry/ --key /registry/a
"""

from __future__ import annotations

import argparse
import sys
import time

import shmcache


def show(value: bytes, limit: int = 40) -> str:
    text = value.decode("utf-8", "backslashreplace")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", required=True, help="cache name (as given to `shmcache serve`)")
    ap.add_argument("--prefix", default="", help="key prefix to list and watch (default: all)")
    ap.add_argument("--key", help="a key to get (default: the first listed key)")
    ap.add_argument("--events", type=int, default=10, help="stop after this many events")
    ap.add_argument("--timeout", type=float, default=30.0, help="stop after this many seconds")
    args = ap.parse_args()

    with shmcache.Reader(args.cache) as r:
        res = r.list(args.prefix)
        print(f"cache {args.cache} at revision {res.revision}: {len(res)} keys under "
              f"{args.prefix or r.prefix.decode()!r}")
        for kv in res.items[:5]:
            print(f"  {kv.key.decode()} = {show(kv.value)}  (mod_revision {kv.mod_revision})")
        key = args.key or (res.items[0].key.decode() if res.items else None)
        if key is not None:
            kv = r.get(key)
            print(f"get {key} -> {show(kv.value) if kv else None}")

        # Watch from the list's revision: every change after the list, none twice.
        print(f"watching from revision {res.revision}", flush=True)
        seen = 0
        with r.watch(args.prefix, since_revision=res.revision) as w:
            deadline = time.monotonic() + args.timeout
            while seen < args.events and time.monotonic() < deadline:
                for ev in w.poll(timeout=min(0.5, max(0.0, deadline - time.monotonic()))):
                    value = f" = {show(ev.kv.value)}" if ev.type == "PUT" else ""
                    print(f"{ev.type} {ev.kv.key.decode()}{value} (revision {ev.revision})",
                          flush=True)
                    seen += 1
            print(f"saw {seen} events; watch at revision {w.revision}")
    return 0 if seen >= args.events else 1


if __name__ == "__main__":
    sys.exit(main())
