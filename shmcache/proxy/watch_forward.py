"""A client stream's watches outside the cache's prefix, on one Watch stream to etcd.

The proxy's forwarder (``forward.stream(service, method, requests, context,
client_streaming)``, requests and responses as bytes, the client's metadata
and deadline passed on) opens the stream on the first such watch; it lives as
long as the client's. Watch ids on it are the client's plus one: etcd reads id
0 as "choose one", and the proxy may have chosen 0 for the client.

Concurrency contract: ``send`` and ``close`` from any thread (a queue); one
thread of its own reads etcd's responses and hands each to ``deliver``, and
the error that ends the stream (none when the client went) to ``failed``.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

from ..etcdapi import rpc

__all__ = ["Upstream", "can_forward", "to_client", "to_etcd"]


def can_forward(forward: object | None) -> bool:
    return callable(getattr(forward, "stream", None))


def to_etcd(watch_id: int) -> int:
    return watch_id + 1


def to_client(watch_id: int) -> int:
    return watch_id - 1 if watch_id != -1 else -1


class Upstream:
    """One Watch stream to etcd on behalf of one client stream."""

    def __init__(self, forward: Any, context: Any, deliver: Callable[[Any], None],
                 failed: Callable[[BaseException], None]) -> None:
        self._requests: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._deliver = deliver
        self._failed = failed
        self._responses = forward.stream("Watch", "Watch", iter(self._requests.get, None),
                                         context, True)
        self._closed = False
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name="shmcache-proxy-watch-upstream")
        self._thread.start()

    def send(self, req: Any) -> None:
        self._requests.put(req.SerializeToString())

    def close(self) -> None:
        """Half-close the stream to etcd; the forwarder cancels it when the client's ends."""
        self._closed = True
        self._requests.put(None)

    def _run(self) -> None:
        try:
            for data in self._responses:
                self._deliver(rpc.WatchResponse.FromString(data))
            if not self._closed:
                self._failed(ConnectionError("etcd ended the forwarded watch stream"))
        except Exception as exc:  # grpc.RpcError as etcd (or the client's end) closed it
            if not self._closed:
                self._failed(exc)
