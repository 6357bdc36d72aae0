"""``shmcache list --range-end/--from-key/--keys-only/--count/--shard`` and ``watch --shard``:
the same answers as etcdctl (and etcd) for the same range at the same revision."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import pytest

import shmcache
from tests.helpers import WriterProcess, delete, put, txn, wait_rev
from tests.test_cli_errors import _etcdctl

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "shmcache"]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60, cwd=ROOT)


def _ok(*args: str) -> str:
    out = _run(*args)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _etcdctl_get(etcd_session: Any, *args: str) -> str:
    etcdctl = _etcdctl()
    if etcdctl is None:
        pytest.skip("no etcdctl binary")
    return subprocess.run([etcdctl, "--endpoints", etcd_session.endpoint, "get", *args],
                          capture_output=True, text=True, timeout=30, check=True,
                          env={**os.environ, "ETCDCTL_API": "3"}).stdout


def _etcdctl_count(etcd_session: Any, *args: str) -> dict[str, Any]:
    """etcdctl's --count-only answer as the JSON of its RangeResponse: etcdctl 3.5 prints
    --count-only only with -w fields, whose Count it is (newer ones print this JSON)."""
    fields = dict(line.split(" : ") for line in _etcdctl_get(
        etcd_session, "-w", "fields", "--count-only", *args).splitlines())
    d: dict[str, Any] = {"header": {"revision": int(fields['"Revision"'])}}
    if int(fields['"Count"']):  # (etcd's JSON leaves out a zero count)
        d["count"] = int(fields['"Count"'])
    return d


@pytest.fixture
def keys(etcd_client: Any, writer: tuple[WriterProcess, bytes], sub_prefix: bytes) -> bytes:
    """30 keys under a fresh sub-prefix, one deleted and one rewritten, published."""
    p = sub_prefix
    txn(etcd_client, [("put", p + b"k%02d" % i, b"v%d" % i) for i in range(30)])
    delete(etcd_client, p + b"k05")
    rev = put(etcd_client, p + b"k07", b"again")
    with shmcache.Reader(writer[0].name) as r:
        wait_rev(r, rev)
    return p


def test_range_keys_only_and_count_json_are_etcdctls(
        writer: tuple[WriterProcess, bytes], keys: bytes, etcd_session: Any) -> None:
    """--range-end, --from-key, --keys-only and --count with --json print what etcdctl's
    get KEY END, --keys-only -w json, and the RangeResponse of --count-only, at that
    revision."""
    name, p = writer[0].name, keys.decode()
    cases = [([f"{p}k03", "--range-end", f"{p}k12"], [f"{p}k03", f"{p}k12"]),
             ([f"{p}k03", "--range-end", f"{p}k12", "--keys-only"],
              [f"{p}k03", f"{p}k12", "--keys-only"]),
             ([f"{p}k10"], [f"{p}k10"])]
    for ours_args, theirs_args in cases:
        ours = json.loads(_ok("list", name, *ours_args, "--json"))
        at = ours["header"]["revision"]
        theirs = json.loads(_etcdctl_get(etcd_session, "-w", "json", f"--rev={at}",
                                         *theirs_args))
        del ours["header"], theirs["header"]
        assert ours == theirs, (ours_args, ours, theirs)
    for ours_args, theirs_args in [([f"{p}k03", "--range-end", f"{p}k12"], [f"{p}k03", f"{p}k12"]),
                                   ([p], [p, "--prefix"]), ([f"{p}no"], [f"{p}no", "--prefix"])]:
        ours = json.loads(_ok("list", name, *ours_args, "--count", "--json"))
        at = ours["header"]["revision"]
        assert ours == _etcdctl_count(etcd_session, f"--rev={at}", *theirs_args), ours_args
    counted = json.loads(_ok("list", name, p, "--count", "--json"))
    assert counted["count"] == 29 and list(counted) == ["header", "count"]
    keys_only = json.loads(_ok("list", name, p, "--keys-only", "--json"))
    assert all("value" not in kv for kv in keys_only["kvs"]) and len(keys_only["kvs"]) == 29


def test_text_output_of_count_keys_only_and_shards(
        writer: tuple[WriterProcess, bytes], keys: bytes) -> None:
    """--count prints the number alone on stdout and its revision on stderr; --keys-only one
    key per line; the --shard I/N listings split the keys by crc32(key) % N."""
    name, p = writer[0].name, keys.decode()
    out = _run("list", name, p, "--count")
    assert out.stdout == "29\n" and out.stderr.startswith("(at revision "), out
    out = _run("list", name, f"{p}k20", "--range-end", f"{p}k23", "--count")
    assert out.stdout == "3\n"
    assert _ok("list", name, f"{p}k20", "--range-end", f"{p}k23", "--keys-only") == \
        f"{p}k20\n{p}k21\n{p}k22\n"
    every = [line.split("\t")[0] for line in _ok("list", name, p).splitlines()]
    union = []
    for i in range(3):
        part = _ok("list", name, p, "--shard", f"{i}/3", "--keys-only").splitlines()
        assert part == [k for k in every if zlib.crc32(k.encode()) % 3 == i]
        union += part
    assert sorted(union) == every and len(every) == 29


@pytest.mark.parametrize("args, message", [
    (["--shard", "3/3"], "shard must be (i, n)"),
    (["--shard", "1:3"], "--shard wants I/N"),
    (["--count", "--limit", "2"], "--count takes no"),
    (["--count", "--shard", "0/2"], "--count takes no"),
    (["--range-end", "/zzz"], "outside the key range"),
    (["--from-key"], "outside the key range"),
])
def test_bad_range_arguments_are_one_line(writer: tuple[WriterProcess, bytes], keys: bytes,
                                          args: list[str], message: str) -> None:
    out = _run("list", writer[0].name, keys.decode(), *args)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and "Traceback" not in out.stderr
    assert lines[0].startswith("shmcache list: ") and message in lines[0], lines
    out = _run("watch", writer[0].name, keys.decode(), "--shard", "x")
    assert out.returncode == 2 and out.stderr.startswith("shmcache watch: --shard wants I/N")


def test_watch_shard_prints_its_shards_events(
        writer: tuple[WriterProcess, bytes], keys: bytes, etcd_client: Any) -> None:
    """``watch --shard 1/2 --json`` prints the events of that shard's keys, and only those."""
    name = writer[0].name
    with shmcache.Reader(name) as r:
        start = r.revision
    proc = subprocess.Popen([*CLI, "watch", name, keys.decode(), "--since", str(start),
                             "--shard", "1/2", "--json"], stdout=subprocess.PIPE, text=True,
                            cwd=ROOT)
    try:
        changed = [keys + b"k%02d" % i for i in range(12)]
        revs = [put(etcd_client, k, b"w") for k in changed]
        want = [(k, rv) for k, rv in zip(changed, revs, strict=True) if zlib.crc32(k) % 2 == 1]
        assert proc.stdout is not None
        got = []
        while len(got) < len(want):
            ev = json.loads(proc.stdout.readline())
            got.append((base64.b64decode(ev["kv"]["key"]), ev["revision"]))
        # One more change in the shard: nothing of the other shard came in between.
        last = next(k for k in (keys + b"z%d" % i for i in range(50)) if zlib.crc32(k) % 2 == 1)
        rev = put(etcd_client, last, b"end")
        ev = json.loads(proc.stdout.readline())
        assert (base64.b64decode(ev["kv"]["key"]), ev["revision"]) == (last, rev)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=15)
    assert got == want and proc.returncode == 0


def test_from_key_on_a_cache_of_the_whole_keyspace(etcd_server: Any, cache_name: str) -> None:
    """A cache of the whole keyspace (prefix b""): range(key, b"\\0") and ``--from-key`` are
    every key >= key, and count(b"\\0", range_end=b"\\0") every key, as etcd answers them."""
    from tests.test_ranges import etcd

    client = etcd_server.client()
    try:
        txn(client, [("put", b"/a/%02d" % i, b"v") for i in range(20)])
        txn(client, [("put", b"/b/%02d" % i, b"w") for i in range(5)] + [("put", b"\xff", b"x")])
        past = delete(client, b"/a/03")
        w = WriterProcess(cache_name, etcd_server.endpoint, b"")
        try:
            w.start()
            with shmcache.Reader(cache_name) as r:
                last = put(client, b"/a/10x", b"new")
                wait_rev(r, last)
                for rev in (last, past):
                    at = None if rev == last else rev
                    for key in (b"/a/15", b"\0", b"/b/", b"\xff\xff"):
                        want, n = etcd(client, key, b"\0", rev)
                        assert r.range(key, b"\0", revision=at).items == want, (key, rev)
                        assert r.count(key, range_end=b"\0", revision=at).count == n == len(want)
                assert r.count().count == 26
                out = _ok("list", cache_name, "/b/", "--from-key", "--keys-only")
                assert out.splitlines() == ["/b/00", "/b/01", "/b/02", "/b/03", "/b/04", "\\xff"]
                assert _run("list", cache_name, "/a/", "--from-key", "--count").stdout == "26\n"
        finally:
            w.close()
    finally:
        client.close()
