"""The ``shmcache`` command: serve, status, get, list, watch, check, rm, demo, bench, proxy."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
from collections.abc import Callable, Collection, Mapping
from typing import Any

from .. import _args
from ..errors import NotFoundError, ShmCacheError
from ..ipc import shm as _shm
from .config import ETCD_SETTINGS, SETTINGS, ServeConfig, Setting
from .output import count_json as _count_json
from .output import kv_json as _kv_json
from .output import plural as _plural
from .output import range_json as _range_json
from .output import text as _text
from .readiness import PUBLISH_GRACE, cmd_status

log = logging.getLogger("shmcache")


def cmd_serve(args: argparse.Namespace) -> int:
    """Settings from flags > SHMCACHE_* environment > --config file > defaults (config.py)."""
    from .config import load, run_configured
    from .service import serve

    return run_configured("serve", args, SETTINGS, load, serve)


def _reader(name: str, timeout: float = 2.0) -> Any:
    from ..reader.reader import Reader

    return Reader(name, timeout=timeout)


def cmd_get(args: argparse.Namespace) -> int:
    with _reader(args.name) as r:
        kv = r.get(os.fsencode(args.key))  # argv bytes as given (any bytes but NUL)
        rev = r.revision
    if args.json:
        print(json.dumps({"revision": rev, "kv": _kv_json(kv) if kv else None}))
    elif kv is None:
        print(f"(not found at revision {rev})", file=sys.stderr)
    elif args.raw:
        sys.stdout.flush()
        sys.stdout.buffer.write(kv.value)  # the exact bytes, nothing added
        sys.stdout.buffer.flush()
    else:
        sys.stdout.write(_text(kv.value) + "\n")
    return 0 if kv is not None else 1


def cmd_list(args: argparse.Namespace) -> int:
    if args.continue_token is not None and args.limit is None:
        raise ValueError("--continue needs --limit (the page size)")
    shard = _args.shard_text(args.shard, "--shard")
    key = os.fsencode(args.prefix)
    end = None if args.range_end is None else os.fsencode(args.range_end)
    if args.range_end is not None and not key:
        raise ValueError("--range-end needs a KEY (the start of the range)")
    if args.index is not None and (args.prefix or args.range_end is not None):
        raise ValueError("give a PREFIX (or KEY --range-end END) or --index, not both")
    if args.count:
        if args.limit is not None or args.continue_token is not None or shard is not None \
                or args.index is not None:
            raise ValueError("--count takes no --limit, --continue, --shard or --index")
        with _reader(args.name) as r:
            counted = r.count(key, range_end=end)
        if args.json:
            print(json.dumps(_count_json(counted)))
        else:
            print(counted.count)
            print(f"(at revision {counted.revision})", file=sys.stderr)
        return 0
    with _reader(args.name) as r:
        page = {"limit": args.limit, "continue_token": args.continue_token,
                "keys_only": args.keys_only, "shard": shard}
        if args.index is not None:
            index, sep, value = args.index.partition("=")
            if not sep or not index:
                raise ValueError(f"--index wants NAME=VALUE (e.g. node=node-7), not "
                                 f"{args.index!r}")
            res = r.by_index(index, os.fsencode(value), **page)
        elif end is not None:
            res = r.range(key, end, **page)
        else:
            res = r.list(key, **page)
    if args.json:
        print(json.dumps(_range_json(res, keys_only=args.keys_only)))
    else:
        for kv in res.items:
            print(_text(kv.key) if args.keys_only else f"{_text(kv.key)}\t{_text(kv.value)}")
        print(f"({_plural(len(res.items), 'key')} at revision {res.revision})", file=sys.stderr)
        if res.continue_token is not None:
            print(f"(more: --continue {res.continue_token})", file=sys.stderr)
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    """Print events until SIGTERM or SIGINT, then exit 0 (within a poll slice, 0.5 s).

    The handler only closes the watch, which takes no lock: it may interrupt the
    main thread anywhere, also inside the demultiplexer's lock."""
    watches: list[Any] = []
    stopped = False

    def on_signal(*_: object) -> None:
        nonlocal stopped
        stopped = True
        for w in watches:
            w.close()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    shard = _args.shard_text(args.shard, "--shard")
    with _reader(args.name) as r, \
            r.watch(os.fsencode(args.prefix), since_revision=args.since, shard=shard) as w:
        watches.append(w)
        if stopped:
            w.close()
        for ev in w:
            if args.json:
                print(json.dumps({"type": ev.type, "revision": ev.revision,
                                  "kv": _kv_json(ev.kv),
                                  "prev_kv": _kv_json(ev.prev_kv) if ev.prev_kv else None}),
                      flush=True)
            else:
                print(f"{ev.revision}\t{ev.type}\t{_text(ev.kv.key)}\t{_text(ev.kv.value)}",
                      flush=True)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Exit 0: every invariant holds; 1: violations found (listed); 2: the check could not
    run (no such cache, a bad flag, etcd unreachable)."""
    from .check import check_cache

    cfg = _check_etcd_config(args)
    facts, problems = check_cache(args.name)
    if cfg is not None and not problems:
        facts, problems = _check_against_etcd(args, cfg, facts)
    for f in facts:
        print(f"ok: {f}")
    for p in problems:
        print(f"VIOLATION: {p}")
    print(f"{args.name}: {'OK' if not problems else _plural(len(problems), 'violation')}")
    return 1 if problems else 0


def _check_etcd_config(args: argparse.Namespace) -> ServeConfig | None:
    """The etcd settings for ``--against-etcd``, as ``serve`` reads them (flags >
    SHMCACHE_* environment > --config file; config.ETCD_SETTINGS), checked before
    anything runs; None without ``--against-etcd``, whose flags are then refused."""
    from .config import load

    flags = {n: getattr(args, n) for n in ETCD_SETTINGS if getattr(args, n, None) is not None}
    if not args.against_etcd:
        given = [f"--{n}" for n in ("values", "config") if getattr(args, n)]
        given += [SETTINGS[n].flag for n in flags]
        if given:
            raise ValueError(f"{', '.join(given)} only "
                             f"{'applies' if len(given) == 1 else 'apply'} with --against-etcd")
        return None
    from ..writer.etcd import connection as _etcd  # noqa: F401  (the writer extra: fail before reading anything)

    return load(args.name, flags, config_file=args.config, only=ETCD_SETTINGS)


def _check_against_etcd(args: argparse.Namespace, cfg: ServeConfig,
                        facts: list[str]) -> tuple[list[str], list[str]]:
    """The live snapshot against etcd's range at its revision (the writer's verifier, once)."""
    from ..writer import verify as _verify
    from ..writer.etcd import connection as _etcd

    settings = _etcd.EtcdSettings(
        endpoints=list(cfg.endpoints), ca_cert=cfg.ca_file, cert_cert=cfg.cert_file,
        cert_key=cfg.key_file, user=cfg.user, password=cfg.password)
    conn = _etcd.Connection(settings)
    try:
        conn.connect()
        res = _verify.compare_cache(args.name, conn, values=args.values)
    except _verify.Inconclusive as exc:
        raise ShmCacheError(f"cannot compare with etcd: {exc}") from None
    except Exception as exc:
        if _etcd.is_grpc_error(exc):
            raise ShmCacheError(f"etcd: {_etcd.describe(exc)}") from None
        raise
    finally:
        conn.close()
    what = "keys, revisions, versions, leases" + (" and values" if args.values else "")
    facts = facts + [f"etcd: {_plural(res.keys, 'key')} equal at revision {res.revision} "
                     f"({what}; {res.etcd_bytes} bytes from etcd in {res.seconds:.2f}s)"]
    problems = [f"etcd at revision {res.revision}: {m}" for m in res.first]
    if res.mismatches > len(res.first):
        problems.append(f"... {res.mismatches - len(res.first)} more difference(s)")
    return facts, problems


def cmd_rm(args: argparse.Namespace) -> int:
    from ..reader import reader  # noqa: F401  (validates the name the same way)
    from ..writer.lock import remove_cache

    removed = remove_cache(_shm.validate_name(args.name), force=args.force)
    if not removed:
        raise NotFoundError(f"no shmcache named {args.name!r} on this host (no segments)",
                            name=args.name, hint="")
    for seg in removed:
        print(f"removed {seg}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ..writer.etcd import connection as _etcd  # noqa: F401  (the writer extra: before etcd starts)
    from .demo import run_demo
    from .demo_etcd import find_etcd_binary

    try:
        find_etcd_binary()
    except RuntimeError as exc:  # no etcd binary: how to install one
        raise ShmCacheError(str(exc)) from None
    return run_demo(duration=args.duration, readers=args.readers, keys=args.keys)


def cmd_bench(args: argparse.Namespace) -> int:
    from . import bench as _bench

    if args.json not in (None, "-"):
        _bench.check_json_path(args.json)
    plan = _bench.Plan(name=args.name, op=args.op, readers=args.readers, seconds=args.seconds,
                       prefix=None if args.prefix is None else os.fsencode(args.prefix),
                       list_size=args.list_size, sample=args.sample, seed=args.seed)
    doc = _bench.run(plan, _bench.Progress(sys.stderr))
    if args.json == "-":
        print(json.dumps(doc, indent=2))
        return 0
    for line in _bench.table(doc):
        print(line)
    if args.json is not None:
        _bench.write_json(args.json, doc)
        print(f"(results written to {args.json})", file=sys.stderr)
    return 0


def _reader_counts(text: str) -> list[int]:
    """``--readers 1,2,4,8``: positive integers, comma-separated; sorted, without repeats."""
    from .bench import MAX_READERS

    try:
        counts = sorted({int(x) for x in text.split(",")})
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of integers: {text!r}") from None
    if counts[0] < 1 or counts[-1] > MAX_READERS:
        raise argparse.ArgumentTypeError(f"reader counts must be 1..{MAX_READERS}, not {text}")
    return counts


def _int_at_least(lo: int) -> Callable[[str], int]:
    """An argparse ``type=``: an integer >= ``lo`` (argparse turns the error into usage, exit 2)."""
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if n < lo:
            raise argparse.ArgumentTypeError(f"must be at least {lo}, not {n}")
        return n
    parse.__name__ = "integer"
    return parse


def _positive_seconds(text: str) -> float:
    """A duration as config.py reads one (``30s``, ``5m``, ``250ms``, or seconds), > 0."""
    from .._units import parse_seconds

    try:
        x = parse_seconds(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not (x > 0 and math.isfinite(x)):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text}")
    return x


# etcdctl's spellings of the TLS flags, as aliases. The first spellings, after
# python-etcd3's arguments (--ca-cert, --cert-cert, --cert-key), keep working unlisted.
_ALIASES = {"ca_file": ["--cacert"], "cert_file": ["--cert"], "key_file": ["--key"]}
_HIDDEN_ALIASES = {"ca_file": "--ca-cert", "cert_file": "--cert-cert", "key_file": "--cert-key"}


def _setting_flags(p: argparse.ArgumentParser, names: Collection[str] | None = None,
                   table: Mapping[str, Setting] | None = None) -> None:
    """One flag per setting of ``table`` (config.SETTINGS: serve's), or of its ``names``;
    None (not given) lets lower sources speak."""
    for name, setting in (SETTINGS if table is None else table).items():
        if names is not None and name not in names:
            continue
        default = setting.default
        if name == "mode":
            default = f"{default:o}"
        elif name == "ring_size":
            default = f"{default >> 20}MiB" if default % (1 << 20) == 0 else str(default)
        elif name == "endpoints":
            default = ",".join(default)
        elif name in ("snapshot_interval", "verify_interval"):
            default = f"{default:g}s"
        shown = "" if default in (None, "", False) else f" (default {default})"
        option_strings = [setting.flag, *_ALIASES.get(name, [])]
        if name == "remove_on_exit":
            p.add_argument(*option_strings, dest=name, action=argparse.BooleanOptionalAction,
                           default=None, help=setting.help)
        elif name == "indexes":
            p.add_argument(*option_strings, dest=name, action="append", default=None,
                           metavar="NAME=SPEC", help=setting.help)
        else:
            p.add_argument(*option_strings, dest=name, default=None,
                           help=f"{setting.help}{shown}".replace("%", "%%"))
        if name in _HIDDEN_ALIASES:
            p.add_argument(_HIDDEN_ALIASES[name], dest=name, default=None,
                           help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="shmcache",
        description="Serve an etcd key range from shared memory on this host (serve) and "
                    "read it (status, get, list, watch); verify (check), remove (rm), try "
                    "(demo) and measure (bench) it; serve it to etcd clients (proxy). Exit "
                    "codes: 0 done, 1 a negative answer (no such key, violations found, not "
                    "ready), 2 an error. See "
                    "docs/operations.md.")
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
    _setting_flags(s)
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser(
        "status", help="show a cache's and its writer's state; exit 0 only when it is ready",
        description="Show a cache's and its writer's state. A readiness probe: exit 0 when "
                    "readers can attach, a writer is alive, it reaches etcd and publishing "
                    "has not failed for --publish-grace seconds; 1 otherwise (the last row, "
                    "or 'not_ready_reason' in --json, says why); 2 when there is no cache "
                    "to show. See docs/operations.md.")
    s.add_argument("name")
    s.add_argument("--json", action="store_true")
    s.add_argument("--publish-grace", type=_positive_seconds, default=PUBLISH_GRACE,
                   metavar="SECONDS",
                   help=f"how long publishing may fail (a full /dev/shm) before the cache "
                        f"counts as not ready (default {PUBLISH_GRACE:.0f})")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("get", help="print one key's value",
                       description="Print one key's value: as text with control characters, "
                                   "backslashes and non-UTF-8 bytes escaped; --raw writes the "
                                   "exact bytes; --json has key and value in base64.")
    s.add_argument("name")
    s.add_argument("key")
    out = s.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true",
                     help="one JSON object; key and value base64-encoded (as etcdctl)")
    out.add_argument("--raw", action="store_true",
                     help="write the value's exact bytes to stdout, with no newline added")
    s.set_defaults(func=cmd_get)

    s = sub.add_parser("list", help="list keys under a prefix, or in a key range")
    s.add_argument("name")
    s.add_argument("prefix", nargs="?", default="", metavar="PREFIX|KEY",
                   help="the prefix (default: the whole cache); with --range-end, the KEY")
    s.add_argument("--range-end", default=None, metavar="END", help="the range [KEY, END)")
    s.add_argument("--from-key", dest="range_end", action="store_const", const="\0",
                   help="every key >= KEY (etcd's range_end \"\\0\")")
    s.add_argument("--keys-only", action="store_true", help="keys without values")
    s.add_argument("--count", action="store_true",
                   help="print only the number of keys (its revision on stderr)")
    s.add_argument("--shard", default=None, metavar="I/N",
                   help="only the keys with crc32(key) %% N == I (docs/format.md, Shards)")
    s.add_argument("--limit", type=_int_at_least(1), default=None,
                   help="at most N keys (the first in key order); the next page with --continue")
    s.add_argument("--continue", dest="continue_token", default=None, metavar="TOKEN",
                   help="the next page of a --limit listing, at the first page's revision")
    s.add_argument("--index", default=None, metavar="NAME=VALUE",
                   help="the keys whose index NAME has VALUE (see `serve --index`)")
    s.add_argument("--json", action="store_true",
                   help="one JSON object; keys and values base64-encoded (as etcdctl)")
    s.set_defaults(func=cmd_list)

    s = sub.add_parser("watch", help="print events as they happen")
    s.add_argument("name")
    s.add_argument("prefix", nargs="?", default="")
    s.add_argument("--since", type=_int_at_least(0), default=None,
                   help="revision to watch after (exclusive)")
    s.add_argument("--shard", default=None, metavar="I/N",
                   help="only the events of keys with crc32(key) %% N == I")
    s.add_argument("--json", action="store_true",
                   help="one JSON object per event; keys and values base64-encoded (as etcdctl)")
    s.set_defaults(func=cmd_watch)

    s = sub.add_parser(
        "check", help="verify every segment and invariant of a cache",
        description="Verify every segment and invariant of cache NAME; with --against-etcd "
                    "also compare the published snapshot with etcd. The etcd settings are "
                    "read as `serve` reads them: flags, SHMCACHE_* environment, --config "
                    "file. Exit 0: all hold; 1: violations (listed); 2: the check could "
                    "not run.")
    s.add_argument("name")
    s.add_argument("--against-etcd", action="store_true",
                   help="also compare the published snapshot with etcd's range at its "
                        "revision (needs the writer extra)")
    s.add_argument("--values", action="store_true",
                   help="with --against-etcd, compare values too (they travel from etcd)")
    s.add_argument("--config", default=None, metavar="FILE",
                   help="with --against-etcd: the writer's TOML settings file, for its etcd "
                        "settings (default: $SHMCACHE_CONFIG if set)")
    _setting_flags(s, ETCD_SETTINGS)
    s.set_defaults(func=cmd_check)

    s = sub.add_parser("rm", help="remove a cache's segments (refused while its writer runs)")
    s.add_argument("name")
    s.add_argument("--force", action="store_true",
                   help="remove even while a writer holds the cache (for a stuck writer)")
    s.set_defaults(func=cmd_rm)

    s = sub.add_parser("demo", help="run etcd, a writer and reader processes on this machine")
    s.add_argument("--duration", type=_positive_seconds, default=None,
                   help="stop after this long: seconds, or 30s, 5m (default: at Ctrl-C)")
    s.add_argument("--readers", type=_int_at_least(1), default=3,
                   help="reader processes (default 3)")
    # Each demo reader lists 100-key ranges: fewer than 100 keys leave nothing to list.
    s.add_argument("--keys", type=_int_at_least(100), default=10_000,
                   help="keys to load, at least 100 (default 10000)")
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser(
        "bench", help="measure multi-reader throughput of a live cache on this host",
        description="Spawn reader processes that read the live cache NAME (never writing to "
                    "etcd or the cache) and print, per reader count, total and per-reader "
                    "ops/s, p50/p99 latency, CPU time per op, cores used and the scaling "
                    "against one reader. See docs/operations.md, 'Benchmark on your host'.")
    s.add_argument("name")
    s.add_argument("--readers", type=_reader_counts, default=[1, 2, 4], metavar="N,N,...",
                   help="reader process counts to measure, e.g. 1,2,4,8 (default 1,2,4)")
    s.add_argument("--op", choices=("get", "list", "watch"), default="get",
                   help="get a sampled key, list a prefix of about --list-size keys, or "
                        "watch the prefix and count events (default get)")
    s.add_argument("--seconds", type=_positive_seconds, default=5.0,
                   help="measuring time per reader count: seconds, or 500ms, 1m (default 5)")
    s.add_argument("--prefix", default=None,
                   help="sample keys and watch under this prefix (default: the whole cache)")
    s.add_argument("--list-size", type=_int_at_least(1), default=100,
                   help="keys per list for --op list (default 100)")
    s.add_argument("--sample", type=_int_at_least(1), default=100_000,
                   help="keys sampled from the cache for get and list (default 100000)")
    s.add_argument("--seed", type=int, default=1, help="seed of the key sample (default 1)")
    s.add_argument("--json", default=None, metavar="FILE",
                   help="also write the results as JSON to FILE ('-': JSON on stdout "
                        "instead of the table)")
    s.set_defaults(func=cmd_bench)

    from .proxy import add_parser as _add_proxy_parser

    _add_proxy_parser(sub, _setting_flags)
    return p


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _os_error(exc: OSError) -> str:
    """``[Errno 13] Permission denied: '/dev/shm/x'`` as ``permission denied: /dev/shm/x``."""
    if exc.strerror:
        what = exc.strerror[:1].lower() + exc.strerror[1:]
        return f"{what}: {exc.filename}" if exc.filename else what
    return str(exc) or type(exc).__name__


# The optional dependencies (pyproject.toml) by their top-level module: what to install.
_EXTRA_OF = {"grpc": "writer", "google": "writer",
             "prometheus_client": "metrics"}


def _missing_extra(exc: ImportError) -> str:
    """``pip install 'shmcache[writer]'`` for a module of an extra; anything else re-raised."""
    extra = _EXTRA_OF.get((exc.name or "").partition(".")[0])
    if extra is None:
        raise exc
    return f"needs the {extra} extra, which is not installed ({exc}): pip install " \
           f"'shmcache[{extra}]'"


def main(argv: list[str] | None = None) -> int:
    """Every error ends in one line ``shmcache COMMAND: message`` on stderr and exit 2."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except BrokenPipeError:
        # The reader of our stdout went away (``| head``): not an error. Point stdout at
        # /dev/null so the interpreter's final flush does not complain either.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 0
    except KeyboardInterrupt:
        return 130
    except ImportError as exc:
        message = _missing_extra(exc)
    except ShmCacheError as exc:
        message = str(exc)
    except ValueError as exc:  # e.g. a key or prefix outside the cache's range
        message = str(exc) or type(exc).__name__
    except OSError as exc:
        message = _os_error(exc)
    log.debug("shmcache %s failed", args.command, exc_info=True)
    print(f"shmcache {args.command}: {_one_line(message)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
