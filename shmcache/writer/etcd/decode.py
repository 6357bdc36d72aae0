"""etcd's WatchResponse, decoded by hand into the writer's event tuples.

The watch stream is the writer's hot path. Pure-Python protobuf 3.20 (the newest
protobuf python-etcd3's generated modules load with, and no compiled build of
it exists for CPython 3.11) spent ~20 µs building message objects for a
one-event response here; this builds the publisher's event tuples directly in
~4 µs. Unknown fields are skipped, as protobuf does; tests/test_watch_stream.py
holds it to protobuf's own decoding. What it cannot read exactly (an event type
other than PUT and DELETE, an event without its key-value) is a ValueError, never
a guess: the feed counts it and watches again (docs/design.md, step 6).

    WatchResponse {ResponseHeader header = 1 (uint64 cluster_id = 1; int64 revision = 3);
        bool created = 3;
        bool canceled = 4; int64 compact_revision = 5; string cancel_reason = 6;
        repeated Event events = 11}
    Event {type = 1 (PUT 0, DELETE 1); KeyValue kv = 2; KeyValue prev_kv = 3}
    KeyValue {bytes key = 1; int64 create_revision = 2; int64 mod_revision = 3;
        int64 version = 4; bytes value = 5; int64 lease = 6}
"""

from __future__ import annotations

from ...format.codec import EventTuple

WatchResponse = tuple[int, bool, bool, int, str, list[EventTuple], bytes]
"""(header.revision, created, canceled, compact_revision, cancel_reason, events,
header.cluster_id): each event ``(type, key, value, create, mod, version, lease, prev)``,
``prev`` None or ``(key, value, create, mod, version, lease)``; a DELETE's value, create,
version and lease are zero. The cluster id is left as its varint's bytes (b"" if the
header lacks it; ``cluster_varint`` encodes one): the feed compares every response's
with the cluster the cache was loaded from, and comparing bytes keeps the hot path
free of decoding a 64-bit varint in Python (docs/design.md, "The writer's pipeline")."""

_SIGN, _MASK = 1 << 63, (1 << 64) - 1


def _varint(b: bytes, i: int) -> tuple[int, int]:
    """The varint at ``b[i]`` as an int64 (its low 64 bits, as protobuf), and the index after."""
    x = shift = 0
    while True:
        c = b[i]
        i += 1
        x |= (c & 0x7F) << shift
        if c < 0x80:
            if x >= _SIGN:
                x &= _MASK
                x = x - _MASK - 1 if x >= _SIGN else x
            return x, i
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")


def _skip(b: bytes, i: int, tag: int) -> int:
    """Skip the value of an unknown field whose tag byte was ``b[i - 1]``."""
    if tag & 0x80:
        tag, i = _varint(b, i - 1)
    wire = tag & 7
    if wire == 0:  # (etcd's header has three: cluster and member ids, raft term)
        start = i
        while b[i] & 0x80:
            i += 1
        if i - start > 9:
            raise ValueError("varint longer than 10 bytes")
        return i + 1
    if wire == 2:
        n, i = _varint(b, i)
        if n < 0:
            raise ValueError("negative length")
        return i + n
    if wire == 1:
        return i + 8
    if wire == 5:
        return i + 4
    raise ValueError(f"unsupported wire type {wire}")


def cluster_varint(cluster_id: int) -> bytes:
    """``cluster_id`` (a uint64) as protobuf encodes it: what ``decode_watch_response``
    returns for a header of that cluster (b"" for 0, a field protobuf omits)."""
    out = bytearray()
    n = cluster_id & _MASK
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    if n:
        out.append(n)
    return bytes(out)


def cluster_from_varint(raw: bytes) -> int:
    """The cluster id whose varint is ``raw`` (b"" -> 0): the inverse of cluster_varint."""
    return _varint(raw, 0)[0] & _MASK if raw else 0


def _length(b: bytes, i: int) -> tuple[int, int]:
    """A length prefix at ``b[i]`` and the index after it."""
    n = b[i]
    if n < 0x80:
        return n, i + 1
    n, i = _varint(b, i)
    if n < 0:
        raise ValueError("negative length")
    return n, i


def _key_value(b: bytes, i: int, end: int) -> tuple[bytes, bytes, int, int, int, int]:
    key = value = b""
    create = mod = version = lease = 0
    while i < end:
        tag = b[i]
        i += 1
        if tag == 0x0A or tag == 0x2A:  # key, value
            n = b[i]
            if n < 0x80:
                i += 1
            else:
                n, i = _length(b, i)
            if tag == 0x0A:
                key = b[i:i + n]
            else:
                value = b[i:i + n]
            i += n
        elif tag == 0x18 or tag == 0x10 or tag == 0x20 or tag == 0x30:
            x = b[i]
            if x < 0x80:
                i += 1
            else:
                x, i = _varint(b, i)
            if tag == 0x18:
                mod = x
            elif tag == 0x10:
                create = x
            elif tag == 0x20:
                version = x
            else:
                lease = x
        else:
            i = _skip(b, i, tag)
    if i != end:
        raise ValueError("KeyValue overruns its length")
    return key, value, create, mod, version, lease


def _event(b: bytes, i: int, end: int) -> EventTuple:
    typ = 0
    kv = prev = None
    while i < end:
        tag = b[i]
        i += 1
        if tag == 0x12 or tag == 0x1A:  # kv, prev_kv
            n = b[i]
            if n < 0x80:
                i += 1
            else:
                n, i = _length(b, i)
            if tag == 0x12:
                kv = _key_value(b, i, i + n)
            else:
                prev = _key_value(b, i, i + n)
            i += n
        elif tag == 0x08:
            typ = b[i]
            if typ < 0x80:
                i += 1
            else:
                typ, i = _varint(b, i)
        else:
            i = _skip(b, i, tag)
    if i != end:
        raise ValueError("Event overruns its length")
    if kv is None:
        raise ValueError("an event without its key-value")
    if typ == 0:
        return (0, *kv, prev)
    if typ == 1:
        return (1, kv[0], b"", 0, kv[3], 0, 0, prev)
    raise ValueError(f"unknown event type {typ}")


def decode_watch_response(data: bytes) -> WatchResponse:
    """Decode a serialized etcd WatchResponse; ValueError if it is malformed."""
    b = bytes(data)
    try:
        revision = compact = 0
        cluster = b""
        created = canceled = False
        reason = ""
        events: list[EventTuple] = []
        i, end = 0, len(b)
        while i < end:
            tag = b[i]
            i += 1
            if tag == 0x5A:  # events
                n, i = _length(b, i)
                events.append(_event(b, i, i + n))
                i += n
            elif tag == 0x0A:  # header
                n, i = _length(b, i)
                h_end = i + n
                while i < h_end:
                    t = b[i]
                    i += 1
                    if t == 0x18:
                        revision, i = _varint(b, i)
                    elif t == 0x08:
                        start = i
                        i = _skip(b, i, t)
                        cluster = b[start:i]
                    else:
                        i = _skip(b, i, t)
                if i != h_end:
                    raise ValueError("header overruns its length")
            elif tag == 0x18 or tag == 0x20 or tag == 0x28:
                x, i = _varint(b, i)
                if tag == 0x28:
                    compact = x
                elif tag == 0x18:
                    created = x != 0
                else:
                    canceled = x != 0
            elif tag == 0x32:
                n, i = _length(b, i)
                reason = b[i:i + n].decode("utf-8", "replace")
                i += n
            else:
                i = _skip(b, i, tag)
        if i != end:
            raise ValueError("a field overruns the message")
    except IndexError:
        raise ValueError("truncated WatchResponse") from None
    return revision, created, canceled, compact, reason, events, cluster
