"""Paginated lists: continue tokens, and a page at the first page's revision.

A token is opaque to users: url-safe base64 of a msgpack array ``[1, cache, epoch,
revision, prefix, last_key]``. The next page is read at ``revision`` (a read at a
past revision once the cache has moved on, see history), so every page of one
listing is exact at the same revision, as etcd's and Kubernetes' paginated lists
are. ``last_key`` None means "from the start of the prefix" (a page of limit 0).
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import msgpack

from ..errors import ExpiredTokenError
from ..types import KeyValue, ListResult

_VERSION = 1


def encode(cache: str, epoch: int, revision: int, prefix: bytes, last: bytes | None) -> str:
    raw = msgpack.packb([_VERSION, cache, epoch, revision, prefix, last], use_bin_type=True)
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def decode(token: str, cache: str, prefix: bytes, epoch: int,
           compact_revision: int) -> tuple[int, bytes | None]:
    """(revision, last key) of a token for this cache, prefix and epoch; ValueError otherwise
    (ExpiredTokenError, also a CompactedError, for an epoch the cache has left)."""
    if not isinstance(token, str) or not token:
        raise ValueError("continue_token must be a token from ListResult.continue_token")
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        fields: Any = msgpack.unpackb(raw, raw=False, strict_map_key=True)
        version, t_cache, t_epoch, revision, t_prefix, last = fields
        if version != _VERSION or type(t_cache) is not str or type(t_epoch) is not int \
                or type(revision) is not int or type(t_prefix) is not bytes \
                or not (last is None or type(last) is bytes):
            raise TypeError
    except (binascii.Error, ValueError, TypeError, msgpack.UnpackException):
        raise ValueError("continue_token is not a token shmcache made") from None
    if t_cache != cache:
        raise ValueError(f"continue_token belongs to cache {t_cache!r}, not {cache!r}")
    if t_prefix != prefix:
        raise ValueError(f"continue_token belongs to {_listing(t_prefix)}, not to "
                         f"{_listing(prefix)}")
    if t_epoch != epoch:
        raise ExpiredTokenError(
            f"continue_token belongs to epoch {t_epoch} of cache {cache!r}, which has reset "
            f"its history since (now epoch {epoch}): list again",
            compact_revision=compact_revision)
    return revision, last


_INDEX = b"\0index\0"
_RANGE = b"\0range\0"


def index_bound(index: str, value: bytes, shard: tuple[int, int] | None = None) -> bytes:
    """What a by_index token is bound to, in place of a list's prefix."""
    bound = _INDEX + index.encode() + b"\0" + value
    return bound if shard is None else _pack_range(bound, None, shard)


def range_bound(start: bytes, end: bytes | None, prefix_end: bytes | None,
                shard: tuple[int, int] | None) -> bytes:
    """What a token of the range [start, end) (of one shard) is bound to: for a prefix's
    range (``end == prefix_end``) without a shard, the prefix, so that ``list(p)`` and
    ``range(p, end of p)`` page with the same tokens."""
    if end == prefix_end and shard is None:
        return start
    return _pack_range(start, end, shard or (0, 0))


def _pack_range(start: bytes, end: bytes | None, shard: tuple[int, int]) -> bytes:
    raw: bytes = msgpack.packb([start, end, *shard], use_bin_type=True)
    return _RANGE + raw


def _listing(bound: bytes) -> str:
    """A token's bound as the user wrote the call, not as the token encodes it."""
    if bound.startswith(_RANGE):
        start, end, i, n = msgpack.unpackb(bound[len(_RANGE):])
        shard = f" shard=({i}, {n})" if n else ""
        if end is None and start.startswith(_INDEX):
            return _listing(start) + shard
        return f"the range [{start!r}, {end!r}){shard}"
    if bound.startswith(_INDEX):
        index, _, value = bound[len(_INDEX):].partition(b"\0")
        return f"by_index({index.decode(errors='replace')!r}, {value!r})"
    return f"the listing of prefix {bound!r}"


def page(items: list[KeyValue], limit: int | None, revision: int, cache: str, epoch: int,
         prefix: bytes) -> ListResult:
    """The ListResult of up to ``limit`` items from ``items`` (read with one more than
    ``limit``, so that whether keys remain is known without another read)."""
    if limit is None or len(items) <= limit:
        return ListResult(items, revision)
    items = items[:limit]
    last = items[-1].key if items else None
    return ListResult(items, revision, more=True,
                      continue_token=encode(cache, epoch, revision, prefix, last))
