"""``shmcache demo``: a throwaway etcd, a writer and reader processes, with live figures."""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

from ..ipc import shm as _shm
from ..writer.lock import remove_cache
from .output import plural

PREFIX = "/demo/"


def _reader_proc(name: str, idx: int, keys: int, stop: Any, counts: Any) -> None:
    """One worker: random gets, and a list of 100 keys every 200 gets."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    from ..reader.reader import Reader

    rnd = random.Random(idx)
    with Reader(name, timeout=30) as r:
        n = 0
        while not stop.is_set():
            for _ in range(200):
                r.get(f"{PREFIX}key/{rnd.randrange(keys):06d}")
            n += 200
            r.list(f"{PREFIX}key/{rnd.randrange(keys // 100):04d}")
            n += 1
            counts[idx] = n


def _watcher_proc(name: str, stop: Any, delays: Any) -> None:
    """Watches the clock key the loader writes; reports put -> event delays."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from ..reader.reader import Reader

    with Reader(name, timeout=30) as r, r.watch(PREFIX + "clock", since_revision=r.revision) as w:
        while not stop.is_set():
            for ev in w.poll(timeout=0.5):
                if ev.type == "PUT":
                    delays.append(time.time() - float(ev.kv.value))


def _load(client: Any, keys: int) -> None:
    for start in range(0, keys, 100):
        client.put_all([(f"{PREFIX}key/{i:06d}", os.urandom(48).hex())
                        for i in range(start, min(keys, start + 100))])


def _stop_children(stop: Any, procs: list[Any], writer: Any) -> None:
    """Readers first, then the writer (it removes the segments), all before etcd stops."""
    stop.set()
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join()
    if writer is not None and writer.poll() is None:
        writer.send_signal(signal.SIGTERM)
        try:
            writer.wait(timeout=10)
        except subprocess.TimeoutExpired:
            writer.kill()
            writer.wait()


def run_demo(duration: float | None = None, readers: int = 3, keys: int = 10_000) -> int:
    from .demo_etcd import DemoEtcd

    name = f"demo-{os.getpid()}"
    readers_text = plural(readers, "reader process", "reader processes")
    print(f"shmcache demo: starting etcd, loading {keys} keys, cache {name!r}, {readers_text}"
          + (f", {duration:.0f}s" if duration else ", Ctrl-C to stop"))
    stop_evt = threading.Event()
    prev_int = signal.signal(signal.SIGINT, lambda *_: stop_evt.set())
    prev_term = signal.signal(signal.SIGTERM, lambda *_: stop_evt.set())
    writer = None
    died = False
    procs: list[Any] = []
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    try:
        with DemoEtcd() as etcd:
            client = etcd.client()
            t0 = time.monotonic()
            _load(client, keys)
            print(f"  etcd {etcd.version} at {etcd.endpoint}: loaded {keys} keys in "
                  f"{time.monotonic() - t0:.1f}s")
            writer = subprocess.Popen(
                [sys.executable, "-m", "shmcache", "serve", name, "--endpoints", etcd.endpoint,
                 "--prefix", PREFIX, "--ring-size", "16MiB", "--remove-on-exit",
                 "--log-level", "warning"], start_new_session=True)
            from ..reader.reader import Reader

            t0 = time.monotonic()
            main_reader = Reader(name, timeout=60)
            print(f"  writer pid {writer.pid}: first snapshot after {time.monotonic() - t0:.2f}s")
            counts = ctx.Array("q", readers)
            manager = ctx.Manager()
            delays = manager.list()
            for i in range(readers):
                p = ctx.Process(target=_reader_proc, args=(name, i, keys, stop, counts),
                                daemon=True)
                p.start()
                procs.append(p)
            p = ctx.Process(target=_watcher_proc, args=(name, stop, delays), daemon=True)
            p.start()
            procs.append(p)

            def writes() -> None:
                rnd = random.Random(1)
                while not stop_evt.is_set():
                    client.put(f"{PREFIX}clock", repr(time.time()))
                    for _ in range(20):
                        client.put(f"{PREFIX}key/{rnd.randrange(keys):06d}", os.urandom(48).hex())
                    stop_evt.wait(0.1)

            loader = threading.Thread(target=writes, daemon=True)
            loader.start()
            print(f"  {'t':>4}  {'reads/s per reader':<34} {'propagation p50/max':>20}  "
                  f"{'writer lag':>10}  {'revision':>8}")
            start = time.monotonic()
            last = [0] * readers
            last_t = start
            while not stop_evt.wait(1.0):
                now = time.monotonic()
                cur = list(counts[:])
                rates = [(c - p) / (now - last_t) for c, p in zip(cur, last, strict=False)]
                last, last_t = cur, now
                d = list(delays)
                del delays[:]
                prop = (f"{statistics.median(d) * 1e3:.2f}/{max(d) * 1e3:.2f} ms" if d else "-")
                st = main_reader.status()
                lag = max(0, client.revision() - st.revision)
                print(f"  {now - start:4.0f}  {' '.join(f'{x:>10,.0f}' for x in rates):<34} "
                      f"{prop:>20}  {lag:>6} rev  {st.revision:>8}", flush=True)
                if any(not p.is_alive() for p in procs) or writer.poll() is not None:
                    print("  a demo process died; stopping", file=sys.stderr)
                    died = True
                    break
                if duration is not None and now - start >= duration:
                    break
            stop_evt.set()
            loader.join(timeout=5)
            main_reader.close()
            _stop_children(stop, procs, writer)
            manager.shutdown()
            client.close()
    finally:
        _stop_children(stop, procs, writer)
        remove_cache(name)
        signal.signal(signal.SIGINT, prev_int)
        signal.signal(signal.SIGTERM, prev_term)
    left = _shm.list_segments(name)
    print(f"shmcache demo: stopped; etcd, writer and readers ended, "
          f"{plural(len(left), 'shared-memory segment')} left")
    return 1 if left or died else 0
