"""Range reads: ``Reader.list``, ``range``, ``iter_list`` and ``count``, as etcd's Range.

One code path for all of them: a read is the key range [start, end) (``list(prefix)``
is the range of the prefix), optionally one shard of it and keys only, at the
current revision (the snapshot walked in place, plus the changes since it:
view) or a past one (history), paginated with pages' tokens. etcd's
``range_end`` meanings: None the single key, ``b"\\0"`` every key >= key, else
[key, range_end).

Concurrency contract: as the Reader's (each call counts itself in its uses and
reads its view under its lock; a walk of the snapshot alone runs outside it).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .. import _args
from ..types import CountResult, KeyValue, ListResult
from . import history as _history
from . import pages as _pages
from .view import lookup
from .view import range_end as prefix_end

if TYPE_CHECKING:
    from .lifetime import Lifetime
    from .view import View

# ``range``'s range_end for "every key >= key" (etcd's spelling).
FROM_KEY = b"\0"
_PREFIX: Any = object()  # the range of the prefix ``key`` (list's form)


class RangeReads:
    """The Reader's range reads (mixed into Reader)."""

    name: str
    _life: Lifetime
    _lock: threading.RLock
    _view: View
    _revision: int
    _prefix: bytes

    def _refresh(self) -> None: ...  # (Reader's)
    def _wait_min(self, min_revision: int | None, timeout: float | None) -> None: ...

    def list(self, prefix: bytes | str = b"", limit: int | None = None, *,
             revision: int | None = None, min_revision: int | None = None,
             timeout: float | None = None, continue_token: str | None = None,
             keys_only: bool = False, shard: tuple[int, int] | None = None) -> ListResult:
        """Every key starting with ``prefix``, sorted, exact at the returned ``.revision``.

        ``prefix`` defaults to the cache's whole range. ``limit`` caps the number
        of items (the first ones in key order); ``.more`` then says whether keys
        remain and ``.continue_token`` continues the listing: the next page is exact
        at the first page's revision (CompactedError once the cache no longer holds
        it: list again). ``revision``: the range as etcd had it at that revision
        (see ``get``). ``min_revision``/``timeout``: wait for the cache to reach a
        revision first. ``keys_only``: values empty (not copied), revisions exact.
        ``shard=(i, n)``: only the keys with ``zlib.crc32(key) % n == i``.
        """
        prefix = _args.as_bytes(prefix, "prefix")
        return self._read(prefix, _PREFIX, limit, revision, min_revision, timeout,
                          continue_token, keys_only, shard)

    def range(self, key: bytes | str, range_end: bytes | str | None = None, *,
              limit: int | None = None, continue_token: str | None = None,
              revision: int | None = None, keys_only: bool = False,
              shard: tuple[int, int] | None = None, min_revision: int | None = None,
              timeout: float | None = None) -> ListResult:
        """The keys in etcd's range of ``key`` and ``range_end``, sorted, exact at ``.revision``.

        ``range_end`` None: the single key; ``b"\\0"``: every key >= ``key``; otherwise
        [key, range_end) (empty when range_end <= key). ValueError when the range
        reaches outside the cache's prefix. Everything else as for ``list``
        (tokens, pages at the first page's revision, the same errors).
        """
        key = _args.as_bytes(key, "key")
        end = None if range_end is None else _args.as_bytes(range_end, "range_end")
        return self._read(key, end, limit, revision, min_revision, timeout, continue_token,
                          keys_only, shard)

    def iter_list(self, prefix: bytes | str = b"", page_size: int = 1000, *,
                  keys_only: bool = False,
                  shard: tuple[int, int] | None = None) -> Iterator[KeyValue]:
        """Every KeyValue under ``prefix`` at the first page's revision, ``page_size`` at a
        time (memory O(page)); CompactedError if the cache stops holding that revision.
        ``keys_only``, ``shard``: as for ``list``."""
        _args.count(page_size, "page_size", minimum=1)
        res = self.list(prefix, limit=page_size, keys_only=keys_only, shard=shard)
        yield from res.items
        while res.continue_token is not None:
            res = self.list(prefix, limit=page_size, continue_token=res.continue_token,
                            keys_only=keys_only, shard=shard)
            yield from res.items

    def count(self, prefix: bytes | str = b"", *, range_end: bytes | str | None = None,
              revision: int | None = None) -> CountResult:
        """How many keys start with ``prefix`` (with ``range_end``: are in etcd's range of
        ``prefix`` and ``range_end``, as for ``range``), exact at the returned
        ``.revision``: etcd's ``count_only``. O(log n) in the snapshot plus the keys
        changed since it (and since ``revision``); no value is copied.
        """
        key = _args.as_bytes(prefix, "prefix")
        end = _PREFIX if range_end is None else _args.as_bytes(range_end, "range_end")
        _args.read_args(revision, None, None)
        with self._life, self._lock:
            self._refresh()
            start, stop, _bound = self._bounds(key, end, None)
            current = self._revision
            at = current if revision is None else revision
            return CountResult(count_at(self._view, start, stop, at, current), at)

    def _bounds(self, key: bytes, end: Any,
                shard: tuple[int, int] | None) -> tuple[bytes, bytes | None, bytes]:
        """(start, end, token bound) of a read; ValueError outside the cache's range.
        ``end``: _PREFIX for the prefix ``key``'s range, else etcd's range_end."""
        p, p_end = self._prefix, self._view.prefix_end
        if end is _PREFIX:
            if not key:
                key = p
            elif p and not key.startswith(p):
                raise ValueError(f"prefix {key!r} is outside the key range of cache "
                                 f"{self.name!r} (prefix {p!r})")
            start, stop = key, prefix_end(key)
        else:
            if not key:
                raise ValueError("key must not be empty (etcd's Range needs one: every key "
                                 "is key=b'\\0', range_end=b'\\0')")
            start = key
            stop = key + b"\0" if end is None else None if end == FROM_KEY else end
            empty = stop is not None and stop <= start
            if start < p or (p_end is not None and (
                    start >= p_end if empty else stop is None or stop > p_end)):
                shown = f"key {key!r}" if end is None else f"range [{key!r}, {end!r})"
                raise ValueError(f"{shown} is outside the key range of cache {self.name!r} "
                                 f"(prefix {p!r})")
        return start, stop, _pages.range_bound(start, stop, prefix_end(start), shard)

    def _read(self, key: bytes, end: Any, limit: int | None, revision: int | None,
              min_revision: int | None, timeout: float | None, continue_token: str | None,
              keys_only: bool, shard: Any) -> ListResult:
        """list and range: one page of [start, end) (see the module docstring)."""
        _args.page_args(limit, revision, continue_token, min_revision, timeout)
        shard = _args.shard(shard)
        keys_only = bool(keys_only)
        with self._life:
            if min_revision is not None:
                self._wait_min(min_revision, timeout)
            want = -1 if limit is None else limit + 1  # one more: whether keys remain
            with self._lock:
                self._refresh()
                start, stop, bound = self._bounds(key, end, shard)
                v = self._view
                if continue_token is not None:
                    revision, last = v.decode_token(continue_token, bound)
                    if last is not None:
                        start = last + b"\0"
                if stop is not None and stop <= start:
                    stop = start  # (an empty range: each layer reads nothing)
                if revision is not None and revision != self._revision:
                    items = items_at(v, start, stop, want, revision, self._revision, keys_only,
                                     shard)
                    return _pages.page(items, limit, revision, self.name, v.epoch, bound)
                snap, revision, epoch = v.snap, self._revision, v.epoch
                assert snap is not None
                if v.changed(start, stop, 1, True, shard):
                    return _pages.page(v.page(start, stop, want, keys_only, shard), limit,
                                       revision, self.name, epoch, bound)
            # Nothing in the range changed since the snapshot: its walk alone, outside the lock.
            return _pages.page(snap.range_list(start, stop, want, keys_only, shard), limit,
                               revision, self.name, epoch, bound)


def items_at(v: View, start: bytes, end: bytes | None, limit: int, revision: int,
             current: int, keys_only: bool, shard: tuple[int, int] | None) -> list[KeyValue]:
    """The keys in [start, end) as etcd had them at ``revision``, at most ``limit`` (-1:
    all): O(limit + changes among them) once the Undo of ``revision`` is read (see
    history.past_page). Under the Reader's lock."""
    u = v.undo(revision, current)
    return _history.past_page(
        lambda n: v.page(start, end, n, keys_only, shard), u,
        lambda last: _history.of_shard(u.keys_in(start, last, end), shard), limit, keys_only)


def count_at(v: View, start: bytes, end: bytes | None, revision: int, current: int) -> int:
    """How many keys [start, end) held at ``revision`` (within the window), never copying
    a value: the snapshot's count (two verified binary searches), plus each key changed
    since it that exists now and did not then, minus the reverse; at a past revision,
    likewise for the keys changed after it (their Undo, as past pages use). Under the
    Reader's lock."""
    u = v.undo(revision, current) if revision != current else None  # (raises outside the window)
    if end is not None and end <= start:
        return 0
    snap = v.snap
    assert snap is not None
    n = (snap.count if end is None else snap.bisect(end)) - snap.bisect(start)
    changes = v.changed(start, end, -1, keys_only=True)
    n += sum(kv is not None for _k, kv in changes) - snap.present([k for k, _kv in changes])
    if u is not None:
        layers, prev = v.layers, u.prev
        for k in u.keys_in(start, None, end):
            n += (prev[k][0] is not None) - (lookup(layers, k, True) is not None)
    return n
