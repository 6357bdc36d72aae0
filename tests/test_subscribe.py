"""Reader.subscribe against a real etcd: every event in order, relist after CompactedError,
resume after reader errors, prompt close."""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

import pytest

import shmcache
from tests.helpers import WriterProcess, delete, etcd_events, etcd_range, put, txn


class Mirror:
    """Applies events to a dict, as a user's callback would; records what it saw."""

    def __init__(self) -> None:
        self.state: dict[bytes, shmcache.KeyValue] = {}
        self.events: list[shmcache.Event] = []
        self.resets: list[shmcache.ListResult] = []
        self.threads: set[str] = set()
        # While ``stalled`` is set, the callback blocks until ``resume`` is set: a
        # callback that is slower than the writes, deterministically.
        self.stalled = threading.Event()
        self.resume = threading.Event()

    def on_event(self, ev: shmcache.Event) -> None:
        self.threads.add(threading.current_thread().name)
        self.events.append(ev)
        if ev.type == "PUT":
            self.state[ev.kv.key] = ev.kv
        else:
            self.state.pop(ev.kv.key, None)
        if self.stalled.is_set():
            self.resume.wait(30)

    def on_reset(self, res: shmcache.ListResult) -> None:
        self.resets.append(res)
        self.state = {kv.key: kv for kv in res.items}


def _mixed_writes(client: Any, p: bytes) -> int:
    put(client, p + b"a", b"1")
    put(client, p + b"b", b"2")
    put(client, p + b"a", b"3")
    delete(client, p + b"b")
    txn(client, [("put", p + b"t1", b"x"), ("put", p + b"t2", b"y"), ("delete", p + b"a", b"")])
    delete(client, p + b"t", prefix=True)
    return put(client, p + b"last", b"z")


def test_callback_sees_every_event_in_order(etcd_session: Any, etcd_client: Any,
                                            reader: shmcache.Reader, sub_prefix: bytes) -> None:
    """With since_revision, the callback receives exactly etcd's events, in order, on the
    subscription's own thread; revision and wait() track delivery."""
    p = sub_prefix
    since = reader.revision
    m = Mirror()
    with reader.subscribe(p, m.on_event, since_revision=since, on_reset=m.on_reset) as sub:
        assert sub.alive
        last = _mixed_writes(etcd_client, p)
        assert sub.wait(last, timeout=10)
        assert sub.revision >= last
    assert not sub.alive
    assert m.events == etcd_events(etcd_session.endpoint, p, since, last)
    assert m.resets == [] and sub.relists == 0 and sub.errors == 0
    assert m.threads == {f"shmcache-subscribe-{reader.name}"}
    assert m.events[-1].revision == last and m.events[0].revision > since


def test_without_on_reset_the_initial_state_arrives_as_puts(
        etcd_client: Any, reader: shmcache.Reader, sub_prefix: bytes) -> None:
    """The default mode: the current state first (PUTs at the list revision), then changes;
    the events applied to an empty dict always equal etcd's range at sub.revision."""
    p = sub_prefix
    for i in range(20):
        put(etcd_client, p + b"k%02d" % i, b"v%d" % i)
    start = reader.wait(put(etcd_client, p + b"k00", b"v0-again"), timeout=10)
    assert start
    m = Mirror()
    with reader.subscribe(p, m.on_event) as sub:
        assert sub.wait(reader.revision, timeout=10)
        initial = list(m.events)
        assert len(initial) == 20 and all(e.type == "PUT" and e.prev_kv is None for e in initial)
        assert len({e.revision for e in initial}) == 1
        assert [e.kv.key for e in initial] == sorted(e.kv.key for e in initial)
        assert list(m.state.values()) == etcd_range(etcd_client, p, sub.revision)
        last = _mixed_writes(etcd_client, p)
        assert sub.wait(last, timeout=10)
        assert sorted(m.state.values()) == etcd_range(etcd_client, p, sub.revision)
        assert [e.revision for e in m.events] == sorted(e.revision for e in m.events)


def test_since_revision_needs_on_reset(reader: shmcache.Reader, sub_prefix: bytes) -> None:
    with pytest.raises(ValueError, match="needs on_reset"):
        reader.subscribe(sub_prefix, print, since_revision=1)
    with pytest.raises(ValueError, match="outside the key range"):
        reader.subscribe(b"/elsewhere/", print)


def test_close_is_prompt_and_idempotent(reader: shmcache.Reader, sub_prefix: bytes) -> None:
    """close() returns well within a second while idle, and again when called twice; closing
    the Reader stops a subscription too."""
    sub = reader.subscribe(sub_prefix, lambda ev: None)
    time.sleep(0.3)
    t0 = time.monotonic()
    sub.close()
    assert time.monotonic() - t0 < 1.0
    assert not sub.alive and not sub._thread.is_alive()
    sub.close()
    with shmcache.Reader(reader.name) as other:
        sub2 = other.subscribe(sub_prefix, lambda ev: None)
        assert sub2.alive
    deadline = time.monotonic() + 2
    while sub2._thread.is_alive():
        assert time.monotonic() < deadline, "subscription survived its Reader"
        time.sleep(0.02)
    assert sub2.errors == 0  # a closed Reader is a stop, not an error
    sub2.close()


def test_close_from_inside_the_callback(etcd_client: Any, reader: shmcache.Reader,
                                        sub_prefix: bytes) -> None:
    closed = threading.Event()
    seen: list[shmcache.Event] = []

    def cb(ev: shmcache.Event) -> None:
        seen.append(ev)
        sub.close()
        closed.set()

    sub = reader.subscribe(sub_prefix, cb, since_revision=reader.revision,
                           on_reset=lambda res: None)
    put(etcd_client, sub_prefix + b"x", b"1")
    put(etcd_client, sub_prefix + b"y", b"2")
    assert closed.wait(10)
    sub._thread.join(2)
    assert not sub._thread.is_alive() and len(seen) == 1


def test_callback_errors_go_to_on_error_and_delivery_continues(
        etcd_client: Any, reader: shmcache.Reader, sub_prefix: bytes) -> None:
    errors: list[BaseException] = []
    seen: list[bytes] = []

    def cb(ev: shmcache.Event) -> None:
        seen.append(ev.kv.key)
        if ev.kv.key.endswith(b"bad"):
            raise RuntimeError("callback bug")

    with reader.subscribe(sub_prefix, cb, since_revision=reader.revision,
                          on_reset=lambda res: None, on_error=errors.append) as sub:
        put(etcd_client, sub_prefix + b"bad", b"1")
        last = put(etcd_client, sub_prefix + b"good", b"2")
        assert sub.wait(last, timeout=10)
    assert seen == [sub_prefix + b"bad", sub_prefix + b"good"]
    assert len(errors) == 1 and str(errors[0]) == "callback bug" and sub.errors == 1


def test_tiny_ring_and_slow_callback_relist_to_etcds_state(
        etcd_session: Any, etcd_client: Any, cache_name: str, unique_prefix: bytes) -> None:
    """A 64 KiB ring and a callback stuck while ~140 KiB of changes go by: the watch is
    lapped (CompactedError), the subscription relists and hands over the state again, and
    the events applied to a dict give exactly etcd's state, in both modes."""
    p = unique_prefix
    w = WriterProcess(cache_name, etcd_session.endpoint, p, ring_size="64KiB")
    try:
        for i in range(30):
            put(etcd_client, p + b"k%02d" % i, b"initial")
        w.start()
        with shmcache.Reader(cache_name) as r:
            diff_mode, reset_mode = Mirror(), Mirror()
            s1 = r.subscribe(p, diff_mode.on_event)
            s2 = r.subscribe(p, reset_mode.on_event, on_reset=reset_mode.on_reset)
            try:
                assert s1.wait(r.revision, timeout=10) and s2.wait(r.revision, timeout=10)
                diff_mode.stalled.set()
                reset_mode.stalled.set()
                last = 0
                for i in range(300):
                    key = p + b"k%02d" % (i % 40)  # keys 30..39 appear; some get deleted below
                    last = put(etcd_client, key, b"%d-" % i + b"y" * 400)
                    if i % 25 == 0:
                        last = delete(etcd_client, p + b"k%02d" % (i % 40 + 1))
                gone = [p + b"k%02d" % i for i in range(5)]
                for key in gone:
                    last = delete(etcd_client, key)
                assert r.wait(last, timeout=15)
                assert r.status().oldest_watchable_revision > s1.revision  # history is gone
                for m in (diff_mode, reset_mode):
                    m.stalled.clear()
                    m.resume.set()
                assert s1.wait(last, timeout=30) and s2.wait(last, timeout=30)
                assert s1.relists >= 1 and s2.relists >= 1, (s1.relists, s2.relists)
                assert len(reset_mode.resets) == 1 + s2.relists  # the initial list, then each relist
                for sub, m in ((s1, diff_mode), (s2, reset_mode)):
                    assert sub.errors == 0
                    assert sorted(m.state.values()) == etcd_range(etcd_client, p, sub.revision)
                # Revisions handed to the callbacks never go backwards.
                for m in (diff_mode, reset_mode):
                    revs = [e.revision for e in m.events]
                    assert revs == sorted(revs)
                # Keys deleted while the watch was lapped arrive as DELETEs at the relist's
                # revision, carrying the last version the callback had seen. (A key may
                # also have been deleted, and put again, in events delivered before the
                # lap: k01 is deleted at the first put. What counts is each key's last event.)
                last_event = {e.kv.key: e for e in diff_mode.events}
                dels = [last_event[k] for k in gone]
                assert all(e.type == "DELETE" for e in dels), dels
                assert all(e.prev_kv is not None and e.prev_kv.key == e.kv.key
                           and e.kv.mod_revision == e.revision for e in dels)
            finally:
                for m in (diff_mode, reset_mode):
                    m.resume.set()
                s1.close()
                s2.close()
    finally:
        w.close()


def test_resumes_from_its_revision_after_a_reader_error(
        etcd_session: Any, etcd_client: Any, cache_name: str, unique_prefix: bytes) -> None:
    """A stalled writer makes the Reader raise StaleError (max_staleness): the subscription
    reports it, backs off, and resumes from its revision without a relist, gap or repeat."""
    p = unique_prefix
    w = WriterProcess(cache_name, etcd_session.endpoint, p)
    try:
        w.start()
        with shmcache.Reader(cache_name, max_staleness=0.6) as r:
            since = r.revision
            errors: list[BaseException] = []
            m = Mirror()
            with r.subscribe(p, m.on_event, since_revision=since, on_reset=m.on_reset,
                             on_error=errors.append) as sub:
                put(etcd_client, p + b"before", b"1")
                w.proc.send_signal(signal.SIGSTOP)  # type: ignore[union-attr]
                try:
                    deadline = time.monotonic() + 10
                    while not errors:
                        assert time.monotonic() < deadline, "no StaleError reported"
                        time.sleep(0.05)
                    for i in range(5):
                        put(etcd_client, p + b"during-%d" % i, b"x")
                finally:
                    w.proc.send_signal(signal.SIGCONT)  # type: ignore[union-attr]
                last = put(etcd_client, p + b"after", b"2")
                assert sub.wait(last, timeout=15)
            assert isinstance(errors[0], shmcache.StaleError)
            assert sub.relists == 0 and m.resets == []
            assert m.events == etcd_events(etcd_session.endpoint, p, since, last)
    finally:
        w.close()
