"""Forwarding to etcd: what the proxy does not answer from the cache goes to ``--endpoints``.

Requests and responses pass through as bytes (no protobuf parse on the way), with
the client's own call metadata (etcd's auth ``token`` among it) and the client's
deadline, so etcd authorises and answers exactly as if the client had called it.
A status etcd answers is handed back to the client unchanged.

Several endpoints are used in order: the first until a call ends UNAVAILABLE,
then the next for later calls (a failed call is not retried: it may have been a
write that etcd applied).

Concurrency contract: one Forwarder per proxy process, shared by every handler
thread; channels and multi-callables are thread-safe (grpcio) and the endpoint
index is one int replaced whole.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import grpc

from ..etcdapi import dial, method_path, rpc

__all__ = ["Forwarder", "method_kinds", "time_left"]

# Metadata gRPC sets for each hop itself; everything else (etcd's "token",
# clientv3's "hasleader") is the client's and travels on.
_HOP_METADATA = ("user-agent", "content-type", "te", "grpc-accept-encoding", "grpc-encoding",
                 "grpc-timeout", "authority")


def time_left(context: Any) -> float | None:
    """Seconds left of the client's deadline; None when it set none (grpcio then reports
    a huge number, which as a timeout would overflow into an instant deadline)."""
    left = context.time_remaining()
    if left is None or left > 1e6:
        return None
    return max(0.0, float(left))


def method_kinds(service: str) -> dict[str, tuple[bool, bool]]:
    """etcd's methods of ``service``: name -> (client streaming, server streaming)."""
    svc = rpc.RangeRequest.DESCRIPTOR.file.services_by_name[service]
    return {m.name: (m.client_streaming, m.server_streaming) for m in svc.methods}


class Forwarder:
    """Calls etcd for the proxy's clients; ``endpoints`` as ``shmcache serve`` takes them."""

    def __init__(self, endpoints: Sequence[str], *, ca_file: str | None = None,
                 cert_file: str | None = None, key_file: str | None = None) -> None:
        if not endpoints:
            raise ValueError("a Forwarder needs at least one endpoint")
        self.endpoints = list(endpoints)
        self._channels = [dial.open_channel(*dial.parse_endpoint(e), ca_cert=ca_file,
                                            cert_key=key_file, cert_cert=cert_file)
                          for e in self.endpoints]
        self._current = 0
        self._calls: list[dict[str, Any]] = [{} for _ in self._channels]

    def channel(self) -> Any:
        """The channel to the endpoint in use now (for a caller with its own stub)."""
        return self._channels[self._current]

    @staticmethod
    def metadata(context: Any) -> tuple[tuple[str, Any], ...]:
        """The client's call metadata that travels to etcd (its token among it)."""
        return tuple((k, v) for k, v in context.invocation_metadata()
                     if not k.startswith((":", "grpc-")) and k not in _HOP_METADATA)

    def _callable(self, service: str, method: str, kind: tuple[bool, bool]) -> tuple[int, Any]:
        i = self._current
        calls = self._calls[i]
        path = method_path(service, method)
        fn = calls.get(path)
        if fn is None:
            ch = self._channels[i]
            make = {(False, False): ch.unary_unary, (False, True): ch.unary_stream,
                    (True, False): ch.stream_unary, (True, True): ch.stream_stream}[kind]
            fn = calls[path] = make(path)  # no serializers: bytes in, bytes out
        return i, fn

    def _failed(self, i: int, exc: grpc.RpcError) -> None:
        if exc.code() == grpc.StatusCode.UNAVAILABLE and len(self._channels) > 1:
            self._current = (i + 1) % len(self._channels)

    def unary(self, service: str, method: str, request: bytes, context: Any) -> bytes:
        """One unary call to etcd with the client's metadata and deadline; raises
        grpc.RpcError as etcd answers."""
        i, fn = self._callable(service, method, (False, False))
        try:
            return fn(request, timeout=time_left(context),  # type: ignore[no-any-return]
                      metadata=self.metadata(context))
        except grpc.RpcError as exc:
            self._failed(i, exc)
            raise

    def stream(self, service: str, method: str, request: Any, context: Any,
               client_streaming: bool) -> Iterator[bytes]:
        """A server-streaming call (a request iterator when ``client_streaming``): etcd's
        responses as they come; the upstream call is cancelled when the client goes."""
        i, fn = self._callable(service, method, (client_streaming, True))
        call = fn(request, timeout=time_left(context), metadata=self.metadata(context))
        context.add_callback(call.cancel)
        try:
            yield from call
        except grpc.RpcError as exc:
            self._failed(i, exc)
            raise

    def close(self) -> None:
        for ch in self._channels:
            ch.close()
