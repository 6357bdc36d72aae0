"""The writer's etcd feed: connect with failover and backoff, list, watch, trust progress with care.

It turns etcd's answers into plain calls on a sink (the Publisher):
``reset(revision, items, reason)`` after a list, ``apply([(revision, [event
tuples])])`` per watch response, ``progress(revision)`` for a progress
revision it has checked against etcd, and ``maybe_snapshot()`` after each
response. Protobuf types and wire bytes never leave _etcd.

Concurrency contract: ``run()`` runs on the writer's thread. ``close()``,
``request_progress()``, ``request_progress_if_idle()`` and
``current_revision()`` may be called from other threads (the ticker, the sync
server); ``close()`` unblocks ``run()`` wherever it waits on etcd. Where etcd
leaves progress requests unanswered (its gRPC proxy), a RangeProver's thread
publishes proven progress (writer/range_proof.py): the watch loop's calls on
the sink and that thread's run under one lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import ShmCacheError
from ..format import codec as _codec
from .etcd import connection as _etcd
from .etcd import stream as _stream
from .etcd.decode import cluster_from_varint
from .range_proof import ProgressAsker, RangeProver, plausible

if TYPE_CHECKING:
    from .control_writer import ControlWriter

log = logging.getLogger("shmcache.writer")

# The longest pause between two attempts to publish while publishing fails (a
# full /dev/shm): short, so the cache catches up within seconds once space returns.
PUBLISH_BACKOFF_MAX = 2.0
# A progress request etcd has not answered after this long marks the stream as
# one that does not answer them (etcd's gRPC proxy drops them; etcd < 3.4.31 /
# 3.5.13 may not answer on an unsynced watch, etcd issue 17507): progress on it
# is proven with linearizable ranges instead (writer/range_proof.py).
PROGRESS_ANSWER_WAIT = 2.0


class Sink(Protocol):
    """Where the feed delivers (writer.publisher.Publisher): the feed reads its revision and
    state, and tells it everything through its methods."""

    revision: int
    kv: Any

    @property
    def ctl(self) -> ControlWriter: ...  # (its cluster_id: the cluster the state came from)

    def saw_etcd_revision(self, revision: int) -> None: ...
    def reset(self, revision: int, items: Any, reason: str) -> None: ...
    def apply(self, batches: list[tuple[int, list[_codec.EventTuple]]]) -> None: ...
    def progress(self, revision: int) -> None: ...
    def maybe_snapshot(self) -> None: ...


class Relist(Exception):
    """The cache's history cannot continue from etcd's: list again (``reason`` says why)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class WatchBroken(ShmCacheError):
    """The watch stream ended or was cancelled for a reason other than compaction."""


class WatchUndecodable(WatchBroken):
    """A watch response could not be decoded exactly (_stream.UndecodableResponse): the
    stream is broken, and watched again from the cache's revision; nothing is guessed."""


def batches(events: list[_codec.EventTuple], after: int,
            ) -> tuple[list[tuple[int, list[_codec.EventTuple]]], Relist | None]:
    """A watch response's events as one batch per revision, and a Relist if a revision
    is at or below ``after`` or not increasing (the batches before it are valid).

    etcd never splits one revision's events across watch responses (without
    the fragment option, which is not used), so each response's revisions are
    complete. A missing prev_kv is passed on as None (Publisher.apply fills it
    from the state).
    """
    first = events[0][4]
    if first > after and (len(events) == 1 or all(ev[4] == first for ev in events)):
        return [(first, events)], None  # the common case: one revision per response
    out: list[tuple[int, list[_codec.EventTuple]]] = []
    batch: list[_codec.EventTuple] = []
    last = after
    for ev in events:
        rev = ev[4]
        if rev != last or not out:
            if rev <= last:
                return out, Relist(f"etcd sent revision {rev} after the cache reached {last}")
            batch = []
            out.append((rev, batch))
            last = rev
        batch.append(ev)
    return out, None


class PublishFailures:
    """The publishing state: the last error's text and since when it fails (Unix time),
    both None while publishing works. ``on_change(error, since)`` is told each change.
    Used by the thread that runs the feed only."""

    def __init__(self, stats: dict[str, Any],
                 on_change: Callable[[str | None, float | None], None]) -> None:
        self.stats = stats
        self.on_change = on_change
        self.error: str | None = None
        self.since: float | None = None
        self._failing_steps: set[str] = set()

    def failed(self, step: str, exc: BaseException, delay: float) -> None:
        """Count the error and enter (or stay in) the failing state; ``step`` is
        "events" (the events, a relist, a progress revision) or "snapshot"."""
        self.stats["publish_errors"] += 1
        self._failing_steps.add(step)
        text = _etcd.describe(exc)
        if self.since is None:
            self.since = time.time()
            log.warning("cannot publish (%s): readers keep the last published revision; "
                        "retrying (etcd is not reconnected for this)", text,
                        exc_info=not isinstance(exc, OSError))
        elif text != self.error:
            log.warning("cannot publish (%s); retrying in %.1fs", text, delay)
        self.error = text
        self.on_change(text, self.since)

    def recovered(self, step: str) -> None:
        """``step`` worked: leave the failing state once no step fails."""
        since = self.since
        self._failing_steps.discard(step)
        if since is None or self._failing_steps:
            return
        log.info("publishing works again after %.1fs of failures", time.time() - since)
        self.error = self.since = None
        self.on_change(None, None)


class EtcdFeed:
    """Follow [range_key, range_end) in etcd and feed a sink until ``close()``."""

    # Largest range whose keys the progress check scans in etcd (see _on_progress).
    PROGRESS_SCAN_LIMIT = 10_000

    def __init__(self, settings: _etcd.EtcdSettings, prefix: bytes, range_key: bytes,
                 range_end: bytes, *, backoff_max: float, stats: dict[str, Any]) -> None:
        self.settings = settings
        self.prefix = prefix
        self.range_key = range_key
        self.range_end = range_end
        self.backoff_max = backoff_max
        self.stats = stats
        stats.setdefault("watch_decode_errors", 0)  # (shmcache_watch_decode_errors_total)
        stats.setdefault("publish_errors", 0)  # (shmcache_publish_errors_total)
        stats.setdefault("cluster_changes", 0)  # (shmcache_cluster_changes_total)
        self.stopped = threading.Event()
        self.conn: _etcd.Connection | None = None
        self.stream: _stream.WatchStream | None = None
        # Since when etcd has not answered (unix time), and the last error; None
        # while connected. Shown by status, the metrics and systemd's STATUS.
        self.etcd_down_since: float | None = None
        self.last_etcd_error = ""
        self.on_reachability: Callable[[float | None], None] = lambda _since: None
        self.on_ready: Callable[[], None] = lambda: None
        # callback(loaded, total) after each page of a list (service.py logs progress
        # with it); an exception it raises aborts the list.
        self.list_progress: Any = None
        self._healthy = False
        self._last_event = 0.0
        self._progress_candidate: int | None = None
        self._watch_created = 0.0
        self._unsynced_until = 0
        self._relist_reason: str | None = None
        # on_publish_state(error, since) is told each change of the publishing state
        # (the writer stores it in the control segment).
        self.on_publish_state: Callable[[str | None, float | None], None] = \
            lambda _error, _since: None
        self._failures = PublishFailures(stats, lambda e, t: self.on_publish_state(e, t))
        self._snapshot_retry_at = 0.0
        self._snapshot_delay = 0.1
        self._cluster_change = (0, 0)  # (the state's cluster, etcd's) last counted
        # The watch loop's sink calls and the prover's publish take turns under it.
        self._sink_lock = threading.Lock()
        self._sink: Sink | None = None
        self.prover = RangeProver(range_key, range_end, self._proof_basis, self._proven,
                                  self.stopped, stats, describe=_etcd.describe)
        self._asker = ProgressAsker(self.prover, PROGRESS_ANSWER_WAIT, stats)

    @property
    def publish_error(self) -> str | None:
        """The last publish error's text; None while publishing works."""
        return self._failures.error

    @property
    def publish_failing_since(self) -> float | None:
        """Unix time since which publishing fails; None while it works."""
        return self._failures.since

    def request_relist(self, reason: str) -> None:
        """Relist into a new epoch at the next watch response (any thread; the verifier)."""
        self._relist_reason = reason

    # -- the loop ----------------------------------------------------------------------

    def run(self, sink: Sink, relist_reason: str | None) -> None:
        """Connect, (re)list when needed, watch; reconnect with backoff on etcd errors.

        The pause between attempts doubles from 0.1 s to ``backoff_max`` while
        etcd stays unreachable and starts over once a watch has worked.

        Every connection's etcd cluster is compared with the one the state came
        from (``sink.ctl.cluster_id``, restored with it): another cluster behind
        the endpoints (a restore or failover onto another cluster) is a relist into
        a new epoch, whatever its revision; another member of the same cluster
        stays a resume.
        """
        conn = _etcd.Connection(self.settings)
        self.conn = conn
        self._sink = sink
        if self.stopped.is_set():
            conn.close()  # close() came first and may have missed this connection
        backoff = 0.1
        need_list = relist_reason is not None
        reason = relist_reason or ""
        try:
            while not self.stopped.is_set():
                try:
                    conn.connect()
                    log.info("connected to etcd %s (version %s)", conn.endpoint, conn.version)
                    current = conn.current_revision(self.range_key, self.range_end)
                    self._reachable(sink, current)
                    other = self._other_cluster(conn, sink, need_list)
                    if other is not None:
                        need_list, reason = True, other
                    if not need_list and current < sink.revision:
                        need_list, reason = True, (f"etcd is at revision {current}, behind the "
                                                   f"cache's {sink.revision} (a new cluster?)")
                    if need_list:
                        if not self._list(conn, sink, reason):
                            break  # stopped while publishing the list failed
                        need_list = False
                    self.on_ready()
                    self._healthy = False
                    self._watch(conn, sink)
                except Relist as exc:
                    need_list, reason = True, exc.reason
                    log.warning("relisting: %s", exc.reason)
                except _etcd.ClusterChanged as exc:
                    # Connect again: the check above then decides (relist or resume).
                    log.warning("%s; reconnecting", exc)
                    self.stopped.wait(0.1)
                except Exception as exc:
                    if self.stopped.is_set():
                        break
                    if not _etcd.is_grpc_error(exc) and not isinstance(exc, (OSError, WatchBroken)):
                        raise
                    if _etcd.is_compacted(exc):
                        need_list, reason = True, "etcd compacted past the cache's revision"
                        continue
                    if self._healthy:
                        backoff = 0.1  # the last watch worked: start over from short waits
                        self._healthy = False
                    self.stats["reconnects"] += 1
                    if not isinstance(exc, WatchUndecodable):  # (etcd did answer)
                        self._unreachable(_etcd.describe(exc))
                    log.warning("etcd error (%s); retrying in %.1fs", _etcd.describe(exc), backoff)
                    self.stopped.wait(backoff)
                    backoff = min(backoff * 2, self.backoff_max)
        finally:
            conn.close()

    def close(self) -> None:
        """Stop ``run()``: cancel the watch stream and the connection it may block in."""
        self.stopped.set()
        stream = self.stream
        if stream is not None:
            stream.close()
        conn = self.conn
        if conn is not None:
            conn.close()
        self.prover.close()

    def _reachable(self, sink: Sink, revision: int) -> None:
        sink.saw_etcd_revision(revision)
        if self.etcd_down_since is not None:
            log.info("etcd reachable again after %.1fs", time.time() - self.etcd_down_since)
        self.etcd_down_since = None
        self.last_etcd_error = ""
        self.on_reachability(None)

    def _unreachable(self, error: str) -> None:
        self.last_etcd_error = error
        if self.etcd_down_since is None:
            self.etcd_down_since = time.time()
            self.on_reachability(self.etcd_down_since)

    def _other_cluster(self, conn: _etcd.Connection, sink: Sink, need_list: bool) -> str | None:
        """Why the state cannot continue from ``conn``'s cluster, or None if it can: the
        state came from another cluster (logged, and counted once per change even if
        the relist has to be tried again; a state to be relisted anyway counts too, as
        what it held came from the other cluster)."""
        had, now = sink.ctl.cluster_id, conn.cluster_id
        if not had or not now or had == now or (need_list and not sink.revision):
            return None
        why = (f"etcd at {conn.endpoint} belongs to cluster {now:x}, the cache was loaded "
               f"from cluster {had:x} (a restore or failover onto another cluster)")
        log.warning("%s: relisting into a new epoch", why)
        if self._cluster_change != (had, now):
            self._cluster_change = (had, now)
            self.stats["cluster_changes"] += 1
        return why

    def _list(self, conn: _etcd.Connection, sink: Sink, reason: str) -> bool:
        """List and reset the sink; False if stopped before the list was published."""
        t0 = time.monotonic()
        log.info("listing %r from etcd (%s)", _codec.key_text(self.prefix), reason)
        rev, items = conn.list_range(self.range_key, self.range_end, progress=self.list_progress)
        sink.ctl.set_cluster_id(conn.cluster_id)  # (published with the new epoch)
        if not self._publish(lambda: sink.reset(rev, items, reason)):
            return False
        log.info("listed %d keys at revision %d in %.2fs", len(items), rev,
                 time.monotonic() - t0)
        return True

    def _watch(self, conn: _etcd.Connection, sink: Sink) -> None:
        start = sink.revision + 1
        stream = conn.watch_decoded(self.range_key, self.range_end, start)
        self.stream = stream
        self.stats["watches"] += 1
        self._progress_candidate = None
        self._asker.answered()
        stats, stopped = self.stats, self.stopped
        expect_cluster = conn.cluster_raw
        try:
            # Responses arrive decoded (_etcd.decode_watch_response): (revision, created,
            # canceled, compact_revision, cancel_reason, event tuples, cluster id varint).
            for revision, created, canceled, compact, cancel_reason, events, cluster in stream:
                stats["watch_responses"] += 1
                if stopped.is_set():
                    return
                if cluster != expect_cluster and cluster and expect_cluster and \
                        cluster_from_varint(cluster) != conn.cluster_id:
                    raise _etcd.ClusterChanged(
                        f"etcd at {conn.endpoint} sent a watch response of cluster "
                        f"{cluster_from_varint(cluster):x}, not {conn.cluster_id:x}")
                if self._relist_reason is not None:
                    reason, self._relist_reason = self._relist_reason, None
                    raise Relist(reason)
                if compact:
                    raise Relist(f"etcd compacted to revision {compact}, past the "
                                 f"cache's {sink.revision}")
                if canceled:
                    raise WatchBroken(f"etcd cancelled the watch: {cancel_reason or '?'}")
                self._healthy = True
                if created:
                    sink.saw_etcd_revision(revision)
                    log.info("watching %r from revision %d", _codec.key_text(self.prefix), start)
                    # Created behind etcd's revision: unsynced until etcd's catch-up
                    # loop has sent the events up to here (see _on_progress).
                    self._watch_created = time.monotonic()
                    self._unsynced_until = revision if revision >= start else 0
                    continue
                with self._sink_lock:
                    sink.saw_etcd_revision(revision)
                    if events:
                        if self._unsynced_until and revision >= self._unsynced_until:
                            self._unsynced_until = 0
                        if self._progress_candidate is not None and any(
                                ev[4] <= self._progress_candidate for ev in events):
                            self._progress_candidate = None  # it overtook events: not truthful
                            stats["progress_anomalies"] += 1
                        self._apply_events(sink, events)
                    else:
                        self._on_progress(sink, revision)
                    if stopped.is_set():
                        return  # (stopped while publishing failed)
                    self._maybe_snapshot(sink)
            if not stopped.is_set():
                raise WatchBroken("etcd closed the watch stream")
        except _stream.UndecodableResponse as exc:
            stats["watch_decode_errors"] += 1
            self._healthy = False  # the same message may come again: back off meanwhile
            raise WatchUndecodable(f"a watch response after revision {sink.revision} could "
                                   f"not be decoded: {exc}") from exc
        finally:
            with self._sink_lock:  # (no proof is published past this point)
                self.stream = None
            stream.close()

    # -- publishing: a failure is a state of the cache, not an etcd error ---------

    def _publish(self, step: Callable[[], None]) -> bool:
        """Run ``step`` (a sink call) until it succeeds; False if ``close()`` came first.

        A step fails when /dev/shm is full (ENOSPC) or on anything else the sink
        raises. By the Publisher's contract readers still see the last published
        state then, and calling again with the input it has not applied (``step``
        filters by ``sink.revision``) succeeds once the cause is gone. So the step
        is retried here, in place, with backoff (0.1 s doubling to
        PUBLISH_BACKOFF_MAX): etcd is not reconnected, and the watch stream is not
        read meanwhile, so gRPC flow control and etcd hold the events that follow,
        not this process's memory. If the stream breaks or etcd compacts while
        it waits, the next read of the stream says so and run() re-watches from
        the cache's revision (or relists only if compacted past it).
        """
        delay = 0.1
        while True:
            try:
                step()
            except Exception as exc:
                if self.stopped.is_set():
                    return False
                self._failures.failed("events", exc, delay)
                if self.stopped.wait(delay):
                    return False
                delay = min(delay * 2, PUBLISH_BACKOFF_MAX)
                continue
            self._failures.recovered("events")
            return True

    def _maybe_snapshot(self, sink: Sink) -> None:
        """sink.maybe_snapshot(), without holding up the events: a cadence snapshot
        (or overlay) that fails is retried after a backoff while records go on into
        the ring (apply publishes the snapshot it cannot do without itself)."""
        now = time.monotonic()
        if now < self._snapshot_retry_at:
            return
        try:
            sink.maybe_snapshot()
        except Exception as exc:
            self._failures.failed("snapshot", exc, self._snapshot_delay)
            self._snapshot_retry_at = now + self._snapshot_delay
            self._snapshot_delay = min(self._snapshot_delay * 2, PUBLISH_BACKOFF_MAX)
            return
        self._snapshot_delay = 0.1
        self._failures.recovered("snapshot")

    def _apply_events(self, sink: Sink, events: list[_codec.EventTuple]) -> None:
        out, relist = batches(events, sink.revision)
        if out and not self._publish(
                lambda: sink.apply([b for b in out if b[0] > sink.revision])):
            return
        self._last_event = time.monotonic()
        if relist is not None:
            raise relist

    # -- progress notifications ---------------------------------------------------------

    def _on_progress(self, sink: Sink, revision: int) -> None:
        """A progress notification: etcd's watch has delivered every event up to ``revision``.

        etcd < 3.4.31 / 3.5.13 may send a requested progress notification ahead of
        events it has not delivered yet (etcd issues 15220, 17507): events already
        queued for the stream, and, on a watch created behind etcd's revision
        (unsynced), all the events etcd's catch-up loop has yet to send. Three
        defences, each cheap because progress only matters while the range idles:

        1. A notification is only a candidate until the answer to a progress
           request sent *after* it arrives; an event at or below the candidate
           in between discards it (queued events go out before later answers).
        2. On a watch created unsynced, no candidate is taken until an event
           response reaches the creation revision or 2 s have passed (etcd's
           catch-up loop runs every 100 ms).
        3. Before publishing candidate P, Range reads at P check that the key
           count matches the state and (for ranges up to PROGRESS_SCAN_LIMIT
           keys) that no key was modified after the cache's revision: pending
           puts and deletes show. (Keys created and deleted again inside the
           window escape this, and in larger ranges so do pending updates of
           existing keys.)
        A late event at or below the published revision still relists into a
        new epoch: the failure is explicit, never silent.
        """
        self._asker.answered()
        sink.saw_etcd_revision(revision)
        if self._unsynced_until and time.monotonic() - self._watch_created < 2.0:
            self._progress_candidate = None
            return
        cand = self._progress_candidate
        if cand is not None and cand > sink.revision and not plausible(
                self.conn, self.range_key, self.range_end, sink.revision, len(sink.kv), cand,
                scan_limit=self.PROGRESS_SCAN_LIMIT):
            self.stats["progress_anomalies"] += 1
            log.warning("progress notification for revision %d ignored: etcd still has events "
                        "after %d to deliver", cand, sink.revision)
            cand = self._progress_candidate = None
        if cand is not None and cand > sink.revision and not self._publish(
                lambda: sink.progress(cand)):
            return
        self._progress_candidate = revision if revision > sink.revision else None
        if self._progress_candidate is not None and self.stream is not None:
            self.request_progress(urgent=False)

    def request_progress(self, urgent: bool = True) -> None:
        """Ask for progress: etcd, or the prover where etcd does not answer (ProgressAsker)."""
        stream, conn = self.stream, self.conn
        if stream is not None:
            self._asker.ask(stream, conn.endpoint if conn else "?", urgent)

    def _proof_basis(self) -> tuple[Any, object, int, int] | None:
        """(connection, stream, revision, key count) of the state to prove (RangeProver)."""
        with self._sink_lock:
            stream, conn, sink = self.stream, self.conn, self._sink
            if not self._asker.proves(stream) or conn is None or sink is None:
                return None
            return conn, stream, sink.revision, len(sink.kv)

    def _proven(self, token: object, revision: int, current: int) -> bool:
        """Publish that the state at ``revision`` is the state at ``current`` (RangeProver)
        unless the watch loop moved it since; False when nothing was published."""
        if not self._sink_lock.acquire(timeout=1.0):
            return False  # (the loop waits for publishing to work: so would this)
        try:
            sink = self._sink
            if (token is self.stream and sink is not None and sink.revision == revision
                    and not self.stopped.is_set()):
                sink.progress(current)
                return True
        except Exception as exc:  # (a full /dev/shm): the next proof tries again
            log.debug("cannot publish proven revision %d: %s", current, _etcd.describe(exc))
        finally:
            self._sink_lock.release()
        return False

    def request_progress_if_idle(self, interval: float) -> None:
        """Ask for progress when no event and no request went out for ``interval`` seconds,
        so an idle range still shows a current revision."""
        now = time.monotonic()
        if self.publish_failing_since is not None:
            return  # the stream is not read while publishing fails: no answers piling up
        if now - self._last_event >= interval and now - self._asker.sent >= interval:
            self.request_progress(urgent=False)

    def current_revision(self) -> int:
        """etcd's current revision, read linearizably now (raises WatchBroken when not connected)."""
        conn = self.conn
        if conn is None or conn.channel is None:
            raise WatchBroken("not connected to etcd")
        return conn.current_revision(self.range_key, self.range_end)
