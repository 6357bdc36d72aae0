"""etcd's Watch service served from the cache: many client watches, one etcd watch (the writer's).

Every client watch is a ``Reader.awatch`` of the proxy's Reader, so all of them
are fed by the Reader's per-process demultiplexer: each ring record is decoded
once for the process, and N client watches cost etcd nothing beyond the
writer's watch. The protocol is etcd's (server/etcdserver/api/v3rpc/watch.go
and server/mvcc/watchable_store.go, v3.5):

- one bidirectional stream carries any number of watches; a create request
  is answered ``created`` (with the watch id the client chose, or the next free
  one), a cancel request ``canceled``, both with the cache's revision in the header;
- a watch starting in the past first gets what it missed in catch-up responses
  of at most 1,000 revisions each, headed by the revision it has caught up to
  (etcd's unsynced watchers); after that one response per revision, all events
  of the revision in it, headed by that revision (etcd's synced watchers);
- a start revision the cache no longer holds: ``created``, then ``canceled``
  with ``compact_revision`` (the oldest start revision it would serve), as
  etcd answers a watch below its compaction; a watch whose history the cache
  loses later (its writer relisted, a new epoch) ends the same way;
- a progress request is answered (watch id -1) with the cache's revision once
  every watch of the stream has delivered its events up to it, so a client
  never sees progress before events it has not got (etcd issues 15220, 17507);
- ``progress_notify`` watches get a progress response every
  ``progress_interval`` seconds (etcd: 10 minutes) unless they got events;
- ``prev_kv``, ``filters`` (NOPUT, NODELETE) and ``fragment`` (responses above
  ``max_request_bytes`` split as etcd's sendFragments does) as etcd;
- a client that reads more slowly than events come: once 4 MiB of responses
  wait for it, its watches stop taking events, which wait in the ring; if the
  ring overwrites them first, the watch is canceled with ``compact_revision``
  as above (etcd cancels a watcher that falls behind its compaction alike).

A watch over keys outside the cache's prefix goes to etcd through the proxy's
forwarder, on one etcd Watch stream per client stream that has such watches
(watch_forward.py): etcd's responses pass on under the client's watch ids, and
a progress request on a stream with forwarded watches is answered with the
lower of the cache's and etcd's revisions. Without a forwarder such a watch is
refused: ``created`` and ``canceled`` with a cancel reason saying so. etcd's
auth applies to forwarded watches (the client's token travels with them), not
to those served from the cache (the proxy serves what its Reader can read).

Threads and concurrency contract: the service runs one asyncio event loop in
one thread for all its streams; every watch and stream state lives there and
is changed only by code on that loop. Per stream, gRPC's handler thread only
sends what the loop queued (``queue.SimpleQueue``); it is one of the gRPC
server's workers for as long as the stream lives, so the server's pool bounds
the streams open at once. One thread of ours reads the client's requests and
hands them to the loop (and one reads etcd's stream, for a stream with
forwarded watches). A watch costs a coroutine, not a thread. ``close()`` may be
called from any thread; it ends every stream UNAVAILABLE, as a stopping etcd
does, and clients reconnect.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ..errors import CompactedError, ShmCacheError
from ..etcdapi import rpc
from .metrics import ProxyMetrics
from .watch_client import ClientWatch
from .watch_encode import Encoder, batches, event_message, fragments, serialize
from .watch_forward import Upstream, can_forward, to_client, to_etcd
from .watch_range import EmptyRange, select

if TYPE_CHECKING:
    from ..reader.reader import Reader
    from ..types import Event

__all__ = ["WatchService"]

_log = logging.getLogger("shmcache.proxy")

# etcd's --max-request-bytes default. A fragment watch's responses are split above
# it plus etcd's allowance for gRPC's overhead (v3rpc/grpc.go, grpcOverheadBytes).
MAX_REQUEST_BYTES = 1536 * 1024
GRPC_OVERHEAD_BYTES = 512 * 1024
# etcd's default progress report interval (v3rpc.GetProgressReportInterval).
PROGRESS_INTERVAL = 600.0
# Bytes of responses a stream may have queued for its client before its watches stop
# reading: a client that reads too slowly is then overtaken by the ring and its
# watches are canceled with compact_revision, instead of the proxy's memory
# growing without bound.
BACKLOG_BYTES = 4 * 2**20

# How long a progress request waits for etcd's answer on the forwarded stream.
_UPSTREAM_PROGRESS_WAIT = 5.0
_EMPTY_RANGE = "mvcc: watcher range is empty"
_DUPLICATE_ID = "mvcc: duplicate watch ID provided on the WatchStream"
_COMPACTED = "mvcc: required revision has been compacted"
_END = object()  # the stream's last item


class _Abort:
    """Ends a stream with a gRPC error (the Reader closed or failed, etcd's stream broke)."""

    def __init__(self, message: str, code: str = "UNAVAILABLE") -> None:
        self.message = message
        self.code = code


class _Stream:
    """One client's Watch stream. Created on gRPC's handler thread; ``request``, ``start``
    and ``teardown`` run on the service's loop; ``stop`` on any thread."""

    def __init__(self, service: WatchService, cluster_id: int, context: Any) -> None:
        self._service = service
        self._context = context
        # Watches outside the cache's prefix: etcd's stream, the forwarded creates etcd
        # has not answered yet, progress requests waiting for etcd's answer.
        self._upstream: Upstream | None = None
        self._creating: collections.deque[int] = collections.deque()
        self._progress: collections.deque[asyncio.Future[int]] = collections.deque()
        self._reader = service.reader
        self._cluster_id = cluster_id
        self._out: queue.SimpleQueue[tuple[int, Any]] = queue.SimpleQueue()  # (size, response)
        # Bytes queued (by the loop) and taken (by gRPC's thread): each written by one thread.
        self._queued = 0
        self.taken = 0
        self._watches: dict[int, ClientWatch] = {}
        self._next_id = 0
        self._stopped = threading.Event()
        self._ticker: asyncio.TimerHandle | None = None
        self._control: asyncio.Queue[Any] = asyncio.Queue()
        self._tasks: set[asyncio.Task[None]] = set()

    # -- any thread ----------------------------------------------------------------------

    def stop(self, error: _Abort | None = None) -> None:
        """End the stream (client gone, RPC over, service closing: with ``error``, the
        status its client gets); idempotent."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        if error is not None:
            self._out.put((0, error))
        self._out.put((0, _END))
        self._service.call(self.teardown)

    def backlog(self) -> int:
        """Bytes of responses queued for the client and not yet handed to gRPC."""
        return self._queued - self.taken

    def take(self) -> Any:
        """The next item for the client (gRPC's handler thread, which alone calls it)."""
        size, item = self._out.get()
        self.taken += size
        return item

    # -- the loop ------------------------------------------------------------------------

    def start(self) -> None:
        if self._stopped.is_set():
            return
        self._spawn(self._serve_requests())
        self._schedule_tick()

    def request(self, req: Any) -> None:
        if not self._stopped.is_set():
            self._control.put_nowait(req)

    def teardown(self) -> None:
        """Cancel every watch and task of the stream."""
        if self._ticker is not None:
            self._ticker.cancel()
        # (end() first: every watch of the cache stops; forwarded ones count too)
        live = sum(1 for cw in self._watches.values() if cw.end() or cw.keys is None)
        self._watches.clear()
        if self._upstream is not None:
            self._upstream.close()
        for t in list(self._tasks):
            t.cancel()
        if live:
            self._service.metrics.watches_changed(-live)

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t

    def _header(self, revision: int) -> Any:
        return rpc.ResponseHeader(cluster_id=self._cluster_id, revision=revision)

    def _send(self, resp: Any) -> None:
        if not self._stopped.is_set():
            size = len(resp) if type(resp) is bytes else resp.ByteSize()
            self._queued += size
            self._out.put((size, resp))

    async def _serve_requests(self) -> None:
        """The client's requests, one at a time in their order (as etcd's recvLoop)."""
        try:
            while True:
                req = await self._control.get()
                which = req.WhichOneof("request_union")
                if which == "create_request":
                    self._create(req.create_request)
                elif which == "cancel_request":
                    self._cancel(req.cancel_request.watch_id)
                elif which == "progress_request":
                    await self._progress_request()
                # (etcd ignores an empty or unknown request too)
        except Exception as exc:  # noqa: BLE001 (a bug must end the stream, not hang it)
            self._fail(exc)

    def _create(self, req: Any) -> None:
        reader = self._reader
        rev = reader.revision
        refuse = None
        keys = None
        try:
            keys = select(req.key, req.range_end, reader.prefix)
        except EmptyRange:
            refuse = _EMPTY_RANGE
        forward = keys is None and refuse is None and can_forward(self._service.forward)
        if keys is None and refuse is None and not forward:
            refuse = (f"shmcache proxy: keys outside the cache's prefix "
                      f"{reader.prefix.decode('utf-8', 'backslashreplace')!r}: watch them on etcd")
        if req.start_revision < 0:
            refuse = _COMPACTED
        watch_id = req.watch_id
        if refuse is None and watch_id and watch_id in self._watches:
            refuse = _DUPLICATE_ID
        if refuse is not None:
            self._send(rpc.WatchResponse(header=self._header(rev), watch_id=-1, created=True,
                                         canceled=True, cancel_reason=refuse))
            return
        if watch_id == 0:  # etcd's AutoWatchID: the next id not in use
            while self._next_id in self._watches:
                self._next_id += 1
            watch_id = self._next_id
            self._next_id += 1
        if keys is None:
            self._forward_create(req, watch_id)
            return
        # Revisions are etcd's: a start revision S wants the events of S and after,
        # since_revision S - 1. One after the current revision is "from now"; later
        # ones start from now and drop what comes before them.
        start = req.start_revision or rev + 1
        since = min(start - 1, rev)
        compacted: CompactedError | None = None
        aw = None
        try:
            aw = reader.awatch(keys.prefix, since)
        except CompactedError as exc:
            compacted = exc
        cw = ClientWatch(watch_id, keys, aw, req, start, catching_up=start <= rev)
        self._watches[watch_id] = cw
        self._send(rpc.WatchResponse(header=self._header(rev), watch_id=watch_id, created=True))
        if compacted is not None:
            self._compacted(cw, compacted)
            return
        self._service.metrics.watches_changed(1)
        cw.fed_by(self._spawn(self._feed(cw)))

    def _cancel(self, watch_id: int) -> None:
        cw = self._watches.pop(watch_id, None)
        if cw is None:
            return  # etcd answers nothing for an unknown id
        if cw.keys is None:  # etcd's answer comes back from etcd
            assert self._upstream is not None
            self._upstream.send(rpc.WatchRequest(cancel_request=rpc.WatchCancelRequest(
                watch_id=to_etcd(watch_id))))
            self._service.metrics.watches_changed(-1)
            return
        self._end(cw)
        self._send(rpc.WatchResponse(header=self._header(self._reader.revision),
                                     watch_id=watch_id, canceled=True))

    def _end(self, cw: ClientWatch) -> None:
        if cw.end():
            self._service.metrics.watches_changed(-1)

    def _compacted(self, cw: ClientWatch, exc: CompactedError) -> None:
        """etcd's answer to a watch below its compaction: canceled, ``compact_revision``
        the oldest start revision served (the id stays taken until the client cancels)."""
        self._end(cw)
        self._send(rpc.WatchResponse(header=self._header(0), watch_id=cw.id, canceled=True,
                                     compact_revision=exc.compact_revision + 1))

    def _fail(self, exc: BaseException) -> None:
        """End the stream with the error that ended a task of it: the Reader's (closed,
        stale), etcd's on the forwarded stream, or a bug of ours (logged)."""
        if self._stopped.is_set():
            return
        code, details = getattr(exc, "code", None), getattr(exc, "details", None)
        if isinstance(exc, ShmCacheError):
            self.stop(_Abort(str(exc)))
        elif code is not None and details is not None:
            self.stop(_Abort(details(), code().name))
        else:
            _log.error("watch stream failed", exc_info=exc)
            self.stop(_Abort(f"shmcache proxy: {exc!r}", "INTERNAL"))

    # -- watches forwarded to etcd --------------------------------------------------------

    def _forward_create(self, req: Any, watch_id: int) -> None:
        if self._upstream is None:
            call = self._service.call
            self._upstream = Upstream(self._service.forward, self._context,
                                      lambda resp: call(self._from_etcd, resp),
                                      lambda exc: call(self._fail, exc))
        self._watches[watch_id] = ClientWatch(watch_id, None, None, req, 0)
        self._creating.append(watch_id)
        self._service.metrics.watches_changed(1)
        fwd = rpc.WatchCreateRequest()
        fwd.CopyFrom(req)
        fwd.watch_id = to_etcd(watch_id)
        self._upstream.send(rpc.WatchRequest(create_request=fwd))

    def _from_etcd(self, resp: Any) -> None:
        """A response on etcd's stream: passed on under the client's watch id; etcd's
        answers to progress requests go to the request waiting for them."""
        if resp.watch_id == -1 and not (resp.created or resp.canceled):
            if self._progress:
                fut = self._progress.popleft()
                if not fut.done():
                    fut.set_result(resp.header.revision)
            return
        if resp.created:
            watch_id = self._creating.popleft() if self._creating else -1
            if resp.canceled:  # refused (permission denied...): the id is free again
                self._forget_forwarded(watch_id)
        out = rpc.WatchResponse()  # the client's copy: etcd's response is not ours to change
        out.CopyFrom(resp)
        out.watch_id = to_client(resp.watch_id)
        if out.canceled and not out.created and not out.compact_revision:
            self._forget_forwarded(out.watch_id)  # (etcd ended it; a compacted one stays)
        self._send(out)

    def _forget_forwarded(self, watch_id: int) -> None:
        cw = self._watches.get(watch_id)
        if cw is not None and cw.keys is None:
            del self._watches[watch_id]
            self._service.metrics.watches_changed(-1)

    async def _progress_request(self) -> None:
        """etcd's progress answer: the revision every watch of the stream has delivered
        up to; with forwarded watches, the lower of the cache's and etcd's."""
        waiting = None
        if self._upstream is not None and any(cw.keys is None for cw in self._watches.values()):
            waiting = asyncio.get_running_loop().create_future()
            self._progress.append(waiting)
            self._upstream.send(rpc.WatchRequest(progress_request=rpc.WatchProgressRequest()))
        rev = await self._synced_revision(list(self._watches.values()))
        if waiting is not None:
            try:
                etcd_rev = await asyncio.wait_for(waiting, _UPSTREAM_PROGRESS_WAIT)
            except TimeoutError:
                return  # etcd sent none (a watch of it still catching up): neither do we
            rev = None if rev is None else min(rev, etcd_rev)
        if rev is not None:
            self._send(rpc.WatchResponse(header=self._header(rev), watch_id=-1))

    async def _feed(self, cw: ClientWatch) -> None:
        """Move a watch's events from the cache to the client, until it ends."""
        try:
            while cw.aw is not None:
                while self.backlog() > BACKLOG_BYTES and not self._stopped.is_set():
                    await asyncio.sleep(0.05)  # the client reads slowly: let the ring judge
                aw = cw.aw
                if aw is None or aw.closed:
                    return  # (a closed watch's poll returns at once: no spinning on it)
                events = await aw.poll(None)
                if cw.aw is aw:
                    self._deliver(cw, events)
        except CompactedError as exc:
            if self._watches.get(cw.id) is cw:
                self._compacted(cw, exc)
        except Exception as exc:  # noqa: BLE001 (a bug must end the stream, not hang it)
            self._fail(exc)

    async def _drain(self, cw: ClientWatch) -> None:
        """Deliver what ``cw`` has now (a progress answer must not overtake events)."""
        aw = cw.aw
        if aw is None:
            return
        try:
            events = await aw.poll(0)
        except CompactedError as exc:
            self._compacted(cw, exc)
            return
        self._deliver(cw, events)

    def _deliver(self, cw: ClientWatch, events: list[Event]) -> None:
        """Send ``events`` (ascending revisions) as etcd batches them."""
        events = cw.wanted(events)
        catching_up = cw.delivering(bool(events))
        if not events:
            return
        assert cw.aw is not None
        # A catch-up is headed by the revision the watch has caught up to.
        for rev, batch in batches(events, cw.aw.revision if catching_up else None):
            self._respond(cw, rev, batch)

    def _respond(self, cw: ClientWatch, revision: int, events: list[Event]) -> None:
        limit = self._service.max_request_bytes + GRPC_OVERHEAD_BYTES
        if not cw.fragment or len(events) < 2:
            self._send(self._service.encoder.response(cw.id, self._cluster_id, revision, events,
                                                      cw.prev_kv))
            return
        resp = rpc.WatchResponse(header=self._header(revision), watch_id=cw.id, events=[
            event_message(e, cw.prev_kv) for e in events])
        if resp.ByteSize() < limit:
            self._send(resp)
            return
        for part in fragments(resp, limit):
            self._send(part)

    async def _synced_revision(self, watches: list[ClientWatch]) -> int | None:
        """The cache's revision once ``watches`` have delivered every event up to it; None
        if one cannot within a second (etcd then sends no progress either)."""
        rev = self._reader.revision
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 1.0
        while True:
            for cw in watches:
                await self._drain(cw)
            behind = [cw for cw in watches if cw.aw is not None and cw.aw.revision < rev]
            if not behind:
                return rev
            if loop.time() > deadline:
                return None
            watches = behind
            await asyncio.sleep(0.01)

    def _schedule_tick(self) -> None:
        loop = asyncio.get_running_loop()
        self._ticker = loop.call_later(self._service.progress_interval, self._tick)

    def _tick(self) -> None:
        if self._stopped.is_set():
            return
        self._spawn(self._progress_notify())
        self._schedule_tick()

    async def _progress_notify(self) -> None:
        """etcd's progress ticker: each progress_notify watch that got no events since the
        last tick and has caught up gets a progress response with the cache's revision."""
        try:
            for cw in [cw for cw in self._watches.values() if cw.progress_notify]:
                if cw.quiet and cw.aw is not None:
                    rev = await self._synced_revision([cw])
                    if rev is not None and cw.quiet and cw.aw is not None:
                        self._send(rpc.WatchResponse(header=self._header(rev), watch_id=cw.id))
                cw.ticked()
        except Exception as exc:  # noqa: BLE001 (a bug must end the stream, not hang it)
            self._fail(exc)


class WatchService:
    """etcd's Watch service for a proxy: ``handler()`` for a gRPC server, ``close()`` to stop.

    ``reader``: the proxy's Reader (shared with the other services; thread-safe).
    ``forward``: the proxy's forwarder (its ``stream`` method, see watch_forward.py)
    for watches outside the cache's prefix; None: those are refused. ``progress_interval``:
    seconds between progress_notify responses; ``max_request_bytes``: etcd's
    --max-request-bytes, which decides where fragment watches split responses
    (both etcd's defaults).
    """

    def __init__(self, reader: Reader, metrics: ProxyMetrics, forward: object | None = None, *,
                 progress_interval: float = PROGRESS_INTERVAL,
                 max_request_bytes: int = MAX_REQUEST_BYTES) -> None:
        self.reader = reader
        self.metrics = metrics
        self.forward = forward
        self.progress_interval = progress_interval
        self.max_request_bytes = max_request_bytes
        self.encoder = Encoder()  # (the loop's)
        self._lock = threading.Lock()
        self._streams: set[_Stream] = set()
        self._threads: set[threading.Thread] = set()
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                             name="shmcache-proxy-watch")
        self._loop_thread.start()

    def handler(self) -> Any:
        """The ``grpc.GenericRpcHandler`` of etcd's Watch service."""
        # (etcdapi.service_handler but for the serializer: responses to many watches
        # arrive encoded already, see watch_encode.py)
        grpc = _grpc()
        watch = grpc.stream_stream_rpc_method_handler(
            self._watch, request_deserializer=rpc.WatchRequest.FromString,
            response_serializer=serialize)
        return grpc.method_handlers_generic_handler(
            "etcdserverpb.Watch", {"Watch": watch})

    def call(self, fn: Any, *args: Any) -> None:
        """Run ``fn(*args)`` on the service's loop (nothing once it is closed)."""
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            pass  # the loop is closed: close() tore everything down already

    def close(self) -> None:
        """End every stream (their clients see the RPC end) and stop the loop and threads."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            streams, threads = list(self._streams), list(self._threads)
        for s in streams:
            s.stop(_Abort("shmcache proxy is closing"))  # (clients reconnect, as to etcd)

        async def finish() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            asyncio.run_coroutine_threadsafe(finish(), self._loop).result(10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._loop_thread.join(10)
            self._loop.close()
        for t in threads:
            t.join(5)

    def _watch(self, requests: Iterator[Any], context: Any) -> Iterator[Any]:
        """One Watch stream (gRPC's handler thread): send what the loop queues."""
        with self._lock:
            if self._closed:
                context.abort(_grpc().StatusCode.UNAVAILABLE, "shmcache proxy is closing")
            block = self.reader.control.block()  # (the etcd cluster the cache's epoch is of)
            stream = _Stream(self, block.cluster_id if block is not None else 0, context)
            reader = threading.Thread(target=self._read_requests, args=(stream, requests),
                                      daemon=True, name="shmcache-proxy-watch-requests")
            self._streams.add(stream)
            self._threads.add(reader)
        self.metrics.stream_opened()
        context.add_callback(stream.stop)
        code = "OK"
        try:
            self.call(stream.start)
            reader.start()
            while True:
                item = stream.take()
                if item is _END:
                    return
                if isinstance(item, _Abort):
                    code = item.code
                    context.abort(getattr(_grpc().StatusCode, code), item.message)
                yield item
        finally:
            stream.stop()
            with self._lock:
                self._streams.discard(stream)
            self.metrics.stream_closed()
            self.metrics.request("Watch", "Watch", code, forwarded=False)

    def _read_requests(self, stream: _Stream, requests: Iterator[Any]) -> None:
        """The stream's request reader: hands each request to the loop. The client closing
        its side ends only this (etcd keeps sending); a broken stream ends the stream."""
        try:
            for req in requests:
                self.call(stream.request, req)
        except Exception:  # grpc.RpcError: the RPC ended (client gone, cancelled)
            stream.stop()
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())


def _grpc() -> Any:
    import grpc

    return grpc
