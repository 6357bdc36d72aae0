"""The ``shmcache`` command: serve, status, get, list, watch, check, rm, demo."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from typing import Any

from . import _shm
from .errors import ShmCacheError

log = logging.getLogger("shmcache")


def _text(b: bytes) -> str:
    return b.decode("utf-8", "backslashreplace")


def _kv_json(kv: Any) -> dict[str, Any]:
    return {"key": _text(kv.key), "value": _text(kv.value), "create_revision": kv.create_revision,
            "mod_revision": kv.mod_revision, "version": kv.version, "lease": kv.lease}


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({"ts": round(record.created, 3), "level": record.levelname.lower(),
                           "logger": record.name, "msg": record.getMessage()})


def setup_logging(level: str = "info", fmt: str = "plain") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def cmd_serve(args: argparse.Namespace) -> int:
    """Settings from flags > SHMCACHE_* environment > --config file > defaults (config.py)."""
    from .config import SETTINGS, ConfigError, load
    from .service import serve

    flags = {name: getattr(args, name, None) for name in SETTINGS}
    try:
        cfg = load(args.name, flags, config_file=args.config)
        if args.check_config:
            for line in cfg.describe():
                print(line)
            for warning in cfg.warnings:
                print(f"warning: {warning}", file=sys.stderr)
            return 0
        return serve(cfg)
    except ConfigError as exc:
        print(f"shmcache serve: {exc}", file=sys.stderr)
        return 2


def _reader(name: str) -> Any:
    from .reader import Reader

    return Reader(name, timeout=2.0)


def cmd_status(args: argparse.Namespace) -> int:
    with _reader(args.name) as r:
        st = r.status()
    d = st.as_dict()
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    age = "-" if st.heartbeat_age is None else f"{st.heartbeat_age:.1f}s ago"
    rows = [
        ("cache", st.name), ("prefix", d["prefix"] or "(whole keyspace)"),
        ("writer", f"pid {st.writer_pid} {'alive' if st.writer_alive else 'NOT RUNNING'}"),
        ("heartbeat", age), ("revision", st.revision),
        ("etcd revision seen", st.etcd_revision), ("epoch", st.epoch),
        ("oldest watchable", st.oldest_watchable_revision),
        ("snapshot revision", st.snapshot_revision), ("keys", st.key_count),
        ("ring", f"{st.ring_used} of {st.ring_capacity} bytes used"),
        ("format version", st.format_version),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    with _reader(args.name) as r:
        kv = r.get(args.key)
        rev = r.revision
    if args.json:
        print(json.dumps({"revision": rev, "kv": _kv_json(kv) if kv else None}))
    elif kv is None:
        print(f"(not found at revision {rev})", file=sys.stderr)
        return 1
    else:
        sys.stdout.write(_text(kv.value) + "\n")
    return 0 if kv is not None else 1


def cmd_list(args: argparse.Namespace) -> int:
    with _reader(args.name) as r:
        res = r.list(args.prefix, limit=args.limit)
    if args.json:
        print(json.dumps({"revision": res.revision, "items": [_kv_json(kv) for kv in res.items]}))
    else:
        for kv in res.items:
            print(f"{_text(kv.key)}\t{_text(kv.value)}")
        print(f"({len(res.items)} keys at revision {res.revision})", file=sys.stderr)
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    with _reader(args.name) as r, r.watch(args.prefix, since_revision=args.since) as w:
        signal.signal(signal.SIGTERM, lambda *_: w.close())
        try:
            for ev in w:
                if args.json:
                    print(json.dumps({"type": ev.type, "revision": ev.revision,
                                      "kv": _kv_json(ev.kv),
                                      "prev_kv": _kv_json(ev.prev_kv) if ev.prev_kv else None}),
                          flush=True)
                else:
                    print(f"{ev.revision}\t{ev.type}\t{_text(ev.kv.key)}\t{_text(ev.kv.value)}",
                          flush=True)
        except KeyboardInterrupt:
            pass
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from ._check import check_cache

    facts, problems = check_cache(args.name)
    for f in facts:
        print(f"ok: {f}")
    for p in problems:
        print(f"VIOLATION: {p}")
    print(f"{args.name}: {'OK' if not problems else f'{len(problems)} violation(s)'}")
    return 1 if problems else 0


def cmd_rm(args: argparse.Namespace) -> int:
    from . import reader  # noqa: F401  (validates the name the same way)

    removed = _shm.remove_cache(_shm.validate_name(args.name), force=args.force)
    for seg in removed:
        print(f"removed {seg}")
    if not removed:
        print(f"no segments for cache {args.name!r}", file=sys.stderr)
        return 1
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo

    return run_demo(duration=args.duration, readers=args.readers, keys=args.keys)


def _serve_setting_flags(p: argparse.ArgumentParser) -> None:
    """One flag per setting of config.SETTINGS; None (not given) lets lower sources speak."""
    from .config import SETTINGS

    aliases = {"ca_file": ["--ca-cert"], "cert_file": ["--cert-cert"], "key_file": ["--cert-key"]}
    for name, setting in SETTINGS.items():
        default = setting.default
        if name == "mode":
            default = f"{default:o}"
        elif name == "ring_size":
            default = "64MiB"
        elif name == "endpoints":
            default = ",".join(default)
        shown = "" if default in (None, "", False) else f" (default {default})"
        names = [setting.flag, *aliases.get(name, [])]
        if name == "remove_on_exit":
            p.add_argument(*names, dest=name, action=argparse.BooleanOptionalAction,
                           default=None, help=setting.help)
        else:
            p.add_argument(*names, dest=name, default=None,
                           help=f"{setting.help}{shown}".replace("%", "%%"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shmcache", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser(
        "serve", help="run the writer for cache NAME (one per host)",
        description="Run the writer for cache NAME. Each setting may come from a flag, an "
                    "environment variable SHMCACHE_<SETTING> or the --config TOML file (keys "
                    "as the flags, with '_'); that is also the order of precedence. See "
                    "docs/operations.md.")
    s.add_argument("name")
    s.add_argument("--config", default=None, metavar="FILE",
                   help="TOML file of settings (default: $SHMCACHE_CONFIG if set)")
    s.add_argument("--check-config", action="store_true",
                   help="print the effective settings and where each came from, then exit")
    _serve_setting_flags(s)
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("status", help="show a cache's and its writer's state")
    s.add_argument("name")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("get", help="print one key's value")
    s.add_argument("name")
    s.add_argument("key")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_get)

    s = sub.add_parser("list", help="list keys under a prefix")
    s.add_argument("name")
    s.add_argument("prefix", nargs="?", default="")
    s.add_argument("--limit", type=int, default=None)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_list)

    s = sub.add_parser("watch", help="print events as they happen")
    s.add_argument("name")
    s.add_argument("prefix", nargs="?", default="")
    s.add_argument("--since", type=int, default=None, help="revision to watch after (exclusive)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_watch)

    s = sub.add_parser("check", help="verify every segment and invariant of a cache")
    s.add_argument("name")
    s.set_defaults(func=cmd_check)

    s = sub.add_parser("rm", help="remove a cache's segments (refused while its writer runs)")
    s.add_argument("name")
    s.add_argument("--force", action="store_true",
                   help="remove even while a writer holds the cache (for a stuck writer)")
    s.set_defaults(func=cmd_rm)

    s = sub.add_parser("demo", help="run etcd, a writer and reader processes on this machine")
    s.add_argument("--duration", type=float, default=None, help="stop after S seconds")
    s.add_argument("--readers", type=int, default=3)
    s.add_argument("--keys", type=int, default=10_000)
    s.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ShmCacheError as exc:
        print(f"shmcache {args.command}: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
