#!/usr/bin/env python3
"""A pre-fork WSGI app answering "which pods are on node X" from a secondary index.

Shows: the writer builds one index (`--index node=json:/spec/nodeName`: each
pod's spec.nodeName, computed once per change as it follows etcd), and every
worker process reads it in place from shared memory with `reader.by_index`,
`reader.index_values` and `reader.watch(..., index=)`. No worker runs an
informer: none lists or watches etcd, keeps its own copy of the pods or
maintains its own by-node indexer, so N workers cost one copy and one etcd
watch, not N, and a worker that starts (or is restarted) answers at once.
Answers are exact at a revision; a page with a continue token is read at the
first page's revision, as Kubernetes' paginated lists are.

The server is the standard library's (wsgiref) behind a small pre-fork
master: it opens the listening socket, forks --workers processes that accept
on it, each attaching its own Reader after fork, restarts a worker that dies,
and on SIGTERM or SIGINT stops them all (SIGKILL after 10 s) before exiting.
A worker whose master is gone (killed with SIGKILL) exits within half a second.
Each worker serves one request at a time; a long-poll watch holds its worker.

Endpoints (JSON):
    GET /nodes[?min_revision=R]       node -> number of pods on it, and the revision
    GET /nodes/NODE/pods[?limit=N][&continue=TOKEN][&min_revision=R]
                                      the pods on NODE, sorted by key, a page of N (default
                                      500) and the token for the next page (null: the last)
    GET /nodes/NODE/watch?since=R[&timeout=S]
                                      the changes on NODE after revision R, waiting up to S s
                                      (default 10) for the first, as ADDED/MODIFIED/DELETED
                                      (a pod moved to another node is DELETED here); 410 when
                                      R is too old: list again, then watch from its revision
min_revision waits (up to 5 s) until the cache has reached R: read-your-writes.

Run it: `shmcache demo` has no index, so start etcd and a writer of your own,
with the index:

    etcd --data-dir /tmp/etcd-pods &     # listens on 127.0.0.1:2379
    shmcache serve pods --prefix /registry/pods/ --index node=json:/spec/nodeName &
    etcdctl put /registry/pods/default/web-1 \\
        '{"metadata": {"name": "web-1", "namespace": "default"}, "spec": {"nodeName": "node-7"}}'
    python examples/node_index_app.py --cache pods --port 8000 --workers 4
    curl http://127.0.0.1:8000/nodes
    curl 'http://127.0.0.1:8000/nodes/node-7/pods?limit=100'          # then &continue=TOKEN
    curl 'http://127.0.0.1:8000/nodes/node-7/watch?since=REVISION'    # its "revision"
    kill -TERM <the app's pid>                                        # or Ctrl-C

Keys are read as Kubernetes lays them out (PREFIX/NAMESPACE/NAME), values as
JSON. kube-apiserver writes protobuf to etcd by default; json: indexes find
values only in JSON documents (an apiserver run with
--storage-media-type=application/json, or records of your own).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time
import traceback
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

import shmcache

INDEX = "node"  # the writer's --index node=json:/spec/nodeName
Body = dict[str, Any]
App = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


# --- the app: every answer comes from the writer's index, read in place -------------------


def _text(b: bytes) -> str:
    return b.decode("utf-8", "backslashreplace")


def _pod(kv: shmcache.KeyValue, prefix: bytes) -> Body:
    # PREFIX/NAMESPACE/NAME, as kube-apiserver names its keys: nothing to decode.
    namespace, _, name = kv.key[len(prefix):].rpartition(b"/")
    return {"namespace": _text(namespace), "name": _text(name), "key": _text(kv.key),
            "mod_revision": kv.mod_revision}


def _node_of(kv: shmcache.KeyValue | None) -> str | None:
    """The pod's spec.nodeName (only the watch needs it: to tell a move from a change)."""
    try:
        spec = json.loads(kv.value).get("spec") if kv is not None else None
    except (ValueError, AttributeError):
        return None
    node = spec.get("nodeName") if isinstance(spec, dict) else None
    return node if isinstance(node, str) else None


def _min_revision(r: shmcache.Reader, q: dict[str, str]) -> None:
    if "min_revision" in q and not r.wait(int(q["min_revision"]), timeout=5.0):
        raise shmcache.TimeoutError(f"the cache did not reach revision {q['min_revision']} "
                                    f"within 5s (it is at {r.revision})")


def nodes(r: shmcache.Reader, q: dict[str, str]) -> tuple[str, Body]:
    _min_revision(r, q)
    # index_values reads the current state; it is exact at the revision read around it
    # when that did not move meanwhile.
    for _ in range(10):
        before = r.revision
        counts = r.index_values(INDEX)
        if r.revision == before:
            break
    return "200 OK", {"revision": before,
                      "nodes": {_text(node): n for node, n in counts.items()}}


def node_pods(r: shmcache.Reader, node: str, q: dict[str, str]) -> tuple[str, Body]:
    limit = int(q.get("limit", "500"))
    if limit < 1:
        raise ValueError("limit must be >= 1")
    token = q.get("continue") or None
    res = r.by_index(INDEX, node, limit=limit, continue_token=token,
                     min_revision=None if token else
                     (int(q["min_revision"]) if "min_revision" in q else None),
                     timeout=5.0)
    prefix = r.prefix
    return "200 OK", {"node": node, "revision": res.revision,
                      "pods": [_pod(kv, prefix) for kv in res.items],
                      "continue": res.continue_token}


def node_watch(r: shmcache.Reader, node: str, q: dict[str, str]) -> tuple[str, Body]:
    since = int(q["since"])
    timeout = min(float(q.get("timeout", "10")), 30.0)
    prefix = r.prefix
    with r.watch(prefix, since, index=(INDEX, node)) as w:
        events = w.poll(timeout=timeout)
        out = []
        for ev in events:
            # The filter passes the events whose pod is on the node after or before them.
            was = _node_of(ev.prev_kv) == node
            now = ev.type == "PUT" and _node_of(ev.kv) == node
            kind = "MODIFIED" if was and now else "ADDED" if now else "DELETED"
            pod = ev.kv if ev.type == "PUT" else (ev.prev_kv or ev.kv)
            out.append({"type": kind, "revision": ev.revision, "pod": _pod(pod, prefix),
                        "node": _node_of(ev.kv) if ev.type == "PUT" else None})
        return "200 OK", {"node": node, "events": out, "revision": w.revision}


def make_app(r: shmcache.Reader) -> App:
    """The WSGI callable of one worker process, answering from its Reader ``r``."""

    def route(path: str, q: dict[str, str]) -> tuple[str, Body]:
        parts = path.split("/")
        if path == "/nodes":
            return nodes(r, q)
        if len(parts) == 4 and parts[:2] == ["", "nodes"] and parts[2]:
            if parts[3] == "pods":
                return node_pods(r, parts[2], q)
            if parts[3] == "watch":
                return node_watch(r, parts[2], q)
        return "404 Not Found", {"error": "not found", "endpoints": [
            "/nodes", "/nodes/NODE/pods", "/nodes/NODE/watch"]}

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        # PEP 3333: PATH_INFO is the (already unquoted) path's bytes as latin-1.
        path = environ.get("PATH_INFO", "").encode("latin-1").decode("utf-8", "replace")
        q = dict(urllib.parse.parse_qsl(environ.get("QUERY_STRING", "")))
        try:
            status, body = route(path, q)
        except shmcache.TimeoutError as exc:
            status, body = "504 Gateway Timeout", {"error": str(exc)}
        except shmcache.CompactedError as exc:
            status, body = "410 Gone", {"error": str(exc),
                                        "compact_revision": exc.compact_revision}
        except shmcache.CorruptSegmentError as exc:
            status, body = "503 Service Unavailable", {"error": str(exc)}
        except (KeyError, ValueError) as exc:  # a missing or bad parameter, or continue token
            status, body = "400 Bad Request", {"error": f"{type(exc).__name__}: {exc}"}
        except shmcache.ShmCacheError as exc:  # e.g. StaleError: the writer is gone
            status, body = "503 Service Unavailable", {"error": str(exc)}
        body["pid"] = os.getpid()  # which worker answered
        data = json.dumps(body).encode()
        start_response(status, [("Content-Type", "application/json"),
                                ("Content-Length", str(len(data)))])
        return [data]

    return app


# --- the pre-fork server ----------------------------------------------------------------------


class _Handler(WSGIRequestHandler):
    timeout = 10  # seconds a client may take to send its request
    access_log = False

    def log_message(self, format: str, *args: Any) -> None:
        if self.access_log:
            super().log_message(format, *args)


class _Server(WSGIServer):
    """A wsgiref server accepting on a listening socket the master made (and shares)."""

    def __init__(self, sock: socket.socket, app: App) -> None:
        super().__init__(sock.getsockname()[:2], _Handler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock  # non-blocking: a worker that loses the race for a connection
        self.server_name, self.server_port = sock.getsockname()[:2]  # moves on
        self.setup_environ()
        self.set_app(app)


def _worker(sock: socket.socket, cache: str, master: int, mask: set[signal.Signals]) -> int:
    """A worker's life, after fork: its own Reader, requests until told to stop."""
    stopping = False

    def stop(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True  # the request in progress, if any, is answered first

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # the master blocks these; we wait on none
    # Attached here, after fork: mapping the cache's segments is all it takes (timeout=:
    # wait for a writer still loading its first snapshot).
    with shmcache.Reader(cache, timeout=10) as r:
        print(f"worker {os.getpid()} attached to {cache!r} at revision {r.revision}", flush=True)
        server = _Server(sock, make_app(r))
        server.timeout = 0.5  # how often to look at `stopping` and the master
        while not stopping and os.getppid() == master:
            server.handle_request()
    return 0


def _reap() -> Iterator[tuple[int, int]]:
    """(pid, status) of every child that has exited, without waiting."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        yield pid, status


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", required=True, help="cache name (as given to `shmcache serve`)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000, help="0: any free port (printed)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--access-log", action="store_true", help="log each request to stderr")
    args = ap.parse_args()
    _Handler.access_log = args.access_log

    # Fail once, in the master, rather than in every worker: the cache exists and has the
    # index. (This Reader is closed before fork; each worker attaches its own.)
    try:
        with shmcache.Reader(args.cache, timeout=10) as r:
            r.index_values(INDEX)
    except (shmcache.ShmCacheError, ValueError) as exc:
        print(f"cannot serve cache {args.cache!r}: {exc}", file=sys.stderr)
        return 2

    sock = socket.create_server((args.host, args.port), backlog=128)
    sock.setblocking(False)
    host, port = sock.getsockname()[:2]
    print(f"serving cache {args.cache!r} on http://{host}:{port} with {args.workers} "
          f"workers (master pid {os.getpid()})", flush=True)

    # The master waits for signals synchronously: blocked here, taken by sigtimedwait, so
    # none arrives in the middle of a fork. Workers restore the mask.
    sigs = {signal.SIGTERM, signal.SIGINT, signal.SIGCHLD}
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)  # SIG_DFL might discard it
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    master = os.getpid()
    workers: dict[int, float] = {}  # pid -> when it started

    def spawn() -> None:
        sys.stdout.flush()  # or the child inherits, and prints again, what is buffered
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = _worker(sock, args.cache, master, mask)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)  # never the master's cleanup below
        workers[pid] = time.monotonic()

    due: list[float] = []  # restarts waiting out a back-off
    try:
        for _ in range(args.workers):
            spawn()
        while True:
            wait = max(0.0, min(due) - time.monotonic()) if due else 3600.0
            info = signal.sigtimedwait(sigs, wait)
            if info is not None and info.si_signo != signal.SIGCHLD:
                print(f"{signal.Signals(info.si_signo).name}: stopping {len(workers)} workers",
                      flush=True)
                break
            for pid, status in _reap():
                started = workers.pop(pid, None)
                if started is not None:
                    print(f"worker {pid} exited ({_how(status)}); starting another", flush=True)
                    # One that dies at once (a gone cache, a bug) is restarted once a second.
                    due.append(started + 1.0)
            while due and min(due) <= time.monotonic():
                due.remove(min(due))
                spawn()
    finally:
        left = _stop(workers)
        sock.close()
    print(f"stopped: every worker has exited ({left} needed SIGKILL)", flush=True)
    return 0


def _how(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"


def _stop(workers: dict[int, float], grace: float = 10.0) -> int:
    """SIGTERM every worker, wait for them (SIGKILL after ``grace`` s); how many needed SIGKILL."""
    for pid in workers:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass  # exited already; reaped below
    deadline = time.monotonic() + grace
    while workers and time.monotonic() < deadline:
        for pid, _status in _reap():
            workers.pop(pid, None)
        if workers:
            signal.sigtimedwait({signal.SIGCHLD}, 0.1)
    killed = len(workers)
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    workers.clear()
    return killed


if __name__ == "__main__":
    sys.exit(main())
