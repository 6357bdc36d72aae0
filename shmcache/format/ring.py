"""The ring log: one record per etcd revision, appended by the writer, read in place by readers.

Concurrency contract: exactly one process appends (the writer); any number read.
The writer never waits for readers. Before it overwrites bytes it moves the
published tail past them (see ``RingWriter.reserve``), and only after the new
bytes are complete does it move the head. A reader copies a record, then
re-reads the tail: if the tail has moved past the record's position, the copy
may be torn and is discarded (the reader was lapped). The position stamp and the
CRC in every record catch the same on architectures that reorder memory accesses.
"""

from __future__ import annotations

import collections
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import repeat

from ..errors import CorruptSegmentError
from . import layout

_REC = layout.RECORD
_REC_SIZE = _REC.size
_DATA = layout.RING_DATA
_KIND_EVENTS = layout.REC_KIND_EVENTS
_KIND_PAD = layout.REC_KIND_PAD
_CRC_SPAN = layout.REC_CRC_SPAN
_crc32 = zlib.crc32
_Q = struct.Struct("<Q")


class TornRecord(Exception):
    """A record's stamp, length or CRC did not check out: lapped, or corrupt if the tail says not."""


class Lapped(Exception):
    """The writer overwrote records while they were read: the tail passed them."""


def iter_records(buf: object, capacity: int, start: int, stop: int,
                 tail: Callable[[], int], *, after_revision: int = 0,
                 max_revision: int | None = None,
                 name: str = "") -> Iterator[tuple[int, int, int, bytes]]:
    """Yield ``(pos, revision, next_pos, payload)`` for every event record in [start, stop).

    The one walk over ring records that everything uses (reader refresh,
    watches, past-revision reads, the writer's restore). ``tail()`` reads the
    published tail now. One policy decides between the two ways a read can
    fail: a record that does not check out (stamp, length, CRC, revision order
    after ``after_revision`` and up to ``max_revision``) is ``Lapped`` if the tail
    has passed its position, else a CorruptSegmentError. Payloads are copies,
    but they are only known intact once the generator has finished: it then
    re-reads the tail and raises Lapped if it passed ``start``. So consumers
    collect what they read and commit it only when the loop ends normally.
    """
    if start < tail():
        raise Lapped()
    pos = start
    last = after_revision
    steps = 0
    limit = capacity // 8 + 2  # a record is at least 8 bytes: more steps means a loop
    while pos < stop:
        steps += 1
        try:
            if steps > limit:
                raise TornRecord(f"record chain from {start} does not reach {stop}")
            kind, revision, nxt, payload = read_record(buf, capacity, pos)
            if payload is not None and (revision <= last or (
                    max_revision is not None and revision > max_revision)):
                raise TornRecord(f"record at {pos} has revision {revision}, expected above "
                                 f"{last}" + ("" if max_revision is None
                                              else f" and at most {max_revision}"))
        except TornRecord as exc:
            if tail() > pos:
                raise Lapped() from None
            raise CorruptSegmentError(str(exc), segment=name) from None
        if payload is not None:
            yield pos, revision, nxt, payload
            last = revision
        pos = nxt
    if pos != stop:
        if tail() > start:
            raise Lapped()
        raise CorruptSegmentError(f"record chain ends at {pos}, head is {stop}", segment=name)
    if tail() > start:
        raise Lapped()


def check_ring_header(buf: object, size: int, name: str, generation: int, capacity: int) -> None:
    """Validate a ring segment's header against what the control segment promised."""
    if size < _DATA + layout.MIN_RING_CAPACITY:
        raise CorruptSegmentError(f"ring segment is {size} bytes, too small", segment=name)
    magic, version, kind, gen, cap = layout.RING_HEADER.unpack_from(buf, 0)  # type: ignore[arg-type]
    if magic != layout.MAGIC[layout.KIND_RING] or kind != layout.KIND_RING:
        raise CorruptSegmentError(f"bad ring magic {magic!r}", segment=name)
    layout.check_version(version, "ring segment", name)
    if gen != generation or cap != capacity or _DATA + cap > size or cap % 8:
        raise CorruptSegmentError(
            f"ring header (generation {gen}, capacity {cap}) disagrees with the control "
            f"segment (generation {generation}, capacity {capacity}) or the segment size {size}",
            segment=name)


def read_seal(buf: object) -> tuple[int, int, int] | None:
    """``(final tail, final head, revision)`` of a ring the writer left for the next generation.

    None while the writer still appends to it (or it was abandoned without a
    seal: a new epoch, a crash). See layout.RING_SEAL.
    """
    try:
        sealed, tail, head, revision = layout.RING_SEAL.unpack_from(
            buf, layout.RING_SEAL_OFF)  # type: ignore[arg-type]
    except Exception:  # a closed or short mapping
        return None
    if sealed != 1 or tail > head:
        return None
    return tail, head, revision


def read_record(buf: object, capacity: int, pos: int) -> tuple[int, int, int, bytes | None]:
    """Copy the record at logical position ``pos``.

    Returns ``(kind, revision, next_pos, payload)``; kind 0 stands for the implicit
    skip at the end of a lap (too little room for a header), payload is None for
    padding. Raises TornRecord when the bytes do not check out; the caller then
    decides between "lapped" and "corrupt" by re-reading the tail. The caller must
    also re-check the tail *after* this returns before trusting the payload.
    """
    off = pos % capacity
    room = capacity - off
    if room < _REC_SIZE:
        return 0, 0, pos + room, None
    base = _DATA + off
    try:
        stamp, revision, length, kind, _flags, crc, _ = _REC.unpack_from(buf, base)  # type: ignore[arg-type]
    except Exception as exc:  # struct.error: the segment is shorter than promised
        raise TornRecord(f"record header at {pos} unreadable: {exc}") from None
    if stamp != pos:
        raise TornRecord(f"record at {pos} carries stamp {stamp}")
    if length > room - _REC_SIZE:
        raise TornRecord(f"record at {pos} claims {length} bytes, only {room - _REC_SIZE} fit")
    header = buf[base:base + _CRC_SPAN]  # type: ignore[index]
    if kind == _KIND_PAD:
        if _crc32(header) != crc or length != room - _REC_SIZE:
            raise TornRecord(f"bad padding record at {pos}")
        return _KIND_PAD, 0, pos + room, None
    if kind != _KIND_EVENTS:
        raise TornRecord(f"record at {pos} has unknown kind {kind}")
    start = base + _REC_SIZE
    payload: bytes = buf[start:start + length]  # type: ignore[index]
    if len(payload) != length or _crc32(payload, _crc32(header)) != crc:
        raise TornRecord(f"record at {pos} fails its checksum")
    return _KIND_EVENTS, revision, pos + layout.align8(_REC_SIZE + length), payload


def peek_revision(buf: object, capacity: int, pos: int) -> tuple[int, int, int]:
    """Read only a record's header: ``(kind, revision, next_pos)``; for walking to a revision.

    The header is not covered by a CRC check here (that needs the payload), so the
    caller must treat the result as a hint and validate the record it finally reads.
    """
    off = pos % capacity
    room = capacity - off
    if room < _REC_SIZE:
        return 0, 0, pos + room
    try:
        stamp, revision, length, kind, _f, _c, _ = _REC.unpack_from(buf, _DATA + off)  # type: ignore[arg-type]
    except Exception as exc:
        raise TornRecord(f"record header at {pos} unreadable: {exc}") from None
    if stamp != pos or length > room - _REC_SIZE:
        raise TornRecord(f"record at {pos} carries stamp {stamp} / length {length}")
    if kind == _KIND_PAD:
        return _KIND_PAD, 0, pos + room
    if kind != _KIND_EVENTS:
        raise TornRecord(f"record at {pos} has unknown kind {kind}")
    return _KIND_EVENTS, revision, pos + layout.align8(_REC_SIZE + length)


@dataclass
class Placement:
    """Where the next record goes and what the writer must publish before writing it.

    A plan only (``RingWriter.place``): nothing changes until the writer
    ``drop``s the records it overwrites (after publishing ``new_tail``) and
    ``write``s the record.
    """

    start: int  # logical position of the record
    end: int  # head after the record
    pad_at: int | None  # position of a padding record to write first, if any
    new_tail: int  # tail to publish before writing
    compact_revision: int | None  # new oldest watchable revision, if history is dropped
    evict: int  # records (and padding entries) the write overwrites, oldest first


class RingWriter:
    """Writer-side bookkeeping of one ring segment: positions of live records, placement, bytes.

    Not thread-safe; owned by the writer's publishing thread. An append is
    ``place`` (a pure plan), then, once the writer has published the plan's
    tail, ``drop`` (the bookkeeping forgets the overwritten records), then
    ``write``. A failure before ``write`` completes leaves the head where it
    was: readers never see the record and a retry places it again.
    """

    def __init__(self, buf: object, capacity: int, generation: int) -> None:
        self.buf = buf
        self.capacity = capacity
        self.generation = generation
        self.head = 0
        self.tail = 0
        # (position, revision) of every record still intact, oldest first; revision
        # 0 marks padding and end-of-lap skips.
        self.records: collections.deque[tuple[int, int]] = collections.deque()

    @staticmethod
    def init_segment(buf: object, generation: int, capacity: int) -> None:
        layout.RING_HEADER.pack_into(buf, 0, layout.MAGIC[layout.KIND_RING],  # type: ignore[arg-type]
                                     layout.FORMAT_VERSION, layout.KIND_RING, generation, capacity)

    @staticmethod
    def record_size(payload_len: int) -> int:
        return layout.align8(_REC_SIZE + payload_len)

    def fits(self, payload_len: int) -> bool:
        """Whether a record of this payload can ever be placed (with room for a lap's padding)."""
        return self.record_size(payload_len) <= self.capacity // 2

    def place(self, payload_len: int) -> Placement:
        """Plan the next record: where it goes and which records it overwrites. Changes nothing."""
        size = self.record_size(payload_len)
        head = self.head
        room = self.capacity - head % self.capacity
        pad_at = None
        start = head
        if size > room:
            pad_at = head if room >= _REC_SIZE else None
            start = head + room
        end = start + size
        low = end - self.capacity  # bytes below this logical position get overwritten
        compact = None
        n = 0
        # The tail always lands on a tracked position (a record, a padding record
        # or an end-of-lap skip), so a snapshot's ring position, which is some
        # earlier head, is never strictly between two valid positions.
        for pos, revision in self.records:
            if pos >= low:
                new_tail = pos
                break
            n += 1
            if revision:
                compact = revision
        else:
            new_tail = head
        if new_tail < self.tail:
            new_tail = self.tail
        return Placement(start, end, pad_at, new_tail, compact, n)

    def drop(self, placement: Placement) -> None:
        """Forget the records ``placement`` overwrites: once, after publishing its tail."""
        popleft = self.records.popleft
        for _ in repeat(None, placement.evict):
            popleft()
        self.tail = placement.new_tail

    def write(self, placement: Placement, revision: int, payload: bytes,
              hook: Callable[[], None] | None = None) -> None:
        """Write the padding (if any) and the record bytes, then take the record into the
        bookkeeping; the caller has ``drop``ped what it overwrites first, and publishes
        the head after. ``hook`` (a fault point) runs after the payload and after the
        header, before the bookkeeping changes."""
        buf = self.buf
        cap = self.capacity
        if placement.pad_at is not None:
            pos = placement.pad_at
            room = cap - pos % cap
            hdr = bytearray(_REC_SIZE)
            _REC.pack_into(hdr, 0, pos, 0, room - _REC_SIZE, _KIND_PAD, 0, 0, 0)
            crc = _crc32(bytes(hdr[:_CRC_SPAN]))
            _REC.pack_into(hdr, 0, pos, 0, room - _REC_SIZE, _KIND_PAD, 0, crc, 0)
            base = _DATA + pos % cap
            buf[base:base + _REC_SIZE] = hdr  # type: ignore[index]
        pos = placement.start
        length = len(payload)
        hdr = bytearray(_REC_SIZE)
        _REC.pack_into(hdr, 0, pos, revision, length, _KIND_EVENTS, 0, 0, 0)
        crc = _crc32(payload, _crc32(bytes(hdr[:_CRC_SPAN])))
        _REC.pack_into(hdr, 0, pos, revision, length, _KIND_EVENTS, 0, crc, 0)
        base = _DATA + pos % cap
        # Payload first, header last: a reader that races this write sees the old
        # stamp (or a CRC mismatch) rather than a valid header over half a payload.
        buf[base + _REC_SIZE:base + _REC_SIZE + length] = payload  # type: ignore[index]
        if hook is not None:
            hook()
        buf[base:base + _REC_SIZE] = hdr  # type: ignore[index]
        if hook is not None:
            hook()
        if placement.start != self.head:
            self.records.append((self.head, 0))  # the padding / end-of-lap skip
        self.records.append((pos, revision))
        self.head = placement.end

    def forget_history(self) -> None:
        """No record before the head is history any more (a new epoch: tail = head)."""
        self.records.clear()
        self.tail = self.head

    def seal(self, revision: int, tail: int | None = None) -> None:
        """Mark this ring finished at its head (see read_seal). ``tail``: the oldest
        position still worth reading on to (default: the current tail); a tail equal
        to the head leaves nothing to read. ``revision``: the cache's revision at the
        head, where the next generation's history begins. Stored before the control
        segment points at the next ring, flag last."""
        t = self.tail if tail is None else max(self.tail, min(tail, self.head))
        _Q.pack_into(self.buf, layout.RING_SEAL_OFF + 8, t)  # type: ignore[arg-type]
        _Q.pack_into(self.buf, layout.RING_SEAL_OFF + 16, self.head)  # type: ignore[arg-type]
        _Q.pack_into(self.buf, layout.RING_SEAL_OFF + 24, revision)  # type: ignore[arg-type]
        _Q.pack_into(self.buf, layout.RING_SEAL_OFF, 1)  # type: ignore[arg-type]

    def unseal(self) -> None:
        """Withdraw a seal whose next generation was never published (a failed switch)."""
        _Q.pack_into(self.buf, layout.RING_SEAL_OFF, 0)  # type: ignore[arg-type]

    def restore(self, head: int, tail: int) -> None:
        """Rebuild the record list from the segment after a writer restart."""
        self.head, self.tail = head, tail
        self.records.clear()
        for _kind, revision, pos, _next in walk(self.buf, self.capacity, tail, head):
            self.records.append((pos, revision))


def walk(buf: object, capacity: int, start: int, stop: int) -> Iterator[tuple[int, int, int, int]]:
    """Yield ``(kind, revision, pos, next_pos)`` for every record header from start to stop.

    Raises CorruptSegmentError if the chain of records does not land exactly on stop.
    """
    pos = start
    steps = 0
    limit = capacity // 8 + 2  # a record is at least 8 bytes: more steps means a loop
    while pos < stop:
        steps += 1
        if steps > limit:
            raise CorruptSegmentError(f"record chain from {start} does not reach {stop}")
        try:
            kind, revision, nxt = peek_revision(buf, capacity, pos)
        except TornRecord as exc:
            raise CorruptSegmentError(str(exc)) from None
        yield kind, revision, pos, nxt
        pos = nxt
    if pos != stop:
        raise CorruptSegmentError(f"record chain from {start} overshoots the head {stop} (at {pos})")
