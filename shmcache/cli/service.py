"""The writer as a system service: sd_notify, watchdog, Prometheus metrics, signals, progress logs.

``serve(config)`` runs one Writer on a thread and keeps the main thread for
signals and supervision: it tells systemd when the cache is ready (READY=1
only once the first snapshot is published), keeps STATUS= current, pings the
watchdog only while the writer's loop makes progress, warns when the cache
lags etcd, and stops on SIGTERM/SIGINT after the record in progress.
Nothing here needs libsystemd: the notify protocol is one datagram per message.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any

from ..errors import ShmCacheError
from ..format import control, layout
from ..ipc import shm as _shm
from .config import ConfigError, ServeConfig
from .metrics import start_metrics_server
from .output import since as _since

__all__ = ["ListProgress", "Liveness", "Notifier", "serve", "watchdog_interval"]

log = logging.getLogger("shmcache.service")

# How long SIGTERM may take before the process exits without a clean release.
# Readers cope with a writer that vanishes at any instruction, so this is safe;
# it only bounds shutdown when something (a huge snapshot, a stuck call) holds it.
STOP_TIMEOUT = 10.0
# Warn when the cache has been behind the newest revision etcd reported for this long.
LAG_WARN_SECONDS = 10.0
# Warn when no watch response arrived for this long (idle progress answers come
# about every second, so this means the stream or etcd is stuck).
SILENCE_WARN_SECONDS = 15.0
# Without a watchdog, "healthy" (a metric) means the loop progressed this recently.
DEFAULT_STALL_LIMIT = 30.0


# -- sd_notify -------------------------------------------------------------------

class Notifier:
    """sd_notify(3) over ``$NOTIFY_SOCKET``: one AF_UNIX datagram per message.

    A name starting with ``@`` is in the abstract namespace. Without the
    variable every call is a no-op, so the writer runs the same outside systemd.
    Send errors are logged once and never raised: a notification is not worth
    stopping the cache for (systemd then times out or restarts the unit).
    """

    def __init__(self, address: str | None) -> None:
        self.address = address or None
        self._target: str | bytes | None = None
        self._sock: socket.socket | None = None
        self._warned = False
        if self.address:
            if self.address.startswith("@"):
                self._target = b"\0" + self.address[1:].encode()
            elif self.address.startswith("/"):
                self._target = self.address
            else:
                log.warning("NOTIFY_SOCKET=%r is not a unix socket path; not notifying systemd",
                            self.address)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        environ = os.environ if environ is None else environ
        return cls(environ.get("NOTIFY_SOCKET"))

    @property
    def enabled(self) -> bool:
        return self._target is not None

    def notify(self, *fields: str) -> bool:
        """Send ``KEY=value`` fields in one message; True if it was sent."""
        if self._target is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(fields).encode(), self._target)
            return True
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("cannot notify systemd at %s: %s", self.address, exc)
            return False

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval(environ: Mapping[str, str] | None = None,
                      pid: int | None = None) -> float | None:
    """The watchdog timeout systemd set for this process (``WatchdogSec=``), in seconds, or None."""
    environ = os.environ if environ is None else environ
    usec = environ.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    owner = environ.get("WATCHDOG_PID", "")
    if owner.isdigit() and int(owner) != (os.getpid() if pid is None else pid):
        return None  # meant for another process (we were started by it)
    return int(usec) / 1e6


# -- logging -------------------------------------------------------------------

class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({"ts": round(record.created, 3), "level": record.levelname.lower(),
                           "logger": record.name, "msg": record.getMessage()})


def setup_logging(level: str = "info", fmt: str = "plain") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


# -- progress of the writer's loop -------------------------------------------------

class ListProgress:
    """``Writer.list_progress`` callback: logs keys loaded, rate and ETA of a long relist.

    A list of more than two pages logs its first line at the second page (the
    first that gives a rate), then one every ``interval`` seconds; the writer
    logs the total when it is done. When ``stopping`` is set it raises, which
    aborts the list so that SIGTERM is not held up by a large range.
    """

    def __init__(self, stopping: threading.Event, interval: float = 5.0) -> None:
        self.stopping = stopping
        self.interval = interval
        self.loaded = 0  # keys loaded so far in the current list
        self.pages = 0  # pages loaded by every list (read by Liveness)
        self._page = 0
        self._t1 = 0.0  # when the first page of the current list arrived
        self._first = 0
        self._last_log = 0.0

    def __call__(self, loaded: int, total: int) -> None:
        if self.stopping.is_set():
            raise InterruptedError("stopping: list abandoned")
        now = time.monotonic()
        self.pages += 1
        if loaded <= self.loaded or self._page == 0:  # the first page of a new list
            self._page, self._t1, self._first, self._last_log = 0, now, loaded, 0.0
        self._page += 1
        self.loaded = loaded
        if self._page < 2 or loaded >= total:
            return
        if self._last_log and now - self._last_log < self.interval:
            return
        self._last_log = now
        rate = (loaded - self._first) / max(now - self._t1, 1e-6)
        log.info("listing: %d of %d keys loaded (%.0f%%), %.0f keys/s, about %.0fs left",
                 loaded, total, 100.0 * loaded / max(total, 1), rate,
                 (total - loaded) / max(rate, 1e-6))


class Liveness:
    """Whether the writer's main loop is making progress, as opposed to merely existing.

    The loop shows progress by receiving watch responses (an idle writer asks
    for progress about once a second, and every answer counts), by attempting to
    reconnect (every few seconds at most while etcd is down), by loading list
    pages, by publishing and by retrying a publish that failed (every 2 s at most
    while /dev/shm is full: a restart would not cure that). The ticker thread's heartbeat does not count: it
    beats even while the loop is stuck.
    """

    KEYS = ("watch_responses", "reconnects", "relists", "snapshots", "records", "watches",
            "publish_errors")

    def __init__(self, writer: Any, progress: ListProgress | None = None) -> None:
        self.writer = writer
        self.progress = progress
        self._signature: tuple[Any, ...] = ()
        self.last_change = time.monotonic()

    def update(self) -> float:
        """Sample the writer; returns seconds since the loop last made progress."""
        stats = self.writer.stats
        sig = tuple(stats.get(k, 0) for k in self.KEYS) + (
            self.progress.pages if self.progress is not None else 0,)
        now = time.monotonic()
        if sig != self._signature:
            self._signature = sig
            self.last_change = now
        return now - self.last_change


def publish_failing_text(w: Any) -> str:
    """"cannot publish since 12:00:03 UTC (41s, 9 errors): <error>", or "" while publishing works."""
    since = w.publish_failing_since
    if since is None:
        return ""
    return (f"cannot publish since {_since(since)}, "
            f"{w.stats.get('publish_errors', 0)} errors): {w.publish_error}")


def etcd_down_text(w: Any) -> str:
    """"etcd unreachable since 12:00:03 UTC (41s, 7 failed attempts): <error>", or "" if reachable."""
    since = w.etcd_down_since
    if since is None:
        return ""
    return (f"etcd unreachable since {_since(since)}, "
            f"{w.stats.get('reconnects', 0)} failed attempts): {w.last_etcd_error}")


# -- the service ------------------------------------------------------------------------

class _LastWarning(logging.Handler):
    """Keeps the writer's last warning for STATUS= ("etcd error ...; retrying in 2s")."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.text = ""

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):  # a bad log call must not break the service
            self.text = record.getMessage()


class _Service:
    def __init__(self, cfg: ServeConfig, writer: Any, environ: Mapping[str, str]) -> None:
        self.cfg = cfg
        self.writer = writer
        self.notifier = Notifier.from_environ(environ)
        self.watchdog = watchdog_interval(environ)
        self.stall_limit = self.watchdog if self.watchdog is not None else DEFAULT_STALL_LIMIT
        self.stopping = threading.Event()
        self.progress = ListProgress(self.stopping)
        writer.list_progress = self.progress
        self.liveness = Liveness(writer, self.progress)
        self.errors: list[BaseException] = []
        self._ctl: _shm.Segment | None = None
        self._block: control.Block | None = None
        self._stop_at: float | None = None
        self._signal = 0
        self._stop_reported = False

    # state read from the control segment, as readers see it
    def _control(self) -> Any:
        if self._ctl is None:
            try:
                self._ctl = _shm.open_readonly(layout.control_name(self.cfg.name))
            except OSError:
                return None
        return self._ctl

    def block(self) -> control.Block | None:
        seg = self._control()
        if seg is None or seg.size < layout.CONTROL_SIZE:
            return None
        try:
            b = control.read_block(seg.buf, spins=50)
        except ShmCacheError:  # damaged (readers are told): the last good block for status
            b = None
        if b is not None and b.snap_seq:
            self._block = b
        return self._block

    def heartbeat_age(self) -> float | None:
        seg = self._control()
        if seg is None or seg.size < layout.CONTROL_SIZE:
            return None
        hb = control.writer_identity(seg.buf)[2]
        return (time.monotonic_ns() - hb) / 1e9 if hb else None

    def healthy(self, stalled: float) -> bool:
        """shmcache_healthy: the cache follows etcd. The loop made progress within the
        stall limit (the watchdog's own criterion, which alone decides its pings:
        a restart cures a stuck loop, not an etcd outage or a full /dev/shm), etcd
        is reachable and publishing works."""
        w = self.writer
        return (stalled < self.stall_limit and w.etcd_down_since is None
                and w.publish_failing_since is None)

    def status_text(self, last_warning: str) -> str:
        text = self._state_text(last_warning)
        failing = publish_failing_text(self.writer)
        return f"{text}; {failing}" if failing else text

    def _state_text(self, last_warning: str) -> str:
        w = self.writer
        b = self.block()
        silent = time.monotonic() - self.liveness.last_change
        down = etcd_down_text(w)
        if down:
            if not w.ready.is_set() or b is None:
                return f"waiting for etcd: {down}"
            return f"serving revision {b.revision} ({b.key_count} keys); {down}"
        if not w.ready.is_set() or b is None:
            if w.stats.get("reconnects", 0):
                return f"waiting for etcd ({w.stats['reconnects']} failed attempts): {last_warning}"
            if self.progress.loaded:
                return f"listing from etcd: {self.progress.loaded} keys loaded"
            return "starting: connecting to etcd"
        lag = max(0, w.etcd_revision - b.revision)
        text = (f"revision {b.revision}, etcd {w.etcd_revision} (lag {lag}), {b.key_count} keys, "
                f"ring {100 * (b.ring_head - b.ring_tail) // max(b.ring_capacity, 1)}% used")
        if silent > 5.0:
            text += f"; no progress for {silent:.0f}s: {last_warning or 'etcd silent'}"
        return text

    def on_signal(self, signum: int, _frame: Any) -> None:
        """SIGTERM/SIGINT: ask the writer to stop (``run()``'s loop reports it).

        A handler runs in the main thread between two bytecodes, possibly while
        that thread holds a lock (logging's handler locks, a buffered stream's), so
        it takes none: no logging and no sd_notify here, only flags and
        ``Writer.stop()`` (lock-free). A second signal writes one line to fd 2
        and exits at once.
        """
        if self._stop_at is not None:
            with contextlib.suppress(OSError):
                os.write(2, b"shmcache serve: second signal: exiting at once\n")
            os._exit(1)
        self._signal = signum
        self._stop_at = time.monotonic()
        self.writer.stop()

    def _report_stop(self) -> None:
        """What on_signal may not do itself: log, tell systemd, abort a list in progress."""
        name = signal.Signals(self._signal).name
        log.info("received %s, stopping", name)
        self.notifier.notify("STOPPING=1", f"STATUS=stopping ({name})")
        self.stopping.set()  # after stop(): aborting a list must find the writer stopping

    def run(self) -> int:
        w = self.writer
        last_warning = _LastWarning()
        logging.getLogger("shmcache.writer").addHandler(last_warning)
        signal.signal(signal.SIGTERM, self.on_signal)
        signal.signal(signal.SIGINT, self.on_signal)

        def target() -> None:
            try:
                w.run()
            except BaseException as exc:  # reported on the main thread
                self.errors.append(exc)

        self.notifier.notify("STATUS=starting: connecting to etcd")
        # The writer runs on a thread so the main thread stays free to take signals
        # promptly even while the writer blocks inside gRPC.
        t = threading.Thread(target=target, name="shmcache-writer")
        t.start()
        tick = 0.25 if self.watchdog is None else min(0.25, self.watchdog / 4)
        ready_sent = False
        next_ping = 0.0
        last_status = ""
        status_at = 0.0
        stall_warned = False
        # Lag: the cache has not reached a revision etcd reported LAG_WARN_SECONDS ago.
        # (Compared with one fixed target: with steady writes elsewhere in etcd the
        # cache trails etcd's newest revision all the time, by design, but it keeps
        # reaching each target within a second or two.)
        lag_since = 0.0
        lag_target: int | None = None
        lag_warned = False
        try:
            while t.is_alive():
                if ready_sent or self._stop_at is not None:
                    t.join(tick)
                else:
                    w.ready.wait(tick)  # READY=1 as soon as the first snapshot is out
                now = time.monotonic()
                stalled = self.liveness.update()
                healthy = stalled < self.stall_limit
                if self._stop_at is not None:
                    if not self._stop_reported:
                        self._stop_reported = True
                        self._report_stop()
                    if now - self._stop_at > STOP_TIMEOUT and t.is_alive():
                        log.error("writer did not stop within %.0fs; exiting without a clean "
                                  "release (readers keep the last published state)",
                                  STOP_TIMEOUT)
                        logging.shutdown()
                        os._exit(1)
                    continue
                if not ready_sent and w.ready.is_set():
                    ready_sent = True
                    b = self.block()
                    log.info("ready: cache %r serving %r at revision %d (%d keys)",
                             self.cfg.name, self.cfg.prefix, b.revision if b else w.revision,
                             b.key_count if b else len(w.kv))
                    self.notifier.notify("READY=1", "STATUS=" + self.status_text(last_warning.text))
                    status_at = now
                if self.watchdog is not None and now >= next_ping and healthy:
                    self.notifier.notify("WATCHDOG=1")
                    next_ping = now + self.watchdog / 2
                if not healthy and not stall_warned:
                    stall_warned = True
                    log.warning("writer loop made no progress for %.0fs%s", stalled,
                                "; not pinging the watchdog" if self.watchdog else "")
                elif healthy and stall_warned:
                    stall_warned = False
                    log.info("writer loop making progress again")
                if now - status_at >= 1.0:
                    status_at = now
                    text = self.status_text(last_warning.text)
                    if text != last_status:
                        last_status = text
                        self.notifier.notify("STATUS=" + text)
                b = self._block
                if not ready_sent or b is None:
                    continue
                if lag_target is not None and b.revision >= lag_target:
                    if lag_warned:
                        log.info("cache caught up with etcd: revision %d", b.revision)
                    lag_target, lag_warned = None, False
                if lag_target is None and w.etcd_revision > b.revision:
                    lag_target, lag_since = w.etcd_revision, now
                elif (lag_target is not None and not lag_warned
                      and now - lag_since >= LAG_WARN_SECONDS):
                    lag_warned = True
                    log.warning("cache lags etcd: still at revision %d, %.0fs after etcd reported "
                                "%d (now %d)", b.revision, now - lag_since, lag_target,
                                w.etcd_revision)
        finally:
            logging.getLogger("shmcache.writer").removeHandler(last_warning)
        if self._stop_at is not None:
            log.info("stopped in %.2fs", time.monotonic() - self._stop_at)
        if self.errors:
            exc = self.errors[0]
            self.notifier.notify("STOPPING=1", f"STATUS=failed: {exc}")
            if isinstance(exc, ShmCacheError):
                print(f"shmcache serve: {exc}", file=sys.stderr)
            else:
                log.error("writer failed", exc_info=exc)
            return 1
        if self._stop_at is None:  # run() returned without being asked to: also a failure
            log.error("writer stopped unexpectedly")
            return 1
        return 0

    def close(self) -> None:
        self.notifier.close()
        if self._ctl is not None:
            self._ctl.close()
            self._ctl = None


def serve(cfg: ServeConfig, environ: Mapping[str, str] | None = None) -> int:
    """Run the writer for ``cfg`` until SIGTERM/SIGINT; returns the process exit code.

    Exit codes: 0 stopped by a signal, 1 the writer failed (another writer holds
    the cache, an unexpected error), 2 a bad setting (ConfigError is raised).
    """
    from ..writer.writer import Writer

    environ = os.environ if environ is None else environ
    setup_logging(cfg.log_level, cfg.log_format)
    for warning in cfg.warnings:
        log.warning("%s", warning)
    log.info("cache %r: prefix %r from %s; settings from %s", cfg.name, cfg.prefix,
             ",".join(cfg.endpoints), cfg.config_file or "flags/environment/defaults")
    for line in cfg.describe():
        log.debug("setting %s", line)
    try:
        writer = Writer(cfg.name, list(cfg.endpoints), cfg.prefix.encode(), ring_size=cfg.ring_size,
                        snapshot_interval=cfg.snapshot_interval,
                        snapshot_bytes=cfg.snapshot_bytes, verify_interval=cfg.verify_interval,
                        mode=cfg.mode, group=cfg.group,
                        remove_on_close=cfg.remove_on_exit, ca_file=cfg.ca_file,
                        cert_file=cfg.cert_file, key_file=cfg.key_file, user=cfg.user,
                        password=cfg.password, indexes=cfg.indexes)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    svc = _Service(cfg, writer, environ)
    server = None
    try:
        if cfg.metrics is not None:
            server, port = start_metrics_server(svc, *cfg.metrics)
            log.info("metrics at http://%s:%d/metrics", cfg.metrics[0], port)
        return svc.run()
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
        svc.close()
