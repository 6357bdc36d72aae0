"""A WSGI app serving a cache over HTTP from pre-fork servers: gunicorn and uWSGI.

Shows:
- A Reader created at import time. With `gunicorn --preload`, and with uWSGI's
  default of loading the app in the master and then forking the workers, it is
  created once in the master and inherited by every worker: a Reader keeps
  working after fork() (its mappings are inherited, its lock re-created), so
  nothing needs re-attaching. Without --preload (or with uWSGI --lazy-apps)
  every worker imports this module and attaches its own Reader; both work.
- Threads do not survive fork(). A Subscription (a background thread keeping an
  in-process dict up to date) must start in each worker: here lazily, on the
  first request of each process (a pid check), which works whether or not the
  app was preloaded. gunicorn's post_fork hook or uWSGI's @postfork would do too.

Endpoints (JSON; keys and values are shown as UTF-8 text):
    GET /get?key=K[&min_revision=R]      the key's value, after waiting (up to 5 s) for revision R
    GET /list?prefix=P                   the keys under P and the revision they are exact at
    GET /mirror?key=K[&min_revision=R]   the key from this worker's in-process dict, kept up
                                         to date by reader.subscribe(...)

Run it against the demo (it prints its cache name, e.g. 'demo-12345'):

    shmcache demo --duration 300 &
    pip install gunicorn uwsgi          # or: pip install "shmcache[examples]"
    export SHMCACHE_CACHE=demo-12345
    gunicorn --chdir examples --workers 2 --preload --bind 127.0.0.1:8000 wsgi_app:app
    # uWSGI: --enable-threads is needed for the subscription thread; SIGTERM stops it
    # with --die-on-term (without it SIGTERM means "reload" to uWSGI 2.0).
    uwsgi --http 127.0.0.1:8000 --master --processes 2 --enable-threads --die-on-term \
          --wsgi-file examples/wsgi_app.py
    curl 'http://127.0.0.1:8000/get?key=/demo/clock'

SHMCACHE_MIRROR_PREFIX (default: the whole cache) chooses what /mirror keeps.
"""

from __future__ import annotations

import json
import os
import threading
import urllib.parse
from collections.abc import Callable, Iterable
from typing import Any

import shmcache

CACHE = os.environ.get("SHMCACHE_CACHE", "")
if not CACHE:
    raise SystemExit("set SHMCACHE_CACHE to the name of the cache to serve")
MIRROR_PREFIX = os.environ.get("SHMCACHE_MIRROR_PREFIX", "")

# Created at import: in the master with --preload / uWSGI's default, in each worker otherwise.
reader = shmcache.Reader(CACHE, timeout=10)
CREATED_IN_PID = os.getpid()

# --- the in-process mirror, one per worker process ----------------------------------------

_mirror: dict[bytes, bytes] = {}
_mirror_lock = threading.Lock()
_mirror_pid = 0
_subscription: Any = None


def _apply(ev: shmcache.Event) -> None:
    # Runs on the subscription's thread. Without on_reset, the first events are
    # the whole current state (PUTs), and a relist arrives as the difference.
    if ev.type == "PUT":
        _mirror[ev.kv.key] = ev.kv.value
    else:
        _mirror.pop(ev.kv.key, None)


def mirror() -> Any:
    """This process's Subscription, started on first use in each process."""
    global _mirror_pid, _subscription
    if _mirror_pid != os.getpid():
        with _mirror_lock:
            if _mirror_pid != os.getpid():
                _mirror.clear()  # what a preloading master had is not ours to keep
                _subscription = reader.subscribe(MIRROR_PREFIX, _apply)
                _subscription.wait(reader.revision, timeout=5.0)
                _mirror_pid = os.getpid()
    return _subscription


# --- the app ---------------------------------------------------------------------------------


def _text(b: bytes) -> str:
    return b.decode("utf-8", "backslashreplace")


def get(q: dict[str, str]) -> tuple[str, dict[str, Any]]:
    kv = reader.get(q["key"], min_revision=int(q["min_revision"]) if "min_revision" in q else None,
                    timeout=5.0)
    return "200 OK", {"key": q["key"], "value": _text(kv.value) if kv else None,
                      "mod_revision": kv.mod_revision if kv else None,
                      "revision": reader.revision}


def list_(q: dict[str, str]) -> tuple[str, dict[str, Any]]:
    res = reader.list(q.get("prefix", ""))
    return "200 OK", {"revision": res.revision,
                      "items": [[_text(kv.key), _text(kv.value)] for kv in res.items]}


def mirror_get(q: dict[str, str]) -> tuple[str, dict[str, Any]]:
    sub = mirror()
    if "min_revision" in q and not sub.wait(int(q["min_revision"]), timeout=5.0):
        return "504 Gateway Timeout", {"error": f"mirror did not reach {q['min_revision']}"}
    value = _mirror.get(q["key"].encode())
    return "200 OK", {"key": q["key"], "value": _text(value) if value is not None else None,
                      "revision": sub.revision, "keys": len(_mirror)}


ROUTES = {"/get": get, "/list": list_, "/mirror": mirror_get}


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    handler = ROUTES.get(environ.get("PATH_INFO", ""))
    q = dict(urllib.parse.parse_qsl(environ.get("QUERY_STRING", "")))
    if handler is None:
        status, body = "404 Not Found", {"error": "not found", "endpoints": sorted(ROUTES)}
    else:
        try:
            status, body = handler(q)
        except shmcache.TimeoutError as exc:
            status, body = "504 Gateway Timeout", {"error": str(exc)}
        except (KeyError, ValueError) as exc:
            status, body = "400 Bad Request", {"error": f"{type(exc).__name__}: {exc}"}
    # Which process answered, and where its Reader was created (the master, if preloaded).
    body.update(pid=os.getpid(), reader_created_in=CREATED_IN_PID)
    data = json.dumps(body).encode()
    start_response(status, [("Content-Type", "application/json"),
                            ("Content-Length", str(len(data)))])
    return [data]


# uWSGI looks for "application" by default.
application = app
