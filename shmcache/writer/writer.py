"""Writer: follow an etcd key range and publish it into the cache's segments.

A thin coordinator over three parts with one concern each: the etcd feed
(feed: connection, backoff, list, watch, progress defences), the publisher
(publisher: state, ring, snapshots, epochs, restore, over segments) and the
sync server (sync_server.Server: consistent reads). A data path crosses each once:
etcd event -> feed batch -> publisher ring record -> reader.

Concurrency contract: one Writer per cache name per host, enforced with an
exclusive flock on its lock file (a second writer gets CacheExistsError;
the lock dies with its holder, so a crashed writer never blocks its successor).
The thread that calls ``run()`` applies events and publishes them; a sync
thread publishes the consistent-read counters (ControlWriter.publish is
locked); a ticker thread beats the heartbeat; ``stop()`` may be called from any
thread or a signal handler.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .. import _args, _defaults
from .._units import parse_size
from ..errors import ShmCacheError, WriterError
from ..format import indexspec, layout
from ..ipc import shm as _shm
from . import sync_server
from . import verify as _verify
from .etcd import connection as _etcd
from .feed import EtcdFeed
from .indexer import Indexer
from .publisher import Publisher
from .segments import CacheSegments

__all__ = ["Writer"]

log = logging.getLogger("shmcache.writer")


class Writer:
    """The one process per host that feeds a cache from etcd.

    ``Writer(name, endpoints=[...], prefix=b"/registry/").run()`` blocks until
    ``stop()``. Segments outlive the writer: readers keep serving the last
    published data (``Reader.status().writer_alive`` turns False), and a
    restarted writer resumes from the published revision without a relist when
    etcd still has that history. ``remove_on_close=True`` unlinks every segment
    of the cache when the writer stops.
    """

    def __init__(
        self,
        name: str,
        endpoints: list[str] | str | None = None,
        prefix: bytes | str = b"",
        *,
        ring_size: int | str = _defaults.RING_SIZE,
        snapshot_interval: float = _defaults.SNAPSHOT_INTERVAL,
        snapshot_bytes: int | str | None = None,
        progress_interval: float = _defaults.PROGRESS_INTERVAL,
        verify_interval: float = _defaults.VERIFY_INTERVAL,
        mode: int = _defaults.MODE,
        group: str | int | None = None,
        remove_on_close: bool = False,
        backoff_max: float = _defaults.BACKOFF_MAX,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        user: str | None = None,
        password: str | None = None,
        etcd_timeout: float = _defaults.ETCD_TIMEOUT,
        indexes: Mapping[str, str | Callable[[bytes, bytes], Iterable[bytes | str]]]
        | None = None,
    ) -> None:
        self.name = _shm.validate_name(name)
        self.prefix = _args.as_bytes(prefix, "prefix")  # (not bytes(5): five NUL bytes)
        if len(self.prefix) > layout.MAX_PREFIX_LEN:
            raise ValueError(f"prefix longer than {layout.MAX_PREFIX_LEN} bytes")
        self.ring_size = layout.align8(parse_size(ring_size))
        if not layout.MIN_RING_CAPACITY <= self.ring_size <= layout.MAX_RING_CAPACITY:
            raise ValueError(f"ring size must be between {layout.MIN_RING_CAPACITY} bytes and "
                             f"{layout.MAX_RING_CAPACITY} bytes, not {self.ring_size}")
        _check_ring_fits(self.name, self.ring_size)
        if mode & 0o022:
            raise ValueError(f"mode {mode:o} lets group or others write the segments")
        self.progress_interval = progress_interval
        if verify_interval < 0:
            raise ValueError("verify_interval must be >= 0 (0: never)")
        self.verify_interval = verify_interval
        self.remove_on_close = remove_on_close
        # A fresh settings object per Writer: nothing the caller holds is shared.
        settings = _etcd.EtcdSettings(
            endpoints=[_defaults.ENDPOINT], timeout=etcd_timeout, ca_cert=ca_file,
            cert_key=key_file, cert_cert=cert_file, user=user, password=password)
        if endpoints is not None:
            settings.endpoints = [endpoints] if isinstance(endpoints, str) else list(endpoints)
        if not settings.endpoints:
            raise ValueError("no etcd endpoints given")
        self.etcd_settings = settings
        self.stats: dict[str, Any] = {
            "events": 0, "records": 0, "bytes": 0, "snapshots": 0, "relists": 0,
            "reconnects": 0, "progress_requests": 0, "progress_anomalies": 0,
            "progress_proofs": 0,
            "sync_requests": 0, "sync_rounds": 0,
            # Watch streams opened and responses received (the watchdog's "is the
            # loop making progress" test), the last snapshot's publish time, key
            # count and size: for service.py's metrics.
            "watches": 0, "watch_responses": 0, "snapshot_seconds": 0.0,
            "snapshot_seconds_total": 0.0, "snapshot_keys": 0, "snapshot_bytes": 0,
            # The verifier's rounds (checks of the snapshot against etcd, verify).
            "verify_rounds": 0, "verify_mismatches": 0, "verify_revision": 0,
            "verify_seconds": 0.0,
            # Failed attempts to publish (a full /dev/shm); each is retried (feed._publish).
            "publish_errors": 0}
        # Secondary indexes (indexspec): validated here, published with each epoch.
        defs = indexspec.make_all(indexes)
        self._index_defs = indexspec.encode_defs(defs) if defs else b""
        if len(self._index_defs) > layout.MAX_INDEX_DEFS_LEN:
            raise ValueError(f"the index definitions take {len(self._index_defs)} bytes, "
                             f"more than the {layout.MAX_INDEX_DEFS_LEN} the cache has room for")
        self.indexes = {d.name: d.spec for d in defs}
        self._segs = CacheSegments(self.name, self.prefix, mode, group, self._index_defs)
        self._pub = Publisher(
            self._segs, ring_size=self.ring_size, snapshot_interval=snapshot_interval,
            snapshot_bytes=(parse_size(snapshot_bytes) if snapshot_bytes is not None
                            else min(self.ring_size // 4, 16 << 20)),
            stats=self.stats,
            indexer=Indexer(indexspec.IndexSet(defs, self.prefix)) if defs else None)
        # etcd rejects an empty key; b"\0" with range end b"\0" means every key.
        self._feed = EtcdFeed(settings, self.prefix, self.prefix or b"\0",
                              layout.prefix_range_end(self.prefix), backoff_max=backoff_max,
                              stats=self.stats)
        self._feed.on_reachability = self._on_reachability
        self._feed.on_publish_state = self._on_publish_state
        self._feed.on_ready = self._on_ready
        # stop() only sets this flag and writes a byte to the wake pipe (it may run
        # in a signal handler, where taking any lock can deadlock); the ticker
        # thread then stops the feed. The pipe lives as long as this object: were
        # it closed when run() returns, a stop() between loading the fd and writing
        # to it could write into whatever file reused the number.
        self._stop_requested = False
        self._stopped = self._feed.stopped
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        weakref.finalize(self, _close_fds, self._wake_r, self._wake_w)
        self._fatal: ShmCacheError | None = None
        self._remove_strays_later = True
        self.ready = threading.Event()

    # -- what service.py, the metrics and the tests read ---------------------------------

    @property
    def revision(self) -> int:
        """The revision the state is exact at (it runs ahead of the published one mid-response)."""
        return self._pub.revision

    @property
    def etcd_revision(self) -> int:
        return self._pub.etcd_revision

    @property
    def epoch(self) -> int:
        return self._pub.epoch

    @property
    def etcd_down_since(self) -> float | None:
        """Unix time since which etcd has not answered; None while it does."""
        return self._feed.etcd_down_since

    @property
    def last_etcd_error(self) -> str:
        return self._feed.last_etcd_error

    @property
    def publish_error(self) -> str | None:
        """The last error publishing met (a full /dev/shm), None while publishing works."""
        return self._feed.publish_error

    @property
    def publish_failing_since(self) -> float | None:
        """Unix time since which publishing fails; None while it works."""
        return self._feed.publish_failing_since

    @property
    def list_progress(self) -> Any:
        """callback(loaded, total) after each page of a list; an exception aborts the list."""
        return self._feed.list_progress

    @list_progress.setter
    def list_progress(self, callback: Any) -> None:
        self._feed.list_progress = callback

    # -- running ----------------------------------------------------------------------

    def run(self) -> None:
        """Serve until ``stop()``: attach, list or resume, then watch and publish.

        Raises WriterError if the cache's control segment is removed while it
        runs (it stops publishing), CacheExistsError if another writer holds it.
        """
        self._run()
        if self._fatal is not None:
            raise self._fatal

    def _run(self) -> None:
        if self._stop_requested:
            return
        pub = self._pub
        existed = pub.attach()  # (claim() clears ETCD_DOWN_SINCE)
        ticker = threading.Thread(target=self._ticker, name="shmcache-ticker", daemon=True)
        ticker.start()
        server = None
        try:  # beside the segments, with their readers' access (any namespace sharing /dev/shm)
            sock = sync_server.bind_path(self.name, self._segs.mode, self._segs.gid())
            self._segs.track_sync_socket()
        except OSError as exc:
            log.warning("consistent reads: cannot bind the request socket file: %s", exc)
        else:
            server = sync_server.Server(sock, pub.ctl, self._feed.current_revision,
                                  self._feed.request_progress, pub.published_revision,
                                  pub.revision_moved, self._stopped, self.stats,
                                  describe=_etcd.describe)
            syncer = threading.Thread(target=server.run, name="shmcache-sync", daemon=True)
            syncer.start()
        verifier = None
        if self.verify_interval > 0:
            verifier = _verify.Verifier(self.name, self.etcd_settings, self.verify_interval,
                                        self.stats, self._stopped, self._feed.request_relist)
            checker = threading.Thread(target=verifier.run, name="shmcache-verify", daemon=True)
            checker.start()
        try:
            try:
                why_not = pub.restore() if existed else "first start"
            except Exception as exc:  # (a full /dev/shm): the relist's reset is retried
                why_not = _etcd.describe(exc)
            if why_not is not None and existed:
                why_not = f"cannot resume from the existing segments: {why_not}"
                log.warning("%s; relisting", why_not)
            self._feed.run(pub, why_not)
        finally:
            self._feed.close()
            self._wake()
            with pub.revision_moved:
                pub.revision_moved.notify_all()
            ticker.join(timeout=2)
            if verifier is not None:
                verifier.close()
                checker.join(timeout=2)
            if server is not None:
                syncer.join(timeout=2)
                server.close()
                self._segs.unlink_sync_socket()
            pub.close(removed_under_us=self._fatal is not None, remove=self.remove_on_close)
            log.info("writer for %r stopped at revision %d", self.name, pub.revision)

    def _on_reachability(self, down_since: float | None) -> None:
        self._pub.set_etcd_down_since(down_since)
        if down_since is None and self._segs.ctl is not None:
            self._segs.ctl.set_etcd_reached()

    def _on_publish_state(self, error: str | None, since: float | None) -> None:
        if self._segs.ctl is not None:
            self._segs.ctl.set_publish_error(error, int(since * 1e9) if since else 0)

    def _on_ready(self) -> None:
        """The state is current (listed or resumed) and the watch is about to open."""
        if self._remove_strays_later:
            self._segs.remove_strays()
            self._remove_strays_later = False
        self.ready.set()

    def _ticker(self) -> None:
        """Heartbeat, stop requests, the control segment's presence and idle progress requests.

        Runs beside the watch loop and wakes every 0.25 s, or at once when
        ``stop()`` writes to the wake pipe. An unexpected error in one round is
        logged (once per distinct error) and the next round runs: readers judge
        the writer by this thread's heartbeat, so it must not die of one.
        """
        wake = self._wake_r
        last_error = ""
        while not self._stop_requested and not self._stopped.is_set():
            try:
                ready, _, _ = select.select([wake], [], [], 0.25)
                if ready:
                    os.read(wake, 4096)
            except OSError:
                pass
            if self._stop_requested or self._stopped.is_set():
                break
            try:
                if not self._tick():
                    break
            except Exception as exc:
                text = _etcd.describe(exc)
                if text != last_error:
                    last_error = text
                    log.error("writer ticker: %s; continuing", text, exc_info=True)
        # Unblock the loop wherever it waits on etcd: the watch stream, or a
        # connect or list call (up to their timeouts otherwise).
        self._feed.close()

    def _tick(self) -> bool:
        """One round of the ticker; False when the writer must stop."""
        assert self._segs.ctl is not None
        self._segs.ctl.heartbeat()
        if not self._segs.still_ours():
            cname = layout.control_name(self.name)
            self._fatal = WriterError(
                f"control segment {cname} was removed while this writer ran (shmcache rm "
                f"--force?): readers can no longer attach to what it publishes",
                hint="Stopping; start the writer again to republish the cache")
            log.error("%s; stopping", self._fatal.message)
            return False
        self._feed.request_progress_if_idle(self.progress_interval)
        return True

    def stop(self) -> None:
        """Ask ``run()`` to return after the record in progress.

        Safe from any thread and from a signal handler: it sets a flag and writes
        one byte to a pipe, and takes no lock (a handler that runs while its own
        thread holds a lock the stop path needs would deadlock). The writer's
        ticker thread wakes on the byte and cancels the etcd call the loop waits in.
        """
        self._stop_requested = True
        self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except OSError:  # full: a wake is pending anyway
            pass


def _close_fds(*fds: int) -> None:
    for fd in fds:
        os.close(fd)


def _check_ring_fits(name: str, ring_size: int) -> None:
    """ValueError, in one line, if a ring of ``ring_size`` cannot fit in /dev/shm's free space.

    The cache's own rings count as free: a restarted writer reuses its ring (or
    replaces it only after the new one exists, which needs the free space
    anyway, so this is the lower bound). A ring that cannot fit would fail
    every start the same way; snapshots are not counted here: their size
    depends on the data, and one that does not fit is a state the writer
    reports (``Status.publish_error``) and recovers from when space returns.
    """
    try:
        st = os.statvfs(_shm.SHM_DIR)
    except OSError:
        return  # no /dev/shm to measure (not Linux): creating the ring will tell
    free = st.f_bavail * st.f_frsize
    for seg in _shm.list_segments(name):
        if ".ring." in seg:
            try:
                free += os.stat(_shm.SHM_DIR + seg).st_blocks * 512
            except OSError:
                pass
    need = layout.RING_DATA + ring_size
    if need > free:
        raise ValueError(
            f"ring size {_gib(ring_size)} does not fit in {_shm.SHM_DIR}: {_gib(free)} free "
            f"of {_gib(st.f_blocks * st.f_frsize)}; lower ring_size or enlarge "
            f"{_shm.SHM_DIR} (the cache needs its ring plus room for its snapshots: "
            f"docs/operations.md, 'Size the ring and /dev/shm')")


def _gib(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} bytes"
