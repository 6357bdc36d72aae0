"""The test harness's etcd: throwaway servers on loopback for tests and benchmarks.

Not part of the package (``shmcache demo`` has its own minimal launcher,
shmcache/cli/demo_etcd.py, whose ``find_etcd_binary`` and ``free_port`` this uses).

``EtcdServer`` is one member (optionally with TLS and authentication);
``EtcdCluster`` is several members forming one cluster, for failover tests;
``generate_tls_files`` makes a CA and server/client certificates for them.
``ApiClient`` speaks etcd's API through shmcache.etcdapi (the harness's admin
calls, the test helpers, the benchmarks); ``client()`` hands out python-etcd3
clients for tests that use it as a third-party client.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import psutil

from shmcache.cli.demo_etcd import etcd_env, find_etcd_binary, free_port
from tests.python_etcd3 import import_python_etcd3, use_pure_python_protobuf

__all__ = ["ApiClient", "EtcdCluster", "EtcdServer", "TLSFiles", "find_etcd_binary", "free_port",
           "use_pure_python_protobuf",
           "generate_tls_files"]

_HOST = "127.0.0.1"
_NAME = "shmcache-test"
_LOG_NAME = "etcd.log"
_MEMBER_DIR_NAME = "etcd"
_STOP_GRACE = 5.0

@dataclass(frozen=True)
class TLSFiles:
    """PEM files for an etcd server with TLS and for its clients (see ``generate_tls_files``)."""

    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str


def generate_tls_files(directory: str | os.PathLike[str], client_cn: str = "root",
                       days: int = 2) -> TLSFiles:
    """Write a throwaway CA, a server certificate for 127.0.0.1/localhost and a client
    certificate with common name ``client_cn`` into ``directory``.

    Needs the ``cryptography`` package (part of the ``dev`` extra). With
    ``--client-cert-auth`` and authentication enabled, etcd takes the client
    certificate's common name as the user name.
    """
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=days)

    def name(cn: str) -> x509.Name:  # ("": no common name, as etcd's gRPC proxy wants)
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else [])

    def write(filename: str, data: bytes) -> str:
        path = os.path.join(directory, filename)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return path

    def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM,
                                 serialization.PrivateFormat.TraditionalOpenSSL,
                                 serialization.NoEncryption())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder().subject_name(name("shmcache test CA"))
        .issuer_name(name("shmcache test CA")).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(cn: str, usage: Any, san: list[Any] | None) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), key_pem(key)

    server_cert, server_key = leaf(
        "127.0.0.1", [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
        [x509.IPAddress(ipaddress.ip_address(_HOST)), x509.DNSName("localhost")])
    client_cert, client_key = leaf(client_cn, [ExtendedKeyUsageOID.CLIENT_AUTH], None)
    return TLSFiles(
        ca=write("ca.pem", ca_cert.public_bytes(serialization.Encoding.PEM)),
        server_cert=write("server.pem", server_cert),
        server_key=write("server-key.pem", server_key),
        client_cert=write("client.pem", client_cert),
        client_key=write("client-key.pem", client_key),
    )


class ApiClient:
    """etcd's v3 API on one gRPC channel through ``shmcache.etcdapi``: the harness's own
    client for admin calls, test helpers and benchmarks.

    ``kv`` is the KV stub and ``stub(service)`` makes the others; pass ``metadata``
    (etcd's auth token, or None) with every call. The messages are
    ``shmcache.etcdapi.rpc``'s: python-etcd3's are other classes, never to be passed
    to these stubs nor these messages to python-etcd3's. With TLS the channel is
    secure (``tls``'s CA and client certificate); with ``credentials`` it logs in
    once (tokens expire after etcd's ``--auth-token-ttl`` unused). It works under
    either protobuf implementation and forces neither. Calls may come from any
    thread (grpcio channels are thread-safe); the caller closes it.
    """

    def __init__(self, host: str, port: int, *, tls: TLSFiles | None = None,
                 credentials: tuple[str, str] | None = None, timeout: float = 10.0) -> None:
        from shmcache.etcdapi import Stub
        from shmcache.etcdapi.dial import authenticate, open_channel

        self.channel = open_channel(
            host, port, ca_cert=tls.ca if tls is not None else None,
            cert_key=tls.client_key if tls is not None else None,
            cert_cert=tls.client_cert if tls is not None else None)
        self.metadata: tuple[tuple[str, str], ...] | None = None
        try:
            if credentials is not None:
                self.metadata = authenticate(self.channel, *credentials, timeout=timeout)
        except BaseException:
            self.channel.close()
            raise
        self.kv = Stub(self.channel, "KV")

    @classmethod
    def to(cls, endpoint: str, **kw: Any) -> ApiClient:
        """A client of ``endpoint`` (``http://h:p``, ``https://h:p`` or ``h:p``)."""
        from shmcache.etcdapi.dial import parse_endpoint

        return cls(*parse_endpoint(endpoint), **kw)

    def stub(self, service: str) -> Any:
        """The stub of another etcd service on this channel (``"Lease"``, ``"Auth"`` ...)."""
        from shmcache.etcdapi import Stub

        return Stub(self.channel, service)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
        *,
        tls: TLSFiles | None = None,
        client_cert_auth: bool = False,
        name: str = _NAME,
    ) -> None:
        self._owns_dir = data_dir is None
        self.data_dir: str = (
            tempfile.mkdtemp(prefix="shmcache-etcd-") if data_dir is None else os.fspath(data_dir)
        )
        os.makedirs(self.data_dir, exist_ok=True)
        self.binary: str = binary if binary is not None else find_etcd_binary()
        self.extra_args: list[str] = list(extra_args)
        self.tls = tls
        self.client_cert_auth = client_cert_auth
        self.name = name
        # (user, password) that client() and compact() use once enable_auth() ran.
        self.credentials: tuple[str, str] | None = None
        # Set by EtcdCluster: the other members, and raft timers fit for several members.
        self._initial_cluster: str | None = None
        self._cluster_token: str | None = None
        self._timers = ("10", "100")
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
    def scheme(self) -> str:
        """``https`` when the server was given TLS files, else ``http``."""
        return "https" if self.tls is not None else "http"

    @property
    def endpoint(self) -> str:
        """The client URL, ``http://127.0.0.1:<port>`` (``https://`` with TLS)."""
        return f"{self.scheme}://{_HOST}:{self.port}"

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

    def start_at(self, port: int, timeout: float = 15.0) -> Self:
        """Start again on client port ``port``, keeping this server's data and peer port;
        returns self. With another server's port (stopped first): another cluster behind
        the same address, as a restore or a failover onto another cluster would put it
        (tests/checker_faults.py, ``cluster_swap``)."""
        if self._port is None:
            raise RuntimeError("etcd server has not been started")
        if self.running:
            raise RuntimeError(f"etcd server is already running (pid {self.pid})")
        self._port = port
        return self.start(timeout)

    def pause(self) -> None:
        """Freeze etcd with SIGSTOP: connections stay open but nothing is answered."""
        if not self.running:
            raise RuntimeError("etcd server is not running")
        self._signal(signal.SIGSTOP)
        self._paused = True
        # kill() returns before every thread has stopped: a request sent right away
        # could still be answered. Wait until all of etcd's threads show state T.
        pid = self.pid
        deadline = time.monotonic() + 2.0
        while pid is not None and time.monotonic() < deadline:
            try:
                states = []
                for tid in os.listdir(f"/proc/{pid}/task"):
                    with open(f"/proc/{pid}/task/{tid}/stat") as f:
                        states.append(f.read().rsplit(")", 1)[1].split()[0])
            except OSError:
                return  # not Linux, or the process is gone
            if all(st in ("T", "t") for st in states):
                return
            time.sleep(0.001)

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
        """Return a new ``etcd3.client`` connected to this server; the caller closes it.

        With TLS the CA and client certificate are passed, and after
        ``enable_auth()`` the root credentials, unless ``kw`` says otherwise.
        Note that python-etcd3's own methods (``client.put`` ...) send the token as
        call credentials, which gRPC refuses on a channel without TLS: with
        authentication but no TLS, call the stubs with ``metadata=client.metadata``.
        Under protobuf>=4 it makes this process use the pure-Python protobuf
        (tests/python_etcd3.py): where python-etcd3 is not the point, use
        ``api_client()``.
        """
        if self.tls is not None:
            kw.setdefault("ca_cert", self.tls.ca)
            kw.setdefault("cert_cert", self.tls.client_cert)
            kw.setdefault("cert_key", self.tls.client_key)
        if self.credentials is not None and "user" not in kw:
            kw["user"], kw["password"] = self.credentials
        return import_python_etcd3().client(host=self.host, port=self.port, **kw)

    def api_client(self) -> ApiClient:
        """Return a new ``ApiClient`` (shmcache.etcdapi) connected to this server, with
        its TLS files and, after ``enable_auth()``, the root credentials; the caller
        closes it. Unlike ``client()`` it leaves the protobuf implementation alone."""
        return ApiClient(self.host, self.port, tls=self.tls, credentials=self.credentials)

    def compact(self, revision: int) -> None:
        """Compact the key-value history up to ``revision`` (physically, i.e. waiting for it)."""
        from shmcache.etcdapi import rpc

        with self.api_client() as client:
            client.kv.Compact(rpc.CompactionRequest(revision=revision, physical=True), 30,
                              metadata=client.metadata)

    def enable_auth(self, root_password: str = "root") -> None:
        """Create the ``root`` user and role and turn authentication on.

        From then on ``client()`` and ``api_client()`` authenticate as root.
        Authentication stays on across restarts (it is stored in the data dir).
        """
        from shmcache.etcdapi import rpc

        with self.api_client() as client:
            stub, md = client.stub("Auth"), client.metadata
            with contextlib.suppress(Exception):  # etcd >= 3.5 may know the root role already
                stub.RoleAdd(rpc.AuthRoleAddRequest(name="root"), 10, metadata=md)
            stub.UserAdd(rpc.AuthUserAddRequest(name="root", password=root_password), 10,
                         metadata=md)
            stub.UserGrantRole(rpc.AuthUserGrantRoleRequest(user="root", role="root"), 10,
                               metadata=md)
            stub.AuthEnable(rpc.AuthEnableRequest(), 10, metadata=md)
        self.credentials = ("root", root_password)

    def add_user(self, user: str, password: str, read_prefix: bytes) -> None:
        """Create ``user`` with a role that may only read keys starting with ``read_prefix``.

        With ``client_cert_auth`` a client certificate whose common name is
        ``user`` authenticates as that user too (etcd ignores the password then).
        """
        from shmcache.etcdapi import auth, rpc

        end = _prefix_end(read_prefix)
        with self.api_client() as client:
            stub, md = client.stub("Auth"), client.metadata
            role = f"{user}-read"
            stub.RoleAdd(rpc.AuthRoleAddRequest(name=role), 10, metadata=md)
            perm = auth.Permission(permType=auth.Permission.READ, key=read_prefix, range_end=end)
            stub.RoleGrantPermission(rpc.AuthRoleGrantPermissionRequest(name=role, perm=perm),
                                     10, metadata=md)
            stub.UserAdd(rpc.AuthUserAddRequest(name=user, password=password), 10, metadata=md)
            stub.UserGrantRole(rpc.AuthUserGrantRoleRequest(user=user, role=role), 10,
                               metadata=md)

    # -- internals ----------------------------------------------------------

    @staticmethod
    def _two_free_ports() -> tuple[int, int]:
        while True:
            a, b = free_port(), free_port()
            if a != b:
                return a, b

    def _command(self) -> list[str]:
        client_url = f"{self.scheme}://{_HOST}:{self._port}"
        peer_url = f"http://{_HOST}:{self._peer_port}"
        flags = [
            ("--name", self.name),
            # A subdirectory that etcd creates itself gets the 0700 mode etcd
            # insists on, whatever the mode of the directory we were given.
            ("--data-dir", os.path.join(self.data_dir, _MEMBER_DIR_NAME)),
            ("--listen-client-urls", client_url),
            ("--advertise-client-urls", client_url),
            ("--listen-peer-urls", peer_url),
            ("--initial-advertise-peer-urls", peer_url),
            ("--initial-cluster", self._initial_cluster or f"{self.name}={peer_url}"),
            ("--initial-cluster-state", "new"),
            # 3.4 defaults to the deprecated capnslog logger, 3.5 to zap; both
            # accept zap, so the log has the same JSON lines whichever runs.
            ("--logger", "zap"),
            ("--log-level", "warn"),
            # A restarted member waits one randomised election timeout (1-2 s
            # by default) before it leads again; a lone member has no peer to
            # lose, so short timers only make restarts ~10x faster.
            # (EtcdCluster sets longer ones: several members on two busy cores
            # would otherwise hold elections all the time.)
            ("--heartbeat-interval", self._timers[0]),
            ("--election-timeout", self._timers[1]),
        ]
        if self._cluster_token is not None:
            flags.append(("--initial-cluster-token", self._cluster_token))
        if self.tls is not None:
            flags += [("--cert-file", self.tls.server_cert), ("--key-file", self.tls.server_key),
                      ("--trusted-ca-file", self.tls.ca)]
        # Go's boolean flags take no separate value: "--client-cert-auth true" stops the parse.
        switches = []
        if self.tls is not None and self.client_cert_auth:
            switches.append("--client-cert-auth=true")
        # The last occurrence of a flag wins, so extra_args can override the above.
        return [self.binary, *(arg for pair in flags for arg in pair), *switches,
                *self.extra_args]

    def _launch_and_wait(self, timeout: float) -> None:
        self._launch()
        try:
            self._wait_healthy(timeout)
        except BaseException:
            self.kill()
            raise

    def _launch(self) -> None:
        # etcd reads ETCD_<FLAG> variables as flag values and refuses to start
        # when one duplicates a flag we pass, so a caller's environment must
        # not leak in; ETCD_UNSUPPORTED_ARCH is what lets 3.4 run on arm64.
        # etcd also speaks sd_notify: a throwaway server must not tell the
        # caller's systemd (or a test's stand-in) that it is ready.
        env = etcd_env()
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
        context = None
        if self.tls is not None:
            context = ssl.create_default_context(cafile=self.tls.ca)
            context.load_cert_chain(self.tls.client_cert, self.tls.client_key)
        with urllib.request.urlopen(self.endpoint + path, timeout=timeout,
                                    context=context) as resp:
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


def _prefix_end(prefix: bytes) -> bytes:
    """The range end covering every key that starts with ``prefix`` (etcd's convention)."""
    b = bytearray(prefix)
    while b:
        if b[-1] < 0xFF:
            b[-1] += 1
            return bytes(b)
        b.pop()
    return b"\0"


class EtcdCluster:
    """Several etcd members on loopback forming one cluster, for failover tests.

    Every member is an ``EtcdServer`` (``members``) that may be killed, stopped
    and started again on its own; ``endpoints`` lists the client URLs of all
    members. ``data_dir`` holds one subdirectory per member; when None, a
    temporary directory is created and removed by ``close()``.
    """

    def __init__(
        self,
        size: int = 3,
        data_dir: str | os.PathLike[str] | None = None,
        binary: str | None = None,
        extra_args: Sequence[str] = (),
        *,
        tls: TLSFiles | None = None,
        client_cert_auth: bool = False,
    ) -> None:
        if size < 1:
            raise ValueError("a cluster needs at least one member")
        self._owns_dir = data_dir is None
        self.data_dir: str = (
            tempfile.mkdtemp(prefix="shmcache-etcd-cluster-") if data_dir is None
            else os.fspath(data_dir)
        )
        binary = binary if binary is not None else find_etcd_binary()
        self.members: list[EtcdServer] = [
            EtcdServer(os.path.join(self.data_dir, f"m{i}"), binary, extra_args, tls=tls,
                       client_cert_auth=client_cert_auth, name=f"m{i}")
            for i in range(size)
        ]
        for m in self.members:
            m._timers = ("50", "500")
            m._cluster_token = f"shmcache-{os.getpid()}-{id(self):x}"

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    def start(self, timeout: float = 30.0) -> Self:
        """Start every member at once (none is healthy before a quorum runs); returns self."""
        for attempt in range(3):
            ports = self._free_ports(2 * len(self.members))
            for i, m in enumerate(self.members):
                m._port, m._peer_port = ports[2 * i], ports[2 * i + 1]
            cluster = ",".join(f"{m.name}=http://{_HOST}:{m._peer_port}" for m in self.members)
            for m in self.members:
                m._initial_cluster = cluster
            try:
                for m in self.members:
                    m._launch()
                for m in self.members:
                    m._wait_healthy(timeout)
                return self
            except BaseException:
                clash = any("address already in use" in m._log_tail(since=m._log_start)
                            for m in self.members)
                for m in self.members:
                    m.kill()
                if attempt == 2 or not clash:
                    raise
                for m in self.members:  # a failed first start leaves member dirs behind
                    shutil.rmtree(os.path.join(m.data_dir, _MEMBER_DIR_NAME), ignore_errors=True)
        raise AssertionError("unreachable")

    def member_at(self, port: int) -> EtcdServer | None:
        """The member whose client port is ``port``."""
        return next((m for m in self.members if m._port == port), None)

    def client(self, **kw: Any) -> Any:
        """An ``etcd3.client`` to the first running member; the caller closes it."""
        for m in self.members:
            if m.running and not m.paused:
                return m.client(**kw)
        raise RuntimeError("no etcd member is running")

    def api_client(self) -> ApiClient:
        """An ``ApiClient`` to the first running member; the caller closes it."""
        for m in self.members:
            if m.running and not m.paused:
                return m.api_client()
        raise RuntimeError("no etcd member is running")

    def close(self) -> None:
        """Stop every member and remove the data dir if this object created it; idempotent."""
        try:
            for m in self.members:
                with contextlib.suppress(Exception):
                    m.stop()
        finally:
            for m in self.members:
                m.close()
            if self._owns_dir:
                shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<EtcdCluster {self.members!r}>"

    @staticmethod
    def _free_ports(n: int) -> list[int]:
        ports: list[int] = []
        while len(ports) < n:
            p = free_port()
            if p not in ports:
                ports.append(p)
        return ports
