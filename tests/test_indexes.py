"""Secondary indexes: the spec language (pure), the index segment format, and by_index,
index_values and watch(index=) against a real etcd and writer process."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from typing import Any

import pytest

import shmcache
from shmcache.format import indexseg, layout
from shmcache.format import indexspec as _indexdef
from shmcache.ipc import shm as _shm
from tests.helpers import WriterProcess, delete, drain, etcd_events, etcd_range, put, txn

# -- the spec language (pure) ---------------------------------------------------


def _vals(spec: str, key: bytes, value: bytes, prefix: bytes = b"/registry/pods/") -> tuple:
    s = _indexdef.IndexSet((_indexdef.make("i", spec),), prefix)
    got = s.values(key, value)
    return got[0] if got else ()


def test_segment_spec_counts_segments_after_the_prefix() -> None:
    k = b"/registry/pods/default/web-1"
    assert _vals("segment:0", k, b"") == (b"default",)
    assert _vals("segment:1", k, b"") == (b"web-1",)
    assert _vals("segment:2", k, b"") == ()
    # A prefix without the trailing slash: the rest's leading slash is skipped.
    assert _vals("segment:0", k, b"", prefix=b"/registry/pods") == (b"default",)
    assert _vals("segment:1", b"/registry/pods/a//x", b"") == ()  # an empty segment: no value


def test_json_pointer_follows_rfc_6901() -> None:
    doc = json.dumps({"spec": {"nodeName": "node-7"}, "a/b": 1, "m~n": True,
                      "arr": ["x", "y", "x", {"o": 1}, None, 2.5], "n": None,
                      "list": [{"k": "v0"}, {"k": "v1"}]}).encode()
    k = b"/registry/pods/ns/p"
    assert _vals("json:/spec/nodeName", k, doc) == (b"node-7",)
    assert _vals("json:/a~1b", k, doc) == (b"1",)
    assert _vals("json:/m~0n", k, doc) == (b"true",)
    assert _vals("json:/arr", k, doc) == (b"2.5", b"x", b"y")  # scalars only, distinct
    assert _vals("json:/list/1/k", k, doc) == (b"v1",)
    assert _vals("json:/list/01/k", k, doc) == ()  # leading zero: not an index (RFC 6901)
    assert _vals("json:/n", k, doc) == ()  # null: no value
    assert _vals("json:/spec", k, doc) == ()  # an object: no value
    assert _vals("json:/missing/x", k, doc) == ()
    assert _vals("json:/spec/nodeName", k, b"not json {") == ()
    assert _vals("json:/spec/nodeName", k, b"\xff\xfe") == ()


def test_json_map_gives_k_equals_v() -> None:
    doc = json.dumps({"metadata": {"labels": {"app": "web", "tier": "fe", "n": 3,
                                              "o": {"x": 1}}}}).encode()
    got = _vals("json-map:/metadata/labels", b"/registry/pods/a/b", doc)
    assert got == (b"app=web", b"n=3", b"tier=fe")
    assert _vals("json-map:/metadata/missing", b"/registry/pods/a/b", doc) == ()


@pytest.mark.parametrize("bad", ["segment:x", "segment:", "json:spec", "jsn:/a", "nodeName",
                                 "json-map:a/b"])
def test_bad_specs_are_rejected_with_the_reason(bad: str) -> None:
    with pytest.raises(ValueError, match="index 'i'"):
        _indexdef.make("i", bad)


def test_bad_names_and_options() -> None:
    with pytest.raises(ValueError, match="index name"):
        _indexdef.make("no spaces", "segment:0")
    with pytest.raises(ValueError, match="NAME=SPEC"):
        _indexdef.parse_option("node")
    assert _indexdef.parse_option("node=json:/spec/nodeName") == ("node", "json:/spec/nodeName")


def test_callable_values_are_cleaned_and_failures_leave_the_key_out(
        caplog: pytest.LogCaptureFixture) -> None:
    def fn(key: bytes, value: bytes) -> list[Any]:
        if value == b"boom":
            raise RuntimeError("bug")
        return [value[:1], "s", value[:1], b"x" * (_indexdef.MAX_VALUE_LEN + 1)]

    s = _indexdef.IndexSet((_indexdef.make("c", fn),), b"")
    assert s.values(b"k", b"ab") == ((b"a", b"s"),)
    assert s.values(b"k", b"boom") == ()
    assert "raised" in caplog.text
    assert s.defs[0].spec.startswith("callable:")


# -- the index segment format ----------------------------------------------------


def _segment(pairs: list[list[tuple[bytes, bytes]]]) -> indexseg.IndexSegment:
    size, fill = indexseg.build(pairs, 3, 42, 1)
    buf = bytearray(size)
    fill(buf)
    return indexseg.IndexSegment("/t", bytes(buf), size)  # (slices of bytes, as of a mapping)


@pytest.fixture(params=["c", "python"])
def run_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """run_keys through the C speedups (_speedups.index_run) and through pure Python."""
    if request.param == "c" and indexseg._speedups is None:
        pytest.skip("shmcache.format._speedups was not built")
    monkeypatch.setattr(indexseg, "USE_SPEEDUPS", request.param == "c")
    return str(request.param)


def test_index_segment_round_trip_and_pages(run_path: str) -> None:
    rnd = random.Random(5)
    pairs = sorted({(b"v%d" % rnd.randrange(20), b"k%05d" % rnd.randrange(5000))
                    for _ in range(3000)})
    seg = _segment([pairs, []])
    assert (seg.snap_seq, seg.revision, seg.epoch, seg.count) == (3, 42, 1, 2)
    assert not seg.check()
    by_value: dict[bytes, list[bytes]] = {}
    for v, k in pairs:
        by_value.setdefault(v, []).append(k)
    assert dict(seg.values(0)) == {v: len(ks) for v, ks in by_value.items()}
    for v, ks in by_value.items():
        assert seg.run_keys(0, v, None, -1) == ks
        mid = ks[len(ks) // 2]
        assert seg.run_keys(0, v, mid, 5) == [k for k in ks if k > mid][:5]
    assert seg.run_keys(0, b"absent", None, -1) == []
    assert list(seg.values(1)) == []


def test_build_lays_out_the_same_bytes_in_c_and_python(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """indexseg.build's per-posting tables from _speedups.index_table equal the pure-Python
    ones byte for byte: random indexes, values of several lengths, empty indexes."""
    if indexseg._speedups is None:
        pytest.skip("shmcache.format._speedups was not built")
    rnd = random.Random(2)
    for trial in range(40):
        pairs = [sorted({(b"v%d" % rnd.randrange(rnd.randrange(1, 50)) + b"x" * rnd.randrange(3),
                          b"k%05d" % rnd.randrange(9000)) for _ in range(rnd.randrange(3000))})
                 for _ in range(rnd.randrange(4))]
        outs = []
        for c in (True, False):
            monkeypatch.setattr(indexseg, "USE_SPEEDUPS", c)
            size, fill = indexseg.build(pairs, 1, 2, 3)
            buf = bytearray(size)
            fill(buf)
            outs.append(bytes(buf))
        assert outs[0] == outs[1], trial
        assert not indexseg.IndexSegment("/t", outs[0], len(outs[0])).check()


def test_run_items_reads_the_snapshot_skipping_changed_keys(run_path: str) -> None:
    """run_items: the run's KeyValues from the snapshot, passing over the keys in ``skip``
    without counting them towards the limit, from above ``after``; a posting whose key
    the snapshot lacks is corruption, never a silent gap."""
    from shmcache.format import snapshot

    rnd = random.Random(8)
    keys = sorted({b"k%05d" % rnd.randrange(100_000) for _ in range(2000)})
    items = [(k, (b"val-" + k, 1, 2, 1, 0)) for k in keys]
    size, fill = snapshot.build(items, len(items), 7, 1)
    sbuf = bytearray(size)
    fill(sbuf)
    snap = snapshot.Snapshot("/s", bytes(sbuf), size)
    pairs = sorted((b"v%d" % (i % 7), k) for i, k in enumerate(keys))
    seg = _segment([pairs])
    run = [k for v, k in pairs if v == b"v3"]
    skip = {k: None for k in rnd.sample(run, len(run) // 3)}
    left = [k for k in run if k not in skip]
    for after, limit in [(None, -1), (None, 10), (run[40], 25), (run[-2], 5), (None, 0),
                         (run[10], len(run))]:
        got = seg.run_items(0, b"v3", after, limit, skip, snap)
        want = [k for k in left if after is None or k > after]
        want = want if limit < 0 else want[:limit]
        assert [kv.key for kv in got] == want, (after, limit)
        assert all(kv.value == b"val-" + kv.key for kv in got)
    assert seg.run_items(0, b"absent", None, -1, {}, snap) == []
    # An index segment naming a key its snapshot lacks.
    bad = _segment([[(b"v3", b"zz-not-in-snapshot")] + [p for p in pairs if p[0] == b"v4"]])
    with pytest.raises(shmcache.CorruptSegmentError, match="lacks") as exc:
        bad.run_items(0, b"v3", None, -1, {}, snap)
    assert exc.value.segment == "/t"
    # A damaged snapshot entry of the run: the snapshot's corruption, named as such.
    damaged = bytearray(sbuf)
    damaged[damaged.find(b"val-" + run[7]) + 5] ^= 1
    dsnap = snapshot.Snapshot("/s", bytes(damaged), size)
    with pytest.raises(shmcache.CorruptSegmentError, match="checksum") as exc:
        seg.run_items(0, b"v3", None, -1, {}, dsnap)
    assert exc.value.segment == "/s"


def test_index_segment_damage_is_an_error_not_a_wrong_answer(run_path: str) -> None:
    """Every single-bit flip anywhere is caught by a check or changes nothing a reader
    sees (flips in padding or unread fields), and ``check()`` finds each in the body."""
    pairs = [[(b"a", b"k1"), (b"a", b"k2"), (b"b", b"k3"), (b"c", b"k1")]]
    size, fill = indexseg.build(pairs, 1, 9, 1)
    clean = bytearray(size)
    fill(clean)
    want = {v: indexseg.IndexSegment("/t", bytes(clean), size).run_keys(0, v, None, -1)
            for v in (b"a", b"b", b"c")}
    for off in range(size):
        for bit in (0, 7):
            buf = bytearray(clean)
            buf[off] ^= 1 << bit
            try:
                seg = indexseg.IndexSegment("/t", bytes(buf), size)
                got = {v: seg.run_keys(0, v, None, -1) for v in want}
            except (shmcache.CorruptSegmentError, shmcache.VersionMismatchError):
                continue
            assert got == want, f"flip at byte {off} bit {bit} changed an answer silently"
    for off in range(indexseg.HEADER_SIZE, size):
        buf = bytearray(clean)
        buf[off] ^= 1
        try:
            problems = indexseg.IndexSegment("/t", bytes(buf), size).check()
        except shmcache.CorruptSegmentError:
            continue  # (the directory: the header's checksum covers it)
        assert problems, f"flip at {off} not detected"


# -- against etcd ---------------------------------------------------------------

INDEXES = ["--index", "node=json:/spec/nodeName", "--index", "ns=segment:0",
           "--index", "label=json-map:/metadata/labels"]


@pytest.fixture(scope="module")
def writer(etcd_session: Any) -> Any:
    import secrets

    name = f"ix-{secrets.token_hex(4)}"
    prefix = b"/ix/" + secrets.token_hex(6).encode() + b"/"
    # A small ring and snapshot cadence: the workload below crosses several snapshots.
    w = WriterProcess(name, etcd_session.endpoint, prefix, ring_size="1MiB",
                      extra=INDEXES + ["--snapshot-bytes", "20000"])
    try:
        w.start()
        yield w, prefix
    finally:
        w.close()


def _pod(node: str | None, labels: dict[str, str] | None = None) -> bytes:
    doc: dict[str, Any] = {"spec": {} if node is None else {"nodeName": node}}
    if labels is not None:
        doc["metadata"] = {"labels": labels}
    return json.dumps(doc).encode()


def _node_of(value: bytes) -> bytes | None:
    try:
        n = json.loads(value)["spec"]["nodeName"]
    except Exception:
        return None
    return n.encode() if isinstance(n, str) else None


def _filter(kvs: list[Any], node: bytes) -> list[Any]:
    return [kv for kv in kvs if _node_of(kv.value) == node]


def test_by_index_equals_etcd_filtered_at_every_revision(
        etcd_client: Any, writer: Any, sub_prefix: bytes) -> None:
    """Keys move between nodes, gain and lose the field, become non-JSON, are deleted,
    written in multi-key transactions and expire with leases; at every revision of the
    run by_index equals etcd's range at that revision, filtered."""
    w, prefix = writer
    p = sub_prefix
    rnd = random.Random(11)
    nodes = [f"node-{i}" for i in range(4)]
    keys = [p + b"ns%d/pod%02d" % (i % 3, i) for i in range(40)]
    revs = []
    lease = etcd_client.lease(60)
    for step in range(160):
        k = rnd.choice(keys)
        r = rnd.random()
        if r < 0.5:
            revs.append(put(etcd_client, k, _pod(rnd.choice(nodes))))
        elif r < 0.6:
            revs.append(put(etcd_client, k, _pod(None)))  # loses the field
        elif r < 0.65:
            revs.append(put(etcd_client, k, b"not json"))
        elif r < 0.75:
            revs.append(delete(etcd_client, k))
        elif r < 0.9:
            ops = [("put", kk, _pod(rnd.choice(nodes))) for kk in rnd.sample(keys, 3)]
            revs.append(txn(etcd_client, ops))
        else:
            revs.append(put(etcd_client, k, _pod(rnd.choice(nodes)), lease=lease))
        if step == 120:
            lease.revoke()  # its keys are deleted in one revision, as on expiry
            lease = etcd_client.lease(60)
    with shmcache.Reader(w.name) as r:
        assert r.wait(revs[-1], timeout=15)
        st = r.status()
        checked = 0
        for rev in sorted(set(revs)):
            if rev < st.oldest_watchable_revision:
                continue
            want_all = [kv for kv in etcd_range(etcd_client, p, rev)]
            for node in nodes:
                want = _filter(want_all, node.encode())
                got = r.by_index("node", node, revision=rev)
                assert got.revision == rev
                # by_index is over the whole cache; this test's keys are under p
                assert [kv for kv in got if kv.key.startswith(p)] == want, (rev, node)
                checked += 1
        assert checked > 100
        now = etcd_range(etcd_client, p)
        for node in nodes:
            got = [kv for kv in r.by_index("node", node) if kv.key.startswith(p)]
            assert got == _filter(now, node.encode())
        counts = r.index_values("node")
        for node in nodes:
            mine = len(_filter(etcd_range(etcd_client, prefix), node.encode()))
            assert counts.get(node.encode(), 0) == mine
        assert r.status().indexes == {"node": "json:/spec/nodeName", "ns": "segment:0",
                                      "label": "json-map:/metadata/labels"}


def test_watch_by_index_sees_keys_enter_and_leave(etcd_client: Any, etcd_session: Any,
                                                  writer: Any, sub_prefix: bytes) -> None:
    w, _prefix = writer
    p = sub_prefix
    with shmcache.Reader(w.name) as r:
        start = r.revision
        with r.watch(p, since_revision=start, index=("node", "node-x")) as wt:
            put(etcd_client, p + b"a", _pod("node-x"))  # enters
            put(etcd_client, p + b"b", _pod("node-y"))  # never in
            put(etcd_client, p + b"a", _pod("node-y"))  # leaves: prev_kv matches
            put(etcd_client, p + b"c", _pod("node-x"))
            txn(etcd_client, [("put", p + b"d", _pod("node-x")), ("put", p + b"e", b"{}")])
            last = delete(etcd_client, p + b"c")
            got = drain(wt, last)
        want = [ev for ev in etcd_events(etcd_session.endpoint, p, start, last)
                if _node_of(ev.kv.value) == b"node-x"
                or (ev.prev_kv is not None and _node_of(ev.prev_kv.value) == b"node-x")]
        assert got == want
        assert [(e.type, e.kv.key[len(p):]) for e in got] == [
            ("PUT", b"a"), ("PUT", b"a"), ("PUT", b"c"), ("PUT", b"d"), ("DELETE", b"c")]


def test_by_index_pages_stay_at_the_first_pages_revision(etcd_client: Any, writer: Any,
                                                         sub_prefix: bytes) -> None:
    w, _prefix = writer
    p = sub_prefix
    node = "page-" + p.decode()[-9:-1]
    for i in range(0, 50, 10):
        txn(etcd_client, [("put", p + b"k%03d" % j, _pod(node)) for j in range(i, i + 10)])
    last = put(etcd_client, p + b"zz", _pod("other"))
    with shmcache.Reader(w.name) as r:
        assert r.wait(last, timeout=10)
        first = r.by_index("node", node, limit=20)
        assert len(first) == 20 and first.more and first.continue_token
        put(etcd_client, p + b"k030", _pod("moved"))  # changes after the first page
        end = put(etcd_client, p + b"k045x", _pod(node))
        assert r.wait(end, timeout=10)
        pages = [first]
        while pages[-1].more:
            pages.append(r.by_index("node", node, limit=20,
                                    continue_token=pages[-1].continue_token))
        assert [len(pg) for pg in pages] == [20, 20, 10]
        assert {pg.revision for pg in pages} == {first.revision}
        assert [kv.key for pg in pages for kv in pg] == [p + b"k%03d" % j for j in range(50)]
        assert len(list(r.iter_by_index("node", node, page_size=7))) == 50  # k030 moved, k045x new
        with pytest.raises(ValueError, match="prefix"):
            r.list(p, limit=5, continue_token=first.continue_token)
        lst = r.list(p, limit=5)
        with pytest.raises(ValueError):
            r.by_index("node", node, limit=5, continue_token=lst.continue_token)
        with pytest.raises(ValueError, match="no index 'nope'"):
            r.by_index("nope", "x")
        with pytest.raises(ValueError, match="no index"):
            r.watch(p, index=("nope", "x"))


def test_by_index_pages_after_heavy_change(etcd_client: Any, writer: Any,
                                           sub_prefix: bytes) -> None:
    """Between by_index pages, most keys of the run still to come move to another node,
    are deleted, or are rewritten, and keys join the node (more than a page of each):
    every page equals etcd's range at the first page's revision, filtered; the run now
    equals etcd's now."""
    w, _prefix = writer
    p = sub_prefix
    node = "heavy-" + p.decode()[-9:-1]
    for i in range(0, 300, 50):
        txn(etcd_client, [("put", p + b"k%03d" % j, _pod(node if j % 2 else "other"))
                          for j in range(i, i + 50)])
    with shmcache.Reader(w.name) as r:
        rev0 = put(etcd_client, p + b"start", b"x")
        assert r.wait(rev0, timeout=10)
        first = r.by_index("node", node, limit=15)
        rev = first.revision
        ops: list[tuple[str, bytes, bytes]] = []
        for j in range(40, 300):
            if j % 4 == 1:
                ops.append(("put", p + b"k%03d" % j, _pod("moved")))
            elif j % 4 == 3:
                ops.append(("delete", p + b"k%03d" % j, b""))
            elif j % 4 == 2:
                ops.append(("put", p + b"k%03d" % j, _pod(node)))  # joins the node
            if j % 7 == 0:
                ops.append(("put", p + b"k%03dx" % j, _pod(node)))
        end = 0
        for i in range(0, len(ops), 40):
            end = txn(etcd_client, ops[i:i + 40])
        assert r.wait(end, timeout=10)
        pages = [first]
        while pages[-1].more:
            pages.append(r.by_index("node", node, limit=15,
                                    continue_token=pages[-1].continue_token))
        assert {pg.revision for pg in pages} == {rev}
        mine = [kv for pg in pages for kv in pg if kv.key.startswith(p)]
        assert mine == _filter(etcd_range(etcd_client, p, rev), node.encode())
        now = [kv for kv in r.iter_by_index("node", node, page_size=11)
               if kv.key.startswith(p)]
        assert now == _filter(etcd_range(etcd_client, p, end), node.encode())


def test_cli_list_by_index_and_pages(etcd_client: Any, writer: Any, sub_prefix: bytes) -> None:
    w, _prefix = writer
    p = sub_prefix
    node = "cli-" + p.decode()[-9:-1]
    last = txn(etcd_client, [("put", p + b"k%d" % j, _pod(node)) for j in range(5)])
    with shmcache.Reader(w.name) as r:
        assert r.wait(last, timeout=10)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "shmcache", *args], capture_output=True,
                              text=True, timeout=30)

    out = cli("list", w.name, "--index", f"node={node}", "--limit", "3", "--json")
    assert out.returncode == 0, out.stderr
    page = json.loads(out.stdout)
    assert len(page["kvs"]) == 3 and page["more"] and page["continue_token"]
    out2 = cli("list", w.name, "--index", f"node={node}", "--limit", "3", "--continue",
               page["continue_token"], "--json")
    assert out2.returncode == 0, out2.stderr
    assert len(json.loads(out2.stdout)["kvs"]) == 2
    text = cli("list", w.name, "--index", f"node={node}")
    assert text.returncode == 0 and text.stdout.count("\n") == 5
    bad = cli("list", w.name, "--index", "nope=x")
    assert bad.returncode != 0 and "no index 'nope'" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    st = cli("status", w.name)
    assert "index node" in st.stdout and "json:/spec/nodeName" in st.stdout


def test_serve_rejects_a_bad_index_spec_in_one_line() -> None:
    out = subprocess.run([sys.executable, "-m", "shmcache", "serve", "bad-ix", "--index",
                          "node=json:spec", "--check-config"], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 2
    assert "must be empty or start with '/'" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_changed_index_definitions_rebuild_in_a_new_epoch(etcd_session: Any, etcd_client: Any,
                                                          cache_name: str,
                                                          unique_prefix: bytes) -> None:
    p = unique_prefix
    last = txn(etcd_client, [("put", p + b"ns%d/x" % i, _pod(f"n{i % 2}")) for i in range(6)])
    w = WriterProcess(cache_name, etcd_session.endpoint, p,
                      extra=["--index", "node=json:/spec/nodeName"])
    try:
        w.start()
        with shmcache.Reader(cache_name) as r:
            assert r.wait(last, timeout=10)
            epoch = r.status().epoch
            assert len(r.by_index("node", "n0")) == 3
        w.terminate()
        # Same definitions: resumed in the same epoch. Different: rebuilt in a new one.
        w.start()
        with shmcache.Reader(cache_name) as r:
            assert r.status().epoch == epoch and len(r.by_index("node", "n1")) == 3
        w.terminate()
        w.args += ["--index", "ns=segment:0"]
        w.start()
        with shmcache.Reader(cache_name) as r:
            deadline = time.monotonic() + 15
            while r.status().epoch == epoch and time.monotonic() < deadline:
                time.sleep(0.05)  # the new writer relists (restore refused)
            st = r.status()
            assert st.epoch > epoch and set(st.indexes) == {"node", "ns"}
            assert r.index_values("ns") == {b"ns%d" % i: 1 for i in range(6)}
        w.terminate()
        # Without indexes: by_index says so.
        w.args = [a for a in w.args if a not in ("--index", "ns=segment:0",
                                                 "node=json:/spec/nodeName")]
        w.start()
        with shmcache.Reader(cache_name) as r:
            deadline = time.monotonic() + 15
            while r.status().epoch == st.epoch and time.monotonic() < deadline:
                time.sleep(0.05)
            with pytest.raises(ValueError, match="its indexes: none"):
                r.by_index("node", "n0")
    finally:
        w.close()
    assert not _shm.list_segments(cache_name)


def test_index_segment_goes_with_each_snapshot_and_leaves_no_strays(
        etcd_client: Any, writer: Any, sub_prefix: bytes) -> None:
    w, _prefix = writer
    p = sub_prefix
    for i in range(30):  # past --snapshot-bytes: new snapshots
        last = put(etcd_client, p + b"k%d" % (i % 5), _pod("n", {"i": "x" * 500}))
    with shmcache.Reader(w.name) as r:
        assert r.wait(last, timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            segs = _shm.list_segments(w.name)
            snaps = [s for s in segs if ".snap." in s]
            idxs = [s for s in segs if ".idx." in s]
            if len(snaps) == 1 and [s.replace(".snap.", ".idx.") for s in snaps] == idxs:
                break
            time.sleep(0.1)
        assert [s.replace(".snap.", ".idx.") for s in snaps] == idxs
        seq = r.control.block().snap_seq  # type: ignore[union-attr]
        assert idxs == [layout.index_name(w.name, seq)]


def test_check_verifies_the_index_segment(etcd_session: Any, etcd_client: Any,
                                          cache_name: str, unique_prefix: bytes) -> None:
    """`shmcache check` verifies the published index segment (checks, order, every key in
    the snapshot) and reports a damaged posting as a violation, not "ok"."""
    import mmap
    import os

    import posix_ipc

    p = unique_prefix
    txn(etcd_client, [("put", p + b"ns%d/pod%d" % (i % 3, i), _pod(f"node-{i % 4}"))
                      for i in range(40)])
    w = WriterProcess(cache_name, etcd_session.endpoint, p, extra=INDEXES)
    try:
        w.start()
        cli = [sys.executable, "-m", "shmcache", "check", cache_name]
        out = subprocess.run(cli, capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "ok: indexes: node, ns, label: 80 postings verified" in out.stdout
        with shmcache.Reader(cache_name) as r:
            seq = r.control.block().snap_seq  # type: ignore[union-attr]
        shm = posix_ipc.SharedMemory(layout.index_name(cache_name, seq), flags=0, size=0)
        try:
            m = mmap.mmap(shm.fd, os.fstat(shm.fd).st_size, flags=mmap.MAP_SHARED)
        finally:
            shm.close_fd()
        try:  # one byte of a key in the postings' key area (the index segment keeps keys)
            pos = m.rfind(p + b"ns1/pod")
            assert pos > 0
            m[pos + len(p) + 2] ^= 0x01
        finally:
            m.close()
        out = subprocess.run(cli, capture_output=True, text=True, timeout=30)
        assert out.returncode == 1, out.stdout
        assert "VIOLATION: index segment" in out.stdout
        assert "ok: indexes" not in out.stdout
    finally:
        w.close()
