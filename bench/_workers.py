"""Code that runs inside the benchmark's child processes (spawned, never forked).

* ``pool_main``: a long-lived worker of the process pool. It sets up one backend at a
  time (shmcache Reader, direct etcd, replica, Redis, Manager dict, LMDB, plain dict)
  and runs timed phases of get / list(prefix of 100) / list(whole range) in windows
  whose start times the parent fixes, so K workers measure concurrently.
* ``memory_main``, ``coldstart_main``: fresh processes (their memory and start-up
  cost are what is measured).
* ``shm_watch_main``, ``etcd_watch_main``: propagation-delay watchers.

The direct-etcd and replica backends, ``etcd_watch_main`` and the ``etcd_receive*``
workers measure python-etcd3, the client a user would pick instead: they import it
through ``python_etcd3()``, so under protobuf>=4 those processes run the pure-Python
protobuf (its generated modules load with nothing else); the writer, the loads and
the parent keep the installed implementation (the results' stamp says which).
"""

from __future__ import annotations

import gc
import os
import random
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from _common import (
    LIST_PREFIX_KEYS,
    group_prefix,
    grpc_options,
    key,
    python_etcd3,
    range_all,
    sleep_until,
    stamp_of,
    summary,
    value,
)

GET_CHUNK = 128


def _quiet_closed_channels() -> None:
    """python-etcd3's watch thread reports the channel a replica closed on purpose: hush it."""
    default_hook = threading.excepthook

    def hook(a: Any) -> None:
        if "Channel closed" not in str(a.exc_value):
            default_hook(a)

    threading.excepthook = hook


_quiet_closed_channels()
MAX_LATENCY_SAMPLES = 200_000


def _prefix_end(p: bytes) -> bytes:
    from shmcache.format import layout

    return layout.prefix_range_end(p)


# -- backends: each returns (get, list, close); get(key) and list(prefix) are what users call --

class Backend:
    def __init__(self, get: Callable[[bytes], Any], list_: Callable[[bytes], Any],
                 close: Callable[[], None] = lambda: None, info: dict[str, Any] | None = None
                 ) -> None:
        self.get = get
        self.list = list_
        self.close = close
        self.info = info or {}


def _shmcache(p: dict[str, Any]) -> Backend:
    import shmcache

    r = shmcache.Reader(p["cache"])
    return Backend(r.get, r.list, r.close)


def _etcd_client(p: dict[str, Any]) -> Any:
    etcd3 = python_etcd3()
    return etcd3.client(host=p["etcd_host"], port=p["etcd_port"], grpc_options=grpc_options())


def _etcd(p: dict[str, Any]) -> Backend:
    """Every read goes to etcd: a serializable get (served by the member without a quorum round)."""
    client = _etcd_client(p)

    def get(k: bytes) -> Any:
        return client.get(k, serializable=True)

    def list_(prefix: bytes) -> Any:
        return range_all(client, prefix, _prefix_end(prefix), page=5000)[1]

    return Backend(get, list_, client.close)


def _replica(p: dict[str, Any]) -> Backend:
    """What a worker does without shmcache: list the range, then watch it into its own dict."""
    from sortedcontainers import SortedDict

    client = _etcd_client(p)
    prefix = p["prefix"]
    t0 = time.perf_counter()
    # Pages of 50,000 (~15 MB): etcd counts the rest of the range for every page, so
    # small pages make listing 1M keys quadratic (minutes instead of seconds).
    rev, kvs = range_all(client, prefix, _prefix_end(prefix), page=50_000)
    sd = SortedDict((kv.key, kv.value) for kv in kvs)
    del kvs
    listed = time.perf_counter() - t0
    lock = threading.Lock()
    events, cancel = client.watch_prefix(prefix, start_revision=rev + 1)

    def apply() -> None:
        try:
            for ev in events:
                with lock:
                    if type(ev).__name__ == "DeleteEvent":
                        sd.pop(ev.key, None)
                    else:
                        sd[ev.key] = ev.value
        except Exception:  # the stream ends when cancel() is called
            pass

    t = threading.Thread(target=apply, daemon=True)
    t.start()

    def list_(prefix: bytes) -> list[tuple[bytes, bytes]]:
        end = _prefix_end(prefix)
        with lock:
            return [(k, sd[k]) for k in sd.irange(prefix, end, inclusive=(True, False))]

    def close() -> None:
        cancel()
        t.join(2)
        client.close()
        sd.clear()

    return Backend(sd.get, list_, close, {"list_seconds": listed})


def _redis(p: dict[str, Any]) -> Backend:
    import redis

    r = redis.Redis(host="127.0.0.1", port=p["redis_port"])
    idx = b"idx:" + p["prefix"]

    def list_(prefix: bytes) -> list[tuple[bytes, bytes]]:
        ks = r.zrangebylex(idx, b"[" + prefix, b"(" + _prefix_end(prefix))
        out: list[tuple[bytes, bytes]] = []
        for i in range(0, len(ks), 10_000):
            chunk = ks[i:i + 10_000]
            out.extend(zip(chunk, r.mget(chunk), strict=False))
        return out

    return Backend(r.get, list_, r.close)


def _manager(p: dict[str, Any]) -> Backend:
    d = p["manager_dict"]

    def list_(prefix: bytes) -> list[tuple[bytes, bytes]]:
        # A Manager dict has no ordered index: a prefix read copies every item.
        return sorted((k, v) for k, v in d.items() if k.startswith(prefix))

    return Backend(d.get, list_)


def _lmdb(p: dict[str, Any]) -> Backend:
    import lmdb

    env = lmdb.open(p["lmdb_path"], readonly=True, lock=True, subdir=True, max_readers=256)
    begin = env.begin

    def get(k: bytes) -> Any:
        # A fresh read transaction per get, so every read sees the latest commit.
        with begin() as txn:
            return txn.get(k)

    def list_(prefix: bytes) -> list[tuple[bytes, bytes]]:
        out = []
        with begin() as txn:
            cur = txn.cursor()
            if cur.set_range(prefix):
                for k, v in cur:
                    if not k.startswith(prefix):
                        break
                    out.append((k, v))
        return out

    return Backend(get, list_, env.close)


def _dict(p: dict[str, Any]) -> Backend:
    """The upper bound: the data in this process, a dict with a sorted key index for ranges."""
    from sortedcontainers import SortedDict

    prefix = p["prefix"]
    sd = SortedDict((key(prefix, i), value(i)) for i in range(p["n"]))

    def list_(pfx: bytes) -> list[tuple[bytes, bytes]]:
        return [(k, sd[k]) for k in sd.irange(pfx, _prefix_end(pfx), inclusive=(True, False))]

    return Backend(sd.get, list_, sd.clear)


BACKENDS: dict[str, Callable[[dict[str, Any]], Backend]] = {
    "shmcache": _shmcache, "etcd": _etcd, "replica": _replica, "redis": _redis,
    "manager": _manager, "lmdb": _lmdb, "dict": _dict,
}


# -- timed phases --------------------------------------------------------------------------

def _op_args(op: str, n: int, prefix: bytes, rnd: random.Random) -> list[bytes]:
    if op == "get":
        return [key(prefix, rnd.randrange(n)) for _ in range(20_000)]
    if op == "list100":
        groups = max(1, n // LIST_PREFIX_KEYS)
        return [group_prefix(prefix, rnd.randrange(groups)) for _ in range(2_000)]
    return [prefix]


def _check(b: Backend, backend: str, n: int, prefix: bytes, load: bool) -> None:
    """Every backend must answer correctly before it is timed."""
    i = n // 3
    got = b.get(key(prefix, i))
    if backend == "shmcache":
        got = got.value if got is not None else None
    elif backend == "etcd":
        got = got[0]
    # Under write load the values carry timestamps: check presence only.
    if got is None or (not load and got[:11] != value(i)[:11]):
        raise AssertionError(f"{backend}: get({key(prefix, i)!r}) returned {got!r:.60}")
    items = b.list(group_prefix(prefix, 0))
    if len(items) != min(n, LIST_PREFIX_KEYS):
        raise AssertionError(f"{backend}: list(prefix of 100) returned {len(items)} items")


def run_phases(b: Backend, plan: dict[str, Any]) -> dict[str, Any]:
    """Run each op in its window: throughput (no per-op timer), then per-op latency."""
    prefix, n = plan["prefix"], plan["n"]
    rnd = random.Random(plan["seed"])
    out: dict[str, Any] = {}
    t = plan["t0"]
    for op in plan["ops"]:
        dur, lat_dur = plan["dur"][op], plan["lat_dur"][op]
        args = _op_args(op, n, prefix, rnd)
        fn = b.get if op == "get" else b.list
        gc.collect()
        sleep_until(t)
        start = time.perf_counter()
        cpu0 = time.process_time()
        deadline = start + dur
        ops = 0
        perf = time.perf_counter
        if op == "get":
            chunks = [args[i:i + GET_CHUNK] for i in range(0, len(args), GET_CHUNK)]
            stop = False
            while not stop:
                for chunk in chunks:
                    for k in chunk:
                        fn(k)
                    ops += len(chunk)
                    if perf() >= deadline:
                        stop = True
                        break
        else:
            while True:
                for a in args:
                    fn(a)
                    ops += 1
                    if perf() >= deadline:
                        break
                if perf() >= deadline:
                    break
        elapsed = perf() - start
        # The share of a core this reader got: below ~1, the OS gave its CPU to others.
        cpu_share = (time.process_time() - cpu0) / elapsed if elapsed else 0.0
        lat: list[float] = []
        lat_deadline = perf() + lat_dur
        i = 0
        while len(lat) < MAX_LATENCY_SAMPLES:
            a = args[i % len(args)]
            i += 1
            t1 = perf()
            fn(a)
            t2 = perf()
            lat.append((t2 - t1) * 1e6)
            if t2 >= lat_deadline:
                break
        out[op] = {"ops": ops, "seconds": elapsed, "rate": ops / elapsed,
                   "cpu_share": cpu_share, "latency_us": summary(lat)}
        t += dur + lat_dur + plan["gap"]
    return out


def pool_main(conn: Any, index: int) -> None:
    """Serve the parent's commands on ``conn`` until "quit"."""
    import shmcache  # noqa: F401  (imports done before the first timed phase)


    backends: dict[str, Backend] = {}
    while True:
        try:
            cmd, arg = conn.recv()
        except EOFError:
            return
        try:
            if cmd == "quit":
                for b in backends.values():
                    b.close()
                conn.send(("ok", None))
                return
            if cmd == "setup":
                name = arg["backend"]
                if name not in backends:
                    t0 = time.perf_counter()
                    b = BACKENDS[name](arg)
                    b.info["setup_seconds"] = time.perf_counter() - t0
                    _check(b, name, arg["n"], arg["prefix"], arg.get("load", False))
                    # Warm up: caches, lazy imports, branch predictors, page faults.
                    # At most 2000 gets and 20 lists, and at most ~0.5 s for slow backends.
                    rnd = random.Random(index)
                    until = time.perf_counter() + 0.3
                    for _ in range(2000):
                        b.get(key(arg["prefix"], rnd.randrange(arg["n"])))
                        if time.perf_counter() > until:
                            break
                    until = time.perf_counter() + 0.2
                    for _ in range(20):
                        b.list(group_prefix(arg["prefix"], rnd.randrange(max(1, arg["n"] // 100))))
                        if time.perf_counter() > until:
                            break
                    backends[name] = b
                conn.send(("ok", backends[name].info))
            elif cmd == "run":
                b = backends[arg["backend"]]
                conn.send(("ok", run_phases(b, arg)))
            elif cmd == "drop":
                b = backends.pop(arg, None)  # type: ignore[assignment]
                if b is not None:
                    b.close()
                gc.collect()
                conn.send(("ok", None))
            else:
                conn.send(("err", f"unknown command {cmd!r}"))
        except BaseException:
            conn.send(("err", traceback.format_exc()))


# -- fresh processes -------------------------------------------------------------------------

def _mem() -> dict[str, float]:
    import psutil

    m = psutil.Process().memory_full_info()
    return {"uss_mb": m.uss / 1e6, "pss_mb": m.pss / 1e6, "rss_mb": m.rss / 1e6}


def attach(cache: str, notes: list[str]) -> Any:
    """shmcache.Reader(cache), retried: twice a fresh Reader found the snapshot the control
    segment points at missing (CorruptSegmentError); each failure is reported."""
    import shmcache

    for attempt in range(10):
        try:
            return shmcache.Reader(cache)
        except shmcache.CorruptSegmentError as exc:
            notes.append(repr(exc))
            if attempt == 9:
                raise
            time.sleep(0.2)


def memory_main(kind: str, p: dict[str, Any], barrier: Any, out: Any) -> None:
    """USS/PSS of one worker before attaching, after attaching and after a full sweep.

    The sweep: get every key (random order), list every prefix of 100 keys, list the
    whole range once; results are dropped before measuring. Every worker of the
    group measures after all have swept (PSS divides shared pages among them).
    """
    try:
        python_etcd3()  # both kinds pay the same imports
        import sortedcontainers  # noqa: F401

        import shmcache  # noqa: F401  (the baseline includes every import a reader pays)

        gc.collect()
        base = _mem()
        notes: list[str] = []
        if kind == "shmcache":
            r = attach(p["cache"], notes)
            b = Backend(r.get, r.list, r.close)
        else:
            b = _replica(p)
        gc.collect()
        attached = _mem()
        n, prefix = p["n"], p["prefix"]
        order = list(range(n))
        random.Random(os.getpid()).shuffle(order)
        for i in order:
            b.get(key(prefix, i))
        del order
        for j in range(max(1, n // LIST_PREFIX_KEYS)):
            b.list(group_prefix(prefix, j))
        whole = b.list(prefix)
        count = len(whole)
        del whole
        gc.collect()
        barrier.wait(timeout=600)
        swept = _mem()
        barrier.wait(timeout=600)
        out.put({"kind": kind, "pid": os.getpid(), "base": base, "attached": attached,
                 "swept": swept, "whole_range_items": count, "attach_errors": notes})
        b.close()
    except BaseException:
        out.put({"kind": kind, "error": traceback.format_exc()})
        try:
            barrier.abort()
        except Exception:
            pass


def coldstart_main(kind: str, p: dict[str, Any], out: Any) -> None:
    """A new process: import, attach (or list from etcd), first correct get."""
    t0 = time.perf_counter()
    try:
        if kind == "shmcache":
            import shmcache  # noqa: F401  (timed: the import is part of a cold start)

            notes: list[str] = []
            t1 = time.perf_counter()
            r = attach(p["cache"], notes)
            i = p["n"] // 2
            kv = r.get(key(p["prefix"], i))
            t2 = time.perf_counter()
            assert kv is not None and kv.value[:11] == value(i)[:11], kv
            res = {"import_s": t1 - t0, "ready_s": t2 - t1, "attach_errors": notes}
            # Attaching again in the same process (segments already in the page cache
            # and mapped once): the steady-state cost of a short-lived Reader.
            again = []
            for _ in range(20):
                t3 = time.perf_counter()
                with attach(p["cache"], notes) as r2:
                    r2.get(key(p["prefix"], i))
                again.append(time.perf_counter() - t3)
            res["reattach"] = summary(again)
            r.close()
        else:
            python_etcd3()  # (timed: the import is part of a cold start)
            import psutil
            from sortedcontainers import SortedDict  # noqa: F401

            t1 = time.perf_counter()
            b = _replica(p)
            i = p["n"] // 2
            got = b.get(key(p["prefix"], i))
            t2 = time.perf_counter()
            assert got is not None and got[:11] == value(i)[:11]
            m = psutil.Process().memory_full_info()
            res = {"import_s": t1 - t0, "ready_s": t2 - t1, "uss_mb": m.uss / 1e6,
                   "pss_mb": m.pss / 1e6}
            b.close()
        out.put(res)
    except BaseException:
        out.put({"error": traceback.format_exc()})


def shm_watch_main(cache: str, prefix: bytes, stop: Any, ready: Any, out: Any) -> None:
    """Record (arrival CLOCK_MONOTONIC ns, put stamp ns) for each event of a shmcache watch."""
    import shmcache

    got: list[tuple[int, int]] = []
    try:
        r = shmcache.Reader(cache)
        w = r.watch(prefix)
        ready.set()
        while not stop.is_set():
            for ev in w.poll(timeout=0.2):
                now = time.monotonic_ns()
                v = ev.kv.value
                if ev.type == "PUT" and v[20:21] == b"|":
                    got.append((now, stamp_of(v)))
        out.put({"events": got})
    except BaseException:
        ready.set()
        out.put({"events": got, "error": traceback.format_exc()})


def etcd_watch_main(host: str, port: int, prefix: bytes, stop: Any, ready: Any, out: Any) -> None:
    """The same with a direct python-etcd3 watch in the process."""
    etcd3 = python_etcd3()

    got: list[tuple[int, int]] = []
    try:
        client = etcd3.client(host=host, port=port, grpc_options=grpc_options())
        events, cancel = client.watch_prefix(prefix)
        ready.set()
        threading.Thread(target=lambda: (stop.wait(), cancel()), daemon=True).start()
        for ev in events:
            now = time.monotonic_ns()
            v = ev.value
            if v[20:21] == b"|":
                got.append((now, stamp_of(v)))
        out.put({"events": got})
    except BaseException:
        ready.set()
        out.put({"events": got, "error": traceback.format_exc()})


def etcd_receive_main(host: str, port: int, prefix: bytes, start_revision: int,
                      last_revision: int, out: Any) -> None:
    """python-etcd3 merely receiving a backlog of events (watch from a past revision)."""
    etcd3 = python_etcd3()

    try:
        client = etcd3.client(host=host, port=port, grpc_options=grpc_options())
        t0 = time.perf_counter()
        events, cancel = client.watch_prefix(prefix, start_revision=start_revision)
        n = 0
        for ev in events:
            n += 1
            if ev.mod_revision >= last_revision:
                break
        dt = time.perf_counter() - t0
        cancel()
        client.close()
        out.put({"events": n, "seconds": dt, "rate": n / dt})
    except BaseException:
        out.put({"error": traceback.format_exc()})


def etcd_receive_stopped_main(host: str, port: int, prefix: bytes, start_revision: int,
                              last: Any, ready: Any, out: Any) -> None:
    """python-etcd3 receiving a backlog the way the writer meets one: its watch is open
    when the parent stops this process (SIGSTOP), writes the backlog and continues it,
    so etcd serves both through the same slow-watcher path. Reports when it saw
    ``last.value`` (CLOCK_MONOTONIC is system-wide: the parent times from SIGCONT)."""
    etcd3 = python_etcd3()

    try:
        client = etcd3.client(host=host, port=port, grpc_options=grpc_options())
        events, cancel = client.watch_prefix(prefix, start_revision=start_revision)
        ready.put(os.getpid())
        n = 0
        for ev in events:
            n += 1
            if last.value and ev.mod_revision >= last.value:
                break
        t_end = time.monotonic()
        cancel()
        client.close()
        out.put({"events": n, "t_end": t_end})
    except BaseException:
        out.put({"error": traceback.format_exc()})


def raw_receive_main(endpoint: str, prefix: bytes, start_revision: int, last_revision: int,
                     out: Any) -> None:
    """The writer's own gRPC watch stream (shmcache.writer.etcd.connection), receiving and decoding only."""
    from shmcache.writer.etcd import connection as _etcd

    try:
        conn = _etcd.Connection(_etcd.EtcdSettings(endpoints=[endpoint]))
        conn.connect()
        t0 = time.perf_counter()
        stream = conn.watch(prefix, _prefix_end(prefix), start_revision)
        n = 0
        done = False
        for resp in stream:
            for ev in resp.events:
                n += 1
                if ev.kv.mod_revision >= last_revision:
                    done = True
            if done:
                break
        dt = time.perf_counter() - t0
        stream.close()
        conn.close()
        out.put({"events": n, "seconds": dt, "rate": n / dt})
    except BaseException:
        out.put({"error": traceback.format_exc()})


if __name__ == "__main__":
    sys.exit("this module runs inside bench/run.py's child processes")
