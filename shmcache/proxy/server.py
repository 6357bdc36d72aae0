"""The proxy's gRPC server: etcd's KV, Watch, Lease, Maintenance, Cluster and Auth services
and gRPC's health service, on one listening address.

Several proxy processes may listen on one address (``grpc.so_reuseport``, set
explicitly: the kernel then spreads connections across them), to use more
cores for one cache. TLS and client certificates are on the listening side;
``--endpoints`` TLS is the Forwarder's.

The health service (``grpc.health.v1.Health/Check``) is written here rather
than taken from grpcio-health-checking: its releases for current grpcio need
protobuf >= 7, and the writer extra this proxy shares pins protobuf < 4.

Concurrency contract: ``start()`` and ``stop()`` from one thread (the CLI's main
thread); every handler runs on the server's thread pool. ``stop()`` is
idempotent: it refuses new calls, lets calls in flight finish for ``grace``
seconds, cancels the rest, then closes the Watch service, the forwarding
channels and the Reader (its mappings go with it; the proxy creates no segment).
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc

from ..errors import ShmCacheError
from ..etcdapi import ETCD_VERSION, rpc
from ..reader.reader import Reader
from .forward import Forwarder, method_kinds
from .kv import Header, KVService
from .metrics import ProxyMetrics
from .wire import (
    HEALTH_NOT_SERVING,
    HEALTH_SERVING,
    decode_health_request,
    encode_health_response,
)

__all__ = ["ListenTLS", "ProxyServer", "split_listen"]

log = logging.getLogger("shmcache.proxy")

FORWARDED_SERVICES = ("Lease", "Cluster", "Auth", "Maintenance")
SERVICES = ("KV", "Watch", *FORWARDED_SERVICES)
HEALTH_SERVICE = "grpc.health.v1.Health"
# Messages as large as etcd's own limits (its --max-request-bytes is 1.5 MiB; its
# responses are bounded only by the client's receive limit).
_SERVER_OPTIONS = (
    ("grpc.so_reuseport", 1),
    ("grpc.max_receive_message_length", 16 * 2**20),
    ("grpc.max_send_message_length", 2**31 - 1),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
)


@dataclass(frozen=True)
class ListenTLS:
    """PEM files of the listening side: the server's certificate and key, and the CA
    whose client certificates are required (None: no client certificate asked)."""

    cert_file: str
    key_file: str
    client_ca_file: str | None = None

    def credentials(self) -> Any:
        def read(path: str) -> bytes:
            with open(path, "rb") as f:
                return f.read()
        ca = None if self.client_ca_file is None else read(self.client_ca_file)
        return grpc.ssl_server_credentials([(read(self.key_file), read(self.cert_file))],
                                           root_certificates=ca,
                                           require_client_auth=ca is not None)


class ProxyServer:
    """One proxy process's server for the cache ``name``; see the module docstring."""

    def __init__(self, name: str, listen: str, endpoints: Sequence[str] = (), *,
                 tls: ListenTLS | None = None, ca_file: str | None = None,
                 cert_file: str | None = None, key_file: str | None = None,
                 workers: int = 256, reader_timeout: float = 0.0) -> None:
        self.name = name
        host, port = split_listen(listen)
        _probe_bind(host, port)
        self.metrics = ProxyMetrics()
        self._stopped = threading.Event()
        self._serving = False
        self.reader = Reader(name, timeout=reader_timeout)
        self.forwarder: Forwarder | None = None
        self.watch: Any = None
        self._server: Any = None
        try:
            if endpoints:
                self.forwarder = Forwarder(endpoints, ca_file=ca_file, cert_file=cert_file,
                                           key_file=key_file)
            self.header = Header(self.reader)
            self.kv = KVService(self.reader, self.metrics, self.forwarder, self.header)
            self._server = grpc.server(futures.ThreadPoolExecutor(
                max_workers=workers, thread_name_prefix="shmcache-proxy"),
                options=list(_SERVER_OPTIONS))
            handlers = [self.kv.handler(), self._health_handler(),
                        self._maintenance_handler()]
            handlers += [self._forwarding_handler(s) for s in FORWARDED_SERVICES]
            watch = self._watch_handler()
            if watch is not None:
                handlers.insert(1, watch)
            self._server.add_generic_rpc_handlers(handlers)
            address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            if tls is None:
                self.port = self._server.add_insecure_port(address)
            else:
                self.port = self._server.add_secure_port(address, tls.credentials())
            if not self.port:
                raise OSError(f"cannot listen on {listen}")
        except BaseException:
            self._release()
            raise

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> int:
        """Serve; returns the port (the bound one when ``listen`` asked for port 0)."""
        self._server.start()
        self._serving = True
        log.info("proxy for cache %r serving etcd's API on port %d (%s)", self.name, self.port,
                 "forwarding to " + ",".join(self.forwarder.endpoints)
                 if self.forwarder is not None else "no --endpoints: reads only")
        return int(self.port)

    def stop(self, grace: float = 5.0) -> None:
        """Stop serving and release everything (idempotent)."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._serving = False
        if self._server is not None:
            done = self._server.stop(grace)
            # Watch streams never end by themselves: end them now rather than after the
            # grace, so that unary calls in flight are what the grace is for.
            self._close_watch()
            done.wait(grace + 5.0)
        self._release()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until ``stop()``; False on timeout."""
        return self._stopped.wait(timeout)

    def _close_watch(self) -> None:
        watch, self.watch = self.watch, None
        if watch is not None:
            watch.close()

    def _release(self) -> None:
        self._close_watch()
        if self.forwarder is not None:
            self.forwarder.close()
        self.reader.close()

    # -- services -------------------------------------------------------------

    def _watch_handler(self) -> Any:
        try:
            from .watch import WatchService  # type: ignore[import-not-found,unused-ignore]
        except ImportError:
            log.warning("the Watch service is not available in this build: watches are %s",
                        "forwarded" if self.forwarder is not None else "refused")
            return self._forwarding_handler("Watch") if self.forwarder is not None else None
        self.watch = WatchService(self.reader, self.metrics, self.forwarder)
        return self.watch.handler()

    def _forwarding_handler(self, service: str) -> Any:
        """Every method of ``service`` forwarded to etcd as bytes (UNIMPLEMENTED without it)."""
        handlers = {}
        for method, (client_streaming, server_streaming) in method_kinds(service).items():
            fn = self._forwarder_for(service, method, client_streaming, server_streaming)
            make = {(False, False): grpc.unary_unary_rpc_method_handler,
                    (False, True): grpc.unary_stream_rpc_method_handler,
                    (True, False): grpc.stream_unary_rpc_method_handler,
                    (True, True): grpc.stream_stream_rpc_method_handler}[
                        (client_streaming, server_streaming)]
            handlers[method] = make(fn)
        return grpc.method_handlers_generic_handler(f"etcdserverpb.{service}", handlers)

    def _forwarder_for(self, service: str, method: str, client_streaming: bool,
                       server_streaming: bool) -> Any:
        fwd, metrics, kv = self.forwarder, self.metrics, self.kv

        def refuse(context: Any) -> None:
            metrics.request(service, method, "UNIMPLEMENTED", forwarded=False)
            context.abort(grpc.StatusCode.UNIMPLEMENTED,
                          f"shmcache proxy: {service}.{method} goes to etcd, and this proxy "
                          f"has no --endpoints")

        def failed(context: Any, exc: grpc.RpcError) -> None:
            metrics.request(service, method, exc.code().name, forwarded=True)
            context.abort(exc.code(), exc.details())

        if server_streaming:
            def streaming(request: Any, context: Any) -> Any:
                if fwd is None:
                    refuse(context)
                assert fwd is not None
                try:
                    yield from fwd.stream(service, method, request, context, client_streaming)
                except grpc.RpcError as exc:
                    if exc.code() != grpc.StatusCode.CANCELLED:
                        failed(context, exc)
                metrics.request(service, method, "OK", forwarded=True)
            return streaming

        assert not client_streaming  # (etcd has no client-streaming unary-response method)

        def unary(request: Any, context: Any) -> bytes:
            if fwd is None:
                refuse(context)
            assert fwd is not None
            try:
                resp = fwd.unary(service, method, request, context)
            except grpc.RpcError as exc:
                failed(context, exc)
            metrics.request(service, method, "OK", forwarded=True)
            if service == "Lease" and method == "LeaseRevoke":
                # A revoked lease deletes its keys: reads after it wait for its revision.
                kv.note_write(int(rpc.LeaseRevokeResponse.FromString(resp).header.revision))
            return resp
        return unary

    def _maintenance_handler(self) -> Any:
        """Maintenance forwarded, except Status without --endpoints: answered here, so
        ``etcdctl endpoint status`` works against a read-only proxy."""
        if self.forwarder is not None:
            return self._forwarding_handler("Maintenance")
        header = self.header

        def status(_request: bytes, context: Any) -> bytes:
            rev = self.reader.revision
            resp = rpc.StatusResponse(
                header=rpc.ResponseHeader(cluster_id=header.cluster_id(), revision=rev),
                version=ETCD_VERSION,
                errors=[f"shmcache proxy for cache {self.name!r}: answered from the cache; "
                        f"no etcd endpoints"])
            self.metrics.request("Maintenance", "Status", "OK", forwarded=False)
            return resp.SerializeToString()  # type: ignore[no-any-return]

        forward = self._forwarding_handler("Maintenance")
        return _Override(forward, {"/etcdserverpb.Maintenance/Status":
                                   grpc.unary_unary_rpc_method_handler(status)})

    def _health_handler(self) -> Any:
        """grpc.health.v1.Health/Check: SERVING while started and the cache's writer
        is alive, for "" and each etcd service; NOT_FOUND for other names."""
        known = {"", *(f"etcdserverpb.{s}" for s in SERVICES)}

        def check(raw: bytes, context: Any) -> bytes:
            try:
                service = decode_health_request(raw)
            except ValueError as exc:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            if service not in known:
                context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {service!r}")
            try:
                ok = self._serving and self.reader.control.writer_alive()
            except (ValueError, ShmCacheError):  # the Reader closed under us: stopping
                ok = False
            return encode_health_response(HEALTH_SERVING if ok else HEALTH_NOT_SERVING)

        return grpc.method_handlers_generic_handler(
            HEALTH_SERVICE, {"Check": grpc.unary_unary_rpc_method_handler(check)})


class _Override(grpc.GenericRpcHandler):  # type: ignore[misc]
    """``base`` with some methods answered by other handlers."""

    def __init__(self, base: Any, methods: dict[str, Any]) -> None:
        self._base, self._methods = base, methods

    def service(self, handler_call_details: Any) -> Any:
        h = self._methods.get(handler_call_details.method)
        return h if h is not None else self._base.service(handler_call_details)


def _probe_bind(host: str, port: int) -> None:
    """OSError (with the kernel's reason) when ``host:port`` cannot be listened on, before
    grpcio tries and reports it only as a log line of its own."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            s.bind((host, port))
        except socket.gaierror as exc:
            raise OSError(f"cannot resolve {host!r}: {exc.strerror}") from None


def split_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:2379`` for IPv6; port 0: any free one) as (host, port);
    ValueError for anything else."""
    host, sep, port_text = listen.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"listen address {listen!r} is not HOST:PORT (e.g. 127.0.0.1:2379)")
    return host, int(port_text)
