"""asyncio support against a real etcd: awatch/await_revision equal etcd's answers, share one
waker thread, clean up after cancellation and timeouts, survive fork, and run under uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import multiprocessing as mp
import os
import random
import signal
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import shmcache
from shmcache.format import layout
from shmcache.ipc import futex as _futex
from shmcache.ipc import shm as _shm
from shmcache.ipc.control_reader import ControlReader
from shmcache.reader import aio
from shmcache.reader import demux as _demux
from shmcache.reader.lifetime import Lifetime
from tests.etcdserver import free_port
from tests.helpers import (
    WriterProcess,
    delete,
    etcd_current_revision,
    etcd_events,
    etcd_get,
    put,
    txn,
)
from tests.test_forking import EXAMPLES, ServerProcess


def _in_thread(fn: Any, *args: Any) -> threading.Thread:
    """Run blocking etcd writes next to the event loop (not through asyncio.to_thread, whose
    executor threads would spoil the thread counts below)."""
    t = threading.Thread(target=fn, args=args, daemon=True)
    t.start()
    return t


def _writes(client: Any, p: bytes, out: list[int]) -> None:
    put(client, p + b"a", b"1")
    put(client, p + b"b", b"2")
    delete(client, p + b"a")
    txn(client, [("put", p + b"t1", b"x"), ("put", p + b"t2", b"y"), ("delete", p + b"b", b"")])
    for i in range(10):
        put(client, p + b"n%d" % i, b"%d" % i)
    out.append(put(client, p + b"last", b"z"))


def _no_waker_threads(timeout: float = 3.0) -> None:
    """Until the waker threads of earlier tests' Readers have exited (they linger <= 1 s)."""
    deadline = time.monotonic() + timeout
    while any(t.name.startswith(("shmcache-aio-", "shmcache-watch-"))
              for t in threading.enumerate()):
        assert time.monotonic() < deadline, "a waker thread outlived its Reader"
        time.sleep(0.05)


def _waiters(r: shmcache.Reader) -> int:
    """asyncio waiters registered anywhere: the waker (await_revision, a watch catching up)
    and the watch demultiplexer (joined watches)."""
    return aio._waker_for(r).waiter_count() + _demux.demux_of(r).async_waiter_count()


def _wait_thread_gone(r: shmcache.Reader, timeout: float = 3.0) -> None:
    """Until the watch demultiplexer's thread has ended (it has no watches left)."""
    deadline = time.monotonic() + timeout
    while _demux.demux_of(r).thread() is not None:
        assert time.monotonic() < deadline, "demultiplexer thread still running without watches"
        time.sleep(0.05)


class _FakeReader:
    """Just what the waker uses of a Reader: a futex word in shared memory we can publish to."""

    name = "fake"

    def __init__(self) -> None:
        self._cbuf = mmap.mmap(-1, 4096)  # MAP_SHARED | MAP_ANONYMOUS: shared futex ops work
        self._futex_addr = _futex.address_of(self._cbuf, layout.C_SEQ)
        self._life = Lifetime(lambda: None, lambda: shmcache.ShmCacheError("closed"))
        self.control = ControlReader(_shm.Segment("fake", self._cbuf, 4096), self._life)

    def _word(self) -> int:
        return self.control.word()

    def publish(self) -> None:
        seq = struct.unpack_from("<Q", self._cbuf, layout.C_SEQ)[0]
        struct.pack_into("<Q", self._cbuf, layout.C_SEQ, seq + 2)
        _futex.wake_all(self._futex_addr)


def test_waker_loses_no_wakeup_under_racing_publishes(monkeypatch: pytest.MonkeyPatch) -> None:
    """One publish per wait, landing at random moments around the registration and the
    start of a new waker thread; then two loops under a stream of publishes. Every wait
    ends by a wake-up, never by the waker's FUTEX_WAIT timeout (raised to 3 s here, so a
    lost wake-up would show)."""
    monkeypatch.setattr(aio, "_SLICE", 3.0)
    monkeypatch.setattr(aio, "_IDLE_EXIT", 0.0)  # exit at the first moment without waiters
    fake = _FakeReader()
    rnd = random.Random(6)
    delays = (0, 0, 0, 0.00005, 0.0002, 0.001)

    async def wait_once(seen: int) -> float:
        t0 = time.monotonic()
        async with asyncio.timeout(2.0):
            while fake._word() == seen:  # wake-ups may be spurious
                await aio._wait_change(fake, seen, None)  # type: ignore[arg-type]
        return time.monotonic() - t0

    # 1. Exactly one publish per wait: nothing else could cover for a lost wake-up.
    go, done = threading.Event(), threading.Event()

    def one_publish_per_go() -> None:
        while go.wait() and not done.is_set():
            go.clear()
            time.sleep(rnd.uniform(0, 0.0003))
            fake.publish()

    async def single(restart: bool) -> float:
        worst = 0.0
        waker = aio._waker_for(fake)  # type: ignore[arg-type]
        for _ in range(200):
            seen = fake._word()
            go.set()
            worst = max(worst, await wait_once(seen))
            if restart:
                # A publish nobody waits for makes the waker thread exit (_IDLE_EXIT = 0),
                # so the next wait starts a new one, raced by the next publish too.
                fake.publish()
                async with asyncio.timeout(2.0):
                    while waker.thread() is not None:
                        await asyncio.sleep(0.0005)
        return worst

    pub = threading.Thread(target=one_publish_per_go, daemon=True)
    pub.start()
    try:
        assert asyncio.run(single(restart=False)) < 2.0  # one long-lived waker thread
        assert asyncio.run(single(restart=True)) < 2.0  # a new waker thread for every wait
    finally:
        done.set()
        go.set()
        pub.join(5)

    # 2. Two loops, a stream of publishes.
    stop = threading.Event()

    def stream() -> None:
        while not stop.is_set():
            time.sleep(rnd.choice(delays))
            fake.publish()

    slowest: list[float] = []

    async def many() -> None:
        worst = 0.0
        for _ in range(300):
            worst = max(worst, await wait_once(fake._word()))
        slowest.append(worst)

    pub = threading.Thread(target=stream, daemon=True)
    pub.start()
    try:
        loops = [threading.Thread(target=asyncio.run, args=(many(),)) for _ in range(2)]
        for t in loops:
            t.start()
        for t in loops:
            t.join(60)
    finally:
        stop.set()
        pub.join(5)
    assert len(slowest) == 2 and max(slowest) < 2.0, "a loop failed (see its exception above)"
    waker = aio._waker_for(fake)  # type: ignore[arg-type]
    assert waker.waiter_count() == 0 and waker._error is None
    # Stop the waker thread now rather than after its 3 s slice.
    thread = waker.thread()
    fake._life.close(wake=fake.control.wake)
    if thread is not None:
        thread.join(5)
        assert not thread.is_alive()


def test_awatch_events_equal_etcd(etcd_session: Any, etcd_client: Any,
                                  reader: shmcache.Reader, sub_prefix: bytes) -> None:
    """async for over awatch yields exactly etcd's events (puts, deletes, a transaction)."""
    p = sub_prefix

    async def main() -> tuple[int, list[shmcache.Event], int]:
        since = reader.revision
        got: list[shmcache.Event] = []
        last: list[int] = []
        async with reader.awatch(p, since_revision=since) as w:
            assert w.prefix == p
            writes = _in_thread(_writes, etcd_client, p, last)
            async with asyncio.timeout(15):
                async for ev in w:
                    got.append(ev)
                    if ev.kv.key == p + b"last":
                        break
            writes.join()
            assert w.revision >= last[0]
        assert w.closed
        return since, got, last[0]

    since, got, last = asyncio.run(main())
    assert got == etcd_events(etcd_session.endpoint, p, since, last)
    assert len(got) == 17


def test_200_watchers_share_one_thread_and_one_call_per_publish(
        etcd_session: Any, etcd_client: Any, reader: shmcache.Reader, sub_prefix: bytes) -> None:
    """200 awatch coroutines in one loop: one extra thread in all (the Reader's watch
    demultiplexer), each record decoded once, at most one call_soon_threadsafe per batch of
    records, every coroutine gets etcd's events; the thread exits once no watch is left."""
    p = sub_prefix
    n = 200
    _no_waker_threads()

    async def main() -> tuple[int, list[list[shmcache.Event]], int, int]:
        since = reader.revision
        threads_before = threading.active_count()
        got: list[list[shmcache.Event]] = [[] for _ in range(n)]
        last: list[int] = []

        async def watcher(i: int) -> None:
            async for ev in reader.awatch(p, since_revision=since):
                got[i].append(ev)
                if ev.kv.key == p + b"last":
                    return

        tasks = [asyncio.create_task(watcher(i)) for i in range(n)]
        await asyncio.sleep(0.2)
        demux = _demux.demux_of(reader)
        assert demux.joined_count() == n
        assert demux.async_waiter_count() == n
        assert threading.active_count() == threads_before + 1
        calls_before, records_before = demux.loop_calls, demux.records
        delivered_before = demux.delivered
        writes = _in_thread(_writes, etcd_client, p, last)
        async with asyncio.timeout(20):
            await asyncio.gather(*tasks)
        extra = threading.active_count() - threads_before
        writes.join()
        assert extra <= 2  # the demultiplexer, and the writes thread if not quite finished
        calls = demux.loop_calls - calls_before
        records = demux.records - records_before
        assert 0 < calls <= records  # one wake-up of the loop per batch, not per watch
        assert demux.delivered - delivered_before == n * 17
        return since, got, last[0], extra

    since, got, last, _ = asyncio.run(main())
    want = etcd_events(etcd_session.endpoint, p, since, last)
    assert len(want) == 17 and all(g == want for g in got)
    _wait_thread_gone(reader)
    assert _demux.demux_of(reader).joined_count() == 0


def test_cancellation_and_timeouts_leave_no_waiter(
        etcd_client: Any, reader: shmcache.Reader, sub_prefix: bytes) -> None:
    """task.cancel(), asyncio.timeout() and asyncio.wait_for() around awatch/await_revision:
    the right exception, and no waiter left registered."""
    p = sub_prefix

    async def main() -> None:
        # Cancel a task blocked in async for.
        w = reader.awatch(p)
        started = asyncio.Event()

        async def consume() -> None:
            started.set()
            async for _ev in w:
                pass

        task = asyncio.create_task(consume())
        await started.wait()
        await asyncio.sleep(0.05)
        assert _waiters(reader) == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert _waiters(reader) == 0
        # The watch is still usable after its consumer was cancelled.
        rev = await asyncio.to_thread(put, etcd_client, p + b"k", b"after-cancel")
        events = await w.poll(timeout=10)
        assert [(e.kv.value, e.revision) for e in events] == [(b"after-cancel", rev)]
        w.close()

        # asyncio.timeout around await_revision and around poll(None).
        far = reader.revision + 10**9
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await reader.await_revision(far)
        assert time.monotonic() - t0 >= 0.15  # (an upper bound: asyncio.timeout's own)
        assert _waiters(reader) == 0
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.awatch(p).poll(None), 0.2)
        assert _waiters(reader) == 0
        # The timeout arguments of their own.
        t0 = time.monotonic()
        assert await reader.await_revision(far, timeout=0.2) is False
        assert await reader.awatch(p).poll(timeout=0.2) == []
        assert time.monotonic() - t0 >= 0.3
        assert _waiters(reader) == 0
        assert await reader.await_revision(reader.revision, timeout=0) is True

    asyncio.run(main())


def test_await_revision_is_woken_by_the_publish(etcd_client: Any, reader: shmcache.Reader,
                                                sub_prefix: bytes,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """await_revision returns as soon as the writer publishes the revision (no polling
    interval to wait out), and other coroutines keep running meanwhile. The waker's own
    FUTEX_WAIT slice is raised above the waits' timeout, so only a wake-up can end them
    in time, however loaded the machine."""
    monkeypatch.setattr(aio, "_SLICE", 120.0)
    p = sub_prefix

    async def main() -> list[float]:
        delays = []
        for i in range(20):
            box: list[tuple[int, float]] = []
            # Tests run one at a time: the next revision etcd hands out is our put's.
            expected = etcd_current_revision(etcd_client) + 1

            def write(box: list[tuple[int, float]] = box, i: int = i) -> None:
                box.append((put(etcd_client, p + b"k", b"%d" % i), time.perf_counter()))

            th = _in_thread(write)
            assert await reader.await_revision(expected, timeout=60)
            woke = time.perf_counter()
            th.join()
            if box[0][0] == expected:  # another test's write could have taken the revision
                delays.append(max(0.0, woke - box[0][1]))

        # The loop keeps running while a coroutine waits. The put comes 300 ms after the
        # wait starts, so a waiter that blocked the loop would leave the ticker at most one
        # tick; a free loop ticks every millisecond or so (a few at least, however loaded).
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.001)
                ticks += 1

        def late_write() -> None:
            time.sleep(0.3)
            put(etcd_client, p + b"late", b"x")

        t = asyncio.create_task(ticker())
        th = _in_thread(late_write)
        assert await reader.await_revision(etcd_current_revision(etcd_client) + 1, timeout=60)
        th.join()
        t.cancel()
        assert ticks >= 3, ticks
        return delays

    delays = sorted(asyncio.run(main()))
    assert delays
    print(f"\nput -> await_revision: median {delays[len(delays) // 2] * 1e3:.1f} ms")


def test_awatch_raises_compacted_error(etcd_session: Any, etcd_client: Any, cache_name: str,
                                       unique_prefix: bytes) -> None:
    """Too old a since_revision raises at awatch(); a lapped awatch raises from async for."""
    p = unique_prefix
    w = WriterProcess(cache_name, etcd_session.endpoint, p, ring_size="64KiB")
    try:
        w.start()
        with shmcache.Reader(cache_name) as r:
            start = r.revision
            slow = r.awatch(p, since_revision=start)
            last = 0
            for i in range(300):
                last = put(etcd_client, p + b"k%d" % (i % 10), b"y" * 400)
            assert r.wait(last, timeout=15)
            with pytest.raises(shmcache.CompactedError) as ei:
                r.awatch(p, since_revision=start)
            assert ei.value.compact_revision == r.status().oldest_watchable_revision

            async def lapped() -> None:
                async for _ev in slow:
                    pass

            with pytest.raises(shmcache.CompactedError):
                asyncio.run(lapped())
    finally:
        w.close()


def test_close_ends_iteration_and_closed_reader_raises(writer: tuple[WriterProcess, bytes],
                                                       sub_prefix: bytes) -> None:
    """AsyncWatch.close() from another task ends a pending async for at once; closing the
    Reader wakes its waiters with an error and stops the waker thread."""
    r = shmcache.Reader(writer[0].name)

    async def main() -> threading.Thread:
        w = r.awatch(sub_prefix)

        async def consume() -> list[shmcache.Event]:
            return [ev async for ev in w]

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.1)
        w.close()  # (the async for waits with no timeout: only the close can end it)
        assert await asyncio.wait_for(task, 30) == []

        pending = asyncio.create_task(r.await_revision(r.revision + 10**9))
        await asyncio.sleep(0.1)
        thread = aio._waker_for(r).thread()
        assert thread is not None
        r.close()
        with pytest.raises(shmcache.ShmCacheError, match="closed"):
            await asyncio.wait_for(pending, 30)
        return thread

    thread = asyncio.run(main())
    thread.join(30)
    assert not thread.is_alive()
    # The control mapping is unmapped once the last thread using it has left.
    deadline = time.monotonic() + 30
    while not r._cbuf.closed:
        assert time.monotonic() < deadline, "the control segment is still mapped"
        time.sleep(0.01)


def _child_awaits(ready: Any, go: Any, q: Any) -> None:
    # Forked: inherits the parent's Reader and aio registry, but not its waker thread.
    r = _FORK_READER
    assert r is not None

    async def main() -> tuple[bool, float]:
        target = r.revision + 1
        ready.set()
        go.wait(10)
        t0 = time.monotonic()
        ok = await r.await_revision(target, timeout=10)
        return ok, time.monotonic() - t0

    q.put((*asyncio.run(main()), os.getpid()))


_FORK_READER: shmcache.Reader | None = None


def test_asyncio_after_fork_starts_its_own_waker(etcd_client: Any, reader: shmcache.Reader,
                                                 sub_prefix: bytes) -> None:
    """A child forked while the parent's waker thread runs starts a waker of its own."""
    global _FORK_READER
    _FORK_READER = reader
    # The parent's waker is kept busy by a loop in another thread (forking from inside
    # a running loop would hand the child that loop's state).
    loop = asyncio.new_event_loop()
    parked = loop.create_task(reader.await_revision(reader.revision + 10**9))

    def run() -> None:
        with contextlib.suppress(asyncio.CancelledError):
            loop.run_until_complete(parked)

    loop_thread = threading.Thread(target=run, daemon=True)
    loop_thread.start()
    ctx = mp.get_context("fork")
    ready, go, q = ctx.Event(), ctx.Event(), ctx.Queue()
    child = ctx.Process(target=_child_awaits, args=(ready, go, q))
    try:
        deadline = time.monotonic() + 5
        while aio._waker_for(reader).thread() is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        child.start()
        assert ready.wait(10)
        put(etcd_client, sub_prefix + b"k", b"v")
        go.set()
        ok, waited, pid = q.get(True, 15)
        child.join(10)
        assert child.exitcode == 0
    finally:
        _FORK_READER = None
        loop.call_soon_threadsafe(parked.cancel)
        loop_thread.join(5)
        loop.close()
        if child.is_alive():
            child.kill()
            child.join()
    assert ok and pid != os.getpid() and waited < 5


def test_uvicorn_workers_serve_the_cache(writer: tuple[WriterProcess, bytes], etcd_client: Any,
                                         sub_prefix: bytes, tmp_path: Path) -> None:
    """examples/asgi_app.py under uvicorn --workers 2: answers equal etcd's, read-your-writes
    through await_revision, long-poll events through awatch, 410 for compacted history."""
    p = sub_prefix.decode()
    for i in range(5):
        put(etcd_client, sub_prefix + b"k%d" % i, b"v%d" % i)
    port = free_port()
    srv = ServerProcess(
        [sys.executable, "-m", "uvicorn", "--app-dir", str(EXAMPLES), "--workers", "2",
         "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", "asgi_app:app"],
        {"SHMCACHE_CACHE": writer[0].name}, port, EXAMPLES, tmp_path / "uvicorn.log",
        stop_signal=signal.SIGINT)
    try:
        srv.start(f"/get?key={p}k0")
        workers = srv.wait_workers(2)
        for i in range(5):
            status, body = srv.get(f"/get?key={p}k{i}")
            want = etcd_get(etcd_client, sub_prefix + b"k%d" % i)
            assert status == 200 and want is not None
            assert (body["value"], body["mod_revision"]) == (want.value.decode(), want.mod_revision)
            assert body["pid"] in workers
        status, body = srv.get(f"/list?prefix={p}")
        assert [k for k, _v in body["items"]] == [f"{p}k{i}" for i in range(5)]
        since = body["revision"]
        # Read-your-writes: the request waits (without blocking its worker) for the revision.
        for i in range(3):
            rev = put(etcd_client, sub_prefix + b"k0", b"new-%d" % i)
            status, body = srv.get(f"/get?key={p}k0&min_revision={rev}")
            assert (status, body["value"], body["mod_revision"]) == (200, f"new-{i}", rev)
        # A long poll that is answered by a put made while it waits.
        result: list[tuple[int, dict[str, Any]]] = []
        status, body = srv.get(f"/list?prefix={p}")
        poll = _in_thread(lambda: result.append(
            srv.get(f"/events?prefix={p}&since_revision={body['revision']}&limit=1&timeout=10")))
        time.sleep(0.3)
        rev = put(etcd_client, sub_prefix + b"k9", b"late")
        poll.join(15)
        assert result and result[0][0] == 200
        assert result[0][1]["events"] == [["PUT", f"{p}k9", "late", rev]]
        # Everything since the list, in etcd's order.
        status, body = srv.get(f"/events?prefix={p}&since_revision={since}&limit=100&timeout=0.5")
        assert [e[3] for e in body["events"]] == sorted(e[3] for e in body["events"])
        assert [e[2] for e in body["events"]] == ["new-0", "new-1", "new-2", "late"]
        status, body = srv.get(f"/events?prefix={p}&since_revision=0&timeout=0.5")
        assert status == 410 and body["compact_revision"] > 0
    finally:
        srv.stop()
    assert "Traceback" not in srv.log(), srv.log()
