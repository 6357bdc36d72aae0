"""Readers in pre-fork servers (gunicorn, uWSGI) and worker pools (multiprocessing, ProcessPoolExecutor).

Every answer is compared with etcd's own; the servers run examples/wsgi_app.py.
"""

from __future__ import annotations

import functools
import json
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import pytest

import shmcache
from tests.etcdserver import free_port
from tests.helpers import WriterProcess, etcd_get, etcd_range, put

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


# ----------------------------------------------------------------------------------------------
# an HTTP server in a child process (also used by tests/test_aio.py)


class ServerProcess:
    """A server command in its own session, queried over HTTP on a loopback port.

    ``stop()`` sends ``stop_signal`` to the server's main process, waits for it,
    and then kills whatever is left of the process group the server started
    (its workers), so a test never leaves processes behind.
    """

    def __init__(self, args: list[str], env: dict[str, str], port: int, cwd: Path,
                 log: Path, stop_signal: int = signal.SIGTERM) -> None:
        self.args, self.env, self.port, self.cwd = args, env, port, cwd
        self.log_path = log
        self.stop_signal = stop_signal
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, ready_path: str, timeout: float = 30.0) -> ServerProcess:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.args, env={**os.environ, **self.env}, cwd=self.cwd,
                                         stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.args[:3]} exited with {self.proc.returncode}:\n"
                                   f"{self.log()}")
            try:
                status, _ = self.get(ready_path, timeout=1.0)
                if status == 200:
                    return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.args[:3]} not answering after {timeout}s:\n"
                                   f"{self.log()}")
            time.sleep(0.05)

    def get(self, path: str, timeout: float = 10.0) -> tuple[int, dict[str, Any]]:
        url = f"http://127.0.0.1:{self.port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")

    def workers(self) -> list[int]:
        """Pids of the server's descendants (its workers and helpers)."""
        assert self.proc is not None
        try:
            return [p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def wait_workers(self, n: int, timeout: float = 15.0) -> list[int]:
        """Until the server has at least ``n`` descendants (workers start one by one)."""
        deadline = time.monotonic() + timeout
        while len(pids := self.workers()) < n:
            assert time.monotonic() < deadline, f"{len(pids)} workers, want {n}:\n{self.log()}"
            time.sleep(0.05)
        return pids

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        pgid = self.proc.pid  # start_new_session: the server leads its own process group
        if self.proc.poll() is None:
            self.proc.send_signal(self.stop_signal)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        deadline = time.monotonic() + 5
        while True:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                break
            if time.monotonic() > deadline:
                os.killpg(pgid, signal.SIGKILL)
                break
            time.sleep(0.05)
        return self.proc.returncode


# ----------------------------------------------------------------------------------------------
# fixtures


def _fill(client: Any, prefix: bytes, n: int = 12) -> int:
    rev = 0
    for i in range(n):
        rev = put(client, prefix + b"k%02d" % i, b"value-%d" % i)
    return rev


@functools.cache
def _gunicorn_extra_args() -> tuple[str, ...]:
    # gunicorn >= 24 opens a control socket at a fixed path under ~/.gunicorn by
    # default, which two servers of one test run would share; older ones lack the option.
    out = subprocess.run([sys.executable, "-m", "gunicorn", "--help"], capture_output=True,
                         text=True, timeout=30, check=False).stdout
    return ("--no-control-socket",) if "--no-control-socket" in out else ()


def _wsgi_server(kind: str, cache: str, tmp_path: Path, mirror_prefix: bytes,
                 preload: bool = True) -> ServerProcess:
    port = free_port()
    env = {"SHMCACHE_CACHE": cache, "SHMCACHE_MIRROR_PREFIX": mirror_prefix.decode()}
    if kind == "gunicorn":
        args = [sys.executable, "-m", "gunicorn", "--workers", "2", "--bind",
                f"127.0.0.1:{port}", *_gunicorn_extra_args(), "wsgi_app:app"]
        if preload:
            args.insert(3, "--preload")
        return ServerProcess(args, env, port, EXAMPLES, tmp_path / "gunicorn.log")
    uwsgi = shutil.which("uwsgi", path=os.path.dirname(sys.executable)) or shutil.which("uwsgi")
    assert uwsgi is not None
    args = [uwsgi, "--http", f"127.0.0.1:{port}", "--master", "--processes", "2",
            "--enable-threads", "--die-on-term", "--home", sys.prefix,
            "--wsgi-file", str(EXAMPLES / "wsgi_app.py")]
    return ServerProcess(args, env, port, EXAMPLES, tmp_path / "uwsgi.log")


def _check_wsgi_server(srv: ServerProcess, client: Any, prefix: bytes, preload: bool) -> None:
    """Answers equal etcd's, follow a put, and come from workers forked as the test expects."""
    master = srv.proc.pid  # type: ignore[union-attr]
    keys = [kv.key for kv in etcd_range(client, prefix)]
    # Concurrent requests, so that more than one worker usually answers.
    with ThreadPoolExecutor(8) as ex:
        answers = list(ex.map(lambda k: srv.get(f"/get?key={k.decode()}"), keys * 3))
    workers = set(srv.workers())
    for key, (status, body) in zip(keys * 3, answers, strict=False):
        assert status == 200, body
        want = etcd_get(client, key)
        assert want is not None and body["value"] == want.value.decode()
        assert body["mod_revision"] == want.mod_revision
        assert body["pid"] in workers and body["pid"] != master
        # --preload / uWSGI's default: the Reader was made in the master before fork().
        assert body["reader_created_in"] == (master if preload else body["pid"])
    status, body = srv.get(f"/list?prefix={prefix.decode()}")
    assert status == 200
    want_items = etcd_range(client, prefix, body["revision"])
    assert body["items"] == [[kv.key.decode(), kv.value.decode()] for kv in want_items]

    # After a put: read-your-writes through min_revision, from the Reader and from the
    # worker's in-process mirror kept by reader.subscribe().
    for i in range(3):
        rev = put(client, prefix + b"k00", b"changed-%d" % i)
        status, body = srv.get(f"/get?key={prefix.decode()}k00&min_revision={rev}")
        assert (status, body["value"], body["mod_revision"]) == (200, f"changed-{i}", rev)
        status, body = srv.get(f"/mirror?key={prefix.decode()}k00&min_revision={rev}")
        assert (status, body["value"]) == (200, f"changed-{i}"), body
        assert body["revision"] >= rev and body["keys"] == len(keys)


# ----------------------------------------------------------------------------------------------
# pre-fork servers


@pytest.mark.parametrize("preload", [True, False], ids=["preload", "no-preload"])
def test_gunicorn_serves_the_cache_from_two_workers(
        writer: tuple[WriterProcess, bytes], etcd_client: Any, sub_prefix: bytes,
        tmp_path: Path, preload: bool) -> None:
    """gunicorn, 2 sync workers, with and without --preload: HTTP answers equal etcd's and
    follow puts; with --preload the Reader was created in the master and inherited."""
    _fill(etcd_client, sub_prefix)
    srv = _wsgi_server("gunicorn", writer[0].name, tmp_path, sub_prefix, preload=preload)
    try:
        srv.start(f"/get?key={sub_prefix.decode()}k00")
        assert len(srv.wait_workers(2)) == 2
        _check_wsgi_server(srv, etcd_client, sub_prefix, preload)
    finally:
        rc = srv.stop()
    assert rc == 0, srv.log()


@pytest.mark.skipif(shutil.which("uwsgi", path=os.path.dirname(sys.executable)) is None
                    and shutil.which("uwsgi") is None,
                    reason="uwsgi is not installed (pip install 'shmcache[examples]' builds it "
                           "from source: it needs a C compiler and the Python headers)")
def test_uwsgi_fork_model_serves_the_cache(writer: tuple[WriterProcess, bytes],
                                           etcd_client: Any, sub_prefix: bytes,
                                           tmp_path: Path) -> None:
    """uWSGI loads the app in the master, then forks 2 workers: the inherited Reader answers
    like etcd, and the per-worker subscription (started lazily after fork) follows puts."""
    _fill(etcd_client, sub_prefix)
    srv = _wsgi_server("uwsgi", writer[0].name, tmp_path, sub_prefix)
    try:
        srv.start(f"/get?key={sub_prefix.decode()}k00")
        srv.wait_workers(3)  # 2 workers and the HTTP router
        _check_wsgi_server(srv, etcd_client, sub_prefix, preload=True)
    finally:
        srv.stop()
    assert "goodbye to uWSGI" in srv.log()


# ----------------------------------------------------------------------------------------------
# worker pools: pass the name, attach in the worker

_worker_reader: shmcache.Reader | None = None


def _attach(name: str) -> None:
    global _worker_reader
    _worker_reader = shmcache.Reader(name)


def _get(key: bytes) -> tuple[int, tuple[Any, ...] | None, int]:
    assert _worker_reader is not None
    kv = _worker_reader.get(key)
    return os.getpid(), tuple(kv) if kv else None, _worker_reader.revision


def _get_by_name(name: str, key: bytes) -> tuple[int, tuple[Any, ...] | None, int]:
    with shmcache.Reader(name) as r:
        kv = r.get(key)
        return os.getpid(), tuple(kv) if kv else None, r.revision


def _revision_of(r: shmcache.Reader) -> int:  # pragma: no cover - never runs: not picklable
    return r.revision


def _check_answers(client: Any, keys: list[bytes],
                   answers: list[tuple[int, tuple[Any, ...] | None, int]]) -> set[int]:
    for key, (_pid, kv, rev) in zip(keys, answers, strict=False):
        want = etcd_get(client, key, rev)
        assert kv == (tuple(want) if want else None)
    pids = {pid for pid, _kv, _rev in answers}
    assert os.getpid() not in pids
    return pids


@pytest.mark.parametrize("method", ["spawn", "fork", "forkserver"])
def test_multiprocessing_pool_workers_attach_by_name(
        writer: tuple[WriterProcess, bytes], etcd_client: Any, sub_prefix: bytes,
        method: str) -> None:
    """multiprocessing.Pool with every start method: the initializer attaches by name and
    every answer equals etcd's at the revision the worker reports."""
    _fill(etcd_client, sub_prefix)
    keys = [sub_prefix + b"k%02d" % i for i in range(12)] + [sub_prefix + b"absent"]
    with mp.get_context(method).Pool(2, initializer=_attach, initargs=(writer[0].name,)) as pool:
        answers = pool.map(_get, keys, chunksize=1)
    _check_answers(etcd_client, keys, answers)


def test_reader_made_before_fork_is_inherited_by_pool_workers(
        writer: tuple[WriterProcess, bytes], etcd_client: Any, sub_prefix: bytes) -> None:
    """A fork Pool created after the parent attached: children use the inherited Reader,
    which keeps following the writer after the fork."""
    global _worker_reader
    _fill(etcd_client, sub_prefix)
    _worker_reader = shmcache.Reader(writer[0].name)
    try:
        before = _worker_reader.revision
        with mp.get_context("fork").Pool(2) as pool:
            rev = put(etcd_client, sub_prefix + b"k03", b"after-fork")
            assert _worker_reader.wait(rev, timeout=10)
            keys = [sub_prefix + b"k%02d" % i for i in range(12)]
            answers = pool.map(_get, keys, chunksize=1)
        _check_answers(etcd_client, keys, answers)
        assert all(r >= rev > before for _pid, _kv, r in answers)
        assert dict(zip(keys, answers, strict=False))[sub_prefix + b"k03"][1][1] == b"after-fork"  # type: ignore[index]
    finally:
        _worker_reader.close()
        _worker_reader = None


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_process_pool_executor_workers_attach_by_name(
        writer: tuple[WriterProcess, bytes], etcd_client: Any, sub_prefix: bytes,
        method: str) -> None:
    """ProcessPoolExecutor: passing the cache name works with spawn and fork."""
    _fill(etcd_client, sub_prefix)
    keys = [sub_prefix + b"k%02d" % i for i in range(12)]
    with ProcessPoolExecutor(2, mp_context=mp.get_context(method)) as ex:
        answers = list(ex.map(_get_by_name, [writer[0].name] * len(keys), keys))
    _check_answers(etcd_client, keys, answers)


def test_passing_a_reader_to_a_pool_raises_a_clear_type_error(
        writer: tuple[WriterProcess, bytes]) -> None:
    """A Reader handed to a worker by accident fails in the caller with a TypeError that says
    what to do, through multiprocessing.Pool and ProcessPoolExecutor alike."""
    with shmcache.Reader(writer[0].name) as r:
        with mp.get_context("spawn").Pool(1) as pool:
            with pytest.raises(TypeError, match="cannot be pickled: pass the cache name"):
                pool.apply(_revision_of, (r,))
            # The pool is still usable afterwards.
            assert pool.apply(os.getpid) != os.getpid()
        with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as ex:
            fut = ex.submit(_revision_of, r)
            with pytest.raises(TypeError, match=r"shmcache.Reader\(name\)"):
                fut.result(timeout=30)
