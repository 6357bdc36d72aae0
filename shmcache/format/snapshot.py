"""Snapshot segments: the whole key range at one revision, immutable once published, searched in place.

A snapshot has a key-sorted index (for ``list(prefix)``: binary search to the first
key, then a sequential walk) and an open-addressing hash table keyed by
crc32(key) (for ``get``: no scan). Entries carry their own CRC, and every key a
read compares is in an entry whose CRC was checked first (the binary search's
answer is verified rather than each step: see ``_walk_start``), so a flipped byte
is CorruptSegmentError, never a miss or a short list. A reader maps the
segment read-only and decodes only the entries it touches, so its memory does
not grow with the number of keys.

Concurrency contract: the writer fills a new segment completely before the
control segment points at it and never writes it again; readers need no
synchronisation beyond the seqlock read of the control segment that gave them
its name.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

from ..errors import CorruptSegmentError
from ..types import KeyValue, kv_new
from . import layout
from .mapped import MappedSegment

# The C versions of get() and the range walk, or None: speedups.py chooses.
from .speedups import USE_SPEEDUPS as USE_SPEEDUPS  # (re-exported: tests patch it here)
from .speedups import _speedups as _speedups

_ENTRY = layout.SNAP_ENTRY
_ENTRY_SIZE = _ENTRY.size
_ENTRY_UNPACK = _ENTRY.unpack_from
_SLOT_UNPACK = layout.SNAP_SLOT.unpack_from
_Q_UNPACK = layout.SNAP_INDEX_ENTRY.unpack_from
_crc32 = zlib.crc32
HEADER_SIZE = 128


class Plan(NamedTuple):
    """Where everything of a snapshot with ``count`` entries taking ``data_len`` bytes goes."""

    count: int  # type: ignore[assignment]  # (shadows tuple.count, unused here)
    data_len: int
    slots: int
    index_off: int
    hash_off: int
    data_off: int
    total: int

    @classmethod
    def of(cls, count: int, data_len: int) -> Plan:
        slots = layout.hash_slots_for(count)
        index_off = HEADER_SIZE
        hash_off = index_off + 8 * count
        data_off = hash_off + 16 * slots
        return cls(count, data_len, slots, index_off, hash_off, data_off, data_off + data_len)


def entry_span(key: bytes, value: bytes) -> int:
    """Bytes an entry takes in the data area (entries are 8-aligned)."""
    return (_ENTRY_SIZE + len(key) + len(value) + 7) & ~7


Item = tuple[bytes, tuple[bytes, int, int, int, int]]


def write(buf: Any, plan: Plan, revision: int, epoch: int, keys: list[bytes],
          values: list[tuple[bytes, int, int, int, int] | None],
          base: Snapshot | None = None, kind: int = layout.KIND_SNAPSHOT) -> None:
    """Fill a new segment with ``base``'s entries overlaid with ``keys``/``values``.

    ``keys`` are sorted and unique; each value is ``(value, create, mod,
    version, lease)`` or None for a key that is gone (absent from ``base`` is
    fine). ``plan`` must give the exact count and data size of the result: the
    writer tracks both as it applies events, so a build needs no sizing pass.
    Without ``base`` the lists are the whole state. ``kind`` KIND_OVERLAY writes an
    delta segment: the same layout, whose tombstones are entries with version 0
    (written as such: pass ``(b"", 0, 0, 0, 0)``, not None).

    Concurrency contract: the caller owns ``buf`` (a segment nobody maps yet)
    and the lists, which must not change during the call; ``base`` is an
    immutable published snapshot. The C build releases the GIL while it copies,
    so the writer runs it in a thread beside the watch loop (see writer.py).
    The header goes in last, so a half-written segment never looks valid.
    Raises ValueError when the entries do not match the plan, and
    CorruptSegmentError when ``base`` fails its checks.
    """
    if USE_SPEEDUPS:
        geometry = (plan.index_off, plan.hash_off, plan.slots, plan.data_off,
                    plan.data_off + plan.data_len, plan.count)
        base_params = (None if base is None else
                       (base.buf, base.index_off, base.count, base.data_off, base.data_end))
        try:
            body_crc = _speedups.build(buf, geometry, keys, values, base_params)
        except ValueError as exc:
            if base is not None and str(exc).startswith("base snapshot"):
                raise base._corrupt(str(exc)) from None
            raise
    else:
        items = _merged(base, keys, values) if base is not None else zip(keys, values, strict=False)
        body_crc = _fill(buf, plan, items)  # type: ignore[arg-type]
    header = bytearray(HEADER_SIZE)
    layout.SNAP_HEADER.pack_into(
        header, 0, layout.MAGIC[kind], layout.FORMAT_VERSION, kind, revision, epoch,
        plan.count, plan.index_off, plan.hash_off,
        plan.slots, plan.data_off, plan.data_len, plan.total, body_crc, 0)
    hcrc = _crc32(memoryview(header)[:layout.SNAP_HEADER_CRC_SPAN])
    header[layout.SNAP_HEADER_CRC_SPAN:layout.SNAP_HEADER.size] = hcrc.to_bytes(4, "little")
    buf[0:HEADER_SIZE] = header


def _merged(base: Snapshot, keys: list[bytes],
            values: list[tuple[bytes, int, int, int, int] | None]) -> Iterator[Item]:
    """``base``'s entries merged with the changes, in key order (the pure-Python build)."""
    changes = iter(zip(keys, values, strict=False))
    change = next(changes, None)
    for kv in base.range(b"", None):
        while change is not None and change[0] < kv.key:
            if change[1] is not None:
                yield change  # type: ignore[misc]
            change = next(changes, None)
        if change is not None and change[0] == kv.key:
            if change[1] is not None:
                yield change  # type: ignore[misc]
            change = next(changes, None)
        else:
            yield kv.key, (kv.value, kv.create_revision, kv.mod_revision, kv.version, kv.lease)
    while change is not None:
        if change[1] is not None:
            yield change  # type: ignore[misc]
        change = next(changes, None)


def _fill(buf: Any, plan: Plan, items: Iterable[Item]) -> int:
    """Write the data area, index and hash table; returns the body CRC (pure Python)."""
    count, slots, data_off = plan.count, plan.slots, plan.data_off
    data_end = data_off + plan.data_len
    index = bytearray(8 * count)
    table = bytearray(16 * slots)
    mask = slots - 1
    pack_q = layout.SNAP_INDEX_ENTRY.pack_into
    pack_slot = layout.SNAP_SLOT.pack_into
    unpack_slot = _SLOT_UNPACK
    pack_entry = _ENTRY.pack_into
    chunk = bytearray()
    chunk_start = data_off
    off = data_off
    n = 0
    body_crc = 0
    prev = None
    for key, (value, create, mod, version, lease) in items:
        klen, vlen = len(key), len(value)
        size = layout.align8(_ENTRY_SIZE + klen + vlen)
        if n >= count or off + size > data_end:
            raise ValueError(f"the entries outgrow the planned snapshot ({count} entries, "
                             f"{plan.data_len} bytes planned)")
        if prev is not None and key <= prev:
            raise ValueError("keys must be sorted and unique")
        prev = key
        entry = bytearray(size)
        pack_entry(entry, 0, 0, klen, vlen, 0, create, mod, version, lease)
        entry[_ENTRY_SIZE:_ENTRY_SIZE + klen] = key
        entry[_ENTRY_SIZE + klen:_ENTRY_SIZE + klen + vlen] = value
        crc = _crc32(memoryview(entry)[4:_ENTRY_SIZE + klen + vlen])
        entry[0:4] = crc.to_bytes(4, "little")
        chunk += entry
        pack_q(index, 8 * n, off)
        h = _crc32(key)
        i = h & mask
        while unpack_slot(table, 16 * i)[1]:
            i = (i + 1) & mask
        pack_slot(table, 16 * i, h | layout.slot_check(h, off) << 32, off)
        off += size
        n += 1
        if len(chunk) >= 1 << 20:
            buf[chunk_start:chunk_start + len(chunk)] = chunk
            body_crc = _crc32(chunk, body_crc)
            chunk_start += len(chunk)
            chunk = bytearray()
    if n != count or off != data_end:
        raise ValueError(f"the snapshot holds {n} entries in {off - data_off} bytes, {count} in "
                         f"{plan.data_len} were planned")
    buf[chunk_start:chunk_start + len(chunk)] = chunk
    body_crc = _crc32(chunk, body_crc)
    buf[plan.index_off:plan.index_off + len(index)] = index
    buf[plan.hash_off:plan.hash_off + len(table)] = table
    return _crc32(table, _crc32(index, body_crc))


def build(items: Iterable[Item], count: int, revision: int, epoch: int) -> tuple[int, Any]:
    """Lay out a snapshot of ``items``; returns ``(size, fill)`` where ``fill(buf)`` writes it.

    ``items`` must yield keys in ascending byte order; values are ``(value,
    create, mod, version, lease)``. A convenience over ``Plan`` and ``write``
    for a whole state given at once.
    """
    items = list(items)
    keys = [k for k, _ in items]
    values: list[tuple[bytes, int, int, int, int] | None] = [v for _, v in items]
    plan = Plan.of(count, sum(entry_span(k, v[0]) for k, v in items))

    def fill(buf: Any) -> None:
        write(buf, plan, revision, epoch, keys, values)

    return plan.total, fill


class Snapshot(MappedSegment):
    """Read-only view of one snapshot segment. Every offset and length read from it is bounded."""

    __slots__ = ("revision", "epoch", "count", "index_off", "hash_off", "slots", "mask",
                 "data_off", "data_end", "body_crc", "params", "kind")

    def __init__(self, name: str, buf: Any, size: int,
                 kind: int = layout.KIND_SNAPSHOT) -> None:
        """``kind`` KIND_OVERLAY reads a delta segment (same layout; see write)."""
        self.kind = kind
        super().__init__(name, buf, size)

    def _read_header(self) -> None:
        name, buf, size, kind = self.name, self.buf, self.size, self.kind
        if size < HEADER_SIZE:
            raise self._corrupt(f"segment is {size} bytes, smaller than a header")
        (magic, version, found_kind, revision, epoch, count, index_off, hash_off, slots, data_off,
         data_len, total, body_crc, hcrc) = layout.SNAP_HEADER.unpack_from(buf, 0)
        if magic != layout.MAGIC[kind] or found_kind != kind:
            what = "delta segment" if kind == layout.KIND_OVERLAY else "snapshot"
            raise self._corrupt(f"bad {what} magic {magic!r}")
        layout.check_version(version, "snapshot", name)
        if _crc32(buf[:layout.SNAP_HEADER_CRC_SPAN]) != hcrc:
            raise self._corrupt("snapshot header checksum mismatch")
        if (total != size or index_off != HEADER_SIZE or hash_off != index_off + 8 * count
                or slots & (slots - 1) or slots < 2 * count or slots == 0
                or data_off != hash_off + 16 * slots or data_off + data_len != total):
            raise self._corrupt(
                f"inconsistent snapshot header (count={count}, slots={slots}, "
                f"data_off={data_off}, data_len={data_len}, total={total}, size={size})")
        self.revision = revision
        self.epoch = epoch
        self.count = count
        self.index_off = index_off
        self.hash_off = hash_off
        self.slots = slots
        self.mask = slots - 1
        self.data_off = data_off
        self.data_end = data_off + data_len
        self.body_crc = body_crc
        # The arguments of _speedups.get after the key, bundled once (the name: the C
        # lookups raise CorruptSegmentError naming this segment, whoever calls them).
        self.params = (buf, hash_off, slots, data_off, self.data_end, KeyValue, name)

    # -- entries -----------------------------------------------------------

    def _entry_at(self, off: int) -> KeyValue:
        if off < self.data_off or off + _ENTRY_SIZE > self.data_end or off & 7:
            raise self._corrupt(f"entry offset {off} outside the data area")
        crc, klen, vlen, _flags, create, mod, version, lease = _ENTRY_UNPACK(self.buf, off)
        start = off + _ENTRY_SIZE
        end = start + klen + vlen
        if end > self.data_end:
            raise self._corrupt(f"entry at {off} claims {klen}+{vlen} bytes past the data area")
        if _crc32(self.memview[off + 4:end]) != crc:
            raise self._corrupt(f"entry at {off} fails its checksum")
        buf = self.buf
        return kv_new(KeyValue, (buf[start:start + klen], buf[start + klen:end],
                                 create, mod, version, lease))

    def _checked(self, off: int) -> tuple[bytes, int]:
        """The key of the entry at ``off`` and the entry's end (before its padding), after
        its bounds and its CRC: what a comparison may use."""
        if off < self.data_off or off + _ENTRY_SIZE > self.data_end or off & 7:
            raise self._corrupt(f"entry offset {off} outside the data area")
        crc, klen, vlen, *_ = _ENTRY_UNPACK(self.buf, off)
        start = off + _ENTRY_SIZE
        stop = start + klen + vlen
        if stop > self.data_end:
            raise self._corrupt(f"entry at {off} claims {klen}+{vlen} bytes past the data area")
        if _crc32(self.memview[off + 4:stop]) != crc:
            raise self._corrupt(f"entry at {off} fails its checksum")
        key: bytes = self.buf[start:start + klen]
        return key, stop

    def offset(self, i: int) -> int:
        off: int = _Q_UNPACK(self.buf, self.index_off + 8 * i)[0]
        return off

    def get(self, key: bytes, keys_only: bool = False) -> KeyValue | None:
        """The entry for ``key`` or None: a hash probe, never a scan. ``keys_only``: with an
        empty value (the entry is verified, its value not copied)."""
        if USE_SPEEDUPS and type(key) is bytes:
            kv: KeyValue | None = (_speedups.get(key, self.params, True) if keys_only
                                   else _speedups.get(key, self.params))  # (names its damage)
            return kv
        return self.py_get(key, keys_only)

    def present(self, keys: list[bytes]) -> int:
        """How many of ``keys`` this snapshot holds: ``get``'s verified probe for each,
        copying no value (in one C call with the speedups)."""
        if USE_SPEEDUPS:
            found: int = _speedups.present(keys, self.params)  # (names its damage)
            return found
        return sum(self.py_get(k, True) is not None for k in keys)

    def py_get(self, key: bytes, keys_only: bool = False) -> KeyValue | None:
        """Reference implementation of ``get`` in pure Python.

        The hot path of every reader, hence written out flat: every offset read
        from the table is bounds-checked before use, and an entry whose hash
        matches has its CRC verified before its key is compared (a damaged key is
        an error, not a miss; a real crc32 collision passes and the probe goes on).
        """
        h = _crc32(key)
        mask = self.mask
        i = h & mask
        buf = self.buf
        base = self.hash_off
        data_off = self.data_off
        last_entry = self.data_end - _ENTRY_SIZE
        klen_want = len(key)
        for _ in range(self.slots):
            word, off = _SLOT_UNPACK(buf, base + (i << 4))
            if off == 0:
                if word:
                    raise self._corrupt(f"hash slot {i} is damaged (empty with a hash)")
                return None
            sh = word & 0xFFFFFFFF
            # layout.slot_check, inlined: this loop is every reader's hot path.
            if word >> 32 != ((sh ^ (off & 0xFFFFFFFF) ^ (off >> 32) ^ 0x5BD1E995)
                              * 0x9E3779B1) & 0xFFFFFFFF:
                raise self._corrupt(f"hash slot {i} fails its check")
            if sh == h:
                if not data_off <= off <= last_entry or off & 7:
                    raise self._corrupt(f"hash slot {i} points outside the data area ({off})")
                crc, klen, vlen, _flags, create, mod, version, lease = _ENTRY_UNPACK(buf, off)
                start = off + _ENTRY_SIZE
                stop = start + klen + vlen
                if stop > last_entry + _ENTRY_SIZE:
                    raise self._corrupt(f"entry at {off} claims {klen}+{vlen} bytes past "
                                        f"the data area")
                if _crc32(self.memview[off + 4:stop]) != crc:
                    raise self._corrupt(f"entry at {off} fails its checksum")
                if klen == klen_want and buf[start:start + klen] == key:
                    return kv_new(KeyValue, (key, b"" if keys_only else buf[start + klen:stop],
                                             create, mod, version, lease))
            i = (i + 1) & mask
        raise self._corrupt("hash table has no empty slot")

    def _search(self, key: bytes) -> int:
        """Where a binary search of the sorted index puts ``key``, unverified: its steps
        compare keys without their CRCs (one entry CRC, value included, per step would
        cost more than the search). ``_walk_start`` verifies the answer."""
        lo, hi = 0, self.count
        buf, index_off, data_off, data_end = self.buf, self.index_off, self.data_off, self.data_end
        while lo < hi:
            mid = (lo + hi) >> 1
            off = _Q_UNPACK(buf, index_off + 8 * mid)[0]
            if off < data_off or off + _ENTRY_SIZE > data_end:
                raise self._corrupt(f"entry offset {off} outside the data area")
            klen = _ENTRY_UNPACK(buf, off)[1]
            start = off + _ENTRY_SIZE
            if start + klen > data_end:
                raise self._corrupt(f"entry at {off} claims a key past the data area")
            if buf[start:start + klen] < key:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def bisect(self, key: bytes) -> int:
        """Index of the first entry whose key is >= ``key``, verified as ``range`` verifies
        where it starts."""
        i, expected, _prev = self._walk_start(key)
        if i == self.count:
            if expected != self.data_end:
                raise self._corrupt(f"sorted index ends at {expected}, before the data "
                                    f"area's end {self.data_end}")
            return i
        off = self.offset(i)
        if off != expected or self._checked(off)[0] < key:
            raise self._corrupt(f"sorted index is out of order at entry {i}")
        return i

    def range_list(self, start: bytes, end: bytes | None, limit: int = -1,
                   keys_only: bool = False, shard: tuple[int, int] | None = None,
                   ) -> list[KeyValue]:
        """Entries with ``start <= key < end`` in key order, at most ``limit`` (-1: all).

        ``keys_only``: with empty values (not copied); ``shard`` (i, n): only the keys
        with ``crc32(key) % n == i`` (docs/format.md, "Shards"), the limit counting those.
        """
        if not USE_SPEEDUPS:
            out: list[KeyValue] = []
            for kv in self.range(start, end, keys_only, shard):
                if len(out) == limit:
                    break
                out.append(kv)
            return out
        si, sn = shard if shard is not None else (0, 0)
        try:
            found: list[KeyValue] = _speedups.range(self.buf, self.index_off, self.count,
                                                    self.data_off, self.data_end, start, end,
                                                    limit, KeyValue, keys_only, si, sn)
            return found
        except ValueError as exc:
            raise self._corrupt(str(exc)) from None

    def _walk_start(self, start: bytes) -> tuple[int, int, bytes | None]:
        """Index of the first key >= start, the offset its entry must have, and the key
        before it (None at index 0).

        The search's answer stands only if entry i - 1 passes its CRC and its key is
        below ``start``; the walk then checks that entry i follows it, passes its own
        CRC and is not below ``start`` (or, at the end, that i - 1 was the last
        entry). So a damaged key or index offset can misdirect the search, never the
        listing: two entry CRCs per listing instead of one per search step.
        """
        i = self._search(start)
        if i == 0:
            return 0, self.data_off, None
        prev, stop = self._checked(self.offset(i - 1))
        if prev >= start:
            raise self._corrupt(f"sorted index is out of order: the search ended after entry "
                                f"{i - 1}, whose key is not below its start")
        return i, (stop + 7) & ~7, prev

    def range(self, start: bytes, end: bytes | None, keys_only: bool = False,
              shard: tuple[int, int] | None = None) -> Iterator[KeyValue]:
        """Entries with ``start <= key < end`` in key order (end None: no upper bound);
        ``keys_only`` and ``shard`` as for ``range_list``."""
        # build() lays entries out back to back in key order, so every index
        # offset is predictable from the entry before it: a damaged index cannot
        # make a listing skip or repeat keys without this check failing.
        i, expected, prev = self._walk_start(start)
        first = i
        n = self.count
        buf = self.buf
        view = self.memview
        index_off = self.index_off
        data_end = self.data_end
        last_entry = data_end - _ENTRY_SIZE
        while i < n:
            off = _Q_UNPACK(buf, index_off + 8 * i)[0]
            if off != expected or off > last_entry:
                raise self._corrupt(f"sorted index is out of order: entry {i} points at {off}, "
                                    f"expected {expected}")
            crc, klen, vlen, _flags, create, mod, version, lease = _ENTRY_UNPACK(buf, off)
            kstart = off + _ENTRY_SIZE
            vstart = kstart + klen
            stop = vstart + vlen
            if stop > data_end:
                raise self._corrupt(f"entry at {off} claims {klen}+{vlen} bytes past the data area")
            # The CRC before the key is compared: a damaged key sorting past ``end``
            # would otherwise end the listing early.
            if _crc32(view[off + 4:stop]) != crc:
                raise self._corrupt(f"entry at {off} fails its checksum")
            key = buf[kstart:vstart]
            # Keys must strictly increase: a damaged index offset that points at
            # another (valid) entry breaks the order, and is caught here.
            if (prev is not None and key <= prev) or (i == first and key < start):
                raise self._corrupt(f"sorted index is out of order at entry {i}")
            prev = key
            expected = (stop + 7) & ~7
            if end is not None and key >= end:
                return
            i += 1
            if shard is not None and _crc32(key) % shard[1] != shard[0]:
                continue
            yield kv_new(KeyValue, (key, b"" if keys_only else buf[vstart:stop], create, mod,
                                    version, lease))
        if expected != data_end:
            raise self._corrupt(f"sorted index ends at {expected}, before the data area's "
                                f"end {data_end}")

    def check(self) -> list[str]:
        """Verify every invariant (body CRC, order, index, hash table); returns the violations."""
        problems = []
        crc = _crc32(self.memview[self.data_off:self.data_end])
        crc = _crc32(self.memview[self.hash_off:self.data_off],
                     _crc32(self.memview[self.index_off:self.hash_off], crc))
        if crc != self.body_crc:
            problems.append(f"{self.name}: body checksum mismatch")
        prev = None
        seen = 0
        try:
            for i in range(self.count):
                kv = self._entry_at(self.offset(i))
                if prev is not None and kv.key <= prev:
                    problems.append(f"{self.name}: key {kv.key!r} at index {i} out of order")
                if kv.mod_revision > self.revision:
                    problems.append(f"{self.name}: key {kv.key!r} has mod_revision "
                                    f"{kv.mod_revision} above the snapshot's {self.revision}")
                got = self.get(kv.key)
                if got != kv:
                    problems.append(f"{self.name}: hash lookup of {kv.key!r} gives {got!r}")
                prev = kv.key
            for i in range(self.slots):
                word, off = _SLOT_UNPACK(self.buf, self.hash_off + 16 * i)
                if off:
                    seen += 1
                    if word >> 32 != layout.slot_check(word & 0xFFFFFFFF, off):
                        problems.append(f"{self.name}: hash slot {i} fails its check")
                elif word:
                    problems.append(f"{self.name}: empty hash slot {i} holds a hash")
            if seen != self.count:
                problems.append(f"{self.name}: hash table holds {seen} entries, index {self.count}")
        except CorruptSegmentError as exc:
            problems.append(str(exc))
        return problems
