"""RecentIndex: per secondary index, what the keys changed since the snapshot add to and
take from its answers (the View keeps one, reads by index merge it with the snapshot's).

Concurrency contract: owned by one View, used under its Reader's lock.
"""

from __future__ import annotations

from sortedcontainers import SortedSet

from ..format.indexspec import IxVals, vals


class RecentIndex:
    """Per index, for the keys changed since the snapshot: value -> the keys that have it
    now, and value -> the change of its key count."""

    __slots__ = ("keys", "count_change")

    def __init__(self, n: int) -> None:
        self.keys: list[dict[bytes, SortedSet]] = [{} for _ in range(n)]
        self.count_change: list[dict[bytes, int]] = [{} for _ in range(n)]

    def apply(self, key: bytes, ix: IxVals | None, pix: IxVals | None) -> None:
        if not ix and not pix:
            return
        for i, (keys, count_change) in enumerate(zip(self.keys, self.count_change, strict=True)):
            for v in vals(pix, i):
                count_change[v] = count_change.get(v, 0) - 1
                s = keys.get(v)
                if s is not None:
                    s.discard(key)
            for v in vals(ix, i):
                count_change[v] = count_change.get(v, 0) + 1
                s = keys.get(v)
                if s is None:
                    s = keys[v] = SortedSet()
                s.add(key)
