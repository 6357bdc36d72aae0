#!/usr/bin/env python3
"""Watch a cache from asyncio: many coroutines, one waker thread, cancellation and timeouts.

Shows: `async for ev in reader.awatch(prefix, since_revision=...)` in several
coroutines at once (they all wake on the writer's publish through a single
thread, however many there are), `await reader.await_revision(rev, timeout)`,
and that cancelling a watching task or running out of an asyncio timeout
leaves nothing behind.

Run it against the demo (it prints its cache name, e.g. 'demo-12345'):

    shmcache demo --duration 300 &
    python examples/asyncio_watch.py --cache demo-12345 --prefix /demo/ --events 20

or against your own writer: python examples/asyncio_watch.py --cache mycache --prefix /registry/
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading

import shmcache


async def watcher(r: shmcache.Reader, prefix: str, since: int, want: int,
                  out: list[shmcache.Event] | None) -> int:
    """Count (and optionally collect) ``want`` events after ``since``."""
    n = 0
    async with r.awatch(prefix, since_revision=since) as w:
        async for ev in w:
            n += 1
            if out is not None:
                out.append(ev)
                value = f" = {ev.kv.value[:40].decode('utf-8', 'replace')}" if ev.type == "PUT" else ""
                print(f"{ev.type} {ev.kv.key.decode()}{value} (revision {ev.revision})", flush=True)
            if n == want:
                break
    return n


async def main(args: argparse.Namespace) -> int:
    r = shmcache.Reader(args.cache)
    threads_before = threading.active_count()
    since = r.revision
    print(f"watching {args.prefix or r.prefix.decode()!r} from revision {since} with "
          f"{args.watchers} coroutines", flush=True)

    # 1. Many watchers, one thread: every coroutine sees the same events.
    first: list[shmcache.Event] = []
    tasks = [asyncio.create_task(watcher(r, args.prefix, since, args.events,
                                         first if i == 0 else None))
             for i in range(args.watchers)]
    await asyncio.sleep(0.2)
    extra = threading.active_count() - threads_before
    print(f"threads added for {args.watchers} watching coroutines: {extra}", flush=True)
    try:
        async with asyncio.timeout(args.timeout):
            counts = await asyncio.gather(*tasks)
    except TimeoutError:
        print(f"timed out after {args.timeout}s", file=sys.stderr)
        return 1
    print(f"{len(counts)} watchers each saw {set(counts)} events, up to revision "
          f"{first[-1].revision}")

    # 2. await_revision: the cache has reached the last event's revision.
    reached = await r.await_revision(first[-1].revision, timeout=1.0)
    print(f"await_revision({first[-1].revision}) -> {reached}")

    # 3. An asyncio timeout and a cancelled task leave no waiter registered.
    try:
        async with asyncio.timeout(0.2):
            await r.await_revision(2**62)
    except TimeoutError:
        print("await_revision(far future) timed out after 0.2s, as asked")
    task = asyncio.create_task(watcher(r, args.prefix, r.revision, 1_000_000, None))
    await asyncio.sleep(0.1)
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        print("a cancelled watcher stopped cleanly")
    r.close()
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", required=True, help="cache name (as given to `shmcache serve`)")
    ap.add_argument("--prefix", default="", help="key prefix to watch (default: all)")
    ap.add_argument("--watchers", type=int, default=50, help="concurrent watching coroutines")
    ap.add_argument("--events", type=int, default=10, help="each watcher stops after this many")
    ap.add_argument("--timeout", type=float, default=30.0, help="give up after this many seconds")
    sys.exit(asyncio.run(main(ap.parse_args())))
