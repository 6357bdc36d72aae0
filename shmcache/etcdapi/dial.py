"""Dialling etcd: endpoint URLs, channels with or without TLS, and authentication.

Written once for everything in shmcache that talks to etcd (the writer's
connection, the proxy's forwarding client, the tests' and benchmarks' clients).
A channel is thread-safe (grpcio); the metadata ``authenticate`` returns is a
plain tuple any thread may pass with its calls.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlparse

import grpc

from . import Stub, rpc

__all__ = ["GRPC_OPTIONS", "authenticate", "open_channel", "parse_endpoint"]

# etcd refuses (and gRPC's default 4 MiB receive limit rejects) large responses:
# ranges are read in pages and the receive limit is lifted for watch batches,
# which carry all events of a revision (a range delete of many keys) at once.
GRPC_OPTIONS = (
    ("grpc.max_receive_message_length", 2**31 - 1),
    ("grpc.max_send_message_length", 64 * 2**20),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
)


def parse_endpoint(url: str) -> tuple[str, int]:
    """``(host, port)`` of an etcd endpoint: ``http://h:p``, ``https://h:p`` or ``h:p``
    (port 2379 when left out); ValueError for a URL without a host."""
    if "://" not in url:
        url = "http://" + url
    u = urlparse(url)
    try:
        port = u.port
    except ValueError:
        raise ValueError(f"endpoint {url!r} has a bad port") from None
    if not u.hostname:
        raise ValueError(f"endpoint {url!r} has no host")
    return u.hostname, port or 2379


def _read(path: str | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as f:
        return f.read()


def open_channel(host: str, port: int, *, ca_cert: str | None = None,
                 cert_key: str | None = None, cert_cert: str | None = None,
                 options: tuple[tuple[str, Any], ...] = GRPC_OPTIONS) -> Any:
    """A gRPC channel to ``host:port``: TLS when a CA or a client certificate is given
    (the CA verifies the server; without one the system's roots do), plain otherwise.

    The channel connects lazily; the first call finds out whether etcd answers.
    OSError if a certificate file cannot be read.
    """
    target = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
    if ca_cert is None and cert_cert is None:
        return grpc.insecure_channel(target, options=options)
    creds = grpc.ssl_channel_credentials(root_certificates=_read(ca_cert),
                                         private_key=_read(cert_key),
                                         certificate_chain=_read(cert_cert))
    return grpc.secure_channel(target, creds, options=options)


def authenticate(channel: Any, user: str, password: str,
                 timeout: float) -> tuple[tuple[str, str], ...]:
    """Log in as ``user``; returns the call metadata that carries etcd's token.

    etcd's simple tokens expire when unused for its ``--auth-token-ttl`` (300 s by
    default): a caller that sees "invalid auth token" authenticates again.
    Raises grpc.RpcError as etcd answers (INVALID_ARGUMENT for a wrong password).
    """
    resp = Stub(channel, "Auth").Authenticate(
        rpc.AuthenticateRequest(name=user, password=password), timeout=timeout)
    return (("token", resp.token),)
