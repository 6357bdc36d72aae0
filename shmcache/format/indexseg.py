"""Index segments: every secondary index of one snapshot, immutable once published,
searched in place.

Per index, a value table sorted by value bytes (binary search: a lookup, not a
scan) whose entries each point at a run of postings, the keys with that value
sorted by key. Readers take a run's keys and read their entries from the
snapshot of the same revision (a hash probe each, batched so that their cache
misses overlap: see _speedups.index_run), so nothing is decoded but
what is answered, and nobody parses JSON: the writer computed the values.

Concurrency contract: like a snapshot, the writer fills a new segment before the
control segment points at the snapshot it goes with, and never writes it again.
Every offset and length read from it is bounded before use; the header's CRC
covers the directory, value entries carry a check word and postings their key's
CRC; a posting whose key the snapshot lacks, or a run out of key order, is
reported as corruption.
"""

from __future__ import annotations

import itertools
import operator
import struct
import zlib
from array import array
from collections.abc import Iterator, Sequence
from typing import Any

from ..errors import CorruptSegmentError
from ..types import KeyValue
from . import layout
from .mapped import MappedSegment
from .snapshot import Snapshot
from .speedups import USE_SPEEDUPS, _speedups

_HDR = layout.IDX_HEADER
_DIR = layout.IDX_DIR
_VAL = layout.IDX_VALUE
_POST = layout.IDX_POSTING
_CHECK = struct.Struct("<QIQQ")
_crc32 = zlib.crc32
HEADER_SIZE = layout.IDX_HEADER_SIZE


def value_check(value: bytes | memoryview, voff: int, vlen: int, first: int, count: int) -> int:
    return _crc32(value, _crc32(_CHECK.pack(voff, vlen, first, count)))


def build(pairs: Sequence[Sequence[tuple[bytes, bytes]]], snap_seq: int, revision: int,
          epoch: int) -> tuple[int, Any]:
    """Lay out the segment of ``pairs`` (per index, (value, key) sorted and unique);
    returns ``(size, fill)`` where ``fill(buf)`` writes it, header last.

    O(postings), the per-posting part in C with the speedups (index_table; pure
    Python otherwise): the writer runs it in the snapshot build thread.
    """
    n = len(pairs)
    vbytes = bytearray()
    kbytes = bytearray()
    tables: list[tuple[bytes | bytearray, bytes, int, int]] = []
    for ipairs in pairs:
        if USE_SPEEDUPS:  # the same tables, in C (_speedups.index_table; docs/design.md, "The C speedups")
            vtab_c, posts_c, nvals, vpart, kpart = _speedups.index_table(
                ipairs if isinstance(ipairs, list) else list(ipairs), len(kbytes),
                len(vbytes))
            vbytes += vpart
            kbytes += kpart
            tables.append((vtab_c, posts_c, nvals, len(posts_c) // _POST.size))
            continue
        vtab = bytearray()
        posts: array[int] = array("Q")
        nvals = 0
        for value, group in itertools.groupby(ipairs, key=lambda p: p[0]):
            first = len(posts) // 2
            for _v, key in group:
                posts.append(len(kbytes))
                posts.append(len(key) | _crc32(key) << 32)
                kbytes += key
            count = len(posts) // 2 - first
            voff = len(vbytes)
            vbytes += value
            vtab += _VAL.pack(voff, len(value), value_check(value, voff, len(value), first,
                                                               count), first, count)
            nvals += 1
        # native order: little-endian on every platform we run on
        tables.append((vtab, posts.tobytes(), nvals, len(posts) // 2))
    off = HEADER_SIZE + _DIR.size * n
    directory = bytearray()
    placed = []
    for table, raw, count, npost in tables:
        voff = off
        poff = voff + len(table)
        off = poff + len(raw)
        directory += _DIR.pack(voff, count, poff, npost)
        placed.append((voff, table, poff, raw))
    values_off = off
    keys_off = layout.align8(values_off + len(vbytes))
    total = keys_off + len(kbytes)

    def fill(buf: Any) -> None:
        body = bytearray(total - HEADER_SIZE)
        b0 = HEADER_SIZE
        body[0:len(directory)] = directory
        for voff, vtab, poff, raw in placed:
            body[voff - b0:voff - b0 + len(vtab)] = vtab
            body[poff - b0:poff - b0 + len(raw)] = raw
        body[values_off - b0:values_off - b0 + len(vbytes)] = vbytes
        body[keys_off - b0:] = kbytes
        buf[HEADER_SIZE:total] = body
        header = bytearray(HEADER_SIZE)
        _HDR.pack_into(header, 0, layout.MAGIC[layout.KIND_INDEX], layout.FORMAT_VERSION,
                       layout.KIND_INDEX, snap_seq, revision, epoch, n, values_off, len(vbytes),
                       keys_off, len(kbytes), total, _crc32(body), 0)
        hcrc = _crc32(directory, _crc32(memoryview(header)[:layout.IDX_HEADER_CRC_SPAN]))
        header[layout.IDX_HEADER_CRC_SPAN:_HDR.size] = hcrc.to_bytes(4, "little")
        buf[0:HEADER_SIZE] = header

    return total, fill


class IndexSegment(MappedSegment):
    """Read-only view of one index segment."""

    def _read_header(self) -> None:
        name, buf, size = self.name, self.buf, self.size
        if size < HEADER_SIZE:
            raise self._corrupt(f"segment is {size} bytes, smaller than a header")
        (magic, version, kind, snap_seq, revision, epoch, n, values_off, values_len, keys_off,
         keys_len, total, body_crc, hcrc) = _HDR.unpack_from(buf, 0)
        if magic != layout.MAGIC[layout.KIND_INDEX] or kind != layout.KIND_INDEX:
            raise self._corrupt(f"bad index segment magic {magic!r}")
        layout.check_version(version, "index segment", name)
        if (total != size or n > 64 or HEADER_SIZE + _DIR.size * n > values_off
                or values_off + values_len > keys_off or keys_off + keys_len != total):
            raise self._corrupt(f"inconsistent index segment header (indexes={n}, "
                                f"total={total}, size={size})")
        dir_end = HEADER_SIZE + _DIR.size * n
        if _crc32(self.memview[HEADER_SIZE:dir_end],
                  _crc32(self.memview[:layout.IDX_HEADER_CRC_SPAN])) != hcrc:
            raise self._corrupt("index segment header checksum mismatch")
        self.snap_seq, self.revision, self.epoch, self.count = snap_seq, revision, epoch, n
        self.values_off, self.values_end = values_off, values_off + values_len
        self.keys_off, self.keys_end = keys_off, keys_off + keys_len
        self.body_crc = body_crc
        self.dirs = []
        for i in range(n):
            voff, nvals, poff, npost = _DIR.unpack_from(buf, HEADER_SIZE + _DIR.size * i)
            if (voff < HEADER_SIZE or voff + _VAL.size * nvals > poff
                    or poff + _POST.size * npost > values_off or voff & 7 or poff & 7):
                raise self._corrupt(f"directory entry {i} points outside the segment")
            self.dirs.append((voff, nvals, poff, npost))

    def _entry(self, i: int, j: int) -> tuple[bytes, int, int]:
        """Value j of index i: (value, first posting, count), checked."""
        voff, _nvals, _poff, npost = self.dirs[i]
        off, vlen, check, first, count = _VAL.unpack_from(self.buf, voff + _VAL.size * j)
        start = self.values_off + off
        if start + vlen > self.values_end or first + count > npost or count == 0:
            raise self._corrupt(f"index {i} value {j} points outside the segment")
        value = self.buf[start:start + vlen]
        if value_check(value, off, vlen, first, count) != check:
            raise self._corrupt(f"index {i} value {j} fails its check")
        return value, first, count

    def lookup(self, i: int, value: bytes) -> tuple[int, int]:
        """(first posting, count) of ``value`` in index ``i``; count 0 if it has no keys."""
        lo, hi = 0, self.dirs[i][1]
        while lo < hi:
            mid = (lo + hi) >> 1
            v, first, count = self._entry(i, mid)
            if v < value:
                lo = mid + 1
            elif v > value:
                hi = mid
            else:
                return first, count
        return 0, 0

    def key(self, i: int, p: int) -> bytes:
        """The key of posting ``p`` of index ``i``."""
        koff, klen, kcrc = _POST.unpack_from(self.buf, self.dirs[i][2] + _POST.size * p)
        start = self.keys_off + koff
        if start + klen > self.keys_end:
            raise self._corrupt(f"index {i} posting {p} points outside the key area")
        k: bytes = self.buf[start:start + klen]
        if _crc32(k) != kcrc:
            raise self._corrupt(f"index {i} posting {p} or its key fails its checksum")
        return k

    def run_keys(self, i: int, value: bytes, after: bytes | None, limit: int) -> list[bytes]:
        """The keys with ``value`` in index ``i`` (above ``after``), in key order, at most
        ``limit`` (-1: all).

        A binary search of the run first, so a page at any offset costs
        O(log run + page). Keys that do not strictly increase raise. With the C
        speedups, all of it is one call (_speedups.index_run, the same checks).
        """
        if USE_SPEEDUPS:
            voff, nvals, poff, npost = self.dirs[i]
            try:
                keys: list[bytes] = _speedups.index_run(
                    self.buf, voff, nvals, poff, npost, self.values_off, self.values_end,
                    self.keys_off, self.keys_end, value, after, limit)
                return keys
            except ValueError as exc:
                raise self._corrupt(f"index {i}: {exc}") from None
        first, count = self.lookup(i, value)
        lo, end = first, first + count
        if after is not None:
            hi = end
            while lo < hi:
                mid = (lo + hi) >> 1
                if self.key(i, mid) <= after:
                    lo = mid + 1
                else:
                    hi = mid
        if limit >= 0:
            end = min(end, lo + limit)
        base = self.dirs[i][2]
        buf, koff0 = self.buf, self.keys_off
        posts = list(_POST.iter_unpack(self.memview[base + 16 * lo:base + 16 * end]))
        if posts and max(o + n for o, n, _c in posts) > self.keys_end - koff0:
            raise self._corrupt(f"index {i} posting points outside the key area")
        keys = [buf[koff0 + o:koff0 + o + n] for o, n, _c in posts]
        # Each key against its posting's CRC, and strictly increasing: a damaged
        # posting or key byte is an error, never another key. (map/zip: C loops.)
        if list(map(_crc32, keys)) != [c for _o, _n, c in posts]:
            raise self._corrupt(f"index {i} posting or key fails its checksum")
        if keys and ((after is not None and keys[0] <= after)
                     or not all(map(operator.lt, keys, itertools.islice(keys, 1, None)))):
            raise self._corrupt(f"index {i} run of {value!r} is out of key order")
        return keys

    def run_items(self, i: int, value: bytes, after: bytes | None, limit: int,
                  skip: dict[bytes, Any], snap: Snapshot,
                  keys_only: bool = False) -> list[KeyValue]:
        """The KeyValues in ``snap`` (this segment's snapshot) of the keys with ``value`` in
        index ``i`` above ``after``, passing over the keys in ``skip`` (changed since the
        snapshot), in key order, at most ``limit`` (-1: all).

        Each skipped key costs one more posting, not a re-read: a page costs
        O(log run + page + skipped keys in it). With the C speedups, one call
        (index_run with a snapshot): it probes the snapshot with the postings'
        CRCs, which the snapshot's hash is. A key the snapshot lacks is damage.
        ``keys_only``: empty values (not copied).
        """
        if USE_SPEEDUPS:
            try:
                voff, nvals, poff, npost = self.dirs[i]
                items: list[KeyValue] = _speedups.index_run(
                    self.buf, voff, nvals, poff, npost, self.values_off, self.values_end,
                    self.keys_off, self.keys_end, value, after, limit, skip, snap.params,
                    keys_only)
                return items
            except CorruptSegmentError:
                raise  # the snapshot's damage, named by its lookup
            except ValueError as exc:
                raise self._corrupt(f"index {i}: {str(exc).removeprefix('missing: ')}") from None
        out: list[KeyValue] = []
        chunk = limit + 16
        while limit < 0 or len(out) < limit:
            keys = self.run_keys(i, value, after, -1 if limit < 0 else chunk)
            for k in keys:
                if k in skip:
                    continue
                kv = snap.get(k, keys_only)
                if kv is None:
                    raise self._corrupt(f"index {i}: index posting names key {k!r}, which "
                                        f"the snapshot lacks")
                out.append(kv)
                if len(out) == limit:
                    break
            if limit < 0 or len(keys) < chunk:
                break
            after, chunk = keys[-1], chunk * 2
        return out

    def values(self, i: int) -> Iterator[tuple[bytes, int]]:
        """Every (value, key count) of index ``i``, in value order."""
        for j in range(self.dirs[i][1]):
            v, _first, count = self._entry(i, j)
            yield v, count

    def check(self) -> list[str]:
        """The body checksum and every value entry and run; returns the violations."""
        problems = []
        if _crc32(self.memview[HEADER_SIZE:self.size]) != self.body_crc:
            problems.append(f"{self.name}: body checksum mismatch")
        try:
            for i in range(self.count):
                prev = None
                for v, _count in self.values(i):
                    if prev is not None and v <= prev:
                        problems.append(f"{self.name}: index {i} values out of order")
                    prev = v
                    self.run_keys(i, v, None, -1)
        except CorruptSegmentError as exc:
            problems.append(str(exc))
        return problems
