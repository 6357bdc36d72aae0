"""Progress without progress requests: a linearizable Range proves an idle range current.

etcd's gRPC proxy (3.4 and 3.5) drops ``WatchRequest.progress_request`` (it logs
"not supported request type by gRPC proxy"), and etcd < 3.4.31 / 3.5.13 may not
answer one on an unsynced watch (etcd issue 17507). A writer behind either would
leave an idle range at its last event's revision: ``sync()`` would time out and
the idle-progress defence would never advance. When a stream leaves a progress
request unanswered, the feed asks a ``RangeProver`` instead (writer/feed.py).

The proof, for a cache whose state is exact at revision ``r`` with ``n`` keys:
read etcd's current revision ``H`` linearizably, then at ``H`` the range's key
count and the keys whose mod revision is above ``r``. If the count is ``n`` and
no key was modified after ``r``, the keys at ``H`` are ``n`` keys untouched since
``r``: the very keys (and values) of the state at ``r``. So the state at ``r`` is
the state at ``H``, and the cache may say it is exact at ``H``.

What the proof cannot see: a key created and deleted again inside ``(r, H]``
(it exists at neither end). The state at ``H`` is still right (a ``sync()`` is
exact), but that PUT and DELETE are missing from the history between ``r`` and
``H``; when the watch delivers them later, at or below the published revision,
the feed relists into a new epoch (watchers get CompactedError): explicit, never
silent. etcd filters by mod revision by scanning the range (count_only ignores
the filter), so a proof costs etcd a scan of the range's keys: proofs asked for
by the idle ticker are spaced (IDLE_GAP, IDLE_DUTY); a sync round's are not.

Concurrency contract: ``ask()`` may be called from any thread and never blocks;
proofs run on the prover's own thread, which calls back into the feed
(``basis`` and ``proven``, the latter under the feed's publishing lock).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("shmcache.writer")

# Proofs asked for by the idle ticker (not those a sync round waits for) come at
# most every IDLE_GAP seconds, and wait IDLE_DUTY times the last proof's duration:
# behind a proxy every idle writer would otherwise cost etcd a scan of the range
# each progress interval, N writers N scans. An idle cache's revision then trails
# etcd's by up to IDLE_GAP; sync() does not wait for it.
IDLE_GAP = 5.0
IDLE_DUTY = 20


def unchanged(conn: Any, key: bytes, range_end: bytes, revision: int, count: int, at: int,
              scan_limit: int | None = None) -> bool:
    """Whether [key, range_end) at revision ``at`` holds ``count`` keys, none modified after
    ``revision``: then it is the state of ``revision`` (module docstring). With
    ``scan_limit``, ranges of more keys are judged by their count alone (etcd's filter
    scans the range). ``conn``'s errors propagate."""
    if conn.count(key, range_end, at) != count:
        return False
    if scan_limit is not None and count > scan_limit:
        return True
    return bool(conn.modified_since(key, range_end, at, revision + 1) == 0)


def plausible(conn: Any, key: bytes, range_end: bytes, revision: int, count: int, at: int,
              scan_limit: int) -> bool:
    """``unchanged`` (ranges over ``scan_limit`` keys judged by their count), False when it
    cannot be told (not connected, compacted meanwhile, etcd gone): not confirmed."""
    if conn is None or conn.channel is None:
        return False
    try:
        return unchanged(conn, key, range_end, revision, count, at, scan_limit)
    except Exception as exc:
        log.debug("progress check at %d failed: %s", at, exc)
        return False


def prove(conn: Any, key: bytes, range_end: bytes, revision: int, count: int) -> int | None:
    """etcd's current revision H (read linearizably) if the range is ``unchanged`` at H
    since ``revision`` with ``count`` keys; None if it changed or H is not above it."""
    current = int(conn.current_revision(key, range_end))
    if current <= revision or not unchanged(conn, key, range_end, revision, count, current):
        return None
    return current


class ProgressAsker:
    """Whether to ask a watch stream for progress or the prover: the first stream that
    leaves a request unanswered for ``answer_wait`` seconds is proven from then on.

    Called by the feed's threads (the watch loop, the ticker, the sync server); its
    few fields are plain stores, and a lost race costs one request more or less.
    """

    def __init__(self, prover: RangeProver, answer_wait: float, stats: dict[str, Any]) -> None:
        self.prover = prover
        self.answer_wait = answer_wait
        self.stats = stats
        self.outstanding = False
        self.sent = 0.0  # (monotonic time of the last request or proof asked for)
        self.unanswered: object | None = None  # the stream proven instead

    def answered(self) -> None:
        """A progress notification arrived (or a new stream opened)."""
        self.outstanding = False

    def proves(self, stream: object) -> bool:
        return stream is not None and stream is self.unanswered

    def ask(self, stream: Any, endpoint: str, urgent: bool) -> None:
        """Send ``stream`` a progress request (at most one outstanding), or ask the prover
        (``urgent``: a sync round waits for it) once the stream left one unanswered."""
        now = time.monotonic()
        if (self.unanswered is not stream and self.outstanding
                and now - self.sent > self.answer_wait):
            self.unanswered = stream
            log.info("etcd at %s left a progress request unanswered for %.0fs (etcd's gRPC "
                     "proxy drops them): proving progress with linearizable ranges instead",
                     endpoint, now - self.sent)
        if self.unanswered is stream:
            self.sent = now
            self.prover.ask(urgent)
        elif not self.outstanding:
            self.outstanding = True
            self.sent = now
            self.stats["progress_requests"] += 1
            stream.request_progress()


class RangeProver:
    """One thread that runs proofs when asked, at most one at a time.

    ``basis()`` returns ``(conn, token, revision, count)`` for the state to prove,
    or None when there is none (not watching); ``proven(token, revision, current)``
    publishes the result if the state is still the one at ``revision`` (the feed
    checks ``token`` and the revision under its publishing lock).
    """

    def __init__(self, key: bytes, range_end: bytes,
                 basis: Callable[[], tuple[Any, object, int, int] | None],
                 proven: Callable[[object, int, int], bool],
                 stopped: threading.Event, stats: dict[str, Any],
                 describe: Callable[[BaseException], str] = str) -> None:
        self.key = key
        self.range_end = range_end
        self.basis = basis
        self.proven = proven
        self.stopped = stopped
        self.stats = stats
        stats.setdefault("progress_proofs", 0)
        self.describe = describe
        self._wake = threading.Event()
        self._urgent = False
        self._next_idle = 0.0
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def ask(self, urgent: bool) -> None:
        """Run a proof soon. ``urgent`` (a sync round waits) skips the idle spacing."""
        with self._lock:
            if not urgent and time.monotonic() < self._next_idle:
                return
            self._urgent = self._urgent or urgent
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="shmcache-range-proof",
                                                daemon=True)
                self._thread.start()
        self._wake.set()

    def _run(self) -> None:
        while not self.stopped.is_set():
            self._wake.wait()
            self._wake.clear()
            if self.stopped.is_set():
                return
            with self._lock:
                self._urgent = False
            t0 = time.monotonic()
            self.once()
            took = time.monotonic() - t0
            with self._lock:
                self._next_idle = time.monotonic() + max(IDLE_GAP, took * IDLE_DUTY)

    def once(self) -> int | None:
        """One proof now, on the calling thread: the revision published, or None."""
        got = self.basis()
        if got is None:
            return None
        conn, token, revision, count = got
        try:
            current = prove(conn, self.key, self.range_end, revision, count)
        except Exception as exc:  # etcd gone or compacted meanwhile: the next ask retries
            log.debug("range proof after revision %d failed: %s", revision, self.describe(exc))
            return None
        if current is None or not self.proven(token, revision, current):
            return None
        self.stats["progress_proofs"] += 1
        return current

    def close(self) -> None:
        """Let the thread end (after ``stopped`` is set); any thread, does not wait."""
        self._wake.set()
