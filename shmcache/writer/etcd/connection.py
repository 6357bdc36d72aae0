"""The writer's etcd side: connection with failover, paginated range reads, and a watch stream it owns.

python-etcd3 0.12 is used for its channel, credentials and generated protobufs,
but not for watching: its watcher ignores non-compaction cancels, re-opens
streams without backoff and cannot send progress requests (docs/design.md). The
stream here is a raw bidirectional gRPC call whose lifecycle the writer owns.

Most of the writer's CPU per revision went to gRPC's and protobuf's Python
machinery (docs/benchmarks.md, "Writer CPU per revision"): the stream is driven
by the thread that reads it, on a completion queue of its own (``_DirectCall``;
``_ThreadedCall``, the public API, is the fallback), and its responses are
decoded by hand into the publisher's event tuples (``_watchpb``).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import etcd3
import grpc
from etcd3.etcdrpc import rpc_pb2

from ... import _defaults
from . import listing
from .decode import cluster_varint, decode_watch_response

log = logging.getLogger("shmcache.writer")

# WatchRequest{progress_request: WatchProgressRequest{}}: field 3 of the request
# oneof, an empty message. python-etcd3 0.12's generated protos predate the
# field, so the bytes are written by hand (tag (3 << 3) | 2 = 0x1a, length 0).
PROGRESS_REQUEST = b"\x1a\x00"

# etcd refuses (and gRPC's default 4 MiB receive limit rejects) large responses:
# ranges are read in pages and the receive limit is lifted for watch batches,
# which carry all events of a revision (a range delete of many keys) at once.
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", 2**31 - 1),
    ("grpc.max_send_message_length", 64 * 2**20),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


@dataclass
class EtcdSettings:
    endpoints: list[str] = field(default_factory=lambda: [_defaults.ENDPOINT])
    timeout: float = _defaults.ETCD_TIMEOUT
    ca_cert: str | None = None
    cert_key: str | None = None
    cert_cert: str | None = None
    user: str | None = None
    password: str | None = None


def parse_endpoint(url: str) -> tuple[str, int]:
    if "://" not in url:
        url = "http://" + url
    u = urlparse(url)
    if not u.hostname:
        raise ValueError(f"endpoint {url!r} has no host")
    return u.hostname, u.port or 2379


class ClusterChanged(Exception):
    """An endpoint answered for another etcd cluster than it did at ``connect()`` (a
    restore or failover onto another cluster behind the same address): reconnect, and
    let the feed compare the new cluster with the cache's."""


class Connection:
    """A client for one etcd member at a time; ``reconnect()`` moves to the next endpoint.

    ``cluster_id`` is the cluster the member said it belongs to at ``connect()`` (etcd's
    response header; 0 if it did not say); every range answer's header is checked
    against it (ClusterChanged), and ``cluster_raw`` is its varint, against which the
    feed checks watch responses.
    """

    def __init__(self, settings: EtcdSettings) -> None:
        self.settings = settings
        self.endpoints = [parse_endpoint(e) for e in settings.endpoints]
        if not self.endpoints:
            raise ValueError("no etcd endpoints given")
        self._next = 0
        self.client: Any = None
        self.endpoint = ""
        self.version = ""
        self.cluster_id = 0
        self.cluster_raw = b""

    def connect(self) -> None:
        """Connect to the next endpoint in turn and check it answers; raises grpc.RpcError."""
        self.close()
        host, port = self.endpoints[self._next % len(self.endpoints)]
        self._next += 1
        s = self.settings
        self.endpoint = f"{host}:{port}"
        self.client = etcd3.client(host=host, port=port, timeout=s.timeout, ca_cert=s.ca_cert,
                                   cert_key=s.cert_key, cert_cert=s.cert_cert, user=s.user,
                                   password=s.password, grpc_options=GRPC_OPTIONS)
        status = self.client.maintenancestub.Status(rpc_pb2.StatusRequest(), s.timeout,
                                                    metadata=self.client.metadata)
        self.version = status.version
        self.cluster_id = int(status.header.cluster_id)
        self.cluster_raw = cluster_varint(self.cluster_id)

    def _checked(self, resp: Any) -> Any:
        """``resp`` if its header is from the cluster connected to; else ClusterChanged."""
        self.check_cluster(resp.header.cluster_id)
        return resp

    def check_cluster(self, found: int) -> None:
        """ClusterChanged unless ``found`` (an answer's header) is the cluster connected to."""
        if found != self.cluster_id and found and self.cluster_id:
            raise ClusterChanged(f"etcd at {self.endpoint} now answers for cluster {found:x}, "
                                 f"not {self.cluster_id:x}")

    def close(self) -> None:
        if self.client is not None:
            try:
                self.client.close()
            except Exception:  # closing a dead channel must not mask the real error
                pass
            self.client = None

    def current_revision(self, key: bytes, range_end: bytes) -> int:
        """etcd's current revision, from a linearizable count-only range."""
        req = rpc_pb2.RangeRequest(key=key, range_end=range_end, count_only=True)
        resp = self.client.kvstub.Range(req, self.settings.timeout, metadata=self.client.metadata)
        return int(self._checked(resp).header.revision)

    def count(self, key: bytes, range_end: bytes, revision: int) -> int:
        """Number of keys in [key, range_end) at ``revision``."""
        req = rpc_pb2.RangeRequest(key=key, range_end=range_end, revision=revision,
                                   count_only=True)
        resp = self.client.kvstub.Range(req, self.settings.timeout, metadata=self.client.metadata)
        return int(self._checked(resp).count)

    def modified_since(self, key: bytes, range_end: bytes, revision: int,
                       min_mod_revision: int) -> int:
        """Keys in the range at ``revision`` last modified at or after ``min_mod_revision``.

        keys_only, because etcd ignores min_mod_revision for count_only requests
        (it counts the whole range); etcd still scans the range to filter it.
        """
        req = rpc_pb2.RangeRequest(key=key, range_end=range_end, revision=revision,
                                   keys_only=True, min_mod_revision=min_mod_revision)
        resp = self.client.kvstub.Range(req, self.settings.timeout, metadata=self.client.metadata)
        return len(self._checked(resp).kvs)

    # The largest page the verifier's own paging asks for (writer/verify.py).
    LIST_PAGE_MAX = listing.PAGE_MIN

    def _ranges(self) -> listing.RangeReader:
        """Range reads on this connection's channel (listing.py), each answer's cluster checked."""
        return listing.RangeReader(self.client.channel, self.client.metadata,
                                   max(self.settings.timeout, 30.0), self.check_cluster)

    def list_range(self, key: bytes, range_end: bytes,
                   progress: Any = None) -> tuple[int, list[listing.Item]]:
        """Every key in [key, range_end) at one revision, read in pages; returns (revision, items).

        The first page fixes the revision; later pages are read at that revision,
        so the result is one consistent cut even while etcd is being written.
        """
        return self._ranges().list_range(key, range_end, progress)

    def range_page(self, start: bytes, range_end: bytes, revision: int, limit: int,
                   keys_only: bool = False) -> tuple[list[listing.PageKV], bool, int]:
        """One page of [start, range_end) at ``revision``, in key order: (kvs, more, bytes)."""
        return self._ranges().page(start, range_end, revision, limit, keys_only)

    def watch(self, key: bytes, range_end: bytes, start_revision: int) -> WatchStream:
        """A watch stream yielding protobuf ``WatchResponse`` messages (tools and tests)."""
        return WatchStream(self, key, range_end, start_revision,
                           rpc_pb2.WatchResponse.FromString)

    def watch_decoded(self, key: bytes, range_end: bytes, start_revision: int) -> WatchStream:
        """A watch stream yielding ``decode_watch_response`` tuples (the writer's feed)."""
        return WatchStream(self, key, range_end, start_revision, decode_watch_response)


class WatchStream:
    """One gRPC Watch call with a single watcher on [key, range_end) from ``start_revision``.

    Iterating yields the responses in order, each passed through ``decode``.
    ``request_progress`` and ``close`` may be called from any thread; a stream is
    iterated by one thread. A failed call raises a ``grpc.RpcError``, a message
    ``decode`` refuses ``UndecodableResponse``. A first direct call that fails is
    replaced by a public-API one (``DirectPath``); a progress request sent just
    then may be lost (the feed asks again after 5 s).
    """

    def __init__(self, conn: Connection, key: bytes, range_end: bytes, start_revision: int,
                 decode: Callable[[bytes], Any]) -> None:
        create = rpc_pb2.WatchRequest(create_request=rpc_pb2.WatchCreateRequest(
            key=key, range_end=range_end, start_revision=start_revision, prev_kv=True,
            progress_notify=True)).SerializeToString()
        self._decode = decode
        self._lock = threading.Lock()
        self._closed = False
        self._channel = conn.client.channel
        self._metadata = tuple(conn.client.metadata or ())
        self._create = create
        call: _DirectCall | _ThreadedCall | None = None
        if DIRECT_PATH.usable(self._channel):
            try:
                call = _DirectCall(self._channel, WATCH_METHOD, self._metadata, create)
            except Exception as exc:
                DIRECT_PATH.give_up(exc)
        self._call = call or _ThreadedCall(self._channel, WATCH_METHOD, self._metadata, create)

    def request_progress(self) -> None:
        if not self._closed:
            self._call.send(PROGRESS_REQUEST)

    def __iter__(self) -> Iterator[Any]:
        """The decoded responses; a message ``decode`` refuses raises UndecodableResponse."""
        decode = self._decode
        for data in self._messages():
            try:
                resp = decode(data)
            except ValueError as exc:
                raise UndecodableResponse(f"{exc} (a {len(data)}-byte message)") from exc
            yield resp

    def _messages(self) -> Iterator[bytes]:
        """The call's messages; the first call on the direct path is a trial (DirectPath)."""
        call = self._call
        if not (isinstance(call, _DirectCall) and DIRECT_PATH.on_trial()):
            yield from call.messages()
            return
        it = call.messages()
        try:
            first = next(it)
        except StopIteration:
            return
        except Exception as exc:
            if self._closed:
                raise
            DIRECT_PATH.give_up(exc)
            try:
                call.cancel()  # (best effort: the call may be in any state)
            except Exception:
                pass
            with self._lock:
                if self._closed:
                    raise
                self._call = _ThreadedCall(self._channel, WATCH_METHOD, self._metadata,
                                           self._create)
            yield from self._call.messages()
            return
        DIRECT_PATH.proven()
        yield first
        yield from it

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._call.cancel()


class UndecodableResponse(Exception):
    """A watch response the decoder refused: what etcd sent cannot be read exactly (an
    event type other than PUT and DELETE, a damaged message). The stream is broken."""


class DirectPath:
    """Whether this process drives watch streams with ``_DirectCall`` (grpcio's internal API).

    Its use is a trial until a call on it has delivered its first message. Any
    error constructing a call, or before that first message, gives it up for the
    process, logged once: the stream that failed, and every later one, uses the
    public API (``_ThreadedCall``), so a grpcio whose internals changed costs speed,
    never the writer. Thread-safe.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state = "trial"  # -> "proven" or "off"

    def usable(self, channel: Any) -> bool:
        if self._state == "off" or os.environ.get("SHMCACHE_GRPC_THREADED"):
            return False
        try:
            from grpc._cython import cygrpc
        except ImportError:
            return False
        return (hasattr(getattr(channel, "_channel", None), "segregated_call")
                and hasattr(cygrpc, "SegregatedCall"))

    def on_trial(self) -> bool:
        return self._state == "trial"

    def proven(self) -> None:
        with self._lock:
            if self._state == "trial":
                self._state = "proven"

    def give_up(self, exc: BaseException) -> None:
        with self._lock:
            if self._state == "off":
                return
            self._state = "off"
        log.warning("grpcio %s: the direct watch call failed (%s); using grpc's public stream "
                    "API for the rest of this process", grpc.__version__, describe(exc))


DIRECT_PATH = DirectPath()


WATCH_METHOD = "/etcdserverpb.Watch/Watch"
_STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}


class CallError(grpc.RpcError):  # type: ignore[misc]  # (grpc has no type stubs)
    """A ``_DirectCall`` ended with a status other than OK (the public API's RpcError shape)."""

    def __init__(self, code: int, details: str) -> None:
        super().__init__(details)
        self._code = _STATUS_CODES.get(code, grpc.StatusCode.UNKNOWN)
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class _DirectCall:
    """A bidirectional call on a completion queue of its own, driven by the reading thread.

    gRPC's public stream API hands every message from its channel-spin thread to
    the reader through a condition variable (several thread switches and Python
    lock operations per message). This is the segregated call underneath grpc's
    own single-threaded unary-stream calls (``grpc.experimental.ChannelOptions.
    SingleThreadedUnaryStream``), made bidirectional: ``messages()`` keeps one
    receive started and waits for completions in the calling thread, GIL released.
    It is grpcio's internal API: ``DirectPath`` checks for it and gives it up for
    the process when a first call fails, and the stream then uses ``_ThreadedCall``
    (as it does with ``SHMCACHE_GRPC_THREADED=1``).

    Sends from other threads start at once, or wait while one is in flight (one
    outstanding send per call) until its completion arrives. grpc destroys the
    completion queue once every started batch has completed, so ``next_event``
    is called exactly once per started batch (``_outstanding``, under ``_ops``).
    """

    _SEND, _RECV, _OTHER = "send", "recv", "other"

    def __init__(self, channel: Any, method: str, metadata: tuple[tuple[str, str], ...],
                 first: bytes) -> None:
        from grpc._cython import cygrpc

        self._cygrpc = cygrpc
        self._ops = threading.Lock()
        self._pending: list[bytes] = []
        self._sending = True
        self._status: tuple[int, str] | None = None
        cc = channel._channel
        name = method.encode()
        batches = (
            ((cygrpc.SendInitialMetadataOperation(metadata, 0),
              cygrpc.SendMessageOperation(first, 0)), self._SEND),
            ((cygrpc.ReceiveInitialMetadataOperation(0),), self._OTHER),
            ((cygrpc.ReceiveStatusOnClientOperation(0),), self._OTHER),
        )
        # (flags, method, host, deadline, metadata, call credentials, batches): what older
        # grpcio releases take; newer ones add optional arguments (census context,
        # registered call handle).
        self._call = cc.segregated_call(cygrpc.PropagationConstants.GRPC_PROPAGATE_DEFAULTS,
                                        name, None, None, metadata, None, batches)
        self._outstanding = len(batches)
        self._recv = (cygrpc.ReceiveMessageOperation(0),)
        self._start(self._recv, self._RECV)

    def _start(self, ops: tuple[Any, ...], tag: str) -> bool:
        """Start a batch (``_ops`` held); False once the call has ended."""
        if self._call.operate(ops, tag):
            self._outstanding += 1
            return True
        return False

    def send(self, data: bytes) -> None:
        with self._ops:
            if self._sending:
                self._pending.append(data)
            elif self._outstanding:
                self._sending = self._start((self._cygrpc.SendMessageOperation(data, 0),),
                                            self._SEND)

    def messages(self) -> Iterator[bytes]:
        """The response messages; raises CallError unless the call ends with OK."""
        try:
            while self._outstanding:  # (only this thread lowers it, other threads raise it
                data = self._complete()  # only while it is above zero)
                if data is not None:
                    yield data
        finally:
            if self._outstanding:  # left early: cancel, and complete what was started
                self.cancel()
                while self._outstanding:
                    self._complete()
        code, details = self._status or (self._cygrpc.StatusCode.unknown, "no status")
        if code != self._cygrpc.StatusCode.ok:
            raise CallError(code, details)

    def _complete(self) -> bytes | None:
        """Wait for the next completion and account for it; the message it received, if any."""
        try:
            event = self._call.next_event()
        except BaseException:  # (a signal handler's exception): grpc has released the call
            self._outstanding = 0
            raise
        with self._ops:
            self._outstanding -= 1
            if event.tag == self._RECV:
                data: bytes | None = event.batch_operations[0].message()
                if data is not None:  # receive the next message while this one is processed
                    self._start(self._recv, self._RECV)
                return data
            if event.tag == self._SEND:
                self._sending = False
                if self._pending and self._outstanding:
                    self._sending = self._start(
                        (self._cygrpc.SendMessageOperation(self._pending.pop(0), 0),), self._SEND)
            for op in event.batch_operations:
                if op.type() == self._cygrpc.OperationType.receive_status_on_client:
                    self._status = (op.code(), op.details())
        return None

    def cancel(self) -> None:
        self._call.cancel(self._cygrpc.StatusCode.cancelled, "cancelled by shmcache")


class _ThreadedCall:
    """The call through gRPC's public API: the fallback when ``_DirectCall`` is not usable
    or has failed (DirectPath)."""

    def __init__(self, channel: Any, method: str, metadata: tuple[tuple[str, str], ...],
                 first: bytes) -> None:
        self._requests: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._requests.put(first)
        stream = channel.stream_stream(method, request_serializer=None,
                                       response_deserializer=None)
        self._call = stream(self._request_iter(), metadata=metadata)

    def _request_iter(self) -> Iterator[bytes]:
        while (item := self._requests.get()) is not None:
            yield item

    def send(self, data: bytes) -> None:
        self._requests.put(data)

    def messages(self) -> Iterator[bytes]:
        return iter(self._call)

    def cancel(self) -> None:
        self._requests.put(None)
        self._call.cancel()


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
