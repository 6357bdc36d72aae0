"""``shmcache bench NAME``: reader processes against a live cache, reading only (issue 12).

Every command runs as a real ``python -m shmcache`` child process against the module's
writer (tests/conftest.py ``writer``) and the session's etcd. Windows are short (0.3-0.5 s):
these tests check the table, the JSON and the guarantees, not the figures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import shmcache
from shmcache.ipc import shm as _shm
from tests.helpers import WriterProcess, etcd_current_revision, put, txn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = [sys.executable, "-m", "shmcache"]
COLUMNS = ("readers", "total", "per_reader", "p50", "p99", "cpu_us_per_op", "cores",
           "others", "rev_s", "scaling")


def _start(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=ROOT)


def _finish(p: subprocess.Popen[bytes], timeout: float = 60.0) -> tuple[int, str, str]:
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
    return p.returncode, out.decode(errors="replace"), err.decode(errors="replace")


def _rows(out: str) -> list[dict[str, str]]:
    """The table's rows, one per reader count, as {column: cell}."""
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.split()[:1] == ["readers"])
    rows = []
    for line in lines[head + 1:]:
        if not line.strip():
            break
        cells = line.split()
        assert len(cells) == len(COLUMNS), line
        rows.append(dict(zip(COLUMNS, cells, strict=True)))
    return rows


def _num(cell: str) -> float:
    return float(cell.replace(",", "").rstrip("x"))


def _load(client: Any, prefix: bytes, n: int) -> int:
    rev = 0
    for start in range(0, n, 100):
        rev = txn(client, [("put", prefix + b"k/%03d" % i, b"v%d" % i)
                           for i in range(start, min(n, start + 100))])
    return rev


def _our_segments(name: str) -> set[str]:
    return {f for f in os.listdir("/dev/shm") if name in f}


def test_get_and_list_tables_json_and_nothing_written(
        writer: tuple[WriterProcess, bytes], sub_prefix: bytes, etcd_client: Any,
        tmp_path: Path) -> None:
    """A row per reader count with sane figures, the --json file with its fields and machine
    stamp, list returning --list-size keys, scaling against the smallest count when 1 is not
    measured; and neither etcd's revision, the cache nor /dev/shm changed."""
    name = writer[0].name
    rev = _load(etcd_client, sub_prefix, 300)
    with shmcache.Reader(name) as r:
        assert r.wait(rev, timeout=15)
    etcd_before = etcd_current_revision(etcd_client)
    segments_before = _our_segments(name)
    get_json, list_json = tmp_path / "get.json", tmp_path / "list.json"
    p_get = _start("bench", name, "--readers", "1,2", "--op", "get", "--seconds", "0.5",
                   "--prefix", sub_prefix.decode(), "--sample", "100", "--json", str(get_json))
    p_list = _start("bench", name, "--readers", "2", "--op", "list", "--seconds", "0.3",
                    "--prefix", sub_prefix.decode(), "--list-size", "10",
                    "--json", str(list_json))
    (rc, out, err), (rc2, out2, err2) = _finish(p_get), _finish(p_list)
    assert rc == 0, err
    assert rc2 == 0, err2

    rows = _rows(out)
    assert [row["readers"] for row in rows] == ["1", "2"]
    for row in rows:
        assert _num(row["total"]) > 0 and _num(row["per_reader"]) > 0
        assert 0 < _num(row["p50"]) <= _num(row["p99"])
        assert _num(row["cpu_us_per_op"]) > 0 and _num(row["cores"]) > 0
    assert rows[0]["scaling"] == "1.00x"
    assert "readers 1: get for 0.5 s" in err and "readers 2: done" in err
    assert f"cache {name!r}" in out and f"{os.cpu_count()} cores" in out

    doc = json.loads(get_json.read_text())
    assert doc["op"] == "get" and doc["readers"] == [1, 2] and doc["seconds"] == 0.5
    m = doc["machine"]
    assert m["cpu_count"] == os.cpu_count() and m["shmcache"] == shmcache.__version__
    assert m["python"].endswith(".".join(map(str, sys.version_info[:3]))) and m["cpu_model"]
    assert doc["cache"]["name"] == name and doc["cache"]["revision"] >= rev
    assert doc["prefix"] == sub_prefix.decode()
    assert doc["keys_under_prefix"] == 300 and doc["sampled_keys"] == 100
    assert doc["scaling_base_readers"] == 1
    res = doc["results"]
    assert [x["readers"] for x in res] == [1, 2] and res[0]["scaling"] == 1.0
    for x in res:
        assert x["ops"] > 0 and x["ops_per_s"] > 0 and x["per_reader_median_ops_per_s"] > 0
        assert 0 < x["p50_us"] <= x["p99_us"] and x["cpu_us_per_op"] > 0
        assert x["cores_used"] > 0 and len(x["per_reader"]) == x["readers"]
        assert all(p["cpu_s"] > 0 and p["ops"] > 0 for p in x["per_reader"])
    assert not list(tmp_path.glob(".shmcache-bench-*"))  # no temporary file left

    lrows = _rows(out2)
    assert [row["readers"] for row in lrows] == ["2"] and lrows[0]["scaling"] == "1.00x"
    assert "vs 2" in out2 and "the smallest count" in out2
    ldoc = json.loads(list_json.read_text())
    assert ldoc["op"] == "list" and ldoc["list_size"] == 10
    assert ldoc["results"][0]["ops"] > 0 and ldoc["results"][0]["keys_per_list"] == 10
    assert ldoc["scaling_base_readers"] == 2

    assert etcd_current_revision(etcd_client) == etcd_before  # nothing written to etcd
    with shmcache.Reader(name) as r:
        assert r.revision == etcd_before and r.status().key_count == doc["cache"]["keys"]
    assert _our_segments(name) == segments_before  # no new /dev/shm objects


def test_watch_counts_events_under_puts_and_says_when_there_are_none(
        writer: tuple[WriterProcess, bytes], sub_prefix: bytes, etcd_client: Any) -> None:
    """Under puts every reader count delivers events (ops = events, CPU per event); a prefix
    with no writes gives 0 events and says so instead of dividing by zero. ``--json -``
    puts the JSON on stdout."""
    name = writer[0].name
    busy, quiet = sub_prefix + b"busy/", sub_prefix + b"quiet/"
    put(etcd_client, quiet + b"x", b"1")
    stop = threading.Event()

    def puts() -> None:
        i = 0
        while not stop.wait(0.005):
            put(etcd_client, busy + b"k%d" % (i % 50), b"%d" % i)
            i += 1

    t = threading.Thread(target=puts, daemon=True)
    t.start()
    try:
        p_busy = _start("bench", name, "--readers", "1,2", "--op", "watch", "--seconds", "0.5",
                        "--prefix", busy.decode())
        p_quiet = _start("bench", name, "--readers", "1", "--op", "watch", "--seconds", "0.3",
                         "--prefix", quiet.decode(), "--json", "-")
        (rc, out, err), (rc2, out2, err2) = _finish(p_busy), _finish(p_quiet)
    finally:
        stop.set()
        t.join(10)
    assert rc == 0, err
    rows = _rows(out)
    assert [row["readers"] for row in rows] == ["1", "2"]
    for row in rows:
        assert _num(row["total"]) > 0 and _num(row["cpu_us_per_op"]) > 0
        assert _num(row["rev_s"]) > 0
    assert "an op is an event delivered" in out

    assert rc2 == 0, err2
    doc = json.loads(out2)  # stdout is the JSON alone
    row = doc["results"][0]
    assert doc["op"] == "watch" and row["ops"] == 0 and row["deliveries"] == 0
    assert row["cpu_us_per_op"] is None and row["p50_us"] is None and row["scaling"] is None


def test_errors_one_line_exit_2(writer: tuple[WriterProcess, bytes], tmp_path: Path) -> None:
    """A missing cache, a prefix outside the cache and an unwritable --json end in one line
    ``shmcache bench: ...`` and exit 2, before any reader process starts; bad arguments are
    argparse errors (exit 2)."""
    name = writer[0].name
    ours = [["bench", "t-nosuchcache"], ["bench", name, "--prefix", "/outside/"],
            ["bench", name, "--json", str(tmp_path / "missing" / "x.json")],
            ["bench", "bad/name"]]
    bad = [["bench", name, "--readers", "0"], ["bench", name, "--readers", "1,x"],
           ["bench", name, "--readers", ""], ["bench", name, "--readers", "-1"],
           ["bench", name, "--readers", "100000"], ["bench", name, "--op", "put"],
           ["bench", name, "--seconds", "0"], ["bench", name, "--seconds", "-1"],
           ["bench", name, "--seconds", "nan"], ["bench", name, "--list-size", "0"]]
    procs = [_start(*c) for c in ours + bad]
    for cmd, p in zip(ours + bad, procs, strict=True):
        rc, out, err = _finish(p, timeout=30)
        assert rc == 2, (cmd, rc, out, err)
        assert "Traceback" not in err and out == "", (cmd, err)
        lines = err.strip().splitlines()
        if cmd in ours:
            assert len(lines) == 1 and lines[0].startswith("shmcache bench: "), (cmd, err)
        else:
            assert lines[-1].startswith("shmcache bench: error: argument "), (cmd, err)
    assert not _shm.list_segments("t-nosuchcache")
