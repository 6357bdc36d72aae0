"""etcd's gRPC proxy for tests and benchmarks: ``etcd grpc-proxy start`` on loopback.

``GrpcProxy`` runs the proxy from the same etcd binary as the ``EtcdServer`` (or
cluster) it fronts, on free loopback ports, with its data directory in a temp
dir. It can be SIGKILLed and started again on the same port (a proxy crash, a
deploy), and ``close()`` leaves no process and no directory behind.

What the proxy forwards, found by tests/test_grpc_proxy.py against etcd 3.5.1
(and 3.4.23): Range (linearizable ones forwarded; serializable ones may be
answered from its cache), Put/Txn/Compact, Status, leases, watches with
``progress_notify`` (etcd's periodic notifications pass through), compaction
cancels with ``compact_revision``, Authenticate and the token, TLS on both sides
(it refuses a client certificate towards etcd that has a common name). It does
not answer ``WatchRequest.progress_request`` (3.5 logs "not supported request
type by gRPC proxy"; both drop it).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
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

from shmcache.cli.demo_etcd import etcd_env, find_etcd_binary, free_port

__all__ = ["GrpcProxy", "parse_metrics"]

_HOST = "127.0.0.1"
_LOG_NAME = "grpc-proxy.log"

_live: set[GrpcProxy] = set()
_live_lock = threading.Lock()


@atexit.register
def _close_all() -> None:
    with _live_lock:
        proxies = list(_live)
    for proxy in proxies:
        with contextlib.suppress(Exception):
            proxy.close()


_METRIC_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text as {"name{labels}": value} (labels as etcd prints them)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _METRIC_RE.match(line)
        if m is not None:
            with contextlib.suppress(ValueError):
                out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


class GrpcProxy:
    """One ``etcd grpc-proxy start`` in front of ``endpoints`` (etcd client URLs).

    The listening port is chosen by the first ``start()`` and kept, so a
    ``kill()`` + ``start()`` brings the proxy back where its clients dial.
    ``tls`` (tests.etcdserver.TLSFiles) makes the proxy talk TLS to etcd (the CA and
    the client certificate, which must have no common name) and serve TLS to its
    own clients with the server certificate. ``metrics_port``: etcd's /metrics as the proxy sees them plus
    the proxy's own, over plain HTTP. Not thread-safe: one owner drives it.
    """

    def __init__(self, endpoints: Sequence[str], binary: str | None = None,
                 extra_args: Sequence[str] = (), *, tls: Any = None) -> None:
        self.upstream = [e.split("://", 1)[-1] for e in endpoints]
        self.binary = binary if binary is not None else find_etcd_binary()
        self.extra_args = list(extra_args)
        self.tls = tls
        self.dir = tempfile.mkdtemp(prefix="shmcache-grpc-proxy-")
        self.log_path = os.path.join(self.dir, _LOG_NAME)
        self._proc: subprocess.Popen[bytes] | None = None
        self._port: int | None = None
        self._metrics_port: int | None = None
        self._closed = False
        with _live_lock:
            _live.add(self)

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the proxy has not been started")
        return self._port

    @property
    def metrics_port(self) -> int:
        if self._metrics_port is None:
            raise RuntimeError("the proxy has not been started")
        return self._metrics_port

    @property
    def endpoint(self) -> str:
        """The URL clients dial (``https://`` with TLS)."""
        return f"{'https' if self.tls is not None else 'http'}://{_HOST}:{self.port}"

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 15.0) -> Self:
        """Launch the proxy and wait until it answers a gRPC call; returns self.

        The first start picks free ports (retried if another process takes one
        first); later starts reuse them. RuntimeError with the log's tail if the
        proxy exits or does not answer within ``timeout``.
        """
        if self._closed:
            raise RuntimeError("the proxy is closed")
        if self.running:
            raise RuntimeError(f"the proxy is already running (pid {self.pid})")
        if self._port is not None:
            self._launch_and_wait(timeout)
            return self
        for attempt in range(3):
            self._port, self._metrics_port = free_port(), free_port()
            if self._port == self._metrics_port:
                continue
            try:
                self._launch_and_wait(timeout)
                return self
            except RuntimeError:
                if attempt == 2 or "address already in use" not in self._log_tail():
                    self._port = self._metrics_port = None
                    raise
        raise AssertionError("unreachable")

    def kill(self) -> None:
        """SIGKILL the proxy and reap it; no-op when it is not running."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGKILL)
            proc.wait()

    def restart(self, timeout: float = 15.0) -> Self:
        """``kill()`` then ``start()`` on the same port; returns self."""
        self.kill()
        return self.start(timeout)

    def close(self) -> None:
        """Kill the proxy and remove its directory; idempotent."""
        if self._closed:
            return
        try:
            self.kill()
        finally:
            self._closed = True
            if not os.environ.get("SHMCACHE_KEEP_LOGS"):
                shutil.rmtree(self.dir, ignore_errors=True)
            with _live_lock:
                _live.discard(self)

    def __enter__(self) -> Self:
        if not self.running:
            self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def metrics(self) -> dict[str, float]:
        """/metrics from the proxy's metrics address (etcd's, fetched by the proxy, and its own)."""
        url = f"http://{_HOST}:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            return parse_metrics(resp.read().decode())

    def log(self) -> str:
        return self._log_tail(200)

    # -- internals ------------------------------------------------------------

    def _command(self) -> list[str]:
        addr = f"{_HOST}:{self._port}"
        cmd = [self.binary, "grpc-proxy", "start",
               "--endpoints", ",".join(self.upstream),
               "--listen-addr", addr,
               # The proxy dials its advertised address for its own HTTP gateway; the
               # default (127.0.0.1:23790) would be someone else's port, or nobody's.
               "--advertise-client-url", addr,
               "--metrics-addr", f"http://{_HOST}:{self._metrics_port}",
               "--data-dir", os.path.join(self.dir, "data")]
        if self.tls is not None:
            # The proxy refuses a client certificate with a common name ("cert has non
            # empty Common Name"), which etcd would take for a user name: make ``tls``
            # with generate_tls_files(dir, client_cn="").
            cmd += ["--cacert", self.tls.ca, "--cert", self.tls.client_cert,
                    "--key", self.tls.client_key, "--cert-file", self.tls.server_cert,
                    "--key-file", self.tls.server_key]
        return cmd + self.extra_args

    def _launch_and_wait(self, timeout: float) -> None:
        cmd = self._command()
        with open(self.log_path, "ab") as log:
            log.write(f"--- {time.strftime('%H:%M:%S')} starting {cmd}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, env=etcd_env(),
                                          cwd=self.dir, start_new_session=True)
        try:
            self._wait_answering(timeout)
        except BaseException:
            self.kill()
            raise

    def _wait_answering(self, timeout: float) -> None:
        """Until the proxy forwards a Status call to etcd (its gRPC port is open early)."""
        from shmcache.etcdapi import Stub, rpc
        from shmcache.etcdapi.dial import open_channel

        assert self._proc is not None
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"grpc-proxy exited with {self._proc.returncode} during "
                                   f"startup; log {self.log_path}:\n{self._log_tail()}")
            try:
                with socket.create_connection((_HOST, self.port), timeout=0.5):
                    pass
                tls = self.tls
                channel = open_channel(_HOST, self.port,
                                       ca_cert=tls.ca if tls else None,
                                       cert_key=tls.client_key if tls else None,
                                       cert_cert=tls.client_cert if tls else None)
                try:
                    Stub(channel, "Maintenance").Status(rpc.StatusRequest(), timeout=1.0)
                    return
                finally:
                    channel.close()
            except Exception as exc:  # (OSError, or grpc.RpcError while etcd is not reached)
                last = repr(exc)[:200]
            if time.monotonic() >= deadline:
                raise RuntimeError(f"grpc-proxy at {self.endpoint} does not answer after "
                                   f"{timeout:.0f}s ({last}); log:\n{self._log_tail()}")
            time.sleep(0.05)

    def _log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 16384))
                text = f.read().decode("utf-8", "replace")
        except OSError as exc:
            return f"<log unreadable: {exc}>"
        return "\n".join(text.splitlines()[-lines:])

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("running" if self.running else "stopped")
        where = self.endpoint if self._port is not None else "no port yet"
        return f"<GrpcProxy {where} -> {','.join(self.upstream)} {state}>"
