"""Reads by secondary index: ``Reader.by_index``, ``iter_by_index``, ``index_values``.

An answer at the current revision is the snapshot's run of keys for the value
(indexseg, a binary search), minus the keys changed since the snapshot, plus
the changed keys whose current values include it (``recentindex.RecentIndex``, kept
by the View from the index values the writer put into each ring record). A past
revision takes that answer back with the prev_kv and prev index values of the
first event after it, as ``list`` does (history). Nothing here parses JSON or
runs a user's function: the writer computed every value.

Concurrency contract: everything runs under the owning Reader's lock, counted in its
uses (a close() meanwhile leaves the mappings until it returns).
"""

from __future__ import annotations

import heapq
import itertools
import threading
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from .. import _args
from ..types import KeyValue, ListResult
from . import history as _history
from . import pages as _pages

if TYPE_CHECKING:
    from .lifetime import Lifetime
    from .view import View


def _position(v: View, name: str) -> int:
    for i, (n, _spec) in enumerate(v.index_defs):
        if n == name:
            return i
    have = ", ".join(n for n, _ in v.index_defs) or "none"
    raise ValueError(f"cache {v.cache!r} has no index {name!r} (its indexes: {have}; "
                     f"declare them with `shmcache serve NAME --index NAME=SPEC`)")


def _current(v: View, i: int, value: bytes, after: bytes | None, want: int,
             keys_only: bool = False, shard: tuple[int, int] | None = None) -> list[KeyValue]:
    """The keys with ``value`` in index ``i`` now (above ``after``), at most ``want`` (of
    ``shard``; ``keys_only``: empty values, not copied): the snapshot's run without the
    keys changed since, merged with the changed keys that have the value now. O(log run +
    want + changed keys passed over), whatever the offset; a shard's page reads the
    run's keys in growing chunks until it holds ``want`` of the shard's."""
    if shard is None:
        return _all_current(v, i, value, after, want, keys_only)
    out: list[KeyValue] = []
    n = want * shard[1] + 16 if want >= 0 else -1
    while True:
        chunk = _all_current(v, i, value, after, n, keys_only)
        out += [kv for kv in chunk if _history.in_shard(kv.key, shard)]
        if n < 0 or len(chunk) < n or len(out) >= want:
            return out if want < 0 else out[:want]
        after, n = chunk[-1].key, n * 2


def _all_current(v: View, i: int, value: bytes, after: bytes | None, want: int,
                 keys_only: bool) -> list[KeyValue]:
    snap, recent = v.snap, v.recent
    assert snap is not None and v.recent_index is not None
    items = v.indexes().run_items(i, value, after, want, recent, snap, keys_only)
    changed = v.recent_index.keys[i].get(value)
    if changed:
        keys: Iterable[bytes] = (changed if after is None
                                 else changed.irange(after, inclusive=(False, False)))
        if want >= 0:
            keys = itertools.islice(keys, want)
        extra = [recent[k] for k in keys]
        if keys_only:
            extra = [_history.strip(kv) for kv in extra]
        if extra:
            items = list(heapq.merge(items, extra, key=_history.key_of))
            if want >= 0:
                del items[want:]
    return items


def _at(v: View, i: int, value: bytes, after: bytes | None, want: int, revision: int,
        current: int, keys_only: bool, shard: tuple[int, int] | None) -> list[KeyValue]:
    """As ``_current``, at a past ``revision`` within the window (history.past_page)."""
    u = v.undo(revision, current)
    start = b"" if after is None else after + b"\0"
    return _history.past_page(
        lambda n: _current(v, i, value, after, n, keys_only, shard), u,
        lambda last: _history.of_shard(u.keys_with(i, value, start, last), shard), want,
        keys_only)


class IndexReads:
    """The Reader's reads by secondary index (mixed into Reader)."""

    name: str
    _life: Lifetime
    _lock: threading.RLock
    _view: View
    _revision: int

    def _refresh(self) -> None: ...  # (Reader's)
    def _wait_min(self, min_revision: int | None, timeout: float | None) -> None: ...

    def by_index(self, index: str, value: bytes | str, *, revision: int | None = None,
                 limit: int | None = None, continue_token: str | None = None,
                 min_revision: int | None = None, timeout: float | None = None,
                 keys_only: bool = False, shard: tuple[int, int] | None = None) -> ListResult:
        """The KeyValues whose ``index`` values include ``value``, sorted by key, exact at
        the returned ``.revision``: a lookup in the index, not a scan.

        ``revision``, ``limit``, ``continue_token``, ``min_revision``/``timeout``,
        ``keys_only``, ``shard``: as for ``list`` (a page continues at the first page's
        revision). ValueError for an index the cache does not have.
        """
        value = _args.as_bytes(value, "value")
        _args.page_args(limit, revision, continue_token, min_revision, timeout)
        shard = _args.shard(shard)
        keys_only = bool(keys_only)
        if min_revision is not None:
            self._wait_min(min_revision, timeout)
        want = -1 if limit is None else limit + 1
        bound = _pages.index_bound(index, value, shard)
        with self._life, self._lock:
            self._refresh()
            v = self._view
            i = _position(v, index)
            after = None
            if continue_token is not None:
                revision, after = v.decode_token(continue_token, bound)
            if revision is None or revision == self._revision:
                revision = self._revision
                items = v.with_retry(
                    lambda: _current(v, i, value, after, want, keys_only, shard), self._refresh)
            else:
                rev = revision
                items = v.with_retry(lambda: _at(v, i, value, after, want, rev, self._revision,
                                                 keys_only, shard), self._refresh)
            return _pages.page(items, limit, revision, self.name, v.epoch, bound)

    def iter_by_index(self, index: str, value: bytes | str, page_size: int = 1000, *,
                      keys_only: bool = False,
                      shard: tuple[int, int] | None = None) -> Iterator[KeyValue]:
        """``by_index`` page by page at the first page's revision (memory O(page))."""
        _args.count(page_size, "page_size", minimum=1)
        res = self.by_index(index, value, limit=page_size, keys_only=keys_only, shard=shard)
        yield from res.items
        while res.continue_token is not None:
            res = self.by_index(index, value, limit=page_size, continue_token=res.continue_token,
                                keys_only=keys_only, shard=shard)
            yield from res.items

    def index_values(self, index: str) -> dict[bytes, int]:
        """Every value of ``index`` now, with the number of keys that have it, sorted by value."""
        with self._life, self._lock:
            self._refresh()
            v = self._view
            i = _position(v, index)

            def read() -> dict[bytes, int]:
                assert v.recent_index is not None
                counts = dict(v.indexes().values(i))
                for val, d in v.recent_index.count_change[i].items():
                    counts[val] = counts.get(val, 0) + d
                return {k: counts[k] for k in sorted(counts) if counts[k] > 0}

            return v.with_retry(read, self._refresh)

    def _index_filter(self, index: Any) -> tuple[int, bytes] | None:
        """``watch(..., index=(name, value))`` -> (position, value) in the current epoch."""
        if index is None:
            return None
        if not isinstance(index, tuple) or len(index) != 2:
            raise ValueError("index= takes a (name, value) pair")
        with self._lock:
            self._refresh()
            return _position(self._view, index[0]), _args.as_bytes(index[1], "index value")
