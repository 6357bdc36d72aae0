"""The writer's watch stream: one raw bidirectional gRPC ``Watch`` call whose lifecycle it owns.

No client library's watcher is used: python-etcd3's ignored non-compaction
cancels, re-opened streams without backoff and could not send progress requests
(docs/design.md, "Facts this design relies on"). The stream is the writer's hot
path, so it is driven by the thread that reads it, on a completion queue of its
own (``_DirectCall``, grpcio's internal API, used only while ``DirectPath`` finds
it working; ``_ThreadedCall``, the public API, is the fallback), and it yields raw
messages that a decoder of the caller's choice turns into objects
(``decode.decode_watch_response`` for the feed, protobuf for tools and tests).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from ...etcdapi import method_path, rpc

log = logging.getLogger("shmcache.writer")

WATCH_METHOD = method_path("Watch", "Watch")

# WatchRequest{progress_request: WatchProgressRequest{}} (etcd >= 3.4): etcd answers
# with a response without events whose header revision is its current revision.
PROGRESS_REQUEST = rpc.WatchRequest(progress_request=rpc.WatchProgressRequest()).SerializeToString()

Metadata = tuple[tuple[str, str], ...]


class UndecodableResponse(Exception):
    """A watch response the decoder refused: what etcd sent cannot be read exactly (an
    event type other than PUT and DELETE, a damaged message). The stream is broken."""


class WatchStream:
    """One gRPC Watch call with a single watcher on [key, range_end) from ``start_revision``.

    Iterating yields the responses in order, each passed through ``decode``.
    ``request_progress`` and ``close`` may be called from any thread; a stream is
    iterated by one thread. A failed call raises a ``grpc.RpcError``, a message
    ``decode`` refuses ``UndecodableResponse``. A first direct call that fails is
    replaced by a public-API one (``DirectPath``); a progress request sent just
    then may be lost (the feed asks again after 5 s). ``metadata`` goes with the
    call (etcd's auth token: etcd checks it when the watch is created).
    """

    def __init__(self, channel: Any, metadata: Metadata, key: bytes, range_end: bytes,
                 start_revision: int, decode: Callable[[bytes], Any]) -> None:
        create = rpc.WatchRequest(create_request=rpc.WatchCreateRequest(
            key=key, range_end=range_end, start_revision=start_revision, prev_kv=True,
            progress_notify=True)).SerializeToString()
        self._decode = decode
        self._lock = threading.Lock()
        self._closed = False
        self._channel = channel
        self._metadata = metadata
        self._create = create
        call: _DirectCall | _ThreadedCall | None = None
        if DIRECT_PATH.usable(channel):
            try:
                call = _DirectCall(channel, WATCH_METHOD, metadata, create)
            except Exception as exc:
                DIRECT_PATH.give_up(exc)
        self._call = call or _ThreadedCall(channel, WATCH_METHOD, metadata, create)

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
        log.warning("grpcio %s: the direct watch call failed (%s: %s); using grpc's public "
                    "stream API for the rest of this process", grpc.__version__,
                    type(exc).__name__, exc)


DIRECT_PATH = DirectPath()


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

    def __init__(self, channel: Any, method: str, metadata: Metadata, first: bytes) -> None:
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

    def __init__(self, channel: Any, method: str, metadata: Metadata, first: bytes) -> None:
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
