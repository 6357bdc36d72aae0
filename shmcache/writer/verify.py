"""A cache verified against etcd: the live snapshot compared with etcd's range at its revision.

The published snapshot is immutable and exact at its revision R, so comparing it
with etcd's range *at R* needs no copy of the writer's state and no pause of its
watch loop: a paginated range read at R (keys only unless values are asked for:
key, create/mod revision, version and lease travel, values need not) merged in
key order with the snapshot's entries. A mismatch means the cache published
something etcd never held at R. etcd compacting past R during the round makes
the round inconclusive, not a mismatch.

Used by the writer's verifier thread (``--verify-interval``) and by
``shmcache check NAME --against-etcd``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..format import layout
from ..format.snapshot import Snapshot
from ..ipc import control_reader
from ..ipc import shm as _shm
from .etcd import connection as _etcd

log = logging.getLogger("shmcache.writer")

# Pages double from 2,000 to 50,000 keys, like the writer's list: etcd counts the
# rest of the range for every page, so small fixed pages make a large range quadratic.
PAGE = 2000


@dataclass
class Result:
    """One comparison: ``mismatches`` (count) and the first few, described."""

    revision: int
    keys: int = 0
    mismatches: int = 0
    first: list[str] = field(default_factory=list)
    seconds: float = 0.0
    etcd_bytes: int = 0  # bytes of etcd responses read

    def read_from_etcd(self, size: int) -> None:
        self.etcd_bytes += size


class Inconclusive(Exception):
    """etcd compacted past the revision while it was read, the snapshot went away, or etcd is
    another cluster than the one the cache was loaded from."""


def _etcd_items(conn: _etcd.Connection, key: bytes, range_end: bytes, revision: int,
                values: bool, res: Result) -> Iterator[tuple[bytes, tuple[Any, ...]]]:
    start, page = key, PAGE
    while True:
        try:
            kvs, more, size = conn.range_page(start, range_end, revision, page,
                                              keys_only=not values)
        except Exception as exc:
            if _etcd.is_compacted(exc):
                raise Inconclusive(f"etcd compacted past revision {revision}") from None
            raise
        res.read_from_etcd(size)
        for kv in kvs:
            yield kv.key, ((kv.value,) if values else ()) + (
                kv.create_revision, kv.mod_revision, kv.version, kv.lease)
        if not more or not kvs:
            return
        start = kvs[-1].key + b"\0"
        page = min(page * 2, _etcd.Connection.LIST_PAGE_MAX)


def compare(snap: Snapshot, conn: _etcd.Connection, key: bytes, range_end: bytes, *,
            values: bool = False, keep: int = 5) -> Result:
    """Compare snapshot ``snap`` with etcd's [key, range_end) at the snapshot's revision."""
    t0 = time.monotonic()
    res = Result(snap.revision)

    def note(text: str) -> None:
        res.mismatches += 1
        if len(res.first) < keep:
            res.first.append(text)

    ours = ((e.key, ((e.value,) if values else ()) + (e.create_revision, e.mod_revision,
                                                       e.version, e.lease))
            for e in snap.range(b"", None))
    theirs = _etcd_items(conn, key, range_end, snap.revision, values, res)
    a, b = next(ours, None), next(theirs, None)
    while a is not None or b is not None:
        if b is None or (a is not None and a[0] < b[0]):
            assert a is not None
            note(f"{a[0]!r} is in the cache but not in etcd")
            a = next(ours, None)
        elif a is None or b[0] < a[0]:
            note(f"{b[0]!r} is in etcd but not in the cache")
            b = next(theirs, None)
        else:
            if a[1] != b[1]:
                note(f"{a[0]!r} differs: cache {_fields(a[1], values)}, etcd {_fields(b[1], values)}")
            res.keys += 1
            a, b = next(ours, None), next(theirs, None)
    res.seconds = time.monotonic() - t0
    return res


def _fields(t: tuple[Any, ...], values: bool) -> str:
    names = (("value",) if values else ()) + ("create", "mod", "version", "lease")
    return ", ".join(f"{n} {v!r}" for n, v in zip(names, t, strict=True))


def compare_cache(name: str, conn: _etcd.Connection, *, values: bool = False) -> Result:
    """Compare cache ``name``'s live snapshot with etcd (``shmcache check --against-etcd``)."""
    ctl = control_reader.ControlReader.open(name)
    try:
        b = ctl.block()
        if b is None or b.snap_seq == 0:
            raise Inconclusive(f"cache {name!r} has no published snapshot to compare")
        if b.cluster_id and conn.cluster_id and b.cluster_id != conn.cluster_id:
            # Not a difference to repair: the writer relists on its own when it meets the
            # other cluster (a verifier that connected first would count a false mismatch).
            raise Inconclusive(f"etcd at {conn.endpoint} belongs to cluster "
                               f"{conn.cluster_id:x}, the cache was loaded from cluster "
                               f"{b.cluster_id:x}")
        prefix = ctl.prefix(b.prefix_len)
        seg = _shm.open_readonly(layout.snapshot_name(name, b.snap_seq))
        if seg is None:
            raise Inconclusive("the snapshot was replaced while it was opened; run again")
        snap = Snapshot(seg.name, seg.buf, seg.size)
        try:
            return compare(snap, conn, prefix or b"\0", layout.prefix_range_end(prefix),
                           values=values)
        finally:
            snap.close()
            seg.close()
    finally:
        ctl.close()


class Verifier:
    """The writer's thread: every ``interval`` seconds, compare the live snapshot with etcd.

    A mismatch is logged with the first differing keys, counted
    (``stats["verify_mismatches"]``) and handed to ``on_mismatch`` (the writer
    relists into a new epoch). Its own etcd connection: the watch is not slowed.
    ``run()`` returns soon after ``stopped`` is set and ``close()`` is called
    (the writer does both, then joins the thread).
    """

    def __init__(self, name: str, settings: _etcd.EtcdSettings, interval: float,
                 stats: dict[str, Any], stopped: threading.Event,
                 on_mismatch: Callable[[str], None]) -> None:
        self.name = name
        self.settings = settings
        self.interval = interval
        self.stats = stats
        self.stopped = stopped
        self.on_mismatch = on_mismatch
        self.conn = _etcd.Connection(self.settings)

    def close(self) -> None:
        """Cancel the etcd call a round may wait in (any thread); ``run()`` then returns
        once ``stopped`` is set."""
        self.conn.close()

    def run(self) -> None:
        conn = self.conn
        try:
            while not self.stopped.wait(self.interval):
                try:
                    if conn.channel is None:
                        conn.connect()
                    res = compare_cache(self.name, conn)
                except Inconclusive as exc:
                    log.info("verification skipped: %s", exc)
                    continue
                except Exception as exc:  # etcd down, a segment replaced: next round
                    if self.stopped.is_set():
                        break
                    log.info("verification skipped: %s", _etcd.describe(exc))
                    conn.close()
                    continue
                self.stats["verify_rounds"] += 1
                self.stats["verify_revision"] = res.revision
                self.stats["verify_seconds"] = res.seconds
                if res.mismatches:
                    self.stats["verify_mismatches"] += 1
                    reason = (f"the cache differs from etcd at revision {res.revision} in "
                              f"{res.mismatches} key(s): {'; '.join(res.first)}")
                    log.error("verification failed: %s; relisting", reason)
                    self.on_mismatch(reason)
                else:
                    log.debug("verified %d keys at revision %d in %.2fs", res.keys,
                              res.revision, res.seconds)
        finally:
            conn.close()
