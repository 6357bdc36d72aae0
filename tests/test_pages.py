"""Paginated lists: every page exact at the first page's revision, against real etcd."""

from __future__ import annotations

import random
from typing import Any

import pytest

import shmcache
from shmcache.types import KeyValue
from tests.helpers import WriterProcess, delete, etcd_get, etcd_range, put, txn


def _load(client: Any, p: bytes, n: int) -> int:
    rev = 0
    for i in range(0, n, 100):
        rev = txn(client, [("put", p + b"k%04d" % j, b"v%d" % j) for j in range(i, min(n, i + 100))])
    return rev


def test_pages_are_exact_at_the_first_pages_revision_while_etcd_changes(
        etcd_client: Any, writer: tuple[WriterProcess, bytes], sub_prefix: bytes,
        reader: shmcache.Reader) -> None:
    p = sub_prefix
    last = _load(etcd_client, p, 250)
    assert reader.wait(last, timeout=10)
    first = reader.list(p, limit=100)
    rev = first.revision
    assert len(first) == 100 and first.more and first.continue_token
    # Changes after the first page, in the ranges of the pages still to come.
    put(etcd_client, p + b"k0150", b"changed")
    delete(etcd_client, p + b"k0200")
    put(etcd_client, p + b"k0120x", b"new")
    end = delete(etcd_client, p + b"k0001")  # in the page already read
    assert reader.wait(end, timeout=10)
    pages = [first]
    while pages[-1].more:
        pages.append(reader.list(p, limit=100, continue_token=pages[-1].continue_token))
    assert [len(pg) for pg in pages] == [100, 100, 50]
    assert all(pg.revision == rev for pg in pages) and pages[-1].continue_token is None
    got = [kv for pg in pages for kv in pg]
    assert got == etcd_range(etcd_client, p, rev)
    # A listing started now sees the changes.
    now = list(reader.iter_list(p, page_size=64))
    assert now == etcd_range(etcd_client, p, end) and len(now) == 249


def test_iter_list_while_writes_arrive(etcd_client: Any, writer: tuple[WriterProcess, bytes],
                                       sub_prefix: bytes, reader: shmcache.Reader) -> None:
    p = sub_prefix
    assert reader.wait(_load(etcd_client, p, 300), timeout=10)
    rev = reader.revision
    out = []
    for i, kv in enumerate(reader.iter_list(p, page_size=7)):
        out.append(kv)
        if i % 50 == 0:  # writes land between pages
            assert reader.wait(put(etcd_client, p + b"k%04d" % (299 - i), b"x"), timeout=10)
    assert out == etcd_range(etcd_client, p, rev)


def test_limit_zero_and_an_exact_fit(etcd_client: Any, writer: tuple[WriterProcess, bytes],
                                     sub_prefix: bytes, reader: shmcache.Reader) -> None:
    p = sub_prefix
    assert reader.wait(_load(etcd_client, p, 10), timeout=10)
    zero = reader.list(p, limit=0)
    assert zero.items == [] and zero.more and zero.continue_token
    rest = reader.list(p, limit=10, continue_token=zero.continue_token)
    assert len(rest) == 10 and not rest.more and rest.continue_token is None
    assert not reader.list(p, limit=10).more  # exactly 10 keys: nothing remains
    assert not reader.list(p).more


def test_bad_tokens_are_value_errors(etcd_client: Any, writer: tuple[WriterProcess, bytes],
                                     sub_prefix: bytes, reader: shmcache.Reader) -> None:
    p = sub_prefix
    assert reader.wait(_load(etcd_client, p, 5), timeout=10)
    tok = reader.list(p, limit=2).continue_token
    assert tok is not None
    with pytest.raises(ValueError, match="prefix"):
        reader.list(p + b"k", limit=2, continue_token=tok)
    with pytest.raises(ValueError, match="not a token"):
        reader.list(p, limit=2, continue_token="bm90IGEgdG9rZW4")
    with pytest.raises(ValueError, match="not a token"):
        reader.list(p, limit=2, continue_token="!!")
    with pytest.raises(ValueError, match="not both"):
        reader.list(p, limit=2, continue_token=tok, revision=reader.revision)
    with pytest.raises(ValueError):
        list(reader.iter_list(p, page_size=0))


def test_a_token_of_another_cache_is_a_value_error(
        etcd_session: Any, etcd_client: Any, writer: tuple[WriterProcess, bytes],
        sub_prefix: bytes, reader: shmcache.Reader, cache_name: str) -> None:
    assert reader.wait(_load(etcd_client, sub_prefix, 5), timeout=10)
    tok = reader.list(sub_prefix, limit=2).continue_token
    other = WriterProcess(cache_name, etcd_session.endpoint, writer[1])
    try:
        other.start()
        with shmcache.Reader(cache_name) as r2:
            with pytest.raises(ValueError, match="belongs to cache"):
                r2.list(sub_prefix, limit=2, continue_token=tok)
    finally:
        other.close()


def test_a_page_whose_revision_left_the_window_is_compacted(
        etcd_session: Any, etcd_client: Any, cache_name: str, unique_prefix: bytes) -> None:
    p = unique_prefix
    _load(etcd_client, p, 20)
    w = WriterProcess(cache_name, etcd_session.endpoint, p, ring_size="64KiB")
    try:
        w.start()
        with shmcache.Reader(cache_name) as r:
            first = r.list(p, limit=5)
            last = 0
            for i in range(100):  # ~200 KB through a 64 KiB ring: the window moves past it
                last = put(etcd_client, p + b"k%04d" % (i % 20), b"y" * 2000)
            assert r.wait(last, timeout=15)
            assert r.status().oldest_watchable_revision > first.revision
            with pytest.raises(shmcache.CompactedError):
                r.list(p, limit=5, continue_token=first.continue_token)
    finally:
        w.close()


# -- pages at a past revision: past_page's merge (pure), and heavy change (etcd) ----


def test_past_page_equals_the_state_at_the_revision_at_every_offset() -> None:
    """_history.past_page against a brute-force answer: random current ranges, random
    changes after the revision (keys added, removed, rewritten; more of them hidden in
    a page than the page holds), every offset and page size."""
    from shmcache.reader import history as _history

    rnd = random.Random(3)

    def kv(k: bytes, tag: bytes) -> KeyValue:
        return KeyValue(k, tag, 1, 1, 1, 0)

    for _trial in range(60):
        universe = [b"k%03d" % i for i in range(rnd.randrange(1, 120))]
        then = {k: kv(k, b"then") for k in universe if rnd.random() < 0.6}
        u = _history.Undo(5, 0, 0, 0)
        now_state = dict(then)
        for k in rnd.sample(universe, rnd.randrange(len(universe) + 1)):
            u.prev[k] = (then.get(k), None)  # its first event after revision 5
            if rnd.random() < 0.5:
                now_state.pop(k, None)
            else:
                now_state[k] = kv(k, b"now")
        current = [now_state[k] for k in sorted(now_state)]
        want_all = [then[k] for k in sorted(then)]
        for start in (b"", b"k010", b"k050", b"k2"):
            cur = [x for x in current if x.key >= start]
            for want in (-1, 0, 1, 3, 17, 200):
                got = _history.past_page(
                    lambda n, cur=cur: cur if n < 0 else cur[:n], u,
                    lambda last, start=start, u=u: u.keys_in(start, last, None), want)
                expect = [x for x in want_all if x.key >= start]
                assert got == (expect if want < 0 else expect[:want]), (start, want)


def test_pages_after_heavy_change_and_one_decode_per_record(
        etcd_client: Any, writer: tuple[WriterProcess, bytes], sub_prefix: bytes,
        reader: shmcache.Reader, monkeypatch: pytest.MonkeyPatch) -> None:
    """Between pages, most of the keys still to come are deleted, rewritten or joined
    by new ones (many more than a page): every page equals etcd's range at the first
    page's revision, and paging on decodes each ring record once, not once per page."""
    from shmcache.format import codec as _codec
    from shmcache.reader import history as _history

    p = sub_prefix
    assert reader.wait(_load(etcd_client, p, 400), timeout=10)
    first = reader.list(p, limit=20)
    rev = first.revision
    ops: list[tuple[str, bytes, bytes]] = []
    for j in range(20, 400):
        if j % 3 == 0:
            ops.append(("delete", p + b"k%04d" % j, b""))
        elif j % 3 == 1:
            ops.append(("put", p + b"k%04d" % j, b"rewritten"))
        if j % 5 == 0:
            ops.append(("put", p + b"k%04da" % j, b"new"))
    end = 0
    for i in range(0, len(ops), 50):
        end = txn(etcd_client, ops[i:i + 50])
    for i in range(30):  # and single revisions
        end = put(etcd_client, p + b"k%04d" % (100 + i), b"again")
    assert reader.wait(end, timeout=10)
    decoded: list[int] = []
    real = _codec.decode_indexed

    def counting(payload: Any, revision: int, segment: str) -> Any:
        decoded.append(revision)
        return real(payload, revision, segment)

    monkeypatch.setattr(_history._codec, "decode_indexed", counting)
    pages = [first]
    while pages[-1].more:
        pages.append(reader.list(p, limit=20, continue_token=pages[-1].continue_token))
    assert [kv for pg in pages for kv in pg] == etcd_range(etcd_client, p, rev)
    assert all(pg.revision == rev for pg in pages) and len(pages) == 20
    # One decode per record after the first page's revision, for all 19 pages.
    assert sorted(decoded) == sorted(set(decoded)) and decoded, decoded[:20]
    assert max(decoded) == end and min(decoded) > rev
    # The listing at the end revision, paged, equals etcd too.
    assert list(reader.iter_list(p, page_size=13)) == etcd_range(etcd_client, p, end)


def test_view_page_equals_the_merged_state_at_every_start_and_size() -> None:
    """View.page (the current list's merge of the snapshot with the changes since it,
    read only as far as the page needs) against a brute-force merge: random snapshots,
    an overlay segment and a private overlay over it (puts, deletes, new keys, dense and
    sparse), every start and page size."""

    from sortedcontainers import SortedDict

    from shmcache.format import layout, snapshot
    from shmcache.reader.view import View

    rnd = random.Random(4)

    def segment(items: dict[bytes, tuple[bytes, int, int, int, int]], kind: int) -> Any:
        keys = sorted(items)
        vals = [items[k] for k in keys]
        plan = snapshot.Plan.of(len(keys), sum(snapshot.entry_span(k, v[0])
                                               for k, v in zip(keys, vals, strict=True)))
        buf = bytearray(plan.total)
        snapshot.write(buf, plan, 9, 1, keys, vals, kind=kind)  # type: ignore[arg-type]
        return snapshot.Snapshot("/t", bytes(buf), plan.total, kind)

    for _trial in range(40):
        universe = [b"k%04d" % i for i in range(rnd.randrange(1, 400))]
        state = {k: (b"snap", 1, 2, 1, 0) for k in universe if rnd.random() < 0.7}
        v = View.__new__(View)
        v.snap = segment(state, layout.KIND_SNAPSHOT)
        want_state = {k: KeyValue(k, *x) for k, x in state.items()}
        density = rnd.choice([0.01, 0.1, 0.6])
        v.delta = None
        if rnd.random() < 0.5:  # an overlay segment (version 0: deleted)
            seg: dict[bytes, tuple[bytes, int, int, int, int]] = {}
            for k in universe:
                if rnd.random() < density:
                    seg[k] = (b"", 0, 0, 0, 0) if rnd.random() < 0.4 else (b"seg", 1, 3, 2, 0)
            v.delta = segment(seg, layout.KIND_OVERLAY)
            for k, x in seg.items():
                if x[3]:
                    want_state[k] = KeyValue(k, *x)
                else:
                    want_state.pop(k, None)
        v.recent = SortedDict()
        for k in universe:
            if rnd.random() < density:
                kv = None if rnd.random() < 0.4 else KeyValue(k, b"mine", 1, 4, 3, 0)
                v.recent[k] = kv
                if kv is None:
                    want_state.pop(k, None)
                else:
                    want_state[k] = kv
        expect_all = [want_state[k] for k in sorted(want_state)]
        for start in (b"", b"k0050", b"k0199x", b"k9"):
            for end in (None, b"k0300"):
                exp = [kv for kv in expect_all
                       if kv.key >= start and (end is None or kv.key < end)]
                for want in (-1, 0, 1, 5, 40, 500):
                    got = v.page(start, end, want)
                    assert got == (exp if want < 0 else exp[:want]), (start, end, want)


def test_a_reader_keeps_at_most_four_undo_maps(
        etcd_client: Any, writer: tuple[WriterProcess, bytes], sub_prefix: bytes,
        reader: shmcache.Reader) -> None:
    """Past reads at many revisions: the Reader keeps the undo maps of the last four, the
    most recent last, and every answer still equals etcd's."""
    p = sub_prefix
    revs = [put(etcd_client, p + b"k%d" % (i % 3), b"v%d" % i) for i in range(8)]
    assert reader.wait(revs[-1], timeout=10)
    for rev in revs[:-1]:
        assert reader.list(p, revision=rev).items == etcd_range(etcd_client, p, rev)
        assert reader.get(p + b"k1", revision=rev) == etcd_get(etcd_client, p + b"k1", rev)
    kept = [u.revision for u in reader._view.undos]
    assert kept == revs[-5:-1]
