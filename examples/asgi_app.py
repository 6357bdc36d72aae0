"""An ASGI app (no framework) serving a cache over HTTP from uvicorn worker processes.

Shows: a Reader per worker process, created at import (each uvicorn worker
imports the app), read-your-writes with `await reader.await_revision(...)`,
and a long-poll endpoint built on `reader.awatch(...)` that maps CompactedError
to HTTP 410 Gone (list again, then watch from the list's revision). None of
this blocks the event loop: waiting is woken by the writer's publish through
one waker thread per worker.

Endpoints (JSON; keys and values are shown as UTF-8 text):
    GET /get?key=K[&min_revision=R]     the key's value, after waiting (up to 5 s) for revision R
    GET /list?prefix=P                  the keys under P and the revision they are exact at
    GET /events?prefix=P&since_revision=R[&limit=N][&timeout=S]
                                        up to N events after R, waiting up to S s for the first

Run it against the demo (it prints its cache name, e.g. 'demo-12345'):

    shmcache demo --duration 300 &
    pip install uvicorn        # or: pip install "shmcache[examples]"
    SHMCACHE_CACHE=demo-12345 uvicorn --app-dir examples asgi_app:app --workers 2 --port 8000
    curl 'http://127.0.0.1:8000/get?key=/demo/clock'
    curl 'http://127.0.0.1:8000/events?prefix=/demo/clock&since_revision=0&limit=3'   # 410: too old
"""

from __future__ import annotations

import json
import os
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any

import shmcache

CACHE = os.environ.get("SHMCACHE_CACHE", "")
if not CACHE:
    raise SystemExit("set SHMCACHE_CACHE to the name of the cache to serve")

# One Reader per worker process, attached when the worker imports the app.
# timeout=: wait for a writer that is still loading its first snapshot.
reader = shmcache.Reader(CACHE, timeout=10)

Send = Callable[[dict[str, Any]], Awaitable[None]]


def _text(b: bytes) -> str:
    return b.decode("utf-8", "backslashreplace")


async def _reply(send: Send, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


async def get(q: dict[str, str]) -> tuple[int, dict[str, Any]]:
    # Read-your-writes: a client that wrote revision R asks for an answer at >= R.
    if "min_revision" in q and not await reader.await_revision(int(q["min_revision"]),
                                                               timeout=5.0):
        return 504, {"error": f"cache did not reach revision {q['min_revision']} in 5 s"}
    kv = reader.get(q["key"])
    return 200, {"key": q["key"], "value": _text(kv.value) if kv else None,
                 "mod_revision": kv.mod_revision if kv else None,
                 "revision": reader.revision, "pid": os.getpid()}


async def list_(q: dict[str, str]) -> tuple[int, dict[str, Any]]:
    res = reader.list(q.get("prefix", ""))
    return 200, {"revision": res.revision, "pid": os.getpid(),
                 "items": [[_text(kv.key), _text(kv.value)] for kv in res.items]}


async def events(q: dict[str, str]) -> tuple[int, dict[str, Any]]:
    limit = int(q.get("limit", "100"))
    deadline = time.monotonic() + float(q.get("timeout", "10"))
    out: list[list[Any]] = []
    try:
        async with reader.awatch(q.get("prefix", ""),
                                 since_revision=int(q["since_revision"])) as w:
            # poll() hands over whole revisions, so "revision" below never splits a
            # transaction: the client continues with since_revision=revision.
            while len(out) < limit and (remaining := deadline - time.monotonic()) > 0:
                for ev in await w.poll(timeout=remaining):
                    out.append([ev.type, _text(ev.kv.key), _text(ev.kv.value), ev.revision])
    except shmcache.CompactedError as exc:
        return 410, {"error": "compacted", "compact_revision": exc.compact_revision}
    return 200, {"events": out, "revision": w.revision, "pid": os.getpid()}


ROUTES = {"/get": get, "/list": list_, "/events": events}


async def app(scope: dict[str, Any], receive: Callable[[], Awaitable[dict[str, Any]]],
              send: Send) -> None:
    if scope["type"] == "lifespan":
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                reader.close()
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    handler = ROUTES.get(scope["path"])
    if handler is None:
        await _reply(send, 404, {"error": "not found", "endpoints": sorted(ROUTES)})
        return
    q = dict(urllib.parse.parse_qsl(scope["query_string"].decode()))
    try:
        status, body = await handler(q)
    except (KeyError, ValueError) as exc:
        status, body = 400, {"error": f"{type(exc).__name__}: {exc}"}
    await _reply(send, status, body)
