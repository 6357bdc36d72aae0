"""One lifetime for a Reader: close() from any thread or a signal handler ends every call with
ShmCacheError("Reader for NAME is closed"), waiters wake, and the segments are unmapped when
the last call in flight leaves; fork and a publish racing a read leave the view exact.

Real etcd, a real writer process, writes streaming while the Reader is closed.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import pickle
import random
import signal
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import posix_ipc
import pytest

import shmcache
from shmcache.format import layout
from shmcache.ipc import control_reader
from shmcache.reader import demux as _demux
from shmcache.reader import view as _view
from shmcache.writer import control_writer
from tests.helpers import WriterProcess, etcd_range, put, txn


def _mapped(name: str) -> list[str]:
    """Lines of /proc/self/maps that map a segment of cache ``name``."""
    with open("/proc/self/maps") as f:
        return [line.strip() for line in f if f"/shmcache.{name}." in line]


def _closed_message(name: str) -> str:
    return f"Reader for {name!r} is closed"


class Putter:
    """A thread writing keys under ``prefix`` (one put per loop) until stopped."""

    def __init__(self, etcd_session: Any, prefix: bytes, keys: int = 50, per_txn: int = 1,
                 value: Callable[[int], bytes] = lambda i: b"v%d" % i) -> None:
        self._client = etcd_session.client()
        self._stop = threading.Event()
        self.puts = 0
        self._prefix, self._keys, self._value, self._per_txn = prefix, keys, value, per_txn
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            if self._per_txn == 1:
                put(self._client, self._prefix + b"k%03d" % (i % self._keys), self._value(i))
            else:
                txn(self._client, [("put", self._prefix + b"k%03d" % ((i + j) % self._keys),
                                    self._value(i + j)) for j in range(self._per_txn)])
            self.puts += 1
            i += self._per_txn

    def __enter__(self) -> Putter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        self._client.close()


@pytest.fixture
def cache(etcd_session: Any, etcd_client: Any, cache_name: str,
          unique_prefix: bytes) -> Iterator[WriterProcess]:
    """A live cache of 50 keys with its writer running."""
    for i in range(50):
        put(etcd_client, unique_prefix + b"k%03d" % i, b"v%d" % i)
    w = WriterProcess(cache_name, etcd_session.endpoint, unique_prefix, ring_size="256KiB")
    w.start()
    yield w
    w.close()


def _until(cond: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _close_round(name: str, p: bytes, delay: float) -> None:
    """Six threads read in loops; close() from a seventh; check how each ended."""
    r = shmcache.Reader(name)
    loops: Counter[str] = Counter()
    ended: dict[str, BaseException] = {}

    def getter() -> None:
        for i in range(1 << 62):
            r.get(p + b"k%03d" % (i % 60))
            loops["get"] += 1

    def lister() -> None:
        while True:
            r.list(p, limit=100)
            sum(1 for _ in r.iter_list(p, page_size=7))
            loops["list"] += 1

    def watcher() -> None:
        for _ev in r.watch(p):
            loops["watch"] += 1

    def syncer() -> None:
        while True:
            r.sync(timeout=10)
            loops["sync"] += 1

    def waiter() -> None:
        while True:
            r.wait(r.revision + 1, timeout=5)
            loops["wait"] += 1

    def past() -> None:
        while True:
            st = r.status()
            r.get(p + b"k001", revision=max(st.oldest_watchable_revision, r.revision - 3))
            loops["past"] += 1

    def run(what: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            ended[what] = exc

    fns = {"get": getter, "list": lister, "watch": watcher, "sync": syncer, "wait": waiter,
           "past": past}
    threads = [threading.Thread(target=run, args=(n, f), daemon=True) for n, f in fns.items()]
    for t in threads:
        t.start()
    _until(lambda: all(loops[n] > 0 for n in fns) or bool(ended), "every loop to run")
    time.sleep(delay)  # (where each thread is when close() lands)
    closer = threading.Thread(target=r.close)
    closer.start()
    closer.join(30)
    for t in threads:
        t.join(30)
        assert not t.is_alive(), f"a thread still runs after close(): {loops}"
    problems = {n: f"{type(e).__name__}: {e}" for n, e in ended.items()
                if type(e) is not shmcache.ShmCacheError or str(e) != _closed_message(name)}
    assert set(ended) == set(fns) and not problems, problems
    # The demultiplexer's thread is the last user: it leaves once it has woken.
    _until(lambda: _mapped(name) == [], "the segments to be unmapped")


def test_close_from_another_thread_ends_every_call_with_one_error_and_unmaps(
        cache: WriterProcess, etcd_session: Any, unique_prefix: bytes) -> None:
    """Six threads loop over get, list (and iter_list), watch iteration, sync, wait and
    status/past reads while writes stream; another thread closes the Reader. Each thread
    ends with ShmCacheError("Reader for NAME is closed") exactly, nothing else; then no
    segment of the cache is mapped in this process. Five rounds, closing at random times."""
    rnd = random.Random(18)
    with Putter(etcd_session, unique_prefix):
        for _round in range(5):
            _close_round(cache.name, unique_prefix, rnd.uniform(0, 0.05))


def test_close_from_a_signal_handler_while_reading(cache: WriterProcess, etcd_session: Any,
                                                   unique_prefix: bytes) -> None:
    """SIGALRM's handler closes the Reader while the main thread reads (get, list, a joined
    watch) under writes, 40 times at random moments: the read ends with the closed error,
    nothing hangs (the handler takes no lock the interrupted code holds), nothing is left
    mapped. Run in a child process so that a deadlock fails the test instead of hanging it."""
    script = r"""
import random, signal, sys, time, shmcache
name, prefix = sys.argv[1], sys.argv[2].encode()
rnd = random.Random(7)
want = f"Reader for {name!r} is closed"
for n in range(40):
    r = shmcache.Reader(name)
    signal.signal(signal.SIGALRM, lambda *_: r.close())
    w = r.watch(prefix)
    signal.setitimer(signal.ITIMER_REAL, rnd.uniform(0.01, 0.2))
    try:
        while True:
            for ev in w.poll(0.05):
                r.get(ev.kv.key)
            r.list(prefix, limit=20)
    except shmcache.ShmCacheError as exc:
        assert type(exc) is shmcache.ShmCacheError and str(exc) == want, repr(exc)
    assert w.joined or n < 3, "the watch never joined its demultiplexer"
    deadline = time.monotonic() + 30  # (the watch thread leaves last, once it has woken)
    while True:
        with open("/proc/self/maps") as f:
            left = [line for line in f if f"/shmcache.{name}." in line]
        if not left:
            break
        assert time.monotonic() < deadline, left
        time.sleep(0.01)
print("ok", flush=True)
"""
    with Putter(etcd_session, unique_prefix):
        out = subprocess.run([sys.executable, "-c", script, cache.name, unique_prefix.decode()],
                             capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout == "ok\n", out.stderr[-3000:]


def test_awatch_and_wait_wake_when_the_reader_closes(cache: WriterProcess,
                                                     unique_prefix: bytes) -> None:
    """An ``async for`` over awatch and a ``wait`` for a revision that never comes, both
    idle, end with the closed error once another thread closes the Reader; the waker and
    watch threads exit and the segments are unmapped."""
    r = shmcache.Reader(cache.name)
    outcome: dict[str, BaseException | None] = {}

    async def consume() -> None:
        try:
            async for _ev in r.awatch(unique_prefix):
                pass
            outcome["awatch"] = None
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            outcome["awatch"] = exc

    def waiter() -> None:
        try:
            r.wait(r.revision + 10**9, timeout=600)
            outcome["wait"] = None
        except BaseException as exc:  # noqa: BLE001
            outcome["wait"] = exc

    t_async = threading.Thread(target=asyncio.run, args=(consume(),), daemon=True)
    t_wait = threading.Thread(target=waiter, daemon=True)
    t_async.start()
    t_wait.start()
    _until(lambda: _demux.demux_of(r).async_waiter_count() == 1, "the awatch to wait")
    r.close()
    t_async.join(30)
    t_wait.join(30)
    assert set(outcome) == {"awatch", "wait"}
    for what, exc in outcome.items():
        assert type(exc) is shmcache.ShmCacheError and str(exc) == _closed_message(cache.name), \
            (what, exc)
    _until(lambda: not any(t.name.startswith(("shmcache-aio-", "shmcache-watch-"))
                           for t in threading.enumerate()), "the helper threads to exit")
    assert _mapped(cache.name) == []


def test_an_awatch_that_waits_after_close_raises_instead_of_hanging(
        cache: WriterProcess, unique_prefix: bytes) -> None:
    """A joined awatch that comes to wait just after close() (the demultiplexer thread has
    woken its waiters and gone) must not register a wait nobody will end: the
    demultiplexer refuses it, and the poll raises the closed error. Before, the wait was
    registered and the poll hung (seen as a proxy Watch stream that never ended)."""
    r = shmcache.Reader(cache.name)
    aw = r.awatch(unique_prefix)

    async def registered_after_close() -> bool:
        await aw.poll(0)  # joins the demultiplexer
        w = aw._watch
        assert w.joined
        r.close()
        _until(lambda: _demux.demux_of(r)._thread is None, "the demultiplexer to stop")
        fut = asyncio.get_running_loop().create_future()
        return w._demux.add_async(w._inbox, fut)

    assert asyncio.run(registered_after_close()) is False
    with pytest.raises(shmcache.ShmCacheError, match="closed"):
        asyncio.run(aw.poll(None))


def test_close_in_a_signal_handler_that_interrupted_the_demultiplexer_lock(
        cache: WriterProcess, unique_prefix: bytes) -> None:
    """The handler of a signal that lands while the main thread holds the demultiplexer's lock
    (as in Watch.poll -> Demux.take) closes the watch and the Reader: both return at once
    (neither waits for that lock), and the next read raises the closed error. In a child
    process, so that a deadlock fails the test instead of hanging it."""
    script = r"""
import os, signal, sys, shmcache
from shmcache.reader import demux as _demux
name, prefix = sys.argv[1], sys.argv[2].encode()
r = shmcache.Reader(name)
w = r.watch(prefix)
while not w.joined:
    w.poll(0.05)
def on_term(*_):
    w.close()
    r.close()
    print("handled", flush=True)
signal.signal(signal.SIGTERM, on_term)
d = _demux.demux_of(r)
with d.lock:
    os.kill(os.getpid(), signal.SIGTERM)  # the handler runs here, inside the lock
    print("after", flush=True)
assert w.closed
try:
    r.get(prefix + b"k001")
except shmcache.ShmCacheError as exc:
    assert str(exc) == f"Reader for {name!r} is closed", exc
    print("closed", flush=True)
"""
    try:
        out = subprocess.run([sys.executable, "-c", script, cache.name, unique_prefix.decode()],
                             capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        raise AssertionError("the signal handler deadlocked on the demultiplexer's lock") \
            from None
    assert out.returncode == 0 and out.stdout == "handled\nafter\nclosed\n", out.stderr[-3000:]


def test_cli_watch_exits_promptly_on_sigterm_and_sigint_while_events_stream(
        etcd_session: Any, cache_name: str, unique_prefix: bytes) -> None:
    """`shmcache watch` gets SIGTERM or SIGINT (alternately) while it prints a stream of
    events, 40 times: each time it exits with 0 well within the deadline. Its SIGTERM
    handler used to close the watch, taking the demultiplexer's lock that the interrupted
    main thread held in take(): a hang about once in 40."""
    w = WriterProcess(cache_name, etcd_session.endpoint, unique_prefix).start()
    durations = []
    try:
        with Putter(etcd_session, unique_prefix), Putter(etcd_session, unique_prefix + b"2"):
            for n in range(TRIALS):
                durations.append(_watch_and_stop(cache_name, unique_prefix,
                                                 signal.SIGTERM if n % 2 == 0 else signal.SIGINT,
                                                 random.Random(n).randint(5, 50)))
    finally:
        w.close()
    print(f"exit after signal: median {sorted(durations)[len(durations) // 2]:.3f}s, "
          f"max {max(durations):.3f}s")


TRIALS = int(os.environ.get("SHMCACHE_TEST_WATCH_TRIALS", "40"))


def _watch_and_stop(name: str, prefix: bytes, sig: int, lines: int) -> float:
    """Start `shmcache watch`, read its output as fast as it comes, send ``sig`` once it has
    printed ``lines`` events: the seconds it took to exit (with 0, within 10 s)."""
    proc = subprocess.Popen([sys.executable, "-m", "shmcache", "watch", name, prefix.decode()],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen = [0]

    def read() -> None:
        assert proc.stdout is not None
        for _line in proc.stdout:  # never a full pipe: the watch prints without blocking
            seen[0] += 1

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        _until(lambda: seen[0] >= lines or proc.poll() is not None, "events")
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        t0 = time.monotonic()
        proc.send_signal(sig)
        try:
            rc = proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"`shmcache watch` still runs 10 s after {sig!r}") from None
        took = time.monotonic() - t0
        assert rc == 0, (sig, rc, proc.stderr.read() if proc.stderr else "")
        return took
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(10)
        for f in (proc.stdout, proc.stderr):
            if f is not None:
                f.close()


# -- the view: a consistent block, fork --------------------------------------------------------


def test_prefix_is_read_with_its_block(etcd_session: Any, etcd_client: Any, cache_name: str,
                                       unique_prefix: bytes) -> None:
    """A block read before the writer published a new epoch with another prefix (of the same
    length) is never paired with that prefix: View.advance retries instead."""
    p1 = unique_prefix
    p2 = p1[:-2] + b"X/"
    put(etcd_client, p1 + b"a", b"1")
    w = WriterProcess(cache_name, etcd_session.endpoint, p1, ring_size="256KiB").start()
    try:
        w.terminate()  # segments kept
        ctl = control_reader.ControlReader.open(cache_name)
        b = ctl.block()
        assert b is not None and ctl.prefix(b.prefix_len) == p1
        # What the next writer does when it starts a new epoch with prefix p2: the prefix
        # is stored inside the seqlock, with the new block.
        shm = posix_ipc.SharedMemory(layout.control_name(cache_name), flags=0, size=0)
        buf = mmap.mmap(shm.fd, os.fstat(shm.fd).st_size)
        shm.close_fd()
        cw = control_writer.ControlWriter(buf)
        cw.publish({layout.B_EPOCH: b.epoch + 1}, prefix=p2)
        v = _view.View(cache_name, ctl)
        with pytest.raises(_view.Retry):
            v.advance(b)
        assert v.prefix != p2
        assert ctl.definitions(b) is None
        b2 = ctl.block()
        assert b2 is not None and ctl.definitions(b2) == (p2, ())
        buf.close()
        ctl.close()
    finally:
        w.close()


def test_a_fork_while_another_thread_moves_the_view_leaves_the_child_exact(
        etcd_session: Any, etcd_client: Any, cache_name: str, unique_prefix: bytes,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A thread keeps refreshing a Reader of a cache with a secondary index while writes
    stream and the writer republishes its snapshot every second; the process forks while
    that thread is inside View.advance, half-way through moving to a new snapshot. The
    child's list and index_values equal etcd's at the child's revision."""
    p = unique_prefix
    nodes = [b"n%d" % i for i in range(5)]
    for i in range(40):
        put(etcd_client, p + nodes[i % 5] + b"/k%03d" % i, b"v")
    w = WriterProcess(cache_name, etcd_session.endpoint, p, ring_size="256KiB",
                      extra=["--index", "node=segment:0", "--snapshot-interval", "1"]).start()
    r = shmcache.Reader(cache_name)
    snap_seq = r._view.snap_seq
    real = _view.RecentIndex
    paused, resume = threading.Event(), threading.Event()
    stop = threading.Event()

    def pausing(n: int) -> Any:
        # Called in advance() after the new snapshot and ring are in place, before the
        # overlay, its index and the position are.
        if threading.current_thread() is mover:
            paused.set()
            resume.wait(60)
        return real(n)

    def move() -> None:
        while not stop.is_set():
            r.revision  # noqa: B018 - refreshes
            time.sleep(0.001)

    monkeypatch.setattr(_view, "RecentIndex", pausing)
    mover = threading.Thread(target=move, daemon=True)
    client = etcd_session.client()
    rfd, wfd = os.pipe()
    try:
        mover.start()
        i = 0
        deadline = time.monotonic() + 60
        while not paused.is_set():  # writes until a new snapshot reaches the mover
            assert time.monotonic() < deadline, "no new snapshot reached the reader"
            put(client, p + nodes[i % 5] + b"/k%03d" % (100 + i % 30), b"w%d" % i)
            if i % 7 == 0:
                client.delete(p + nodes[i % 3] + b"/k%03d" % (i % 40))
            i += 1
        assert r._view.snap_seq != snap_seq
        pid = os.fork()
        if pid == 0:  # the child: read, report, exit without cleanup
            try:
                os.close(rfd)
                res = r.list(p)
                data = pickle.dumps((res.revision, [(kv.key, kv.value) for kv in res.items],
                                     r.index_values("node"), r.revision))
            except BaseException as exc:  # noqa: BLE001
                data = pickle.dumps(repr(exc))
            os.write(wfd, struct.pack("<Q", len(data)) + data)
            os._exit(0)
        os.close(wfd)
        resume.set()
        with os.fdopen(rfd, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            got = pickle.loads(f.read(n))
        os.waitpid(pid, 0)
        assert not isinstance(got, str), got
        rev, items, counts, rev2 = got
        assert rev == rev2
        want = etcd_range(etcd_client, p, rev)
        assert items == [(kv.key, kv.value) for kv in want]
        by_node = Counter(kv.key[len(p):].split(b"/")[0] for kv in want)
        assert counts == dict(sorted(by_node.items()))
    finally:
        resume.set()
        stop.set()
        mover.join(30)
        r.close()
        client.close()
        w.close()


# -- attach errors ----------------------------------------------------------------------------


def test_a_failed_attach_leaves_nothing_mapped(cache: WriterProcess) -> None:
    """Reader() on a cache whose snapshot is damaged raises CorruptSegmentError and has
    unmapped the control segment and the ring already (not whenever the error is dropped)."""
    cache.terminate()
    with shmcache.Reader(cache.name) as r:
        seq = r._view.snap_seq
    name = layout.snapshot_name(cache.name, seq)
    shm = posix_ipc.SharedMemory(name, flags=0, size=0)
    with mmap.mmap(shm.fd, os.fstat(shm.fd).st_size) as m:
        m[0] ^= 0xFF  # the magic
    shm.close_fd()
    with pytest.raises(shmcache.CorruptSegmentError) as info:
        shmcache.Reader(cache.name)
    assert info.value is not None
    assert _mapped(cache.name) == []


def test_a_refused_index_segment_is_unmapped_at_once(
        etcd_session: Any, etcd_client: Any, cache_name: str, unique_prefix: bytes) -> None:
    """by_index on a cache whose index segment header is damaged raises CorruptSegmentError
    and has unmapped that segment already, while the error (whose traceback holds the
    half-made segment object) is still alive: a refused segment keeps no buffer export
    that would pin its mapping (format/mapped.py)."""
    for i in range(20):
        put(etcd_client, unique_prefix + b"n%d/k%03d" % (i % 3, i), b"v%d" % i)
    w = WriterProcess(cache_name, etcd_session.endpoint, unique_prefix, ring_size="256KiB",
                      extra=["--index", "top=segment:0"])
    try:
        w.start()
        w.terminate()
        with shmcache.Reader(cache_name) as r:
            seq = r._view.snap_seq
            assert r.by_index("top", b"n1").items
        name = layout.index_name(cache_name, seq)
        shm = posix_ipc.SharedMemory(name, flags=0, size=0)
        with mmap.mmap(shm.fd, os.fstat(shm.fd).st_size) as m:
            m[0] ^= 0xFF  # the magic
        shm.close_fd()
        with shmcache.Reader(cache_name) as r:
            with pytest.raises(shmcache.CorruptSegmentError) as info:
                r.by_index("top", b"n1")
            assert info.value is not None
            assert [line for line in _mapped(cache_name) if ".idx." in line] == []
    finally:
        w.close()


def test_a_publish_left_half_done_is_a_clear_error_for_a_new_reader(
        cache: WriterProcess) -> None:
    """A writer killed between the two SEQ stores of a publish leaves SEQ odd: a new Reader
    raises ShmCacheError saying so (after its timeout), never AssertionError."""
    cache.kill()
    shm = posix_ipc.SharedMemory(layout.control_name(cache.name), flags=0, size=0)
    with mmap.mmap(shm.fd, os.fstat(shm.fd).st_size) as m:
        seq = struct.unpack_from("<Q", m, layout.C_SEQ)[0]
        struct.pack_into("<Q", m, layout.C_SEQ, seq + 1)
    shm.close_fd()
    for timeout in (0.0, 0.2):
        with pytest.raises(shmcache.ShmCacheError, match="stopped inside a publish"):
            r = shmcache.Reader(cache.name, timeout=timeout)
            r.get(b"x")
    assert _mapped(cache.name) == []
