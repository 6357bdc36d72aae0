"""Every script in examples/ runs against a real etcd + writer and prints what it promises.

The server examples (wsgi_app.py, asgi_app.py) run under gunicorn, uWSGI and uvicorn in
tests/test_forking.py and tests/test_aio.py; test_every_example_is_run_by_a_test checks that
nothing in examples/ goes untested.
"""

from __future__ import annotations

import ast
import queue
import re
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import WriterProcess, delete, etcd_range, put

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
# Where each example that is not a plain script is run.
RUN_ELSEWHERE = {"wsgi_app.py": "tests/test_forking.py", "asgi_app.py": "tests/test_aio.py"}


@pytest.fixture
def sub_prefix(writer: tuple[WriterProcess, bytes], etcd_client: Any) -> bytes:
    """A fresh sub-prefix holding 10 keys."""
    p = writer[1] + secrets.token_hex(4).encode() + b"/"
    for i in range(10):
        put(etcd_client, p + b"k%02d" % i, b"value-%d" % i)
    return p


class Example:
    """An example script in a child process, its output read line by line."""

    def __init__(self, script: str, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, str(EXAMPLES / script), *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     cwd=ROOT)
        self.lines: list[str] = []
        self._q: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._q.put(line.rstrip("\n"))
        self._q.put(None)

    def wait_for(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._q.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line matching {pattern!r} after {timeout}s; "
                                     f"output so far:\n" + "\n".join(self.lines)) from None
            if line is None:
                raise AssertionError(f"exited ({self.proc.wait()}) without a line matching "
                                     f"{pattern!r}:\n" + "\n".join(self.lines) + self._stderr())
            self.lines.append(line)
            if m := re.search(pattern, line):
                return m

    def finish(self, timeout: float = 60.0) -> str:
        """Wait for the exit; the whole output. Fails unless the exit status is 0."""
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("example did not finish:\n" + "\n".join(self.lines)) from None
        self._reader.join(5)
        while (line := self._q.get_nowait() if not self._q.empty() else None) is not None:
            self.lines.append(line)
        out = "\n".join(self.lines)
        assert rc == 0, out + self._stderr()
        return out

    def _stderr(self) -> str:
        assert self.proc.stderr is not None
        return "\nstderr:\n" + self.proc.stderr.read() if self.proc.poll() is not None else ""

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()


def test_basic(writer: tuple[WriterProcess, bytes], etcd_client: Any, sub_prefix: bytes) -> None:
    p = sub_prefix.decode()
    ex = Example("basic.py", "--cache", writer[0].name, "--prefix", p, "--key", f"{p}k03",
                 "--events", "3")
    try:
        m = ex.wait_for(r"at revision (\d+): (\d+) keys under")
        assert int(m[2]) == 10
        ex.wait_for(rf"^get {p}k03 -> value-3$")
        ex.wait_for(r"^watching from revision \d+")
        revs = [put(etcd_client, sub_prefix + b"k00", b"new"), delete(etcd_client, sub_prefix + b"k01"),
                put(etcd_client, sub_prefix + b"k10", b"added")]
        out = ex.finish()
    finally:
        ex.kill()
    assert f"PUT {p}k00 = new (revision {revs[0]})" in out
    assert f"DELETE {p}k01 (revision {revs[1]})" in out
    assert f"PUT {p}k10 = added (revision {revs[2]})" in out
    assert f"saw 3 events; watch at revision {revs[2]}" in out


def test_asyncio_watch(writer: tuple[WriterProcess, bytes], etcd_client: Any,
                       sub_prefix: bytes) -> None:
    p = sub_prefix.decode()
    ex = Example("asyncio_watch.py", "--cache", writer[0].name, "--prefix", p,
                 "--watchers", "50", "--events", "4")
    try:
        ex.wait_for(r"^watching .* with 50 coroutines")
        m = ex.wait_for(r"^threads added for 50 watching coroutines: (\d+)")
        assert int(m[1]) == 1
        revs = [put(etcd_client, sub_prefix + b"k%02d" % i, b"v%d" % i) for i in range(4)]
        out = ex.finish()
    finally:
        ex.kill()
    for i, rev in enumerate(revs):
        assert f"PUT {p}k{i:02d} = v{i} (revision {rev})" in out
    assert f"50 watchers each saw {{4}} events, up to revision {revs[-1]}" in out
    assert f"await_revision({revs[-1]}) -> True" in out
    assert "timed out after 0.2s, as asked" in out
    assert "a cancelled watcher stopped cleanly" in out


def test_process_pool(writer: tuple[WriterProcess, bytes], sub_prefix: bytes) -> None:
    ex = Example("process_pool.py", "--cache", writer[0].name, "--prefix", sub_prefix.decode())
    try:
        out = ex.finish()
    finally:
        ex.kill()
    assert "10 keys under" in out
    for label in ("multiprocessing spawn pool", "ProcessPoolExecutor (spawn)",
                  "multiprocessing fork pool, inherited Reader"):
        assert re.search(rf"^{re.escape(label)}: 10 lookups in [12] worker processes, "
                         r"all consistent with the list: True$", out, re.MULTILINE), out
    assert "passing a Reader to a worker: TypeError: a shmcache.Reader cannot be pickled" in out


def test_subscribe_mirror(writer: tuple[WriterProcess, bytes], etcd_client: Any,
                          sub_prefix: bytes) -> None:
    p = sub_prefix.decode()
    ex = Example("subscribe_mirror.py", "--cache", writer[0].name, "--prefix", p, "--events", "5")
    try:
        m = ex.wait_for(r"^mirroring '(.*)': (\d+) keys at revision (\d+)")
        assert (m[1], int(m[2])) == (p, 10)
        put(etcd_client, sub_prefix + b"k00", b"x")
        delete(etcd_client, sub_prefix + b"k01")
        put(etcd_client, sub_prefix + b"new", b"y")
        put(etcd_client, sub_prefix + b"k02", b"z")
        last = delete(etcd_client, sub_prefix + b"k03")
        # A change after the fifth may or may not be seen before the script stops; either
        # way its final comparison must hold.
        put(etcd_client, sub_prefix + b"after", b"1")
        out = ex.finish()
    finally:
        ex.kill()
    assert f"DELETE {p}k03 (revision {last}); mirror has 9 keys" in out
    m = re.search(r"^saw (\d+) changes; mirror equals list at revision \d+: True$", out,
                  re.MULTILINE)
    assert m and int(m[1]) >= 5, out
    assert len(etcd_range(etcd_client, sub_prefix)) == 10


def test_every_example_is_run_by_a_test_and_says_how_to_run_it() -> None:
    """Each example has a header saying what it shows and how to run it (--cache NAME or
    SHMCACHE_CACHE), and some test runs it."""
    here = Path(__file__).read_text()
    scripts = sorted(p.name for p in EXAMPLES.glob("*.py"))
    assert scripts, "no examples found"
    for name in scripts:
        source = (EXAMPLES / name).read_text()
        doc = ast.get_docstring(ast.parse(source))
        assert doc, f"{name} has no header docstring"
        assert "Shows" in doc and "Run" in doc and "shmcache demo" in doc, name
        assert "--cache" in doc or "SHMCACHE_CACHE" in doc, name
        if name in RUN_ELSEWHERE:
            assert name in (ROOT / RUN_ELSEWHERE[name]).read_text(), name
        else:
            assert f'Example("{name}"' in here, f"no test runs examples/{name}"
            assert source.startswith("#!/usr/bin/env python3\n"), name
