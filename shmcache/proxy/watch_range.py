"""The keys of an etcd watch (key, range_end) as a cache watch: a prefix for the Reader and a test.

etcd spells a watch's keys three ways (rpc.proto, WatchCreateRequest): an empty
``range_end`` is the single key ``key``; ``range_end`` b"\\0" is every key from
``key`` on; anything else is the range [key, range_end). An empty ``key`` is
b"\\0", the smallest key. A Reader watches by prefix; the longest prefix every
key of the range shares makes its demultiplexer skip most unrelated events,
and the test drops the rest. Pure functions, no state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..reader.view import range_end as prefix_end

__all__ = ["EmptyRange", "KeySelection", "select"]


class EmptyRange(ValueError):
    """``key`` >= ``range_end``: etcd refuses such a watch ("mvcc: watcher range is empty")."""


@dataclass(frozen=True)
class KeySelection:
    """A watch's keys: ``prefix`` for ``Reader.watch`` and ``matches`` for what it lets
    through beyond that prefix (None: every key under the prefix is in the range)."""

    prefix: bytes
    matches: Callable[[bytes], bool] | None


def select(key: bytes, range_end: bytes, cache_prefix: bytes) -> KeySelection | None:
    """The selection of a watch on (key, range_end) as etcd reads them, or None if some
    of its keys lie outside ``cache_prefix`` (the cache cannot see their changes).

    Raises EmptyRange for a range with no key in it.
    """
    if not key:
        key = b"\0"
    limit = prefix_end(cache_prefix)  # every key of the cache is below it (None: no bound)
    if not range_end:
        if not key.startswith(cache_prefix):
            return None
        return KeySelection(key, key.__eq__)
    if range_end == b"\0":  # every key from ``key`` on: the cache must hold the whole keyspace
        if limit is not None:
            return None
        return KeySelection(b"", None if key == b"\0" else (lambda k: k >= key))
    if key >= range_end:
        raise EmptyRange(f"range [{key!r}, {range_end!r}) is empty")
    if not key.startswith(cache_prefix) or (limit is not None and range_end > limit):
        return None
    if range_end == prefix_end(key):
        return KeySelection(key, None)  # a prefix watch (etcdctl watch --prefix)
    # Every key in [key, range_end) starts with what key and range_end have in common.
    n = 0
    while n < min(len(key), len(range_end)) and key[n] == range_end[n]:
        n += 1
    common = key[:n]
    prefix = common if len(common) >= len(cache_prefix) else cache_prefix
    return KeySelection(prefix, lambda k: key <= k < range_end)
