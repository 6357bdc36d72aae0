"""No answer from unverified bytes: a flipped byte in a key, or in the hash or sorted index
table, of a snapshot, overlay or index segment makes every read either exact or a
CorruptSegmentError naming that segment, never a silent miss, a short list, a stale value
or a deleted key brought back (issue 19, item 2).

Each test flips one byte at a time and runs every read a Reader does over it: ``get`` of
the damaged key and of the keys whose probes pass its slot, listings across it, pages, and
``by_index``; in the C speedups and in the pure-Python reference. Segment-level tests build
segments with the writer's own ``snapshot.write``; the Reader tests damage the segments a
real writer published from a real etcd.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import shmcache
from shmcache import CorruptSegmentError, KeyValue
from shmcache.format import indexseg, layout, snapshot
from shmcache.format.snapshot import Snapshot
from tests.helpers import WriterProcess, delete, etcd_range, put, wait_rev

KV5 = tuple[bytes, int, int, int, int]
CORRUPT = "corrupt"


@pytest.fixture(autouse=True, params=["c", "python"])
def impl(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test here runs against the C speedups and the pure-Python reference."""
    if request.param == "c" and snapshot._speedups is None:
        pytest.skip("shmcache.format._speedups was not built")
    monkeypatch.setattr(snapshot, "USE_SPEEDUPS", request.param == "c")
    monkeypatch.setattr(indexseg, "USE_SPEEDUPS", request.param == "c")
    return str(request.param)


def outcome(read: Callable[[], Any], segment: str) -> Any:
    """``read()``'s answer, or CORRUPT if it raised CorruptSegmentError naming ``segment``
    (any other segment named is a failure: the damage is in ``segment``)."""
    try:
        return read()
    except CorruptSegmentError as exc:
        assert exc.segment == segment, f"damage in {segment} reported as {exc.segment}: {exc}"
        return CORRUPT


def flips(raw: bytes, offsets: Iterator[int] | list[int] | range,
          masks: tuple[int, ...]) -> Iterator[tuple[int, int, bytes]]:
    for off in offsets:
        for mask in masks:
            damaged = bytearray(raw)
            damaged[off] ^= mask
            yield off, mask, bytes(damaged)


# --------------------------------------------------------------------------------------
# segments built by the writer's snapshot.write


STATE: dict[bytes, KV5] = {
    **{b"/a/%02d" % i: (b"a-value-%d" % i * (1 + i % 4), 10 + i, 40 + i, 1 + i % 3, 0)
       for i in range(14)},
    **{b"/b/%02d" % i: (b"b%d" % i, 30 + i, 50 + i, 1, 7) for i in range(6)},
    b"/a": (b"the a", 2, 3, 1, 0), b"/c": (b"", 4, 5, 2, 0), b"": (b"root", 1, 1, 1, 0),
    b"\xff\xfe": (b"x" * 300, 6, 6, 1, 0),
}
# The same in an overlay segment: tombstones (version 0) among the entries.
OVERLAY_STATE = {k: (v if i % 3 else (b"", 0, 0, 0, 0)) for i, (k, v) in
                 enumerate(sorted(STATE.items()))}
PROBES = [b"/a/", b"/a/00\x00", b"/b", b"/b/99", b"/", b"\x00", b"\xff", b"\xff\xff", b"zz"]
RANGES: list[tuple[bytes, bytes | None]] = [
    (b"", None), (b"/a/", b"/a0"), (b"/b/", b"/b0"), (b"/a/0", b"/a/1"), (b"/a/1", b"/a/2"),
    (b"/a/05", b"/a/09"), (b"/b/03", None), (b"/c", b"/d"), (b"\xff", None)]


def segment_bytes(state: dict[bytes, KV5], kind: int) -> bytes:
    keys = sorted(state)
    values: list[KV5 | None] = [state[k] for k in keys]
    plan = snapshot.Plan.of(len(keys), sum(snapshot.entry_span(k, state[k][0]) for k in keys))
    buf = bytearray(plan.total)
    snapshot.write(buf, plan, 90, 1, keys, values, kind=kind)
    return bytes(buf)


def reads(snap: Snapshot) -> dict[Any, Any]:
    """Everything a Reader asks a snapshot or overlay segment, each answer or CORRUPT."""
    name = snap.name
    out: dict[Any, Any] = {}
    for k in sorted(STATE) + PROBES:
        out["get", k] = outcome(lambda k=k: snap.get(k), name)
    for start, end in RANGES:
        out["list", start, end] = outcome(lambda s=start, e=end: snap.range_list(s, e), name)
        out["range", start, end] = outcome(lambda s=start, e=end: list(snap.range(s, e)), name)
        for size in (1, 4):
            out["pages", start, end, size] = outcome(
                lambda s=start, e=end, n=size: pages(snap, s, e, n), name)
        out["bisect", start] = outcome(lambda s=start: snap.bisect(s), name)
    return out


def pages(snap: Snapshot, start: bytes, end: bytes | None, size: int) -> list[KeyValue]:
    """A listing in pages of ``size``, each continuing after the last key (as a continue
    token does)."""
    out: list[KeyValue] = []
    while True:
        page = snap.range_list(start, end, size)
        out += page
        if len(page) < size:
            return out
        start = page[-1].key + b"\x00"


def expected(state: dict[bytes, KV5]) -> dict[Any, Any]:
    kvs = [KeyValue(k, *state[k]) for k in sorted(state)]
    keys = [kv.key for kv in kvs]
    out: dict[Any, Any] = {}
    for k in sorted(STATE) + PROBES:
        out["get", k] = KeyValue(k, *state[k]) if k in state else None
    for start, end in RANGES:
        want = [kv for kv in kvs if kv.key >= start and (end is None or kv.key < end)]
        out["list", start, end] = out["range", start, end] = want
        for size in (1, 4):
            out["pages", start, end, size] = want
        out["bisect", start] = bisect.bisect_left(keys, start)
    return out


def assert_exact_or_corrupt(got: dict[Any, Any], want: dict[Any, Any], what: str) -> None:
    assert got.keys() == want.keys()
    wrong = {q: (got[q], want[q]) for q in want if got[q] != CORRUPT and got[q] != want[q]}
    assert not wrong, f"{what}: silent wrong answers {wrong}"


def key_bytes(raw: bytes, kind: int) -> Iterator[tuple[bytes, int]]:
    """(key, offset) of every byte of every entry's key, and of its key length field."""
    snap = Snapshot("/x", raw, len(raw), kind)
    for i in range(snap.count):
        off = snap.offset(i)
        klen = layout.SNAP_ENTRY.unpack_from(raw, off)[1]
        key = raw[off + 48:off + 48 + klen]
        for b in [*range(off + 4, off + 8), *range(off + 48, off + 48 + klen)]:
            yield key, b


@pytest.mark.parametrize("kind", [layout.KIND_SNAPSHOT, layout.KIND_OVERLAY])
def test_a_flipped_key_byte_is_never_answered_silently(kind: int) -> None:
    """Every byte of every key (and of its length): get, list, range, pages and bisect
    answer exactly or raise naming the segment. Before: get of the key returned None, a
    key flipped to sort after a range's end cut the listing short, bisect skipped keys."""
    state = STATE if kind == layout.KIND_SNAPSHOT else OVERLAY_STATE
    raw = segment_bytes(state, kind)
    want = expected(state)
    name = "/shmcache.t.snap.1" if kind == layout.KIND_SNAPSHOT else "/shmcache.t.ovl.1"
    assert reads(Snapshot(name, raw, len(raw), kind)) == want
    flipped = 0
    for key, off in key_bytes(raw, kind):
        for mask in (0x01, 0x02, 0x80):
            damaged = bytearray(raw)
            damaged[off] ^= mask
            got = reads(Snapshot(name, bytes(damaged), len(raw), kind))
            assert_exact_or_corrupt(got, want, f"{key!r}: byte {off} ^ {mask:#x}")
            # The damaged key itself is never a silent miss.
            assert got["get", key] == CORRUPT, (key, off, mask)
            flipped += 1
    assert flipped == 3 * sum(4 + len(k) for k in state)  # every key byte, every length


def test_a_flipped_byte_in_the_hash_or_sorted_index_table_is_never_answered_silently() -> None:
    """Every byte of the sorted index and of the hash table, flipped two ways."""
    raw = segment_bytes(STATE, layout.KIND_SNAPSHOT)
    snap = Snapshot("/shmcache.t.snap.1", raw, len(raw))
    want = expected(STATE)
    for off, mask, damaged in flips(raw, range(snap.index_off, snap.data_off), (0x01, 0x80)):
        got = reads(Snapshot("/shmcache.t.snap.1", damaged, len(raw)))
        assert_exact_or_corrupt(got, want, f"table byte {off} ^ {mask:#x}")


def test_a_genuine_hash_collision_is_still_a_miss_not_an_error() -> None:
    """Two keys with the same crc32 (the hash): the probe verifies the other key's entry and
    goes on; the absent one is None and the present one is found."""
    a, b = b"plumless", b"buckeroo"  # crc32 0x4ddb0c25 both
    assert snapshot._crc32(a) == snapshot._crc32(b)
    raw = segment_bytes({a: (b"1", 1, 1, 1, 0)}, layout.KIND_SNAPSHOT)
    snap = Snapshot("/s", raw, len(raw))
    assert snap.get(b) is None
    assert snap.get(a) == KeyValue(a, b"1", 1, 1, 1, 0)
    raw = segment_bytes({a: (b"1", 1, 1, 1, 0), b: (b"2", 2, 2, 1, 0)}, layout.KIND_SNAPSHOT)
    snap = Snapshot("/s", raw, len(raw))
    assert snap.get(a) == KeyValue(a, b"1", 1, 1, 1, 0)
    assert snap.get(b) == KeyValue(b, b"2", 2, 2, 1, 0)


# --------------------------------------------------------------------------------------
# Readers over the segments a real writer published


def wait_for(cond: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (got := cond()):
        assert time.monotonic() < deadline, what
        time.sleep(0.05)
    return got


def reader_reads(name: str, p: bytes, keys: list[bytes], segment: str) -> dict[Any, Any]:
    """What a fresh Reader answers: every get, the whole list, a sub-prefix, pages; each
    answer or CORRUPT (CorruptSegmentError naming ``segment``)."""
    out: dict[Any, Any] = {}
    try:
        r = shmcache.Reader(name)
    except CorruptSegmentError as exc:
        assert exc.segment == segment, exc
        return {}
    with r:
        for k in keys:
            out["get", k] = outcome(lambda k=k: r.get(k), segment)
        out["list"] = outcome(lambda: r.list(p).items, segment)
        out["list k1"] = outcome(lambda: r.list(p + b"k1").items, segment)
        out["list limit"] = outcome(lambda: r.list(p, limit=5).items, segment)
        for size in (1, 7):
            out["pages", size] = outcome(lambda n=size: list(r.iter_list(p, page_size=n)),
                                         segment)
    return out


def reader_expected(state: list[KeyValue], p: bytes, keys: list[bytes]) -> dict[Any, Any]:
    by_key = {kv.key: kv for kv in state}
    out: dict[Any, Any] = {("get", k): by_key.get(k) for k in keys}
    out["list"] = state
    out["list k1"] = [kv for kv in state if kv.key.startswith(p + b"k1")]
    out["list limit"] = state[:5]
    for size in (1, 7):
        out["pages", size] = state
    return out


def entry_offsets(path: str, kind: int) -> dict[bytes, int]:
    with open(path, "rb") as f:
        raw = f.read()
    seg = Snapshot(path, raw, len(raw), kind)
    return {kv.key: seg.offset(i) for i, kv in enumerate(seg.range(b"", None))}


def flip_file(path: str, off: int, mask: int) -> None:
    with open(path, "r+b") as f:
        f.seek(off)
        byte = f.read(1)[0]
        f.seek(off)
        f.write(bytes([byte ^ mask]))


@pytest.fixture
def layered(etcd_session: Any, cache_name: str, unique_prefix: bytes) -> Iterator[Any]:
    """A stopped writer's snapshot and overlay segment, as it published them: 30 keys in
    the snapshot, then updates, deletions and new keys in the overlay segment."""
    p = unique_prefix
    client = etcd_session.client()
    w = WriterProcess(cache_name, etcd_session.endpoint, p, ring_size="4MiB")
    try:
        for i in range(30):
            put(client, p + b"k%02d" % i, b"snap-%d" % i)
        w.start()
        for i in range(0, 30, 4):
            put(client, p + b"k%02d" % i, b"new-%d" % i)
        for i in range(1, 30, 5):
            delete(client, p + b"k%02d" % i)
        for i in range(5):
            put(client, p + b"k%02d-new" % i, b"created-%d" % i)
        changed = put(client, p + b"k99", b"last of the changes")
        # Records enough for an overlay segment (every 128 KiB) holding the changes above.
        for i in range(150):
            last = put(client, p + b"pad", b"%d" % i + b"x" * 1000)
        with shmcache.Reader(w.name) as r:
            wait_rev(r, last)
            b = wait_for(lambda: (x := r.control.block()) is not None
                         and x.ovl_revision >= changed and x, "an overlay segment")
            assert b.snap_seq == 1 and b.ovl_seq
        w.terminate()  # nothing republishes while the test damages the segments
        state = etcd_range(client, p, last)
        with shmcache.Reader(w.name) as r:
            assert r.list(p).items == state
            assert not set(r._view.recent) - {p + b"pad"}  # the rest is in the segments
        yield w.name, p, state, b
    finally:
        client.close()
        w.close()


def test_reader_answers_exactly_or_raises_over_a_flipped_key(layered: Any) -> None:
    """Each byte of keys in the snapshot (one served from it, one deleted since, one
    updated since) and in the overlay segment (an update, a deletion, a new key): a
    fresh Reader's get of every key, list, sub-prefix list, limited list and pages are
    exact or raise CorruptSegmentError naming the damaged segment. Before: get returned
    None, the stale snapshot value or a deleted key; lists were cut short."""
    name, p, state, b = layered
    snap_path = "/dev/shm" + layout.snapshot_name(name, b.snap_seq)
    ovl_path = "/dev/shm" + layout.overlay_name(name, b.ovl_seq)
    keys = [p + b"k%02d" % i for i in range(30)] + [p + b"k%02d-new" % i for i in range(5)]
    want = reader_expected(state, p, keys)
    # (segment, kind, key, whether get(key) reads that segment's entry)
    targets = [(snap_path, layout.KIND_SNAPSHOT, p + b"k02", True),  # served from the snapshot
               (snap_path, layout.KIND_SNAPSHOT, p + b"k06", False),  # deleted since
               (snap_path, layout.KIND_SNAPSHOT, p + b"k08", False),  # updated since
               (ovl_path, layout.KIND_OVERLAY, p + b"k12", True),  # an update
               (ovl_path, layout.KIND_OVERLAY, p + b"k11", True),  # a deletion (tombstone)
               (ovl_path, layout.KIND_OVERLAY, p + b"k03-new", True)]  # a new key
    for path, kind, key, read_there in targets:
        segment = path.removeprefix("/dev/shm")
        off = entry_offsets(path, kind)[key]
        for b_off in [*range(off + 48, off + 48 + len(key)), off + 4]:
            for mask in (0x01, 0x80):
                flip_file(path, b_off, mask)
                try:
                    got = reader_reads(name, p, keys, segment)
                finally:
                    flip_file(path, b_off, mask)
                what = f"{segment} {key!r} byte {b_off - off} ^ {mask:#x}"
                assert got, what  # (attaching reads no key)
                assert_exact_or_corrupt(got, want, what)
                # The damaged key's own get reads the damaged entry: never a miss; and
                # the whole listing walks over it.
                assert got["list"] == CORRUPT, what
                if read_there:
                    assert got["get", key] == CORRUPT, what


INDEXES = ["--index", "node=json:/spec/nodeName"]


@pytest.fixture
def indexed(etcd_session: Any, cache_name: str, unique_prefix: bytes) -> Iterator[Any]:
    """A stopped writer's snapshot and index segment: 24 pods on three nodes."""
    p = unique_prefix
    client = etcd_session.client()
    w = WriterProcess(cache_name, etcd_session.endpoint, p, ring_size="1MiB", extra=INDEXES)
    try:
        for i in range(24):
            put(client, p + b"pod%02d" % i, b'{"spec": {"nodeName": "n%d"}}' % (i % 3))
        w.start()
        last = put(client, p + b"zz", b"{}")
        with shmcache.Reader(w.name) as r:
            wait_rev(r, last)
            b = r.control.block()
            assert b is not None and b.snap_seq
        w.terminate()
        state = etcd_range(client, p, last)
        yield w.name, p, state, b
    finally:
        client.close()
        w.close()


def test_by_index_answers_exactly_or_raises_over_a_flipped_byte(indexed: Any) -> None:
    """Every byte of the index segment past its header, and every byte of a pod's key in the
    snapshot: by_index (whole, limited, in pages) is exact or raises naming the damaged
    segment."""
    name, p, state, b = indexed
    idx_path = "/dev/shm" + layout.index_name(name, b.snap_seq)
    snap_path = "/dev/shm" + layout.snapshot_name(name, b.snap_seq)
    node1 = [kv for kv in state if kv.value.endswith(b'"n1"}}')]
    assert len(node1) == 8
    want = {"all": node1, "limit": node1[:3], "pages": node1}

    def by_index(segment: str) -> dict[str, Any]:
        try:
            r = shmcache.Reader(name)
        except CorruptSegmentError as exc:
            assert exc.segment == segment, exc
            return {}
        with r:
            return {"all": outcome(lambda: r.by_index("node", b"n1").items, segment),
                    "limit": outcome(lambda: r.by_index("node", b"n1", limit=3).items,
                                     segment),
                    "pages": outcome(lambda: list(r.iter_by_index("node", b"n1",
                                                                   page_size=3)), segment)}

    assert by_index("") == want
    with open(idx_path, "rb") as f:
        size = len(f.read())
    key = p + b"pod04"
    off = entry_offsets(snap_path, layout.KIND_SNAPSHOT)[key]
    damage = [(idx_path, o) for o in range(indexseg.HEADER_SIZE, size)]
    damage += [(snap_path, o) for o in range(off + 48, off + 48 + len(key))]
    caught = set()
    for path, o in damage:
        segment = path.removeprefix("/dev/shm")
        flip_file(path, o, 0x01)
        try:
            got = by_index(segment)
        finally:
            flip_file(path, o, 0x01)
        if got:
            assert_exact_or_corrupt(got, want, f"{segment} byte {o}")
        if got.get("all") == CORRUPT or not got:
            caught.add(path)
    # A flipped byte of the pod's key in the snapshot is found by by_index's probe (named
    # the snapshot's); most index segment bytes are read by this run.
    assert caught == {idx_path, snap_path}
