"""Publishing is a transaction: every step fails whole (ENOSPC, or an unexpected error) and recovers.

The publisher is driven with synthetic batches over real /dev/shm segments
(as in test_publisher.py). At each fault point (shmcache.writer.faults) a step is made
to raise, once with ``OSError(ENOSPC)`` (a full /dev/shm) and once with a
``RuntimeError`` (a bug); then, fault cleared, the publisher is called again
with what it has not applied yet (batches above ``Publisher.revision``). Real
Readers, in this process and in a child, must meanwhile and afterwards see a
consistent cache: watches from every revision the cache advertises receive
exactly the events after it, get/list equal the expected state, ``shmcache check``
is clean, and no segment is left over.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

import shmcache
from shmcache.cli import check as _check
from shmcache.format import codec as _codec
from shmcache.format import control, layout
from shmcache.format import indexspec as _indexdef
from shmcache.format.codec import EventTuple
from shmcache.ipc import shm as _shm
from shmcache.writer import faults as _faults
from shmcache.writer.indexer import Indexer
from shmcache.writer.lock import remove_cache
from shmcache.writer.publisher import Publisher
from shmcache.writer.segments import CacheSegments
from tests.test_publisher import P, _stats, delete, put

ACTIONS = {"enospc": OSError, "error": RuntimeError}


@pytest.fixture(autouse=True)
def _no_faults_after() -> Iterator[None]:
    yield
    _faults.configure("")


def make(name: str, ring_size: int = 64 << 10, snapshot_bytes: int = 1 << 30,
         indexed: bool = False) -> Publisher:
    segs = CacheSegments(name, P, 0o600, None)
    indexer = None
    if indexed:
        indexer = Indexer(_indexdef.IndexSet((_indexdef.make("i", "segment:0"),), P))
    p = Publisher(segs, ring_size=ring_size, snapshot_interval=3600.0,
                  snapshot_bytes=snapshot_bytes, stats=_stats(), indexer=indexer)
    p.attach()
    if indexed:
        p.ctl.index_defs = _indexdef.encode_defs(indexer.iset.defs)  # type: ignore[union-attr]
    return p


@dataclass
class Model:
    """What etcd would hold: the state now and every revision's events since ``base``."""

    base: int = 0  # the revision the history starts at (the last reset's)
    state: dict[bytes, bytes] = field(default_factory=dict)
    events: list[tuple[int, str, bytes, bytes]] = field(default_factory=list)

    def reset(self, revision: int, items: dict[bytes, bytes]) -> None:
        self.base, self.state, self.events = revision, dict(items), []

    def batch(self, revision: int, n_keys: int = 3, size: int = 2000,
              deletes: bool = True) -> tuple[int, list[EventTuple]]:
        """Put into a few keys (and delete one now and then): the batch for ``revision``."""
        evs: list[EventTuple] = []
        for i in range(n_keys):
            key = P + b"k%02d" % ((revision * 7 + i) % 23)
            if deletes and i == 0 and revision % 5 == 0 and key in self.state:
                evs.append(delete(key, revision))
            else:
                value = b"%d:" % revision + b"x" * size
                evs.append(put(key, value, revision))
        return revision, evs

    def applied(self, batches: list[tuple[int, list[EventTuple]]]) -> None:
        for revision, evs in batches:
            for ev in evs:
                if ev[0] == 0:
                    self.state[ev[1]] = ev[2]
                    self.events.append((revision, "PUT", ev[1], ev[2]))
                else:
                    self.state.pop(ev[1], None)
                    self.events.append((revision, "DELETE", ev[1], b""))


def apply_all(p: Publisher, model: Model, batches: list[tuple[int, list[EventTuple]]]) -> None:
    """Apply ``batches`` as the writer loop does: what is above ``p.revision``."""
    p.apply([b for b in batches if b[0] > p.revision])
    p.maybe_snapshot()
    model.applied(batches)


def expected_segments(name: str) -> set[str]:
    seg = _shm.open_readonly(layout.control_name(name))
    assert seg is not None
    try:
        b = control.read_block(seg.buf)
        assert b is not None
    finally:
        seg.close()
    out = {layout.control_name(name), layout.ring_name(name, b.ring_gen),
           layout.snapshot_name(name, b.snap_seq)}
    if b.index_defs_len:
        out.add(layout.index_name(name, b.snap_seq))
    if b.ovl_seq:
        out.add(layout.overlay_name(name, b.ovl_seq))
    return out


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def verify(p: Publisher, name: str, model: Model, revision: int | None = None) -> None:
    """Readers see exactly the model at ``revision`` (default: the publisher's), from every
    advertised revision; check is clean; the segments are exactly those published."""
    revision = p.revision if revision is None else revision
    with shmcache.Reader(name) as r:
        assert r.revision == revision
        assert {kv.key: kv.value for kv in r.list(P)} == model.state
        for key in list(model.state)[:5]:
            got = r.get(key)
            assert got is not None and got.value == model.state[key]
        st = r.status()
        assert model.base <= st.oldest_watchable_revision <= revision
        for since in range(st.oldest_watchable_revision, revision + 1):
            w = r.watch(P, since_revision=since)
            got_events = [(e.revision, e.type, e.kv.key, e.kv.value if e.type == "PUT" else b"")
                          for e in drain_all(w, revision)]
            assert got_events == [e for e in model.events if e[0] > since], (
                f"watch from {since}")
            w.close()
    facts, problems = _check.check_cache(name)
    assert problems == [], problems
    wait_for(lambda: set(_shm.list_segments(name)) == expected_segments(name),
             f"only published segments: {_shm.list_segments(name)}")


def drain_all(w: shmcache.Watch, until: int) -> list[shmcache.Event]:
    out: list[shmcache.Event] = []
    deadline = time.monotonic() + 15
    while w.revision < until:
        assert time.monotonic() < deadline, f"watch stuck at {w.revision} < {until}"
        out.extend(w.poll(timeout=0.5))
    return out


def child_reads(name: str) -> tuple[int, int]:
    """A reader in another process: (revision, number of keys)."""
    code = ("import shmcache, sys; r = shmcache.Reader(sys.argv[1]); "
            "print(r.revision, len(r.list(b'/p/')))")
    out = subprocess.run([sys.executable, "-c", code, name], capture_output=True, text=True,
                         timeout=60, check=True).stdout.split()
    return int(out[0]), int(out[1])


def fail(spec: str, call: Callable[[], object]) -> None:
    """Configure fault ``POINT:1:ACTION``, expect ``call`` to raise it, clear the fault."""
    action = spec.rsplit(":", 1)[1]
    _faults.configure(spec)
    with pytest.raises(ACTIONS[action]) as exc:
        call()
    _faults.configure("")
    if action == "enospc":
        assert exc.value.errno == errno.ENOSPC  # type: ignore[union-attr]


# -- one scenario per fault point ------------------------------------------------------
#
# Each starts from a cache with some history, fails the step once, checks what readers
# see right then (the last published state), recovers and checks again.


def _prime(p: Publisher, model: Model, first: int, n: int) -> int:
    model.reset(first, {P + b"init": b"0"})
    p.reset(first, [(P + b"init", (b"0", first, first, 1, 0))], "test")
    for rev in range(first + 1, first + 1 + n):
        apply_all(p, model, [model.batch(rev)])
    return first + n


def _steps_until(p: Publisher, model: Model, rev: int, cond: Callable[[], bool]) -> int:
    """Apply revisions after ``rev`` until ``cond()``; the last revision applied."""
    for _ in range(500):
        if cond():
            return rev
        rev += 1
        apply_all(p, model, [model.batch(rev)])
    raise AssertionError("condition never met")


def _next_end(p: Publisher, model: Model) -> int:
    """Where the next revision's record would end in the ring (RingWriter.place's
    arithmetic, spelled out so that it does not depend on the code under test)."""
    rw = p.ring
    assert rw is not None
    batch = [ev if ev[1] not in p.kv else (*ev[:7], (ev[1], *p.kv[ev[1]]))  # prev_kv filled
             for ev in model.batch(p.revision + 1)[1]]
    size = rw.record_size(len(_codec.encode(batch)))
    room = rw.capacity - rw.head % rw.capacity
    return rw.head + (room if size > room else 0) + size


def _would_evict(p: Publisher, model: Model) -> bool:
    assert p.ring is not None
    return bool(p.ring.records) and p.ring.records[0][0] < _next_end(p, model) - p.ring.capacity


def _would_force_a_snapshot(p: Publisher, model: Model) -> bool:
    """The next append overwrites records (dropping history) and records newer than the
    live snapshot (forcing one)."""
    assert p.ring is not None
    return (_would_evict(p, model)
            and _next_end(p, model) - p.ring.capacity > p.snap_ring_pos)


def scenario_append(p: Publisher, name: str, model: Model, action: str) -> None:
    rev = _prime(p, model, 10, 5)
    batch = model.batch(rev + 1)
    fail("append:1:" + action, lambda: p.apply([batch]))
    assert p.revision == rev == p.published_revision()
    verify(p, name, model)
    apply_all(p, model, [batch])
    apply_all(p, model, [model.batch(rev + 2)])
    verify(p, name, model)


def scenario_tail(p: Publisher, name: str, model: Model, action: str) -> None:
    rev = _prime(p, model, 10, 3)
    rev = _steps_until(p, model, rev, lambda: _would_evict(p, model))
    batch = model.batch(rev + 1)
    fail("tail:1:" + action, lambda: p.apply([batch]))
    assert p.revision == rev
    verify(p, name, model)
    apply_all(p, model, [batch])
    rev += 1
    for r in range(rev + 1, rev + 40):  # lap the ring again
        apply_all(p, model, [model.batch(r)])
    verify(p, name, model)


def scenario_head(p: Publisher, name: str, model: Model, action: str) -> None:
    rev = _prime(p, model, 10, 5)
    batches = [model.batch(rev + 1), model.batch(rev + 2)]
    published = p.published_revision()
    fail("head:1:" + action, lambda: p.apply(batches))
    # Appended and applied, not published: readers stay at the previous revision.
    assert p.revision == rev + 2 and p.published_revision() == published == rev
    verify(p, name, model, revision=rev)
    apply_all(p, model, batches)  # nothing left to append: publishes the head
    assert p.published_revision() == rev + 2
    apply_all(p, model, [model.batch(rev + 3)])
    verify(p, name, model)


def scenario_progress(p: Publisher, name: str, model: Model, action: str) -> None:
    rev = _prime(p, model, 10, 5)
    fail("progress:1:" + action, lambda: p.progress(rev + 4))
    assert p.revision == rev == p.published_revision()
    verify(p, name, model)
    p.progress(rev + 4)
    apply_all(p, model, [model.batch(rev + 5)])
    verify(p, name, model)


def scenario_forced_snapshot(point: str) -> Callable[[Publisher, str, Model, str], None]:
    """The ring must overwrite records newer than the live snapshot: the forced snapshot
    (``snapshot`` / ``index`` / ``snapshot_publish``) fails, and nothing of the append
    happens; the issue's silent skip was the records dropped before it."""
    def run(p: Publisher, name: str, model: Model, action: str) -> None:
        rev = _prime(p, model, 1, 0)
        assert p.ring is not None
        rev = _steps_until(p, model, rev, lambda: _would_force_a_snapshot(p, model))
        batch = model.batch(rev + 1)
        snaps = p.stats["snapshots"]
        fail(f"{point}:1:{action}", lambda: p.apply([batch]))
        assert p.stats["snapshots"] == snaps and p.revision == rev
        verify(p, name, model)
        assert child_reads(name) == (rev, len(model.state))
        apply_all(p, model, [batch])
        for r in range(rev + 2, rev + 30):
            apply_all(p, model, [model.batch(r)])
        verify(p, name, model)
    return run


def scenario_overlay(p: Publisher, name: str, model: Model, action: str) -> None:
    """A background overlay build fails: nothing is published or left; the next call of
    maybe_snapshot builds it again, with the changes the failed one had."""
    rev = _prime(p, model, 10, 0)
    assert p.delta_segments is not None
    _faults.configure(f"overlay:1:{action}")
    seq = p.ctl.get(layout.B_OVL_SEQ)
    while p.delta_segments.build is None and p.delta_segments.failed is None:
        rev += 1
        apply_all(p, model, [model.batch(rev, size=8000)])
    wait_for(lambda: p.delta_segments is not None and p.delta_segments.failed is not None,
             "the overlay build to fail")
    _faults.configure("")
    assert p.ctl.get(layout.B_OVL_SEQ) == seq
    verify(p, name, model)
    p.maybe_snapshot()  # retries
    wait_for(lambda: p.ctl.get(layout.B_OVL_SEQ) > seq, "the overlay segment")
    for r in range(rev + 1, rev + 5):
        apply_all(p, model, [model.batch(r, size=8000)])
    verify(p, name, model)


def scenario_ring_switch(p: Publisher, name: str, model: Model, action: str) -> None:
    """Two revisions in one call, the second too large for the ring: the first is
    published, the second's ring growth fails whole and ``revision`` says where to go on."""
    rev = _prime(p, model, 10, 5)
    small = model.batch(rev + 1)
    big = model.batch(rev + 2, n_keys=400, size=200)  # ~90 KB: larger than half the ring
    gen = p.ctl.get(layout.B_RING_GEN)
    fail(f"ring_switch:1:{action}", lambda: p.apply([small, big]))
    model.applied([small])
    assert p.ctl.get(layout.B_RING_GEN) == gen and p.revision == rev + 1
    assert p.published_revision() == rev + 1
    verify(p, name, model)
    apply_all(p, model, [big])
    assert p.ctl.get(layout.B_RING_GEN) == gen + 1
    apply_all(p, model, [model.batch(rev + 3)])
    verify(p, name, model)


def scenario_epoch(p: Publisher, name: str, model: Model, action: str) -> None:
    rev = _prime(p, model, 10, 5)
    items = {P + b"a": b"1", P + b"b": b"2"}
    kvs = [(k, (v, 30, 30, 1, 0)) for k, v in items.items()]
    epoch = p.epoch
    fail(f"epoch:1:{action}", lambda: p.reset(30, kvs, "test"))
    assert (p.epoch, p.revision) == (epoch, rev) == (p.ctl.get(layout.B_EPOCH),
                                                     p.published_revision())
    verify(p, name, model)
    apply_all(p, model, [model.batch(rev + 1)])  # the old epoch goes on meanwhile
    verify(p, name, model)
    p.reset(30, kvs, "test")
    model.reset(30, items)
    apply_all(p, model, [model.batch(31)])
    verify(p, name, model)


def scenario_restore(p: Publisher, name: str, model: Model, action: str) -> None:
    try:
        rev = _prime(p, model, 10, 5)
    finally:
        p.close(removed_under_us=False, remove=False)
    q = make(name)
    try:
        fail(f"restore:1:{action}", q.restore)
        assert q.ring is None and q.base is None
        verify(q, name, model, revision=rev)
        assert q.restore() is None
        apply_all(q, model, [model.batch(rev + 1)])
        verify(q, name, model)
    finally:
        q.close(removed_under_us=False, remove=True)


SCENARIOS: dict[str, Callable[[Publisher, str, Model, str], None]] = {
    "append": scenario_append,
    "tail": scenario_tail,
    "head": scenario_head,
    "progress": scenario_progress,
    "snapshot": scenario_forced_snapshot("snapshot"),
    "index": scenario_forced_snapshot("index"),
    "snapshot_publish": scenario_forced_snapshot("snapshot_publish"),
    "overlay": scenario_overlay,
    "ring_switch": scenario_ring_switch,
    "epoch": scenario_epoch,
    "restore": scenario_restore,
}


@pytest.mark.parametrize("action", ["enospc", "error"])
@pytest.mark.parametrize("point", sorted(SCENARIOS))
def test_a_step_that_fails_leaves_the_last_published_state_and_recovers(
        cache_name: str, point: str, action: str) -> None:
    p = make(cache_name, ring_size=(1 << 20) if point == "overlay" else 64 << 10,
             indexed=point == "index")
    try:
        SCENARIOS[point](p, cache_name, model := Model(), action)
    finally:
        _faults.configure("")
        if point != "restore":  # (closes its own publishers)
            p.close(removed_under_us=False, remove=True)
    assert _shm.list_segments(cache_name) == []
    assert model.events or model.state


def test_every_fault_point_has_a_scenario() -> None:
    import re
    doc = _faults.__doc__ or ""
    points = set(re.findall(r"^- ``(\w+)``", doc, re.M)) - {"drop_event"}
    assert points == set(SCENARIOS)


# -- the reproductions ------------------------------------------------------------


def test_a_failed_forced_snapshot_drops_no_history_silently(cache_name: str) -> None:
    """Issue 18's silent skip: a 64 KiB ring, ENOSPC creating the snapshot forced by the
    ring about to overwrite. The records it would overwrite were dropped before the
    snapshot, and the next append moved the tail past them with COMPACT_REVISION left
    at 1: a watch from 1 started at 4 where 2 was due. Nothing may go before the
    snapshot and the tail are published together with the revision they drop."""
    p = make(cache_name)
    model = Model()
    try:
        rev = _prime(p, model, 1, 0)
        rev = _steps_until(p, model, rev, lambda: _would_force_a_snapshot(p, model))
        batch = model.batch(rev + 1)
        fail("snapshot:1:enospc", lambda: p.apply([batch]))
        apply_all(p, model, [batch])  # space is back
        with shmcache.Reader(cache_name) as r:
            oldest = r.status().oldest_watchable_revision
            first = r.watch(P, since_revision=oldest).poll(timeout=1)[0].revision
            assert first == oldest + 1
        verify(p, cache_name, model)
    finally:
        p.close(removed_under_us=False, remove=True)


@pytest.mark.parametrize("point", ["snapshot", "snapshot_publish"])
def test_a_ring_growth_whose_snapshot_fails_leaves_readers_on_the_old_ring(
        cache_name: str, point: str) -> None:
    """Issue 18: 64 KiB ring, a ~2 MB transaction, room for the new ring but not its
    snapshot. Readers must keep attaching and reading the old state (no "ring head -
    tail exceeds capacity"), and once space is back the growth completes and watches
    from every advertised revision receive the transaction. (A watch joined before the
    growth is item 8's: the demultiplexer's charge for large transactions.)"""
    p = make(cache_name)
    model = Model()
    try:
        rev = _prime(p, model, 10, 5)
        big = model.batch(rev + 1, n_keys=1000, size=2000)  # ~2 MB
        with shmcache.Reader(cache_name) as r:
            for _ in range(3):  # retried while the fault lasts: each time whole or nothing
                fail(f"{point}:1:enospc", lambda: p.apply([big]))
                assert p.revision == rev and p.ctl.get(layout.B_RING_GEN) == 1
                assert r.get(P + b"init").value == b"0" and r.revision == rev
                assert child_reads(cache_name) == (rev, len(model.state))
                verify(p, cache_name, model)
            apply_all(p, model, [big])
            apply_all(p, model, [model.batch(rev + 2)])
            assert p.ctl.get(layout.B_RING_GEN) == 2 and p.ring is not None
            assert p.ring.capacity > 2 << 20
            assert r.revision == rev + 2 and len(r.list(P)) == len(model.state)
        assert child_reads(cache_name) == (rev + 2, len(model.state))
        verify(p, cache_name, model)
        with shmcache.Reader(cache_name) as r:
            assert r.status().oldest_watchable_revision == rev  # the transaction is history
    finally:
        p.close(removed_under_us=False, remove=True)


def test_a_background_snapshot_that_fails_is_reported_and_retried(cache_name: str) -> None:
    """A snapshot built beside the watch loop fails (ENOSPC): maybe_snapshot raises it,
    its half-made segment is gone, its changes are kept, and the next call builds again."""
    p = make(cache_name, ring_size=1 << 20, snapshot_bytes=32 << 10)
    model = Model()
    try:
        rev = _prime(p, model, 10, 0)
        _faults.configure("snapshot:1:enospc")
        seq = p.ctl.get(layout.B_SNAP_SEQ)
        started = False
        for _ in range(100):
            rev += 1
            batch = model.batch(rev)
            p.apply([batch])
            model.applied([batch])
            if p._build is not None:  # started by the last maybe_snapshot, in a thread
                started = True
                p._build.done.wait()
            try:
                p.maybe_snapshot()
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                break
        else:
            raise AssertionError("the failed build was never reported")
        assert started
        _faults.configure("")
        assert p.ctl.get(layout.B_SNAP_SEQ) == seq
        verify(p, cache_name, model)
        for _ in range(50):
            if p.ctl.get(layout.B_SNAP_SEQ) > seq:
                break
            rev += 1
            apply_all(p, model, [model.batch(rev)])
            if p._build is not None:
                p._build.done.wait()
        assert p.ctl.get(layout.B_SNAP_SEQ) > seq
        verify(p, cache_name, model)
    finally:
        p.close(removed_under_us=False, remove=True)


@pytest.mark.parametrize("action", ["enospc", "error"])
def test_a_first_epoch_that_cannot_be_published_leaves_no_ring(cache_name: str,
                                                                action: str) -> None:
    """The very first reset fails: no reader can attach yet, and the ring made for it is
    not left in /dev/shm; the next reset publishes the cache."""
    p = make(cache_name)
    try:
        fail(f"snapshot:1:{action}", lambda: p.reset(5, [(P + b"a", (b"1", 5, 5, 1, 0))], "t"))
        assert _shm.list_segments(cache_name) == [layout.control_name(cache_name)]
        with pytest.raises(shmcache.ShmCacheError):
            shmcache.Reader(cache_name)
        p.reset(5, [(P + b"a", (b"1", 5, 5, 1, 0))], "t")
        model = Model()
        model.reset(5, {P + b"a": b"1"})
        apply_all(p, model, [model.batch(6)])
        verify(p, cache_name, model)
    finally:
        p.close(removed_under_us=False, remove=True)


def test_a_ring_resize_at_restart_that_fails_is_retried(cache_name: str) -> None:
    """A restart with another ring size resumes on the old ring when the new one cannot
    be made (ENOSPC): readers keep reading, and maybe_snapshot switches once it can."""
    p = make(cache_name)
    model = Model()
    try:
        rev = _prime(p, model, 10, 5)
    finally:
        p.close(removed_under_us=False, remove=False)
    q = make(cache_name, ring_size=128 << 10)
    try:
        _faults.configure("ring_switch:1:enospc")
        assert q.restore() is None  # resumed; the resize waits
        assert q.ring is not None and q.ring.capacity == 64 << 10
        batches = [model.batch(rev + 1)]
        q.apply(batches)
        model.applied(batches)
        with pytest.raises(OSError):
            q.maybe_snapshot()
        _faults.configure("")
        verify(q, cache_name, model)
        q.maybe_snapshot()
        assert q.ring.capacity == 128 << 10 and q.ctl.get(layout.B_RING_GEN) == 2
        apply_all(q, model, [model.batch(rev + 2)])
        verify(q, cache_name, model)
    finally:
        q.close(removed_under_us=False, remove=True)


def test_fault_syntax_kills_by_default_and_names_the_action() -> None:
    assert _faults.parse("append:0.05, snapshot::enospc,ring_switch:0.5:error,head") == {
        "append": (0.05, "kill"), "snapshot": (1.0, "enospc"),
        "ring_switch": (0.5, "error"), "head": (1.0, "kill")}
    with pytest.raises(ValueError, match="unknown action 'boom'"):
        _faults.parse("append:1:boom")


def test_a_kill_point_still_kills_the_writer(cache_name: str) -> None:
    """``SHMCACHE_FAULT=snapshot`` (kill, as the fault checker uses points): the process
    dies by SIGKILL at the point, a snapshot segment created and not filled."""
    code = ("import sys; from tests.test_publish_faults import make; "
            "p = make(sys.argv[1]); p.reset(1, [], 'test'); print('survived')")
    env = {**os.environ, "SHMCACHE_FAULT": "snapshot"}
    try:
        proc = subprocess.run([sys.executable, "-c", code, cache_name], env=env,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == -9 and "survived" not in proc.stdout
    finally:
        remove_cache(cache_name, force=True)
