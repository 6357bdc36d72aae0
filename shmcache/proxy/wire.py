"""The proxy's hot responses written as protobuf bytes by hand: RangeResponse and gRPC health.

Why by hand: the writer's extra pins protobuf 3.20 (pure Python on 3.11+), whose
message objects cost about 25 us per KeyValue to build and serialize; a 100-key
Range would spend 2.5 ms there, more than the whole read from shared memory.
The few fields written here are etcd's (rpc.proto, kv.proto) and gRPC's health
protocol (grpc/health/v1/health.proto); tests/test_proxy_kv.py checks every
encoder against protobuf's own parse of the same message.

Pure functions of their arguments; safe from any thread.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..types import KeyValue

__all__ = ["HEALTH_NOT_SERVING", "HEALTH_SERVING", "decode_health_request",
           "encode_health_response", "encode_range_response", "header_bytes", "varint"]

_MASK64 = (1 << 64) - 1
# Varints below 2**14 precomputed (lengths, versions, most revisions of a young
# cluster): a list index instead of a loop, the encoder's main cost otherwise.
_SMALL = [bytes([i]) for i in range(128)]
_TABLE = _SMALL + [bytes([(i & 0x7F) | 0x80, i >> 7]) for i in range(128, 1 << 14)]
_TABLE_LEN = len(_TABLE)


def varint(n: int) -> bytes:
    """Protobuf's base-128 varint of ``n`` (negative int64s as their 64-bit two's complement)."""
    if 0 <= n < _TABLE_LEN:
        return _TABLE[n]
    n &= _MASK64
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field_varint(tag: int, n: int) -> bytes:
    """A varint field (wire type 0), left out when 0 as proto3 leaves it."""
    return b"" if n == 0 else _SMALL[tag << 3] + varint(n)


def _field_bytes(tag: int, data: bytes) -> bytes:
    """A length-delimited field (wire type 2), left out when empty as proto3 leaves it."""
    return b"" if not data else _SMALL[(tag << 3) | 2] + varint(len(data)) + data


def header_bytes(cluster_id: int, member_id: int, revision: int, raft_term: int) -> bytes:
    """An etcdserverpb.ResponseHeader message's bytes."""
    return (_field_varint(1, cluster_id) + _field_varint(2, member_id)
            + _field_varint(3, revision) + _field_varint(4, raft_term))


def _kv_bytes(kv: KeyValue, keys_only: bool) -> bytes:
    """An mvccpb.KeyValue message: key 1, create_revision 2, mod_revision 3, version 4,
    value 5, lease 6 (zero and empty fields left out)."""
    key, value, create, mod, version, lease = kv
    v = varint
    if key and create and mod and version:  # every live key: one format call
        if keys_only or not value:
            body = b"\x0a%b%b\x10%b\x18%b\x20%b" % (v(len(key)), key, v(create), v(mod),
                                                     v(version))
        else:
            body = b"\x0a%b%b\x10%b\x18%b\x20%b\x2a%b%b" % (
                v(len(key)), key, v(create), v(mod), v(version), v(len(value)), value)
        return body + b"\x30" + v(lease) if lease else body
    parts = [b"\x0a", v(len(key)), key] if key else []
    if create:
        parts += (b"\x10", v(create))
    if mod:
        parts += (b"\x18", v(mod))
    if version:
        parts += (b"\x20", v(version))
    if value and not keys_only:
        parts += (b"\x2a", v(len(value)), value)
    if lease:
        parts += (b"\x30", v(lease))
    return b"".join(parts)


def encode_range_response(header: bytes, kvs: Iterable[KeyValue], more: bool, count: int,
                          keys_only: bool = False) -> bytes:
    """An etcdserverpb.RangeResponse: header 1, kvs 2 (repeated), more 3, count 4.
    ``header`` is ``header_bytes(...)``; ``keys_only`` leaves every value out."""
    parts = [b"\x0a", varint(len(header)), header]
    v, kv_bytes = varint, _kv_bytes
    for kv in kvs:
        body = kv_bytes(kv, keys_only)
        parts += (b"\x12", v(len(body)), body)
    if more:
        parts.append(b"\x18\x01")
    parts.append(_field_varint(4, count))
    return b"".join(parts)


# grpc.health.v1: HealthCheckRequest {string service = 1}; HealthCheckResponse
# {ServingStatus status = 1} with UNKNOWN 0, SERVING 1, NOT_SERVING 2.
HEALTH_SERVING = 1
HEALTH_NOT_SERVING = 2


def decode_health_request(data: bytes) -> str:
    """The ``service`` of a HealthCheckRequest; unknown fields are skipped as protobuf does.
    ValueError for bytes that are not such a message."""
    i, service = 0, ""
    while i < len(data):
        key, i = _read_varint(data, i)
        tag, wire = key >> 3, key & 7
        if wire == 0:
            _n, i = _read_varint(data, i)
        elif wire == 2:
            n, i = _read_varint(data, i)
            if i + n > len(data):
                raise ValueError("truncated HealthCheckRequest")
            if tag == 1:
                service = data[i:i + n].decode("utf-8")
            i += n
        elif wire in (1, 5):
            i += 8 if wire == 1 else 4
        else:
            raise ValueError(f"HealthCheckRequest: wire type {wire} unsupported")
    if i > len(data):
        raise ValueError("truncated HealthCheckRequest")
    return service


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        if i >= len(data) or shift > 63:
            raise ValueError("bad varint in HealthCheckRequest")
        b = data[i]
        i += 1
        n |= (b & 0x7F) << shift
        if b < 0x80:
            return n, i
        shift += 7


def encode_health_response(status: int) -> bytes:
    """A HealthCheckResponse with ``status``."""
    return _field_varint(1, status)
