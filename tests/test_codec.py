"""The ring record payload codec: one revision's events as msgpack, decoded strictly.

encode/decode round-trips PUT and DELETE events with and without prev_kv;
decode accepts nothing but ``[[type, key, value, create, mod, version, lease,
prev], ...]`` with bytes/ints (prev nil or a 6-array), mod == the record's
revision, and turns everything else into CorruptSegmentError (also a
ValueError), never another exception.
"""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shmcache import CorruptSegmentError, Event, KeyValue
from shmcache.format import codec as _codec
from shmcache.format.layout import EVENT_DELETE, EVENT_PUT

PREV = (b"/k", b"old", 3, 4, 1, 0)


def ev(typ: int = EVENT_PUT, key: bytes = b"/k", value: bytes = b"v", create: int = 3,
       mod: int = 5, version: int = 2, lease: int = 0, prev: object = None) -> list[object]:
    return [typ, key, value, create, mod, version, lease, prev]


def pack(obj: object) -> bytes:
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


def corrupt(payload: bytes, revision: int = 5) -> CorruptSegmentError:
    with pytest.raises(CorruptSegmentError) as info:
        _codec.decode(payload, revision, "/ring.1")
    assert isinstance(info.value, ValueError)
    assert info.value.segment == "/ring.1"
    return info.value


# --------------------------------------------------------------------------------------
# round trips


def test_put_without_prev() -> None:
    """A PUT without prev_kv decodes to Event("PUT", kv, None, revision)."""
    payload = _codec.encode([(EVENT_PUT, b"/k", b"v", 3, 5, 2, 0, None)])
    assert _codec.decode(payload, 5) == [
        Event("PUT", KeyValue(b"/k", b"v", 3, 5, 2, 0), None, 5)]


def test_put_with_prev() -> None:
    """prev_kv round-trips as a KeyValue."""
    payload = _codec.encode([(EVENT_PUT, b"/k", b"new", 3, 5, 2, 7, PREV)])
    (e,) = _codec.decode(payload, 5)
    assert e == Event("PUT", KeyValue(b"/k", b"new", 3, 5, 2, 7), KeyValue(*PREV), 5)
    assert type(e.prev_kv) is KeyValue and type(e.kv) is KeyValue


def test_delete_with_and_without_prev() -> None:
    """A DELETE carries the deletion revision as the kv's mod_revision, other fields zero."""
    payload = _codec.encode([(EVENT_DELETE, b"/k", b"", 0, 5, 0, 0, PREV),
                             (EVENT_DELETE, b"/j", b"", 0, 5, 0, 0, None)])
    assert _codec.decode(payload, 5) == [
        Event("DELETE", KeyValue(b"/k", b"", 0, 5, 0, 0), KeyValue(*PREV), 5),
        Event("DELETE", KeyValue(b"/j", b"", 0, 5, 0, 0), None, 5)]


def test_many_events_binary_keys_and_extreme_ints() -> None:
    """Events of one transaction keep their order; binary keys and 64-bit ints survive."""
    events = [(EVENT_PUT, bytes([i]) * 3, b"\x00\xff" * i, 1, 2**40, i, 2**63 - 1, None)
              for i in range(256)]
    out = _codec.decode(_codec.encode(events), 2**40)
    assert [e.kv.key for e in out] == [bytes([i]) * 3 for i in range(256)]
    assert out[-1].kv.lease == 2**63 - 1 and out[-1].kv.value == b"\x00\xff" * 255


def test_decode_accepts_buffers() -> None:
    """The payload may be a bytearray or memoryview (what a ring slice can be)."""
    payload = _codec.encode([(EVENT_PUT, b"/k", b"v", 3, 5, 2, 0, None)])
    assert _codec.decode(bytearray(payload), 5) == _codec.decode(memoryview(payload), 5)


def test_kv_tuple() -> None:
    """kv_tuple is the encoder's view of a KeyValue."""
    assert _codec.kv_tuple(KeyValue(*PREV)) == PREV


# --------------------------------------------------------------------------------------
# malformed payloads


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\xc1",  # the one byte msgpack never uses
        b"\x91",  # truncated: an array of 1 with nothing in it
        pack([ev()])[:-1],  # truncated inside the last field
        pack([ev()]) + b"\x00",  # trailing bytes after the array
        b"\x91" * 100_000,  # nested 100k deep: must not recurse
    ],
    ids=["empty", "c1", "truncated-array", "truncated-field", "extra-data", "deep-nesting"],
)
def test_not_msgpack(payload: bytes) -> None:
    """Bytes that are not exactly one msgpack object."""
    assert "does not decode" in str(corrupt(payload))


@pytest.mark.parametrize(
    "obj",
    [
        [],  # no events
        {},  # a map
        5,
        None,
        b"bytes",
        [ev()[:7]],  # 7 fields
        [ev() + [0]],  # 9 fields
        [ev(prev=list(PREV[:5]))],  # prev with 5 fields
        [ev(prev=list(PREV) + [0])],  # prev with 7 fields
        [5],  # an event that is an int
        [None],
        [b"12345678"],  # 8 bytes unpack into 8 ints: still not an event
        [ev(), 7],  # a good event followed by junk
    ],
    ids=["empty-array", "map", "int", "nil", "bytes", "arity7", "arity9", "prev5", "prev7",
         "event-int", "event-nil", "event-bytes8", "trailing-junk"],
)
def test_wrong_shape(obj: object) -> None:
    """Anything but a non-empty array of 8-field events."""
    corrupt(pack(obj))


@pytest.mark.parametrize(
    "event",
    [
        ev(key="/k"),  # str instead of bytes
        ev(value="v"),
        ev(key=""),  # an empty str slips past max_str_len=0 but not the type check
        ev(key=None),
        ev(key=5),
        ev(value=[b"v"]),
        ev(create=b"3"),
        ev(create=None),
        ev(version=1.0),
        ev(lease=True),  # bool is not int here
        ev(mod=5.0),
        ev(mod=True, create=1),
        ev(typ=2),  # unknown event type
        ev(typ=-1),
        ev(typ=True),  # == EVENT_DELETE by value, but not an int (was accepted before the fix)
        ev(typ=False),
        ev(typ=1.0),
        ev(typ=0.0),
        ev(typ=b"\x00"),
        ev(typ=None),
        ev(prev=5),
        ev(prev=b"\x01\x02\x03\x04\x05\x06"),  # 6 bytes unpack into 6 ints
        ev(prev=[b"/k", b"old", 3, 4, 1, "0"]),
        ev(prev=["/k", b"old", 3, 4, 1, 0]),
        ev(prev=[b"/k", b"old", 3, 4, True, 0]),
        ev(prev={}),
    ],
)
def test_wrong_types(event: list[object]) -> None:
    """Fields of the wrong type, including str for bytes and bools/floats for ints."""
    corrupt(pack([event]))


@pytest.mark.parametrize("mod", [4, 6, 0, -5, 2**64 - 1])
def test_revision_mismatch(mod: int) -> None:
    """Every event's mod_revision must equal the record's revision."""
    assert "revision" in str(corrupt(pack([ev(), ev(mod=mod)]), revision=5))


@pytest.mark.parametrize(
    "obj",
    [
        msgpack.ExtType(1, b"x"),
        [msgpack.ExtType(0, b"")],
        [ev(key=msgpack.ExtType(5, b"k"))],
        [ev(typ=msgpack.ExtType(0, b""))],
        [ev(value=msgpack.Timestamp(1, 0))],
    ],
    ids=["top", "event", "key", "type-empty-ext", "timestamp"],
)
def test_ext_types(obj: object) -> None:
    """Extension types (including msgpack's timestamp) are never accepted."""
    corrupt(pack(obj))


@pytest.mark.parametrize(
    "payload",
    [
        b"\xdd\xff\xff\xff\xff",  # array32 of 2**32-1 elements, nothing follows
        b"\xdc\xff\xff" + b"\xc0" * 10,  # array16 of 65535 nils, 10 given
        b"\x91\xdd\x7f\xff\xff\xff",  # nested huge array
        b"\xc6\xff\xff\xff\xff",  # bin32 of 4 GiB
        b"\xdb\xff\xff\xff\xff",  # str32 of 4 GiB
        b"\xdf\xff\xff\xff\xff",  # map32 of 2**32-1 pairs
        b"\xc9\xff\xff\xff\xff\x01",  # ext32 of 4 GiB
    ],
    ids=["array32", "array16-short", "nested-array32", "bin32", "str32", "map32", "ext32"],
)
def test_huge_declared_lengths(payload: bytes) -> None:
    """Declared lengths beyond the payload fail fast without allocating them."""
    corrupt(payload)


# --------------------------------------------------------------------------------------
# hypothesis: arbitrary msgpack objects

scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1)
           | st.floats(allow_nan=False) | st.binary(max_size=8) | st.text(max_size=4))
objects = st.recursive(scalars, lambda inner: st.lists(inner, max_size=9), max_leaves=12)
near_events = st.lists(
    st.tuples(st.sampled_from([0, 1, 2, True]), st.binary(max_size=4) | st.text(max_size=2),
              st.binary(max_size=4), st.integers(0, 9), st.sampled_from([5, 5, 4]),
              st.integers(0, 3), st.integers(0, 3),
              st.none() | st.lists(st.binary(max_size=2) | st.integers(0, 5), min_size=5,
                                   max_size=7)).map(list),
    max_size=4,
)


def well_formed(out: list[Event], revision: int) -> None:
    assert out
    for e in out:
        assert type(e) is Event and e.type in ("PUT", "DELETE") and e.revision == revision
        assert type(e.kv.key) is bytes and type(e.kv.value) is bytes
        assert e.kv.mod_revision == revision
        assert all(type(x) is int for x in e.kv[2:])
        if e.prev_kv is not None:
            assert type(e.prev_kv.key) is bytes and type(e.prev_kv.value) is bytes
            assert all(type(x) is int for x in e.prev_kv[2:])


@settings(max_examples=150, derandomize=True, database=None, deadline=None)
@given(obj=objects | near_events)
def test_any_msgpack_object_decodes_or_is_corrupt(obj: object) -> None:
    """Whatever the payload holds, decode returns well-typed events or raises CorruptSegmentError."""
    try:
        out = _codec.decode(pack(obj), 5)
    except CorruptSegmentError:
        return
    well_formed(out, 5)


@settings(max_examples=300, derandomize=True, database=None, deadline=None)
@given(data=st.binary(max_size=64))
def test_any_bytes_decode_or_are_corrupt(data: bytes) -> None:
    """Random bytes: the same guarantee."""
    try:
        out = _codec.decode(data, 5)
    except CorruptSegmentError:
        return
    well_formed(out, 5)
