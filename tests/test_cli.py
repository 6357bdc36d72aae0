"""The ``shmcache`` command line: one-line errors, argument ranges, sizes, binary-safe output,
``status``'s etcd row, ``check``'s wording, and the benchmark's results file (issue 9).

Every command runs as a real ``python -m shmcache`` child process against a real etcd
and a real writer (tests/helpers.WriterProcess) on the host's /dev/shm.
"""

from __future__ import annotations

import base64
import json
import mmap
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import posix_ipc
import pytest

import shmcache
from shmcache._units import parse_size
from shmcache.format import layout
from shmcache.ipc import control_reader
from shmcache.ipc import shm as _shm
from tests.helpers import WriterProcess, put

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = [sys.executable, "-m", "shmcache"]


def _run(*args: str | bytes, timeout: float = 30.0) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*CLI, *args], capture_output=True, timeout=timeout, cwd=ROOT)


def _run_all(cmds: list[list[str]], timeout: float = 30.0) -> list[tuple[int, str, str]]:
    """Run the commands side by side (each is a fresh interpreter: ~0.3 s of imports)."""
    procs = [subprocess.Popen([*CLI, *c], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              cwd=ROOT) for c in cmds]
    out = []
    for p in procs:
        try:
            so, se = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            so, se = p.communicate()
        out.append((p.returncode, so.decode(errors="replace"), se.decode(errors="replace")))
    return out


def _wait_revision(name: str, revision: int) -> None:
    with shmcache.Reader(name) as r:
        assert r.wait(revision, timeout=15), f"cache stuck at {r.revision} < {revision}"


# -- item 9: sizes ---------------------------------------------------------------------------

def test_parse_size_units_up_to_tib() -> None:
    """B, KiB..TiB (and K..T) are powers of 1024, KB..TB powers of 1000; any case; exact."""
    assert parse_size("4096") == parse_size("4096B") == parse_size("4096 b") == 4096
    assert parse_size("512k") == parse_size("512KiB") == parse_size("512kib") == 512 << 10
    assert parse_size("64MiB") == parse_size("64m") == parse_size("64MIB") == 64 << 20
    assert parse_size("1GiB") == parse_size("1g") == 1 << 30
    assert parse_size("1TiB") == parse_size("1t") == parse_size("1tib") == 1 << 40
    assert parse_size("2TiB") == 2 << 40
    assert (parse_size("1KB"), parse_size("1MB"), parse_size("1GB"), parse_size("1TB")) == \
        (10**3, 10**6, 10**9, 10**12)
    assert parse_size("1.5GiB") == 3 << 29 and parse_size(".5KiB") == 512
    assert parse_size("0.1TiB") == (1 << 40) // 10  # no float rounding
    assert parse_size(1234) == 1234
    for bad in ("", "MiB", "x", "1PiB", "1/2KiB", "nan", "inf", "1e", "--1k", "1 2k"):
        with pytest.raises(ValueError, match="cannot parse size"):
            parse_size(bad)


def test_config_does_not_import_the_writer() -> None:
    """config.py (``serve --check-config``) parses sizes without pulling in etcd3/grpc."""
    code = ("import sys, shmcache.cli.config as c; c.load('x', {'ring_size': '1TiB'}, environ={}); "
            "print(sorted(m for m in ('shmcache.writer.writer', 'etcd3', 'grpc') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=30, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_serve_ring_size_1tib_accepted_2tib_out_of_range() -> None:
    """The documented range goes to 1 TiB: 1TiB parses, 2TiB is a range error (not a parse
    error), as one line with exit 2."""
    ok, bad = _run_all([["serve", "x", "--ring-size", "1TiB", "--check-config"],
                        ["serve", "x", "--ring-size", "2TiB", "--check-config"]])
    assert ok[0] == 0, ok[2]
    assert f"ring_size = {1 << 40}" in ok[1]
    rc, _out, err = bad
    assert rc == 2, err
    assert "cannot parse" not in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and err.startswith("shmcache serve: ring_size")
    assert "out of range" in err and "must be between 64KiB and 1TiB" in err


# -- item 3: one-line errors, argument ranges ------------------------------------------------

def test_errors_are_one_line_with_exit_2(writer: tuple[WriterProcess, bytes]) -> None:
    """Reader ValueErrors (key or prefix outside the cache's range) and a missing cache end in
    ``shmcache COMMAND: message`` and exit 2; out-of-range arguments are argparse usage errors
    (exit 2) before anything runs. Never a traceback."""
    w, _prefix = writer
    name = w.name
    ours = [["get", name, "/outside/x"], ["list", name, "/outside/"],
            ["watch", name, "/outside/"], ["get", "t-nosuchcache", "k"],
            ["get", "bad/name", "k"]]
    argparse_errors = [["list", name, "--limit", "-1"], ["list", name, "--limit", "0"],
                       ["list", name, "--limit", "x"], ["watch", name, "--since", "-1"],
                       ["demo", "--keys", "0"], ["demo", "--readers", "0"],
                       ["demo", "--duration", "-1"], ["demo", "--duration", "0"],
                       ["demo", "--duration", "nan"], ["get", name, "k", "--json", "--raw"]]
    results = _run_all(ours + argparse_errors, timeout=20)
    for cmd, (rc, out, err) in zip(ours + argparse_errors, results, strict=True):
        assert rc == 2, (cmd, rc, out, err)
        assert "Traceback" not in err and "Traceback" not in out, (cmd, err)
        lines = err.strip().splitlines()
        if cmd in ours:
            assert len(lines) == 1 and lines[0].startswith(f"shmcache {cmd[0]}: "), (cmd, err)
        else:
            assert lines[-1].startswith(f"shmcache {cmd[0]}: error: argument "), (cmd, err)
    assert "outside the key range" in results[0][2] and "outside the key range" in results[1][2]
    assert "outside the key range" in results[2][2]


# -- item 10: binary-safe output -------------------------------------------------------------

def test_binary_values_round_trip_and_text_is_unambiguous(
        writer: tuple[WriterProcess, bytes], sub_prefix: bytes, etcd_client: Any) -> None:
    """--json carries key and value in base64 (watch's prev_kv too); text escapes so the byte
    \\xff and the 4 characters \\xff differ and a newline does not split a line; get --raw
    writes the exact bytes."""
    name = writer[0].name
    values = {sub_prefix + b"ff": b"\xff", sub_prefix + b"text": b"\\xff",
              sub_prefix + b"nl": b"a\nb", sub_prefix + b"k\xfe\tx": b"tab\tand \x00 nul"}
    start = put(etcd_client, sub_prefix + b"text", b"old")
    rev = 0
    for k, v in values.items():
        rev = put(etcd_client, k, v)
    _wait_revision(name, rev)

    p = sub_prefix.decode()
    watch = subprocess.Popen([*CLI, "watch", name, p, "--since", str(start), "--json"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    try:
        keys = list(values)
        cmds: list[list[Any]] = [["get", name, k, "--json"] for k in keys]
        cmds += [["get", name, k, "--raw"] for k in keys]
        cmds += [["list", name, p], ["list", name, p, "--json"], ["get", name, keys[0]]]
        procs = [subprocess.Popen([*CLI, *c], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  cwd=ROOT) for c in cmds]
        res = [(pr.communicate(timeout=20), pr.returncode) for pr in procs]
        n = len(keys)
        for i, k in enumerate(keys):
            (out, err), rc = res[i]
            assert rc == 0, err
            doc = json.loads(out)
            assert doc["revision"] >= rev and isinstance(doc["revision"], int)
            kv = doc["kv"]
            assert base64.b64decode(kv["key"], validate=True) == k
            assert base64.b64decode(kv["value"], validate=True) == values[k]
            assert all(isinstance(kv[f], int) for f in
                       ("create_revision", "mod_revision", "version"))
            assert "lease" not in kv  # (as etcdctl: left out when 0)
            (raw, err), rc = res[n + i]
            assert rc == 0 and raw == values[k], (raw, err)
        (text, err), rc = res[2 * n]
        assert rc == 0, err
        lines = text.decode("utf-8").split("\n")
        assert lines[-1] == "" and len(lines) == n + 1, text  # one line per key
        shown = dict(line.split("\t") for line in lines[:-1])  # tabs inside are escaped
        assert shown[p + "ff"] == "\\xff"
        assert shown[p + "text"] == "\\\\xff"
        assert shown[p + "nl"] == "a\\nb"
        assert shown[p + "k\\xfe\\tx"] == "tab\\tand \\x00 nul"
        (js, err), rc = res[2 * n + 1]
        items = json.loads(js)["kvs"]
        assert {base64.b64decode(i["key"]): base64.b64decode(i["value"]) for i in items} == values
        (one, _), rc = res[2 * n + 2]
        assert rc == 0 and one == b"\\xff\n"

        events: list[dict[str, Any]] = []
        assert watch.stdout is not None
        timer = threading.Timer(15, watch.kill)  # (a readline that never ends)
        timer.start()
        try:
            while len(events) < n:
                line = watch.stdout.readline()
                if not line:
                    break
                events.append(json.loads(line))
        finally:
            timer.cancel()
        got = [(e["type"], base64.b64decode(e["kv"]["key"]), base64.b64decode(e["kv"]["value"]))
               for e in events]
        assert got == [("PUT", k, v) for k, v in values.items()]
        overwrite = events[1]
        assert overwrite["prev_kv"] is not None
        assert base64.b64decode(overwrite["prev_kv"]["key"]) == sub_prefix + b"text"
        assert base64.b64decode(overwrite["prev_kv"]["value"]) == b"old"
        assert overwrite["revision"] == overwrite["kv"]["mod_revision"]
    finally:
        watch.send_signal(signal.SIGTERM)
        try:
            watch.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            watch.kill()
            watch.communicate()
    assert watch.returncode == 0


# -- status: etcd reachability ---------------------------------------------------------------

def test_status_shows_etcd_unreachable(cache_name: str, unique_prefix: bytes) -> None:
    """A writer that cannot reach etcd: ``status`` says since when, in text and --json, even
    before the writer has loaded anything (no snapshot yet, so no Reader attaches)."""
    w = WriterProcess(cache_name, "http://127.0.0.1:1", unique_prefix)
    try:
        w.start(wait=False)
        deadline = time.monotonic() + 20
        doc: dict[str, Any] = {}
        while time.monotonic() < deadline:
            out = _run("status", cache_name, "--json")
            if out.returncode == 1:  # not ready: no snapshot, etcd unreachable
                doc = json.loads(out.stdout)
                if doc["writer_alive"] and doc["etcd_unreachable_since"] is not None:
                    break
            time.sleep(0.2)
        assert doc.get("etcd_unreachable_since"), (doc, w.log())
        assert abs(doc["etcd_unreachable_since"] - time.time()) < 60
        text = _run("status", cache_name)
        assert text.returncode == 1, text.stderr
        rows = dict(re.split(r"\s{2,}", line, maxsplit=1)
                    for line in text.stdout.decode().splitlines())
        assert re.fullmatch(r"unreachable since 20\d\d-\d\d-\d\d \d\d:\d\d:\d\d UTC \(\d+s\)",
                            rows["etcd"]), rows
    finally:
        w.close()


def test_status_shows_etcd_reachable(writer: tuple[WriterProcess, bytes]) -> None:
    out = _run("status", writer[0].name)
    assert out.returncode == 0, out.stderr
    rows = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in out.stdout.decode().splitlines())
    assert rows["etcd"] == "reachable" and rows["writer"] == f"pid {writer[0].pid} alive"
    doc = json.loads(_run("status", writer[0].name, "--json").stdout)
    assert "etcd_unreachable_since" in doc and doc["etcd_unreachable_since"] is None
    assert base64.b64decode(doc["prefix_base64"]) == writer[1]


def _status_state(name: str) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(exit code, --json document, text rows) of ``shmcache status NAME``."""
    js = _run("status", name, "--json")
    text = _run("status", name)
    if js.returncode == 2 or text.returncode == 2:  # (a control segment being laid out)
        return 2, {"not_ready_reason": js.stderr.decode()}, {}
    assert js.returncode in (0, 1) and text.returncode in (0, 1), (js, text)
    if js.returncode != text.returncode:  # the state changed between the two calls
        return -1, {"not_ready_reason": "changed between two calls"}, {}
    rows = dict(re.split(r"\s{2,}", line, maxsplit=1)
                for line in text.stdout.decode().splitlines())
    return js.returncode, json.loads(js.stdout), rows


def _wait_status(name: str, code: int, timeout: float = 30.0) -> tuple[dict[str, Any],
                                                                         dict[str, str]]:
    deadline = time.monotonic() + timeout
    while True:
        got, doc, rows = _status_state(name)
        if got == code:
            return doc, rows
        assert time.monotonic() < deadline, (code, doc)
        time.sleep(0.2)


def test_status_is_a_readiness_probe(etcd_server: Any, cache_name: str,
                                     unique_prefix: bytes) -> None:
    """Exit 0 only when readers can attach, the writer is alive and reaches etcd; 1 with
    the reason otherwise: no snapshot yet, etcd down, writer stopped (issue 18, item 4)."""
    etcd_server.stop()
    w = WriterProcess(cache_name, etcd_server.endpoint, unique_prefix)
    try:
        w.start(wait=False)
        deadline = time.monotonic() + 30
        while not os.path.exists(f"/dev/shm{layout.control_name(cache_name)}"):
            assert time.monotonic() < deadline, w.log()
            time.sleep(0.1)
        doc, rows = _wait_status(cache_name, 1)  # no snapshot yet (etcd down since the start)
        deadline = time.monotonic() + 30
        while not (doc.get("writer_alive") and "readers cannot attach" in (
                doc["not_ready_reason"] or "")):
            assert time.monotonic() < deadline, doc
            time.sleep(0.2)
            _code, doc, rows = _status_state(cache_name)
        assert doc["ready"] is False and rows["ready"].startswith("NO: readers cannot attach")

        etcd_server.start()
        doc, rows = _wait_status(cache_name, 0)  # healthy
        assert doc["ready"] is True and doc["not_ready_reason"] is None
        assert rows["ready"] == "yes" and rows["publishing"] == "ok"
        assert doc["publish_error"] is None and doc["publish_failing_since"] is None

        etcd_server.stop()
        doc, rows = _wait_status(cache_name, 1)  # etcd down: the snapshot still serves
        assert "cannot reach etcd" in doc["not_ready_reason"], doc
        assert rows["ready"].startswith("NO: the writer cannot reach etcd: unreachable since")
        with shmcache.Reader(cache_name) as r:
            r.status()  # readers attach

        etcd_server.start()
        _wait_status(cache_name, 0)
        assert w.terminate() == 0
        doc, rows = _wait_status(cache_name, 1)  # writer stopped
        assert doc["not_ready_reason"].startswith("no writer is running"), doc
        assert rows["writer"].endswith("NOT RUNNING")
    finally:
        w.close()


def test_status_is_not_ready_before_a_restarted_writer_reaches_etcd(
        etcd_session: Any, cache_name: str, unique_prefix: bytes) -> None:
    """A restarted writer serves its predecessor's snapshot at once, but until it has reached
    etcd the cache may be behind by anything: not ready, even before its first attempt
    fails (here etcd's "address" accepts connections and never answers, for 5 s)."""
    import socket

    w = WriterProcess(cache_name, etcd_session.endpoint, unique_prefix)
    silent = socket.socket()
    try:
        w.start()
        _wait_status(cache_name, 0)
        assert w.terminate() == 0
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        w.args[w.args.index("--endpoints") + 1] = f"http://127.0.0.1:{silent.getsockname()[1]}"
        w.start(wait=False)
        seen = []
        deadline = time.monotonic() + 30
        while not seen or "cannot reach etcd" not in seen[-1]:
            code, doc, _rows = _status_state(cache_name)
            if doc.get("writer_pid") == w.pid and doc.get("writer_alive"):
                assert code == 1, doc
                seen.append(doc["not_ready_reason"])
            assert time.monotonic() < deadline, (seen, w.log())
        assert "the writer has not reached etcd yet" in seen, seen
    finally:
        w.close()
        silent.close()


def test_status_json_gives_a_non_utf8_prefix_exactly() -> None:
    """``prefix`` shows undecodable bytes as escapes; ``prefix_base64`` is exact."""
    from shmcache.types import Status

    fields = {f: 0 for f in Status.__dataclass_fields__}
    fields.update(name="x", prefix=b"/a\\xff/\xff/", heartbeat_age=None, liveness="pid",
                  indexes={}, etcd_unreachable_since=None, writer_alive=True)
    d = Status(**fields).as_dict()
    assert d["prefix"] == "/a\\xff/\\xff/"  # ambiguous: a backslash, or an escape
    assert base64.b64decode(d["prefix_base64"]) == b"/a\\xff/\xff/"
    json.dumps(d)


# -- item 16: check --------------------------------------------------------------------------

def _flip_byte(segment: str, needle: bytes) -> None:
    """Corrupt a segment in place: flip one bit of the first occurrence of ``needle``."""
    shm = posix_ipc.SharedMemory(segment, flags=0, size=0)
    try:
        size = os.fstat(shm.fd).st_size
        m = mmap.mmap(shm.fd, size, flags=mmap.MAP_SHARED)
    finally:
        shm.close_fd()
    try:
        pos = m.find(needle)
        assert pos >= 0, f"{needle!r} not in {segment}"
        m[pos] ^= 0x01
    finally:
        m.close()


@pytest.fixture
def own_writer(etcd_session: Any, etcd_client: Any, cache_name: str,
               unique_prefix: bytes) -> Iterator[WriterProcess]:
    put(etcd_client, unique_prefix + b"k", b"check-me-" + cache_name.encode())
    w = WriterProcess(cache_name, etcd_session.endpoint, unique_prefix, ring_size="1MiB")
    try:
        yield w.start()
    finally:
        w.close()


def test_check_build_in_progress_crash_and_corrupt_snapshot(own_writer: WriterProcess) -> None:
    """A snapshot segment newer than the published one is "being built" while the writer
    lives and "left by a crash" once it is dead; a snapshot that fails a check is never
    reported "ok" as well."""
    name = own_writer.name
    out = _run("check", name)
    assert out.returncode == 0, out.stdout + out.stderr
    assert b"ok: snapshot: 1 key verified" in out.stdout

    cr = control_reader.ControlReader.open(name)
    b = cr.block()
    cr.close()
    assert b is not None and b.snap_seq > 0
    seq = b.snap_seq
    nxt = layout.snapshot_name(name, seq + 1000)
    _shm.create(nxt, 4096).close()
    out = _run("check", name)
    text = out.stdout.decode()
    assert out.returncode == 0, text
    assert f"being built by the writer (pid {own_writer.pid})" in text and nxt in text
    assert "left by a crash" not in text

    _flip_byte(layout.snapshot_name(name, seq), b"check-me-" + name.encode())
    out = _run("check", name)
    text = out.stdout.decode()
    assert out.returncode == 1, text
    assert "VIOLATION: " in text and "body checksum" in text
    assert "ok: snapshot:" not in text

    own_writer.kill()
    text = _run("check", name).stdout.decode()
    assert "left by a crash" in text and nxt in text and "being built" not in text


# -- item 15: the benchmark keeps its committed results on failure ---------------------------

_FAKE_TQDM = '''
class tqdm:
    def __init__(self, *a, total=0, **k): self.total = total
    def set_description_str(self, s): pass
    def update(self, n=1): pass
    def write(self, s, file=None): print(s, file=file)
    def refresh(self): pass
    def close(self): pass
'''


def test_failed_bench_run_keeps_committed_results(tmp_path: Path) -> None:
    """``bench/run.py --quick`` that fails (here: no etcd binary) leaves the committed
    bench/results/quick.json byte-identical and writes no plots."""
    results = Path(ROOT, "bench", "results")
    target = results / "quick.json"
    if not target.exists():
        pytest.skip("no committed bench/results/quick.json")
    before = target.read_bytes()
    listing = sorted(p.name for p in results.iterdir())
    (tmp_path / "tqdm.py").write_text(_FAKE_TQDM)  # the bench extra need not be installed
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "SHMCACHE_ETCD_BINARY": "/nonexistent",
           "TMPDIR": str(tmp_path)}  # (where the run keeps its partial results)
    try:
        out = subprocess.run([sys.executable, "bench/run.py", "--quick"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode != 0, out.stdout + out.stderr
        assert "SHMCACHE_ETCD_BINARY" in out.stderr
        assert target.read_bytes() == before
        assert sorted(p.name for p in results.iterdir()) == listing
        partial = list(tmp_path.glob("shmcache-bench-quick-*.json"))
        assert len(partial) == 1 and str(partial[0]) in out.stderr, out.stderr
        assert json.loads(partial[0].read_text())["errors"]
    finally:
        if target.read_bytes() != before:  # do not leave a broken committed file behind
            target.write_bytes(before)
        for p in results.iterdir():
            if p.name not in listing:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
