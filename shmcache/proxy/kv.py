"""etcd's KV service from the cache: Range answered from shared memory, writes forwarded.

Range follows etcd 3.5's server exactly (server/etcdserver/apply.go,
``applierV3backend.Range``, and server/mvcc/kvstore_txn.go, ``rangeKeys``):

- ``count`` is every key in the range at the read revision, whatever ``limit``,
  the revision filters or ``count_only``;
- with a sort order or any min/max mod/create revision filter the whole range
  is read, filtered, sorted, and only then cut to ``limit`` (``more`` says a cut
  happened); without them the first ``limit`` keys in key order are read;
- a sort target other than KEY with order NONE sorts ascending; items with equal
  sort values stay in key order (etcd's order among them is unspecified);
- ``header.revision`` is the store's current revision even for a read at a past
  ``revision``; a ``revision`` <= 0 reads the current one.

A read the cache cannot answer goes to etcd (the Forwarder) or, without one,
ends with the status etcd itself would give: a revision older than the cache
holds (OUT_OF_RANGE "required revision has been compacted"), newer than it has
(OUT_OF_RANGE "required revision is a future revision"), a range reaching
outside the cache's prefix (FAILED_PRECONDITION, the proxy's own: etcd has no
such case). ``serializable=False`` (etcd's default, linearizable) waits for a
consistent read (``Reader.sync``); a serializable read answers at once, after
the revision of the last write this proxy forwarded that touched the cache's range.

Concurrency contract: one KVService per proxy, called from every handler
thread; the Reader is thread-safe, the write fence is a lock-guarded int.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from ..errors import CompactedError, FutureRevisionError, ShmCacheError
from ..errors import TimeoutError as ShmTimeoutError
from ..reader.view import range_end as prefix_end
from ..types import KeyValue
from .forward import Forwarder, time_left
from .metrics import ProxyMetrics
from .wire import encode_range_response, header_bytes

__all__ = ["Header", "KVService", "RangeAnswer", "answer_range", "covers"]

ERR_EMPTY_KEY = "etcdserver: key is not provided"
ERR_COMPACTED = "etcdserver: mvcc: required revision has been compacted"
ERR_FUTURE = "etcdserver: mvcc: required revision is a future revision"
ERR_TIMEOUT = "etcdserver: request timed out"
# How long a linearizable read waits for the writer's confirmation when the client
# set no deadline: etcd's own default request timeout is about 5 s (plus election time).
SYNC_TIMEOUT = 5.0
FROM_KEY = b"\0"
_SORT_KEYS: dict[int, Callable[[KeyValue], Any]] = {
    0: lambda kv: kv.key, 1: lambda kv: kv.version, 2: lambda kv: kv.create_revision,
    3: lambda kv: kv.mod_revision, 4: lambda kv: kv.value}
_NONE, _ASCEND, _DESCEND = 0, 1, 2


class Forward(Exception):
    """This request is etcd's to answer (raised inside, caught by the handler)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code  # the status to answer with when there is no etcd to forward to


class Header:
    """The ResponseHeader of answers from the cache.

    ``cluster_id`` is the etcd cluster the cache's epoch was loaded from (the
    control block's, issue 19; 0 when the writer did not learn it). ``member_id``
    and ``raft_term`` are 0: the proxy is no raft member, and clients (clientv3,
    python-etcd3, etcdctl) use neither. Thread-safe: the cached id is one int
    replaced whole, re-read at most once a second.
    """

    def __init__(self, reader: Any) -> None:
        self._reader = reader
        self._cluster_id = 0
        self._read_at = -1.0

    def cluster_id(self) -> int:
        now = time.monotonic()
        if now - self._read_at > 1.0:
            try:
                b = self._reader.control.block()
            except (ValueError, ShmCacheError):  # closed under us (shutting down)
                b = None
            if b is not None:
                self._cluster_id = b.cluster_id
            self._read_at = now
        return self._cluster_id

    def bytes(self, revision: int) -> bytes:
        return header_bytes(self.cluster_id(), 0, revision, 0)


def covers(prefix: bytes, key: bytes, end: bytes | None) -> bool:
    """Whether etcd's range of ``key`` and ``end`` (None: the single key; b"\\0": every
    key >= key) lies inside the keys under ``prefix``."""
    if not prefix:
        return True
    if not key.startswith(prefix):
        return False
    if end is None:
        return True
    p_end = prefix_end(prefix)
    if end == FROM_KEY:
        return p_end is None
    return end <= key or p_end is None or end <= p_end


class RangeAnswer:
    """What a Range found: ``kvs`` (filtered, sorted, cut), ``more``, ``count``, and the
    revision the cache was at (``header.revision``)."""

    __slots__ = ("count", "kvs", "more", "revision")

    def __init__(self, kvs: list[KeyValue], more: bool, count: int, revision: int) -> None:
        self.kvs, self.more, self.count, self.revision = kvs, more, count, revision


def answer_range(reader: Any, req: Any, end: bytes | None) -> RangeAnswer:
    """etcd's Range over the cache (see the module docstring); CompactedError or
    FutureRevisionError as the Reader raises them."""
    key = req.key
    at = req.revision if req.revision > 0 else None
    if req.count_only:
        counted = reader.count(key, range_end=key + b"\0" if end is None else end, revision=at)
        return RangeAnswer([], False, counted.count, _current(reader, at, counted.revision))
    limit = req.limit if req.limit > 0 else 0
    filters = (req.min_mod_revision, req.max_mod_revision, req.min_create_revision,
               req.max_create_revision)
    # Values are needed to sort by them even when the answer leaves them out.
    keys_only = req.keys_only and req.sort_target != 4
    count_end = key + b"\0" if end is None else end
    if limit and req.sort_order == _NONE and not any(filters):
        # etcd reads limit + 1 keys in key order (the one more tells ``more``) and sorts
        # only those when a sort target is given with order NONE.
        res = reader.range(key, end, limit=limit + 1, revision=at, keys_only=keys_only)
        count = len(res.items)
        if res.more:
            count = reader.count(key, range_end=count_end, revision=res.revision).count
    else:
        res = reader.range(key, end, revision=at, keys_only=keys_only)
        count = len(res.items)
    kvs = res.items
    order = req.sort_order
    if req.sort_target != 0 and order == _NONE:
        order = _ASCEND
    lo_mod, hi_mod, lo_create, hi_create = filters
    if any(filters):
        kvs = [kv for kv in kvs
               if not (hi_mod and kv.mod_revision > hi_mod or lo_mod and kv.mod_revision < lo_mod
                       or hi_create and kv.create_revision > hi_create
                       or lo_create and kv.create_revision < lo_create)]
    if order in (_ASCEND, _DESCEND) and req.sort_target in _SORT_KEYS:
        # Items with equal sort values keep key order here. etcd leaves their order
        # unspecified: Go's sort.Sort is not stable, and which permutation comes out
        # depends on the Go release etcd was built with (quicksort to Go 1.18,
        # pdqsort since), so no fixed rule could match every etcd.
        kvs.sort(key=_SORT_KEYS[req.sort_target], reverse=order == _DESCEND)
    more = False
    if limit and len(kvs) > limit:
        kvs, more = kvs[:limit], True
    return RangeAnswer(kvs, more, count, _current(reader, at, res.revision))


def _current(reader: Any, at: int | None, read_revision: int) -> int:
    """etcd's header revision: the current one, also for a read at a past revision."""
    return read_revision if at is None else max(reader.revision, read_revision)


class KVService:
    """The KV service of one proxy: ``handler()`` is its GenericRpcHandler."""

    def __init__(self, reader: Any, metrics: ProxyMetrics, forwarder: Forwarder | None,
                 header: Header) -> None:
        self._reader = reader
        self._metrics = metrics
        self._fwd = forwarder
        self._header = header
        self._prefix: bytes = reader.prefix
        self._fence_lock = threading.Lock()
        self._fence = 0  # revision of the newest forwarded write that touched the prefix

    # -- Range --------------------------------------------------------------

    def range(self, raw: bytes, context: Any) -> bytes:
        """etcd's KV.Range: from the cache when it can answer, else forwarded."""
        from ..etcdapi import rpc

        try:
            req = rpc.RangeRequest.FromString(raw)
        except DecodeError as exc:  # (as grpc-go, under etcd, answers bytes it cannot parse)
            self._metrics.request("KV", "Range", "INTERNAL", forwarded=False)
            context.abort(grpc.StatusCode.INTERNAL, f"grpc: error unmarshalling request: {exc}")
        if not req.key:
            self._metrics.request("KV", "Range", "INVALID_ARGUMENT", forwarded=False)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, ERR_EMPTY_KEY)
        end = req.range_end or None
        try:
            if not covers(self._prefix, req.key, end):
                raise Forward(grpc.StatusCode.FAILED_PRECONDITION,
                              f"shmcache proxy: the range of {req.key!r} is outside the prefix "
                              f"{self._prefix!r} of the cache, and there is no etcd "
                              f"(--endpoints) to forward it to")
            self._consistent(req.serializable, context)
            try:
                a = answer_range(self._reader, req, end)
            except CompactedError:
                raise Forward(grpc.StatusCode.OUT_OF_RANGE, ERR_COMPACTED) from None
            except FutureRevisionError:
                raise Forward(grpc.StatusCode.OUT_OF_RANGE, ERR_FUTURE) from None
        except Forward as f:
            return self._forward_or_fail("Range", raw, context, f)
        except ShmCacheError as exc:  # a closed Reader (shutting down), a damaged segment
            self._metrics.request("KV", "Range", "UNAVAILABLE", forwarded=False)
            context.abort(grpc.StatusCode.UNAVAILABLE, f"shmcache proxy: {exc}")
        self._metrics.request("KV", "Range", "OK", forwarded=False)
        return encode_range_response(self._header.bytes(a.revision), a.kvs, a.more, a.count,
                                     req.keys_only)

    def _consistent(self, serializable: bool, context: Any) -> None:
        """Wait until the cache may answer: a consistent read for a linearizable request,
        the last forwarded write for any. Forward when the cache cannot confirm in time."""
        timeout = _deadline(context, SYNC_TIMEOUT)
        try:
            if not serializable:
                self._reader.sync(timeout)
                return
            fence = self._fence
            if fence and not self._reader.wait(fence, timeout):
                raise Forward(grpc.StatusCode.UNAVAILABLE, ERR_TIMEOUT)
        except ShmTimeoutError:
            raise Forward(grpc.StatusCode.UNAVAILABLE, ERR_TIMEOUT) from None

    def _forward_or_fail(self, method: str, raw: bytes, context: Any, why: Forward) -> bytes:
        if self._fwd is None:
            self._metrics.request("KV", method, why.code.name, forwarded=False)
            context.abort(why.code, str(why))
        return self._forward(method, raw, context)

    def _forward(self, method: str, raw: bytes, context: Any) -> bytes:
        assert self._fwd is not None
        try:
            resp = self._fwd.unary("KV", method, raw, context)
        except grpc.RpcError as exc:
            self._metrics.request("KV", method, exc.code().name, forwarded=True)
            context.abort(exc.code(), exc.details())
        self._metrics.request("KV", method, "OK", forwarded=True)
        return resp

    # -- writes -------------------------------------------------------------

    def write(self, method: str) -> Callable[[bytes, Any], bytes]:
        """A forwarding behaviour for Put, DeleteRange, Txn or Compact that notes the
        revision of a write touching the cache's range (the read-after-write fence)."""
        def behaviour(raw: bytes, context: Any) -> bytes:
            if self._fwd is None:
                self._metrics.request("KV", method, "UNIMPLEMENTED", forwarded=False)
                context.abort(grpc.StatusCode.UNIMPLEMENTED,
                              f"shmcache proxy: {method} goes to etcd, and this proxy has no "
                              f"--endpoints: it serves reads from the cache only")
            resp = self._forward(method, raw, context)
            if method != "Compact" and self._touches(method, raw):
                self.note_write(_header_revision(method, resp))
            return resp
        return behaviour

    def note_write(self, revision: int) -> None:
        """A forwarded write (here or in another service: a revoked lease) made ``revision``."""
        with self._fence_lock:
            if revision > self._fence:
                self._fence = revision

    def _touches(self, method: str, raw: bytes) -> bool:
        from ..etcdapi import rpc

        if not self._prefix:
            return True
        if method == "Put":
            return bool(rpc.PutRequest.FromString(raw).key.startswith(self._prefix))
        if method == "DeleteRange":
            r = rpc.DeleteRangeRequest.FromString(raw)
            return _overlaps(self._prefix, r.key, r.range_end)
        return _txn_touches(self._prefix, rpc.TxnRequest.FromString(raw))

    def handler(self) -> Any:
        """The GenericRpcHandler of etcdserverpb.KV (bytes in and out: see wire.py)."""
        impl: dict[str, Any] = {"Range": self.range}
        for m in ("Put", "DeleteRange", "Txn", "Compact"):
            impl[m] = self.write(m)
        return grpc.method_handlers_generic_handler(
            "etcdserverpb.KV", {m: grpc.unary_unary_rpc_method_handler(fn)
                                for m, fn in impl.items()})


def _deadline(context: Any, default: float) -> float:
    """Seconds left of the client's deadline (``default`` without one)."""
    left = time_left(context)
    return default if left is None else left


def _overlaps(prefix: bytes, key: bytes, end: bytes) -> bool:
    """Whether etcd's range [key, end) (end b"": the key; b"\\0": from key) meets the prefix."""
    if not end:
        return key.startswith(prefix)
    p_end = prefix_end(prefix)
    hi_ok = end == FROM_KEY or end > prefix
    lo_ok = p_end is None or key < p_end
    return hi_ok and lo_ok


def _txn_touches(prefix: bytes, txn: Any) -> bool:
    for op in (*txn.success, *txn.failure):
        which = op.WhichOneof("request")
        if which == "request_put" and op.request_put.key.startswith(prefix):
            return True
        if which == "request_delete_range" and _overlaps(
                prefix, op.request_delete_range.key, op.request_delete_range.range_end):
            return True
        if which == "request_txn" and _txn_touches(prefix, op.request_txn):
            return True
    return False


def _header_revision(method: str, resp: bytes) -> int:
    from ..etcdapi import rpc

    cls = {"Put": rpc.PutResponse, "DeleteRange": rpc.DeleteRangeResponse,
           "Txn": rpc.TxnResponse}[method]
    return int(cls.FromString(resp).header.revision)
