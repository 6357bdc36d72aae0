"""Paged Range reads of a whole key range at one revision, the next page requested while
the current one is decoded.

A relist reads every key of the cache's range from etcd. Three things made it slow
(docs/benchmarks.md, "Relist"), and each is handled here:

- **etcd's sorting**: a RangeRequest with ``sort_order`` ASCEND makes etcd 3.5 read
  every key from ``key`` to the range's end for each page, sort them and return the
  first ``limit`` (``limit`` is ignored for the read), so a paged list was quadratic.
  etcd's index returns keys in ascending byte order anyway, and without a sort
  order it reads only ``limit + 1`` keys: requests here set none.
- **decoding**: RangeResponse bytes are read straight into the tuples the writer's
  state holds, by ``range_response`` (C in format/_speedups.c, its pure-Python twin
  ``py_range_response`` below; tests hold both to protobuf's own decoding), never
  into protobuf message objects.
- **waiting**: the next page's request needs only the current page's last key, which
  a scan of the message finds without decoding it; so it goes out before the page is
  decoded, and etcd reads and sends it (and grpc receives it, off the GIL) while
  this thread decodes.

Every page is read at the revision of the first (one consistent cut, even while etcd
is written), and every page's header is checked against the cluster connected to
(``check_cluster``). A compacted revision, a cluster change or any gRPC error is
raised as it comes (grpc.RpcError: ``connection.is_compacted`` recognises
compaction), after cancelling the request in flight.

Concurrency contract: a ``RangeReader`` is used by one thread at a time; it holds a
gRPC channel (thread-safe) and starts at most two requests at once.

    RangeResponse {ResponseHeader header = 1 (uint64 cluster_id = 1; int64 revision = 3);
        repeated KeyValue kvs = 2; bool more = 3; int64 count = 4}
    KeyValue {bytes key = 1; int64 create_revision = 2; int64 mod_revision = 3;
        int64 version = 4; bytes value = 5; int64 lease = 6}
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from ...etcdapi import method_path, rpc
from ...format.speedups import USE_SPEEDUPS, _speedups
from .decode import _key_value, _length, _skip, _varint

Item = tuple[bytes, tuple[bytes, int, int, int, int]]
"""``(key, (value, create_revision, mod_revision, version, lease))``: what the writer's
state holds per key (Publisher.reset)."""

Head = tuple[int, int, bool, int, int, bytes | None]
"""``(cluster_id, revision, more, count, kvs, last_key)`` of a RangeResponse: its
header's cluster id (unsigned) and revision, ``more``, ``count`` (etcd's count of the
keys in [request key, range_end)), the number of KeyValues and the last one's key
(None without any)."""

RANGE_METHOD = method_path("KV", "Range")

# Pages double from FIRST_PAGE keys (a small range answers in one quick page, and
# the first pages of a large one come, and are decoded, soon) up to about
# 1/PAGES_TARGET of the range, as the first page's count tells it: etcd walks
# the rest of the range in its index for every page to count it (``count``),
# so the number of pages, not their size, is what a large range costs etcd.
# Pages are bounded by PAGE_BYTES (from the previous page's bytes per key), so a
# range of large values stays far below gRPC's 2 GiB message limit, and by
# PAGE_MAX keys (memory: two pages are held at once, one being received and
# one being decoded).
FIRST_PAGE = 2000
PAGES_TARGET = 8
PAGE_MIN = 50_000
PAGE_MAX = 250_000
PAGE_BYTES = 64 * 2**20

_U64 = (1 << 64) - 1


def py_range_response(data: bytes, out: list[Item] | None) -> Head:
    """Decode a serialized RangeResponse (pure Python; ``range_response`` picks C when
    built). ``out`` None: only scan for the head; a list: also append each KeyValue
    as an ``Item``. ValueError if the message cannot be read exactly."""
    b = bytes(data)
    cluster = revision = count = kvs = 0
    more = False
    last = (0, 0)
    try:
        i, end = 0, len(b)
        while i < end:
            tag = b[i]
            i += 1
            if tag == 0x12:  # kvs
                n, i = _length(b, i)
                if i + n > end:
                    raise ValueError("a KeyValue overruns the message")
                kvs += 1
                last = (i, i + n)
                if out is not None:
                    key, value, create, mod, version, lease = _key_value(b, i, i + n)
                    out.append((key, (value, create, mod, version, lease)))
                i += n
            elif tag == 0x0A:  # header
                n, i = _length(b, i)
                h_end = i + n
                while i < h_end:
                    t = b[i]
                    i += 1
                    if t == 0x08:
                        x, i = _varint(b, i)
                        cluster = x & _U64
                    elif t == 0x18:
                        revision, i = _varint(b, i)
                    else:
                        i = _skip(b, i, t)
                if i != h_end:
                    raise ValueError("header overruns its length")
            elif tag == 0x18 or tag == 0x20:
                x, i = _varint(b, i)
                if tag == 0x18:
                    more = x != 0
                else:
                    count = x
            else:
                i = _skip(b, i, tag)
        if i != end:
            raise ValueError("a field overruns the message")
        last_key = _key_value(b, *last)[0] if kvs else None
    except IndexError:
        raise ValueError("truncated RangeResponse") from None
    return cluster, revision, more, count, kvs, last_key


def _c_range_response(data: bytes, out: list[Item] | None) -> Head:
    head: Head = _speedups.range_response(data, out)
    return head


range_response: Callable[[bytes, list[Item] | None], Head] = (
    _c_range_response if USE_SPEEDUPS else py_range_response)


class PageKV(NamedTuple):
    """One key of a page, with protobuf KeyValue's field names (the verifier's compare)."""

    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int


class RangeReader:
    """Range reads on one channel: ``list_range`` (a whole range, pipelined) and ``page`` (one).

    ``check_cluster(cluster_id)`` is called with every answer's header cluster id and
    raises to refuse it (Connection: ClusterChanged). ``timeout`` bounds each request.
    ``in_flight_at_decode`` counts, per page decoded by ``list_range``, the requests that
    were in flight meanwhile (tests check that the next page is requested first).
    """

    def __init__(self, channel: Any, metadata: Any, timeout: float,
                 check_cluster: Callable[[int], None]) -> None:
        self._call = channel.unary_unary(RANGE_METHOD, request_serializer=None,
                                         response_deserializer=None)
        self._metadata = tuple(metadata or ())
        self._timeout = timeout
        self._check_cluster = check_cluster
        self._in_flight = 0
        self.in_flight_at_decode: list[int] = []

    def _send(self, key: bytes, range_end: bytes, limit: int, revision: int,
              keys_only: bool = False) -> Any:
        # No sort_order: etcd's index answers in key order, and a sort order would
        # make it read the whole rest of the range for every page (module docstring).
        req = rpc.RangeRequest(key=key, range_end=range_end, limit=limit, revision=revision,
                               keys_only=keys_only).SerializeToString()
        fut = self._call.future(req, timeout=self._timeout, metadata=self._metadata)
        self._in_flight += 1
        return fut

    def _receive(self, fut: Any) -> bytes:
        try:
            data: bytes = fut.result()
        finally:
            self._in_flight -= 1
        return data

    def list_range(self, key: bytes, range_end: bytes,
                   progress: Callable[[int, int], None] | None = None,
                   ) -> tuple[int, list[Item]]:
        """Every key in [key, range_end) at one revision: ``(revision, items)``, in key order.

        The first page is a linearizable read at etcd's current revision; every later
        one is read at that revision. ``progress(loaded, total)`` is called after each
        page (an exception it raises aborts the list).
        """
        items: list[Item] = []
        revision = cap = 0
        limit = FIRST_PAGE
        fut: Any = self._send(key, range_end, limit, 0)
        try:
            while fut is not None:
                data = self._receive(fut)
                fut = None
                cluster, rev, more, count, n, last = range_response(data, None)
                self._check_cluster(cluster)
                if not cap:  # the first page: its revision is the list's
                    revision = rev
                    cap = min(PAGE_MAX, max(PAGE_MIN, count // PAGES_TARGET + 1))
                if more and last is not None:
                    per_key = max(1, len(data) // max(n, 1))
                    limit = max(1, min(limit * 2, cap, PAGE_BYTES // per_key))
                    fut = self._send(last + b"\0", range_end, limit, revision)
                self.in_flight_at_decode.append(self._in_flight)
                range_response(data, items)
                del data
                if progress is not None:
                    # count is of [this page's key, range_end): the keys not loaded before it.
                    progress(len(items), len(items) - n + count)
        finally:
            if fut is not None:
                fut.cancel()
                self._in_flight -= 1
        return revision, items

    def page(self, start: bytes, range_end: bytes, revision: int, limit: int,
             keys_only: bool = False) -> tuple[list[PageKV], bool, int]:
        """One page of [start, range_end) at ``revision``, in key order: (kvs, more, bytes)."""
        data = self._receive(self._send(start, range_end, limit, revision, keys_only))
        self._check_cluster(range_response(data, None)[0])
        items: list[Item] = []
        more = range_response(data, items)[2]
        return [PageKV(k, *v) for k, v in items], more, len(data)
