#!/usr/bin/env python3
"""Keep an in-process dict equal to a key range with reader.subscribe(prefix, callback).

Shows: the callback runs on the subscription's background thread and receives
typed events (shmcache.Event). Without on_reset the subscription first hands
over the current state as PUT events, then every change; if it ever falls
behind the ring (CompactedError) it lists again and hands over the difference,
so applying events in order always rebuilds the range exactly.
`subscription.wait(rev)` waits until the callback has seen revision `rev`.

Run it against the demo (it prints its cache name, e.g. 'demo-12345'):

    shmcache demo --duration 300 &
    python examples/subscribe_mirror.py --cache demo-12345 --prefix /demo/ --events 50

or against your own writer: python examples/subscribe_mirror.py --cache mycache --prefix /registry/
"""

from __future__ import annotations

import argparse
import sys
import threading

import shmcache


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", required=True, help="cache name (as given to `shmcache serve`)")
    ap.add_argument("--prefix", default="", help="key prefix to mirror (default: all)")
    ap.add_argument("--events", type=int, default=20,
                    help="stop after this many changes after the initial state")
    ap.add_argument("--timeout", type=float, default=30.0, help="give up after this many seconds")
    args = ap.parse_args()

    mirror: dict[bytes, bytes] = {}
    changes = 0
    baseline = float("inf")  # revision of the initial state, once it has been delivered
    enough = threading.Event()

    def apply(ev: shmcache.Event) -> None:
        if ev.type == "PUT":
            mirror[ev.kv.key] = ev.kv.value
        else:
            mirror.pop(ev.kv.key, None)

    def on_event(ev: shmcache.Event) -> None:
        nonlocal changes
        apply(ev)
        if ev.revision > baseline:  # a change, not part of the initial state
            changes += 1
            print(f"{ev.type} {ev.kv.key.decode()} (revision {ev.revision}); "
                  f"mirror has {len(mirror)} keys", flush=True)
            if changes >= args.events:
                enough.set()

    with shmcache.Reader(args.cache) as r:
        with r.subscribe(args.prefix, on_event) as sub:
            # The initial state (one PUT per key, at the subscription's list revision)
            # has been delivered once sub.revision reaches the revision we read now.
            sub.wait(r.revision, timeout=10)
            baseline = sub.revision
            print(f"mirroring {args.prefix or r.prefix.decode()!r}: {len(mirror)} keys at "
                  f"revision {sub.revision}", flush=True)
            done = enough.wait(args.timeout)
        # Closed: the callback is no longer called, and sub.revision is final. To compare
        # with a list taken now, replay what happened since with a plain watch
        # (re-applying a change is harmless: PUT and DELETE are idempotent).
        res = r.list(args.prefix)
        with r.watch(args.prefix, since_revision=sub.revision) as w:
            while w.revision < res.revision:
                for ev in w.poll(timeout=1.0):
                    if ev.revision <= res.revision:
                        apply(ev)
        same = {kv.key: kv.value for kv in res.items} == mirror
        print(f"saw {changes} changes; mirror equals list at revision {res.revision}: {same}")
    return 0 if done and same else 1


if __name__ == "__main__":
    sys.exit(main())
