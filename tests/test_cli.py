"""The ``shmcache`` command line: one-line errors, argument ranges, sizes, binary-safe output,
``status``'s etcd row, ``check``'s wording, and the benchmark's results file (issue 9).

Every command runs as a real ``python -m shmcache`` child process against a real etcd
and a real writer (tests/helpers.WriterProcess) on the host's /dev/shm.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import shmcache
from shmcache._units import parse_size

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
    code = ("import sys, shmcache.config as c; c.load('x', {'ring_size': '1TiB'}, environ={}); "
            "print(sorted(m for m in ('shmcache.writer', 'etcd3', 'grpc') if m in sys.modules))")
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
    # config.py words the range check "must be between 64KiB and 1TiB"
    assert "out of range" in err or "must be between 64KiB and 1TiB" in err
