"""Every script in examples/ runs against a real etcd + writer and prints what it promises.

The server examples (wsgi_app.py, asgi_app.py) run under gunicorn, uWSGI and uvicorn in
tests/test_forking.py and tests/test_aio.py; test_every_example_is_run_by_a_test checks that
nothing in examples/ goes untested.
"""

from __future__ import annotations

import ast
import json
import queue
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

import shmcache
from tests.helpers import WriterProcess, delete, etcd_range, put

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
# Where each example that is not a plain script is run.
RUN_ELSEWHERE = {"wsgi_app.py": "tests/test_forking.py", "asgi_app.py": "tests/test_aio.py"}


@pytest.fixture
def sub_prefix(writer: tuple[WriterProcess, bytes], etcd_client: Any) -> bytes:
    """A fresh sub-prefix holding 10 keys, published by the writer."""
    p = writer[1] + secrets.token_hex(4).encode() + b"/"
    for i in range(10):
        rev = put(etcd_client, p + b"k%02d" % i, b"value-%d" % i)
    with shmcache.Reader(writer[0].name) as r:  # or an example may list before the last put
        assert r.wait(rev, timeout=15)
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


def test_shard_workers(writer: tuple[WriterProcess, bytes], etcd_client: Any,
                       sub_prefix: bytes) -> None:
    """Each of 3 pre-forked workers owns its shard: together they hold the 10 keys once,
    each change reaches exactly the worker of its key, and every copy ends equal to its
    shard."""
    import zlib

    p = sub_prefix.decode()
    ex = Example("shard_workers.py", "--cache", writer[0].name, "--prefix", p,
                 "--workers", "3", "--events", "6")
    try:
        ex.wait_for(r"^pool ready: 3 workers, 10 keys$")
        keys = [sub_prefix + b"k00", sub_prefix + b"k01", sub_prefix + b"new1",
                sub_prefix + b"new2", sub_prefix + b"new3"]
        revs = [put(etcd_client, k, b"x") for k in keys]
        revs.append(delete(etcd_client, sub_prefix + b"k05"))
        out = ex.finish()
    finally:
        ex.kill()
    changes = [("PUT", k, r) for k, r in zip(keys, revs, strict=False)]
    changes.append(("DELETE", sub_prefix + b"k05", revs[-1]))
    for kind, key, rev in changes:
        line = f": {kind} {key.decode()} (revision {rev})"
        assert out.count(line) == 1, out
        assert f"worker {zlib.crc32(key) % 3}{line}" in out, out
    for i in range(3):
        assert re.search(rf"^worker {i}: \d+ keys, equal to shard {i}/3 at revision \d+: "
                         r"True$", out, re.MULTILINE), out
    assert "of another shard" not in out


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


def _pod(node: str | None) -> bytes:
    spec = {"nodeName": node} if node is not None else {}
    return json.dumps({"metadata": {}, "spec": spec}).encode()


def _http(port: int, path: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=20) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_node_index_app(etcd_session: Any, etcd_client: Any, cache_name: str,
                        unique_prefix: bytes) -> None:
    """The pre-fork index app answers "pods on node X" (pages at one revision), the node
    counts and a watch of one node (a pod moving away is DELETED there) equal to etcd's,
    and stops every worker on SIGTERM."""
    p = unique_prefix
    for i in range(5):
        put(etcd_client, p + b"default/web-%d" % i, _pod("node-7" if i < 3 else "node-1"))
    put(etcd_client, p + b"default/pending", _pod(None))
    put(etcd_client, p + b"default/not-json", b"{")
    w = WriterProcess(cache_name, etcd_session.endpoint, p,
                      extra=["--index", "node=json:/spec/nodeName"]).start()
    ex = Example("node_index_app.py", "--cache", cache_name, "--port", "0", "--workers", "2")
    try:
        port = int(ex.wait_for(r"^serving cache .* on http://127\.0\.0\.1:(\d+) with 2 workers")[1])
        ex.wait_for(r"^worker \d+ attached")
        status, body = _http(port, "/nodes")
        assert status == 200 and body["nodes"] == {"node-7": 3, "node-1": 2}, body
        status, page = _http(port, "/nodes/node-7/pods?limit=2")
        assert status == 200 and page["continue"], page
        added = put(etcd_client, p + b"default/web-9", _pod("node-7"))  # after page 1
        status, rest = _http(port, f"/nodes/node-7/pods?limit=2&continue={page['continue']}")
        assert status == 200 and rest["continue"] is None and rest["revision"] == page["revision"]
        names = [x["name"] for x in page["pods"] + rest["pods"]]
        assert names == ["web-0", "web-1", "web-2"]  # the first page's revision: no web-9
        since = page["revision"]
        moved = put(etcd_client, p + b"default/web-0", _pod("node-1"))
        gone = delete(etcd_client, p + b"default/web-1")
        status, body = _http(port, f"/nodes/node-7/watch?since={since}&timeout=5")
        assert status == 200, body
        seen = [(e["type"], e["pod"]["name"], e["revision"]) for e in body["events"]]
        want = [("ADDED", "web-9", added), ("DELETED", "web-0", moved),
                ("DELETED", "web-1", gone)]
        assert seen == want[:len(seen)] and seen, seen  # one poll may end before all
        status, body = _http(port, f"/nodes?min_revision={gone}")
        assert status == 200 and body["nodes"] == {"node-7": 2, "node-1": 3}, body
        status, body = _http(port, "/nodes/node-7/pods?continue=garbage")
        assert status == 400, body
        ex.proc.send_signal(signal.SIGTERM)
        out = ex.finish()
        assert "stopped: every worker has exited (0 needed SIGKILL)" in out
    finally:
        ex.kill()
        w.close()
