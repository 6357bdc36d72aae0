"""The writer's secondary indexes: each key's index values and, per index, the sorted
(value, key) pairs an index segment is built from.

Values are computed once per event (indexspec.IndexSet.values), go into the
ring record beside the event (readers' recent changes and watches need them)
and into these structures, from which each snapshot's index segment is laid
out (indexseg.build).

Concurrency contract: used by the thread that runs the writer only; ``freeze``
hands the snapshot build thread copies it may read while this one goes on.
"""

from __future__ import annotations

from collections.abc import Iterable

from sortedcontainers import SortedList

from ..format.indexspec import IndexSet, IxVals


class Indexer:
    def __init__(self, iset: IndexSet) -> None:
        self.iset = iset
        self.ixv: dict[bytes, IxVals] = {}  # keys with at least one index value
        self.pairs: list[SortedList] = [SortedList() for _ in iset.defs]

    def reset(self, items: Iterable[tuple[bytes, tuple[bytes, int, int, int, int]]]) -> None:
        """Recompute everything for a whole state (a relist, a restore)."""
        values = self.iset.values
        ixv = {}
        pairs: list[list[tuple[bytes, bytes]]] = [[] for _ in self.iset.defs]
        for key, v in items:
            ix = values(key, v[0])
            if ix:
                ixv[key] = ix
                for i, vs in enumerate(ix):
                    pairs[i].extend((x, key) for x in vs)
        self.ixv = ixv
        self.pairs = [SortedList(p) for p in pairs]

    def values(self, key: bytes, value: bytes) -> IxVals:
        return self.iset.values(key, value)

    def current(self, key: bytes) -> IxVals | None:
        return self.ixv.get(key)

    def commit(self, key: bytes, ix: IxVals | None) -> None:
        """``key`` now has the values ``ix`` (None or (): none; a delete)."""
        old = self.ixv.pop(key, None)
        if old == ix or (not old and not ix):
            if ix:
                self.ixv[key] = ix
            return
        for i, sl in enumerate(self.pairs):
            was = old[i] if old else ()
            now = ix[i] if ix else ()
            if was == now:
                continue
            for v in was:
                if v not in now:
                    sl.remove((v, key))
            for v in now:
                if v not in was:
                    sl.add((v, key))
        if ix:
            self.ixv[key] = ix

    def freeze(self) -> list[list[tuple[bytes, bytes]]]:
        """Copies of the sorted pairs, for a snapshot build (O(pairs), C-speed iteration)."""
        return [list(sl) for sl in self.pairs]
