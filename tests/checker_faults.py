"""The fault checker's host faults (tests/checker.py): flipped bytes in a live segment, a Reader
closed under its calls, and a writer whose publishing fails with ENOSPC.

- ``Flip``: the checker process maps a segment of the running cache read-write (as root it
  may) and flips one byte of the control segment's block or prefix, a ring record, the
  snapshot, the overlay segment or the index segment for a moment while readers read, then
  puts the byte back unless the writer has rewritten it meanwhile. Readers must answer
  exactly or raise ``CorruptSegmentError``; the writer is never left serving a byte the
  checker changed.
- ``close_under_reads``: a child process reads through one Reader from several threads and
  closes it from another thread or from a signal handler in the middle of their calls;
  every call ends, each with the one closed error (docs/api.md) or an explicit error
  decided before the close, and a fresh Reader then equals etcd.
- ``enospc_supported``: whether this shmcache's ``SHMCACHE_FAULT`` has the ``enospc``
  action (``POINT:PROBABILITY:enospc``), which the ENOSPC fault needs.
"""

from __future__ import annotations

import mmap
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import shmcache
from shmcache.format import control, layout

# Where a byte can be flipped (the fault kind is "flip_" + the segment).
FLIP_SEGMENTS = ("control_block", "control_prefix", "ring", "snapshot", "overlay", "index")

# The publishing steps that allocate /dev/shm, where ENOSPC strikes when it fills: each
# creates a segment (shmcache/writer/faults.py on the `publish` branch). Appends, head and tail
# write into the ring's pages, reserved when the ring was created (posix_fallocate).
ENOSPC_POINTS = ("snapshot", "index", "overlay", "ring_switch", "epoch")


def publish_failure_is_a_state() -> bool:
    """True if this shmcache's writer treats a failing publish as a state it retries
    (``Status.publish_error``), not as an etcd error."""
    import dataclasses

    return "publish_error" in {f.name for f in dataclasses.fields(shmcache.Status)}


def enospc_supported() -> bool:
    """True if SHMCACHE_FAULT accepts ``POINT:PROBABILITY:enospc`` in this shmcache."""
    from shmcache.writer import faults as _faults

    return "enospc" in getattr(_faults, "ACTIONS", ())


def unsupported(kinds: list[str], indexed: bool) -> dict[str, str]:
    """The fault kinds among ``kinds`` that this shmcache or this run cannot inject, each
    with the reason (the run skips them and says so)."""
    why = {}
    if "writer_enospc" in kinds and not enospc_supported():
        why["writer_enospc"] = ("this shmcache's SHMCACHE_FAULT has no 'enospc' action "
                                "(shmcache/writer/faults.py; it comes with the `publish` branch)")
    elif "writer_enospc" in kinds and not publish_failure_is_a_state():
        # Such a writer takes ENOSPC for an etcd error and reconnects several times a
        # second, which the catch-up check reports as a divergence (issue 18, item 2).
        why["writer_enospc"] = ("this writer takes ENOSPC for an etcd error (no "
                                "Status.publish_error; that comes with the `writerstate` "
                                "branch)")
    if "flip_overlay" in kinds and indexed:
        why["flip_overlay"] = ("a writer that keeps indexes builds no overlay segments "
                               "(run(indexed=False), soak --no-index)")
    if "flip_index" in kinds and not indexed:
        why["flip_index"] = "the writer keeps no index (indexed=False)"
    return why


def _path(segment: str) -> str:
    return "/dev/shm/" + segment.lstrip("/")


@dataclass
class Flip:
    """One flipped byte: ``restore()`` puts it back unless the writer rewrote it meanwhile.

    Concurrency contract: made and restored by the checker's main thread while the writer
    runs. A byte the writer may rewrite (the block, a ring record it laps) is restored only
    if nothing the writer does since the flip can have written it: the block's SEQ unchanged,
    the ring tail not past the record, and the byte still the flipped one.
    """

    segment: str
    offset: int
    original: int
    flipped: int
    buf: mmap.mmap
    ctl: mmap.mmap
    seq: int  # the control SEQ when flipped
    ring_pos: int | None = None  # a ring byte's logical position

    def restore(self) -> bool:
        """Put the byte back; False if the writer had rewritten it (then it is the writer's)."""
        try:
            if self.segment.endswith(".ctl") and self.offset < layout.C_PREFIX:
                # The block: every publish rewrites it whole from the writer's own copy.
                still = _seq(self.ctl) == self.seq
            elif self.ring_pos is not None:
                still = _tail(self.ctl) <= self.ring_pos
            else:
                still = True
            if still and self.buf[self.offset] == self.flipped:
                self.buf[self.offset] = self.original
                return True
            return False
        finally:
            self.buf.close()
            self.ctl.close()


def _seq(ctl: mmap.mmap) -> int:
    return int.from_bytes(ctl[layout.C_SEQ:layout.C_SEQ + 8], "little")


def _tail(ctl: mmap.mmap) -> int:
    off = layout.C_BLOCK + 8 * layout.B_RING_TAIL
    return int.from_bytes(ctl[off:off + 8], "little")


def _map_rw(segment: str) -> mmap.mmap | None:
    try:
        fd = os.open(_path(segment), os.O_RDWR)
    except FileNotFoundError:
        return None  # replaced meanwhile
    try:
        size = os.fstat(fd).st_size
        return mmap.mmap(fd, size) if size else None
    finally:
        os.close(fd)


def _where(name: str, where: str, b: control.Block, rnd: random.Random
           ) -> tuple[str, int | None, int | None, int | None] | None:
    """(segment, first and end offset to flip in or None for the whole segment, ring
    position or None), or None if the cache has no such segment now."""
    ctl = layout.control_name(name)
    if where == "control_block":
        return ctl, layout.C_BLOCK, layout.C_BLOCK + layout.BLOCK.size, None
    if where == "control_prefix":
        return (ctl, layout.C_PREFIX, layout.C_PREFIX + b.prefix_len, None) if b.prefix_len \
            else None
    if where == "ring":
        if b.ring_head - b.ring_tail < 32:
            return None
        pos = rnd.randrange(b.ring_tail, b.ring_head)  # a byte of a record readers may read
        at = layout.RING_DATA + pos % b.ring_capacity
        return layout.ring_name(name, b.ring_gen), at, at + 1, pos
    if where == "snapshot":
        return layout.snapshot_name(name, b.snap_seq), None, None, None
    if where == "overlay":
        return (layout.overlay_name(name, b.ovl_seq), None, None, None) if b.ovl_seq else None
    assert where == "index", where
    return (layout.index_name(name, b.snap_seq), None, None, None) if b.index_defs_len \
        else None


def flip(name: str, where: str, rnd: random.Random) -> Flip | None:
    """Flip one bit of cache ``name``'s segment ``where`` (FLIP_SEGMENTS); None if the cache
    has no such segment now (no overlay while indexes are kept, a ring without records)."""
    if where not in FLIP_SEGMENTS:
        raise ValueError(f"no segment {where!r} to flip a byte in")
    ctl = _map_rw(layout.control_name(name))
    if ctl is None:
        return None
    b = control.read_block(ctl)
    found = _where(name, where, b, rnd) if b is not None and b.snap_seq else None
    buf = _map_rw(found[0]) if found is not None else None  # (the control segment too:
    if found is None or buf is None:                      # restore() closes both)
        ctl.close()
        return None
    target, lo, hi, ring_pos = found
    if lo is None or hi is None:
        # A third of the flips in the header (what attaching checks), the rest anywhere.
        lo, hi = 0, (min(len(buf), 128) if rnd.random() < 1 / 3 else len(buf))
    offset = rnd.randrange(lo, hi)
    original = buf[offset]
    flipped = original ^ (1 << rnd.randrange(8))
    seq = _seq(ctl)
    buf[offset] = flipped
    return Flip(target, offset, original, flipped, buf, ctl, seq, ring_pos)


class StepOverrun(Exception):
    """A fault step took longer than the run's ``step_limit``."""


def flip_round(name: str, where: str, connect: Callable[[], Any], prefix: bytes,
               rnd: random.Random) -> tuple[dict[str, int], list[str]] | None:
    """Flip a byte in segment ``where`` for a moment (the running readers read it), attach
    fresh Readers meanwhile (probe_while_flipped), and restore it. None if the cache has
    no such segment now; else the probe's (counts, problems). ``connect()``: an etcd client."""
    flipped = flip(name, where, rnd)
    if flipped is None:
        return None
    try:
        client = connect()
        try:
            return probe_while_flipped(name, client, prefix, rnd.uniform(0.05, 0.5))
        finally:
            client.close()
    finally:
        flipped.restore()


def close_round(ctx: Any, name: str, endpoint: str, prefix: bytes, how: str, seed: int,
                indexed: bool, results: Any, limit: float) -> list[str]:
    """Run close_under_reads in a child process (its counts go to ``results``); the
    divergences it could not report itself. StepOverrun if it has not ended in ``limit``
    seconds."""
    child = ctx.Process(target=close_under_reads,
                        args=(name, endpoint, prefix, how, seed, indexed, results))
    child.start()
    child.join(limit)
    if child.is_alive():
        child.kill()
        child.join()
        raise StepOverrun(f"a reader closed by {how} had not finished after {limit:.0f}s")
    return [f"a reader closed by {how} exited with {child.exitcode}"] if child.exitcode else []


def enospc_spec(rnd: random.Random) -> str:
    """A SHMCACHE_FAULT value: two or three segment creations fail with ENOSPC half of
    the time (/dev/shm filling and freed again by other users)."""
    return ",".join(f"{p}:0.5:enospc" for p in rnd.sample(ENOSPC_POINTS, rnd.randint(2, 3)))


def catches_up(name: str, connect: Callable[[], Any], limit: float, spec: str) -> list[str]:
    """The cache reaches etcd's current revision within ``limit`` seconds although
    publishing fails as ``spec`` says (a full /dev/shm now and then); else a divergence."""
    from tests.helpers import etcd_current_revision

    client = connect()
    try:
        rev = etcd_current_revision(client)
    finally:
        client.close()
    with shmcache.Reader(name, timeout=30) as r:
        if r.wait(rev, timeout=limit):
            return []
        return [f"SHMCACHE_FAULT={spec}: the cache stayed at {r.revision} < etcd's {rev} "
                f"for {limit:.0f}s"]


def log_divergences(writer_log: str) -> list[str]:
    """What the writer's log shows it did wrong under these faults: a full /dev/shm taken
    for an etcd error (the writer must not reconnect to etcd for it: issue 18, item 2)."""
    lines = [line for line in writer_log.splitlines()
             if "etcd error" in line and "[Errno 28]" in line]
    if not lines:
        return []
    return [f"the writer took ENOSPC for an etcd error and reconnected {len(lines)} times: "
            f"{lines[0][:300]}"]


def closed_message(name: str) -> str:
    return f"Reader for {name!r} is closed"


EXPLICIT = (shmcache.CompactedError, shmcache.StaleError, shmcache.TimeoutError,
            shmcache.NotFoundError)


def classify_end(name: str, exc: BaseException, started_after_close: bool) -> str | None:
    """How a call on a Reader that is being closed ended with ``exc``: "closed", "explicit",
    or None for a finding. A call that started after close() returned may only raise the
    closed error; one in flight may also have decided an explicit error before the close."""
    if type(exc) is shmcache.ShmCacheError and str(exc) == closed_message(name):
        return "closed"
    if isinstance(exc, EXPLICIT) and not started_after_close:
        return "explicit"
    return None


def close_under_reads(name: str, endpoint: str, prefix: bytes, how: str, seed: int,
                      indexed: bool, results: Any) -> None:
    """In a child process: threads read through one Reader; it is closed by another thread
    (``how="thread"``) or by SIGALRM's handler in the main thread (``how="signal"``) while
    they read. Puts ``("close", counts, problems)`` on ``results``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from tests.etcdserver import use_pure_python_protobuf

    use_pure_python_protobuf()
    import etcd3

    from tests.helpers import etcd_range

    rnd = random.Random(seed)
    host, port = endpoint.rsplit(":", 1)
    client = etcd3.client(host=host.split("//")[-1], port=int(port), timeout=5)
    counts = {"closed": 0, "explicit": 0, "lists": 0}
    problems: list[str] = []
    lists: list[tuple[int, list[Any]]] = []
    closed: list[int] = []  # appended once close() returned (a signal handler takes no lock)
    r = shmcache.Reader(name, timeout=30)
    ran: dict[str, int] = {}

    def loop(what: str, call: Callable[[], Any]) -> None:
        while True:
            started_after_close = bool(closed)
            try:
                out = call()
            except BaseException as exc:  # noqa: BLE001 - classified below
                kind = classify_end(name, exc, started_after_close)
                if kind is None:
                    problems.append(f"reader closed by {how}: {what} ended with "
                                    f"{type(exc).__name__}: {exc}"[:400])
                    return
                counts[kind] += 1
                if kind == "closed":
                    return
                continue
            if started_after_close:
                problems.append(f"reader closed by {how}: {what} returned after close()")
                return
            if what == "list" and len(lists) < 3:
                lists.append((out.revision, list(out.items)))
            ran[what] = ran.get(what, 0) + 1

    keys = [prefix + b"k%03d" % i for i in range(60)]
    w = r.watch(prefix)
    calls: dict[str, Callable[[], Any]] = {
        "list": lambda: r.list(prefix),
        "get": lambda: r.get(rnd.choice(keys)),
        "watch": lambda: w.poll(timeout=0.2),
        "wait": lambda: r.wait(r.revision + 1, timeout=2),
        "sync": lambda: r.sync(timeout=5),
        "past": lambda: r.list(prefix, revision=max(r.status().oldest_watchable_revision,
                                                    r.revision - 2)),
    }
    if indexed:
        calls["by_index"] = lambda: r.by_index("top", b"sub")
    main_call = calls.pop("get")
    threads = [threading.Thread(target=loop, args=(n, c), daemon=True) for n, c in calls.items()]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while len(ran) < len(calls) and time.monotonic() < deadline and not problems:
        time.sleep(0.01)

    def close_now(*_: Any) -> None:
        r.close()
        closed.append(1)

    delay = rnd.uniform(0.001, 0.2)
    if how == "signal":
        signal.signal(signal.SIGALRM, close_now)
        signal.setitimer(signal.ITIMER_REAL, delay)
    else:
        threading.Timer(delay, close_now).start()
    loop("get", main_call)  # the main thread reads too: the signal lands mid-call
    for t in threads:
        t.join(30)
        if t.is_alive():
            problems.append(f"reader closed by {how}: a call still runs 30 s after close()")
    for rev, items in lists:  # answers returned while closing are exact too
        try:
            want = etcd_range(client, prefix, rev)
        except Exception:  # noqa: BLE001 - etcd compacted it (or is down): not verifiable
            continue
        if items != want:
            problems.append(f"reader closed by {how}: a list at {rev} differs from etcd")
        counts["lists"] += 1
    # A fresh Reader goes on and equals etcd.
    try:
        with shmcache.Reader(name, timeout=30) as fresh:
            res = fresh.list(prefix)
        if res.items != etcd_range(client, prefix, res.revision):
            problems.append(f"a fresh Reader after close by {how}: list at {res.revision} "
                            "differs from etcd")
        counts["lists"] += 1
    except EXPLICIT:
        counts["explicit"] += 1
    except Exception as exc:  # noqa: BLE001 - reported, not raised: the run goes on
        problems.append(f"a fresh Reader after close by {how}: {type(exc).__name__}: {exc}"[:400])
    client.close()
    results.put(("close", counts, problems))


def probe_while_flipped(name: str, client: Any, prefix: bytes, seconds: float
                        ) -> tuple[dict[str, int], list[str]]:
    """For ``seconds`` while a byte is flipped: attach fresh Readers (they read the control
    block and the headers anew, where running Readers keep what they had) and list; each
    answer must equal etcd at its revision, or be CorruptSegmentError. Returns (counts,
    problems) in reader_loop's terms."""
    from tests.helpers import etcd_range

    counts = {"lists": 0, "corrupt": 0, "explicit": 0}
    problems: dict[str, int] = {}  # each finding once, with how often it happened

    def seen(problem: str) -> None:
        problems[problem] = problems.get(problem, 0) + 1

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with shmcache.Reader(name, timeout=5) as r:
                res = r.list(prefix)
        except shmcache.CorruptSegmentError:
            counts["corrupt"] += 1
            continue
        except EXPLICIT:
            counts["explicit"] += 1
            continue
        except Exception as exc:  # noqa: BLE001 - a finding, reported
            seen(f"a Reader attached to a flipped byte: {type(exc).__name__}: {exc}"[:400])
            continue
        try:
            want = etcd_range(client, prefix, res.revision)
        except Exception:  # noqa: BLE001 - etcd no longer has that revision (or never had)
            seen(f"a Reader attached to a flipped byte reports revision {res.revision}, "
                 "which etcd cannot answer for")
            continue
        if res.items != want:
            seen(f"a Reader attached to a flipped byte: list at {res.revision} differs from "
                 f"etcd ({len(res.items)} vs {len(want)} keys)")
        counts["lists"] += 1
    return counts, [f"{p} ({n} times)" if n > 1 else p for p, n in problems.items()]


def fill_dev_shm(seconds: float) -> None:
    """Take all but 64 KiB of /dev/shm for ``seconds``: publishing fails (ENOSPC) until it
    is freed. Only where /dev/shm is the run's own tmpfs (``checker.run(shm_full=True)``)."""
    st = os.statvfs("/dev/shm")
    fd = os.open("/dev/shm/checker-filler", os.O_CREAT | os.O_WRONLY, 0o600)
    try:
        os.posix_fallocate(fd, 0, max(1, st.f_bavail * st.f_frsize - (64 << 10)))
    except OSError:
        pass  # (nearly full already)
    finally:
        os.close(fd)
    time.sleep(seconds)
    os.unlink("/dev/shm/checker-filler")

