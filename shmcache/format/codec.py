"""msgpack encoding of a ring record's payload: all events of one etcd revision."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgpack

from ..errors import CorruptSegmentError
from ..types import Event, KeyValue, kv_new
from . import layout
from .indexspec import IxVals

_PUT = layout.EVENT_PUT
_DELETE = layout.EVENT_DELETE
_packer = msgpack.Packer(use_bin_type=True, autoreset=True)

KVTuple = tuple[bytes, bytes, int, int, int, int]
# An event of a cache with indexes has two more fields: its IxVals and its prev's.
EventTuple = tuple[Any, ...]


def encode(events: Sequence[EventTuple]) -> bytes:
    """Pack one revision's events: ``[type, key, value, create, mod, version, lease, prev]``."""
    data: bytes = _packer.pack(events)
    return data


def decode(payload: bytes, revision: int, where: str = "") -> list[Event]:
    """Unpack and validate one record; anything malformed raises CorruptSegmentError.

    msgpack bounds every length by the input size, so garbage cannot make it
    allocate more than the payload; nothing but ints, bytes, nil and arrays is
    accepted (no ext types, nothing evaluated). Index values, if the record has
    them, are checked and dropped (``decode_indexed`` keeps them).
    """
    return [e[0] for e in _decode(payload, revision, where)]


def decode_indexed(payload: bytes, revision: int,
                   where: str = "") -> list[tuple[Event, IxVals | None, IxVals | None]]:
    """Like ``decode``, with each event's index values and its prev_kv's (None: none)."""
    return _decode(payload, revision, where)


def _check_ix(ix: Any) -> None:
    if ix is not None:
        if type(ix) is not tuple:
            raise ValueError("bad index values")
        for vs in ix:
            if type(vs) is not tuple or not all(type(v) is bytes for v in vs):
                raise ValueError("bad index values")


def _decode(payload: bytes, revision: int,
            where: str) -> list[tuple[Event, IxVals | None, IxVals | None]]:
    try:
        raw = msgpack.unpackb(payload, raw=False, use_list=False, strict_map_key=True,
                              max_str_len=0, max_map_len=0, max_ext_len=0,
                              max_array_len=len(payload))
    except Exception as exc:
        raise CorruptSegmentError(f"record at revision {revision} does not decode: {exc}",
                                  segment=where) from None
    if type(raw) is not tuple:
        raise CorruptSegmentError(f"record at revision {revision} is not an event array",
                                  segment=where)
    out = []
    try:
        for t in raw:
            if type(t) is not tuple:
                raise ValueError("an event is not an array")
            if len(t) == 8:
                typ, key, value, create, mod, version, lease, prev = t
                ix = pix = None
            else:
                typ, key, value, create, mod, version, lease, prev, ix, pix = t
                _check_ix(ix)
                _check_ix(pix)
            # Exact types: msgpack true/1.0 compare equal to EVENT_DELETE and
            # false/0.0 to EVENT_PUT, and must not pass for them (tests/test_codec.py).
            if type(typ) is not int or type(key) is not bytes or type(value) is not bytes \
                    or type(mod) is not int \
                    or type(create) is not int or type(version) is not int \
                    or type(lease) is not int or mod != revision:
                raise ValueError("bad field types or revision")
            kv = kv_new(KeyValue, (key, value, create, mod, version, lease))
            if prev is not None:
                pk, pv, pc, pm, pver, pl = prev
                if type(pk) is not bytes or type(pv) is not bytes or type(pc) is not int \
                        or type(pm) is not int or type(pver) is not int or type(pl) is not int:
                    raise ValueError("bad prev_kv field types")
                prev = kv_new(KeyValue, prev)
            if typ == _PUT:
                out.append((kv_new(Event, ("PUT", kv, prev, revision)), ix, pix))
            elif typ == _DELETE:
                out.append((kv_new(Event, ("DELETE", kv, prev, revision)), ix, pix))
            else:
                raise ValueError(f"unknown event type {typ!r}")
    except (ValueError, TypeError) as exc:
        raise CorruptSegmentError(f"record at revision {revision} holds a malformed event: {exc}",
                                  segment=where) from None
    if not out:
        raise CorruptSegmentError(f"record at revision {revision} holds no events", segment=where)
    return out


def kv_tuple(kv: Any) -> KVTuple:
    return (kv.key, kv.value, kv.create_revision, kv.mod_revision, kv.version, kv.lease)


def key_text(b: bytes) -> str:
    """Key bytes for a log line or a message: the text itself, not a bytes repr."""
    return b.decode("utf-8", "backslashreplace")
