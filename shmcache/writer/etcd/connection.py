"""The writer's etcd connection: dialling with failover, authentication, and range reads.

It speaks etcd's v3 API through ``shmcache.etcdapi`` (etcd's own protos in a
private protobuf pool) on a grpcio channel; the watch stream is ``stream.py``,
the hand decoder of watch responses ``decode.py`` (docs/design.md, "The writer's
etcd API").
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from ... import _defaults
from ...etcdapi import Stub, rpc
from ...etcdapi.dial import authenticate, open_channel, parse_endpoint
from . import listing
from .decode import cluster_varint, decode_watch_response
from .stream import WatchStream

log = logging.getLogger("shmcache.writer")

Metadata = tuple[tuple[str, str], ...]


@dataclass
class EtcdSettings:
    endpoints: list[str] = field(default_factory=lambda: [_defaults.ENDPOINT])
    timeout: float = _defaults.ETCD_TIMEOUT
    ca_cert: str | None = None
    cert_key: str | None = None
    cert_cert: str | None = None
    user: str | None = None
    password: str | None = None


class ClusterChanged(Exception):
    """An endpoint answered for another etcd cluster than it did at ``connect()`` (a
    restore or failover onto another cluster behind the same address): reconnect, and
    let the feed compare the new cluster with the cache's."""


class Connection:
    """A client for one etcd member at a time; ``connect()`` moves to the next endpoint.

    ``cluster_id`` is the cluster the member said it belongs to at ``connect()`` (etcd's
    response header; 0 if it did not say); every range answer's header is checked
    against it (ClusterChanged), and ``cluster_raw`` is its varint, against which the
    feed checks watch responses.

    Concurrency: ``connect()`` and ``close()`` belong to the thread that owns the
    connection (``close()`` may also come from another thread, to stop it); the
    reads (``current_revision``, ``count``, ``range_page`` ...) may be called from
    any thread while it is connected, as the channel is thread-safe. With a user,
    a read that etcd refuses for a token it no longer knows (expired after its
    ``--auth-token-ttl`` unused, or forgotten by a restart) authenticates again,
    once, and is retried.
    """

    def __init__(self, settings: EtcdSettings) -> None:
        self.settings = settings
        self.endpoints = [parse_endpoint(e) for e in settings.endpoints]
        if not self.endpoints:
            raise ValueError("no etcd endpoints given")
        self._next = 0
        self._channel: Any = None
        self._metadata: Metadata = ()
        self._kv: Any = None
        self._auth_lock = threading.Lock()
        self.endpoint = ""
        self.version = ""
        self.cluster_id = 0
        self.cluster_raw = b""

    @property
    def channel(self) -> Any:
        """The gRPC channel to the member connected to; None before ``connect()``/after ``close()``."""
        return self._channel

    @property
    def metadata(self) -> Metadata:
        """Call metadata for that channel: etcd's auth token, or () without a user."""
        return self._metadata

    def connect(self) -> None:
        """Connect to the next endpoint that answers, trying each in turn once.

        A member answers when it authenticates the user (if any) and tells its
        version and cluster. Raises the last endpoint's grpc.RpcError when none does.
        """
        self.close()
        error: BaseException | None = None
        for _ in self.endpoints:
            host, port = self.endpoints[self._next % len(self.endpoints)]
            self._next += 1
            try:
                self._dial(host, port)
                return
            except grpc.RpcError as exc:
                if len(self.endpoints) > 1:
                    log.info("etcd at %s:%s: %s", host, port, describe(exc))
                self.close()
                error = exc
        assert error is not None
        raise error

    def _dial(self, host: str, port: int) -> None:
        s = self.settings
        self.endpoint = f"{host}:{port}"
        self._channel = channel = open_channel(host, port, ca_cert=s.ca_cert,
                                               cert_key=s.cert_key, cert_cert=s.cert_cert)
        if s.user is not None:
            self._metadata = authenticate(channel, s.user, s.password or "", s.timeout)
        self._kv = Stub(channel, "KV")
        status = self._call(Stub(channel, "Maintenance").Status, rpc.StatusRequest(),
                            s.timeout)
        self.version = status.version
        self.cluster_id = int(status.header.cluster_id)
        self.cluster_raw = cluster_varint(self.cluster_id)

    def close(self) -> None:
        channel, self._channel, self._kv = self._channel, None, None
        self._metadata = ()
        if channel is not None:
            try:
                channel.close()
            except Exception:  # closing a dead channel must not mask the real error
                pass

    def _call(self, method: Callable[..., Any], request: Any, timeout: float) -> Any:
        """``method(request)`` with the token; a token etcd no longer knows is renewed once."""
        metadata = self._metadata
        try:
            return method(request, timeout=timeout, metadata=metadata)
        except grpc.RpcError as exc:
            if self.settings.user is None or not _token_unknown(exc):
                raise
        self._reauthenticate(metadata)
        return method(request, timeout=timeout, metadata=self._metadata)

    def _reauthenticate(self, stale: Metadata) -> None:
        """Authenticate again unless another thread already replaced the ``stale`` token."""
        with self._auth_lock:
            channel = self._channel
            if self._metadata != stale or channel is None:
                return
            s = self.settings
            self._metadata = authenticate(channel, s.user or "", s.password or "", s.timeout)
        log.info("etcd at %s no longer knew the auth token: authenticated again", self.endpoint)

    def _range(self, req: Any, timeout: float) -> Any:
        return self._checked(self._call(self._kv.Range, req, timeout))

    def _checked(self, resp: Any) -> Any:
        """``resp`` if its header is from the cluster connected to; else ClusterChanged."""
        self.check_cluster(resp.header.cluster_id)
        return resp

    def check_cluster(self, found: int) -> None:
        """ClusterChanged unless ``found`` (an answer's header) is the cluster connected to."""
        if found != self.cluster_id and found and self.cluster_id:
            raise ClusterChanged(f"etcd at {self.endpoint} now answers for cluster {found:x}, "
                                 f"not {self.cluster_id:x}")

    def current_revision(self, key: bytes, range_end: bytes) -> int:
        """etcd's current revision, from a linearizable count-only range."""
        req = rpc.RangeRequest(key=key, range_end=range_end, count_only=True)
        return int(self._range(req, self.settings.timeout).header.revision)

    def count(self, key: bytes, range_end: bytes, revision: int) -> int:
        """Number of keys in [key, range_end) at ``revision``."""
        req = rpc.RangeRequest(key=key, range_end=range_end, revision=revision, count_only=True)
        return int(self._range(req, self.settings.timeout).count)

    def modified_since(self, key: bytes, range_end: bytes, revision: int,
                       min_mod_revision: int) -> int:
        """Keys in the range at ``revision`` last modified at or after ``min_mod_revision``.

        keys_only, because etcd ignores min_mod_revision for count_only requests
        (it counts the whole range); etcd still scans the range to filter it.
        """
        req = rpc.RangeRequest(key=key, range_end=range_end, revision=revision,
                               keys_only=True, min_mod_revision=min_mod_revision)
        return len(self._range(req, self.settings.timeout).kvs)

    # The largest page the verifier's own paging asks for (writer/verify.py).
    LIST_PAGE_MAX = listing.PAGE_MIN

    def _ranges(self) -> listing.RangeReader:
        """Range reads on this connection's channel (listing.py), each answer's cluster checked."""
        return listing.RangeReader(self._channel, self._metadata,
                                   max(self.settings.timeout, 30.0), self.check_cluster)

    def _renewing(self, read: Callable[[listing.RangeReader], Any]) -> Any:
        """``read(RangeReader)``, again with a renewed token if etcd no longer knew it."""
        metadata = self._metadata
        try:
            return read(self._ranges())
        except grpc.RpcError as exc:
            if self.settings.user is None or not _token_unknown(exc):
                raise
        self._reauthenticate(metadata)
        return read(self._ranges())

    def list_range(self, key: bytes, range_end: bytes,
                   progress: Any = None) -> tuple[int, list[listing.Item]]:
        """Every key in [key, range_end) at one revision, read in pages; returns (revision, items).

        The first page fixes the revision; later pages are read at that revision,
        so the result is one consistent cut even while etcd is being written.
        """
        listed: tuple[int, list[listing.Item]] = self._renewing(
            lambda r: r.list_range(key, range_end, progress))
        return listed

    def range_page(self, start: bytes, range_end: bytes, revision: int, limit: int,
                   keys_only: bool = False) -> tuple[list[listing.PageKV], bool, int]:
        """One page of [start, range_end) at ``revision``, in key order: (kvs, more, bytes)."""
        page: tuple[list[listing.PageKV], bool, int] = self._renewing(
            lambda r: r.page(start, range_end, revision, limit, keys_only))
        return page

    def watch(self, key: bytes, range_end: bytes, start_revision: int) -> WatchStream:
        """A watch stream yielding protobuf ``WatchResponse`` messages (tools and tests)."""
        return WatchStream(self._channel, self._metadata, key, range_end, start_revision,
                           rpc.WatchResponse.FromString)

    def watch_decoded(self, key: bytes, range_end: bytes, start_revision: int) -> WatchStream:
        """A watch stream yielding ``decode_watch_response`` tuples (the writer's feed)."""
        return WatchStream(self._channel, self._metadata, key, range_end, start_revision,
                           decode_watch_response)


def _token_unknown(exc: grpc.RpcError) -> bool:
    """etcd refused a call for its token: expired, forgotten by a restart, or issued
    before the auth store changed (all cured by authenticating again)."""
    text = describe(exc)
    return "invalid auth token" in text or "revision of auth store is old" in text


def is_grpc_error(exc: BaseException) -> bool:
    return isinstance(exc, grpc.RpcError)


def describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
        try:
            return f"{exc.code().name}: {exc.details()}"
        except Exception:
            pass
    return f"{type(exc).__name__}: {exc}"


def is_compacted(exc: BaseException) -> bool:
    return isinstance(exc, grpc.RpcError) and "compacted" in describe(exc)
