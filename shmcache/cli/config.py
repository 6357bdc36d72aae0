"""Settings of ``shmcache serve``: a TOML file, SHMCACHE_* environment variables and flags.

Precedence, highest first: flags > environment > config file > defaults. Each
setting comes whole from the highest source that sets it; the two forms of the
password (``password`` and ``password_file``) count as one setting. Every
value is checked before the writer starts, and a bad one raises
``ConfigError`` naming the setting, where it came from and why it is wrong.
"""

from __future__ import annotations

import difflib
import grp
import ipaddress
import os
import sys
import tomllib
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

from .. import _defaults
from ..errors import ShmCacheError
from ..format import layout

__all__ = ["ETCD_SETTINGS", "SETTINGS", "ConfigError", "ServeConfig", "load"]

ENV_PREFIX = "SHMCACHE_"
# SHMCACHE_* variables that are not settings of `serve` (not warned about): the
# test etcd binary, the writer's crash-test hook and the tests' log switch.
_ENV_NOT_SETTINGS = {"SHMCACHE_CONFIG", "SHMCACHE_ETCD_BINARY", "SHMCACHE_FAULT",
                     "SHMCACHE_KEEP_LOGS"}


class ConfigError(ShmCacheError, ValueError):
    """A setting of ``shmcache serve`` is invalid; the message names it and says why."""


@dataclass(frozen=True)
class Setting:
    name: str
    default: Any
    help: str
    # parse(value, from_file) -> value; raises ValueError(reason). Strings come
    # from the environment and flags, TOML types from the file.
    parse: Callable[[Any, bool], Any]
    secret: bool = False
    flag_name: str | None = None  # the CLI flag, if not --NAME (--index, repeated)

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def flag(self) -> str:
        return self.flag_name or "--" + self.name.replace("_", "-")


# -- value parsers --------------------------------------------------------------

def _type_name(v: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "a table"}.get(type(v), type(v).__name__)


def _str(v: Any, _file: bool) -> str:
    if not isinstance(v, str):
        raise ValueError(f"expected a string, got {_type_name(v)}")
    return v


def _nonempty(v: Any, file: bool) -> str:
    s = _str(v, file)
    if not s:
        raise ValueError("must not be empty")
    return s


def _indexes(v: Any, file: bool) -> dict[str, str]:
    """Secondary indexes: a TOML table name = "spec", or NAME=SPEC strings (a list from
    repeated --index flags; comma-separated in $SHMCACHE_INDEXES)."""
    from ..format.indexspec import make_all, parse_option

    if isinstance(v, dict) and file:
        if not all(isinstance(x, str) for x in v.values()):
            raise ValueError("each index is name = \"SPEC\" (a string)")
        out = dict(v)
    else:
        if isinstance(v, str) and not file:
            v = [x for x in (p.strip() for p in v.split(",")) if x]
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise ValueError(f"must be a table of name = \"SPEC\", not {_type_name(v)}")
        out = {}
        for text in v:
            name, spec = parse_option(text)
            if name in out:
                raise ValueError(f"index {name!r} is given twice")
            out[name] = spec
    make_all(out)  # validates every spec
    return out


def _endpoints(v: Any, _file: bool) -> list[str]:
    if isinstance(v, str):
        items = [e.strip() for e in v.split(",")]
    elif isinstance(v, list) and all(isinstance(e, str) for e in v):
        items = [e.strip() for e in v]
    else:
        raise ValueError(f"expected a list of URLs or a comma-separated string, got "
                         f"{_type_name(v)}")
    items = [e for e in items if e]
    if not items:
        raise ValueError("no endpoint given")
    for e in items:
        url = e if "://" in e else "http://" + e
        u = urlparse(url)
        if u.scheme not in ("http", "https"):
            raise ValueError(f"{e!r}: scheme must be http or https, not {u.scheme!r}")
        try:
            port = u.port
        except ValueError:
            raise ValueError(f"{e!r}: bad port") from None
        if not u.hostname:
            raise ValueError(f"{e!r}: no host")
        if port == 0:
            raise ValueError(f"{e!r}: port 0")
        if u.path not in ("", "/"):
            raise ValueError(f"{e!r}: a client URL has no path")
    return items


def _prefix(v: Any, file: bool) -> str:
    s = _str(v, file)
    if len(s.encode()) > layout.MAX_PREFIX_LEN:
        raise ValueError(f"longer than {layout.MAX_PREFIX_LEN} bytes")
    return s


def _size(v: Any, _file: bool) -> int:
    from .._units import parse_size

    if isinstance(v, bool) or not isinstance(v, (int, str)):
        raise ValueError(f"expected a size such as \"64MiB\" or a number of bytes, got "
                         f"{_type_name(v)}")
    n = parse_size(v)  # ValueError says how to write a size
    if n <= 0:
        raise ValueError("must be positive")
    return n


def _ring_size(v: Any, file: bool) -> int:
    n = _size(v, file)
    lo, hi = layout.MIN_RING_CAPACITY, layout.MAX_RING_CAPACITY
    if not lo <= n <= hi:
        raise ValueError(f"{n} bytes is out of range: must be between 64KiB and 1TiB "
                         f"({lo} and {hi} bytes)")
    return n


def _snapshot_bytes(v: Any, file: bool) -> int | None:
    if v in ("", "auto"):
        return None
    return _size(v, file)


def _seconds(v: Any, _file: bool) -> float:
    from .._units import parse_seconds

    if isinstance(v, bool):
        raise ValueError("expected a duration such as \"30s\" or a number of seconds, got a "
                         "boolean")
    f = parse_seconds(v)  # ValueError says how to write a duration
    if not 0 < f < 86400 * 365:
        raise ValueError("must be a positive number of seconds (below a year)")
    return f


def _mode(v: Any, _file: bool) -> int:
    if isinstance(v, bool):
        raise ValueError("expected an octal mode such as \"640\", got a boolean")
    if isinstance(v, int):
        m = v  # TOML: 0o640 is an int; a plain 640 is decimal and caught below
    elif isinstance(v, str):
        t = v.strip().lower().removeprefix("0o")
        if not t or any(c not in "01234567" for c in t):
            raise ValueError(f"{v!r} is not an octal mode such as \"640\"")
        m = int(t, 8)
    else:
        raise ValueError(f"expected an octal mode such as \"640\", got {_type_name(v)}")
    if m & ~0o777:
        hint = " (write \"640\" or 0o640: a plain 640 is decimal)" if file_int(v) else ""
        raise ValueError(f"{m:o} is not a file mode{hint}")
    if m & 0o022:
        raise ValueError(f"{m:03o} lets group or others write the segments; readers only "
                         f"need read access (600, 640 or 644)")
    if m & 0o111:
        raise ValueError(f"{m:03o} has execute bits; use 600, 640 or 644")
    if m & 0o600 != 0o600:
        raise ValueError(f"{m:03o} does not let the writer read and write its own segments")
    return m


def file_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _group(v: Any, _file: bool) -> str | int | None:
    if v in ("", None):
        return None
    if file_int(v):
        g = int(v)
    elif isinstance(v, str):
        if v.isdigit():
            g = int(v)
        else:
            try:
                grp.getgrnam(v)
            except KeyError:
                raise ValueError(f"no group named {v!r} on this host") from None
            return v
    else:
        raise ValueError(f"expected a group name or id, got {_type_name(v)}")
    # A numeric id needs no entry in /etc/group: in a container the shared group is
    # often only a number (Kubernetes' fsGroup), and chown takes ids anyway.
    if not 0 <= g < 2**32 - 1:
        raise ValueError(f"group id {g} is out of range")
    return g


def _seconds_or_zero(v: Any, file: bool) -> float:
    from .._units import parse_seconds

    if not isinstance(v, bool) and isinstance(v, (int, float, str)):
        try:
            if parse_seconds(v) == 0:
                return 0.0
        except ValueError:
            pass  # (_seconds says why)
    return _seconds(v, file)


def _bool(v: Any, _file: bool) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str):
        t = v.strip().lower()
        if t in ("1", "true", "yes", "on"):
            return True
        if t in ("0", "false", "no", "off"):
            return False
    raise ValueError(f"expected true or false, got {v!r}")


def _readable_file(v: Any, file: bool) -> str:
    path = _nonempty(v, file)
    if not os.path.isfile(path):
        raise ValueError("no such file" if not os.path.exists(path) else "not a regular file")
    if not os.access(path, os.R_OK):
        raise ValueError(f"not readable by uid {os.geteuid()}")
    return path


def _log_level(v: Any, file: bool) -> str:
    t = _str(v, file).strip().lower()
    t = {"warn": "warning"}.get(t, t)
    if t not in ("debug", "info", "warning", "error", "critical"):
        raise ValueError("must be one of debug, info, warning, error, critical")
    return t


def _log_format(v: Any, file: bool) -> str:
    t = _str(v, file).strip().lower()
    if t not in ("plain", "json"):
        raise ValueError("must be plain or json")
    return t


def _metrics(v: Any, file: bool) -> tuple[str, int] | None:
    t = _str(v, file).strip()
    if t.lower() in ("", "off", "none", "false"):
        return None
    host, sep, port_text = t.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError("expected HOST:PORT such as 127.0.0.1:9464 (or \"off\")")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"port {port} is above 65535")
    host = host.strip("[]") or "127.0.0.1"
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IP address (or localhost)") from None
    return host, port


SETTINGS: dict[str, Setting] = {s.name: s for s in [
    Setting("endpoints", [_defaults.ENDPOINT], "etcd client URLs (comma-separated)",
            _endpoints),
    Setting("prefix", "", "key prefix to cache (empty: every key)", _prefix),
    Setting("ring_size", _defaults.RING_SIZE, "ring log size, e.g. 64MiB", _ring_size),
    Setting("snapshot_interval", _defaults.SNAPSHOT_INTERVAL,
            "time between snapshot republishes while keys change (seconds, or 30s, 5m)",
            _seconds),
    Setting("snapshot_bytes", None, "republish the snapshot after this many ring bytes "
            "(default: ring_size / 4, at most 16MiB)", _snapshot_bytes),
    Setting("verify_interval", _defaults.VERIFY_INTERVAL,
            "time between checks of the published snapshot against etcd (0: never)",
            _seconds_or_zero),
    Setting("mode", _defaults.MODE, "segment mode, octal: 600, 640 or 644", _mode),
    Setting("group", None, "group owning the segments (with mode 640)", _group),
    Setting("remove_on_exit", False, "unlink the cache's segments when the writer stops", _bool),
    Setting("ca_file", None, "CA certificate that signed etcd's certificate (PEM)",
            _readable_file),
    Setting("cert_file", None, "client certificate for etcd (PEM)", _readable_file),
    Setting("key_file", None, "private key of the client certificate (PEM)", _readable_file),
    Setting("user", None, "etcd user name", _nonempty),
    Setting("password", None, "etcd password (prefer password_file)", _nonempty, secret=True),
    Setting("password_file", None, "file holding the etcd password (first line)",
            _readable_file),
    Setting("indexes", {}, "secondary index NAME=SPEC (repeatable): segment:N, "
            "json:POINTER or json-map:POINTER", _indexes, flag_name="--index"),
    Setting("log_level", "info", "debug, info, warning or error", _log_level),
    Setting("log_format", "plain", "plain or json (one JSON object per line)", _log_format),
    Setting("metrics", None, "serve Prometheus metrics on HOST:PORT", _metrics),
]}

# Settings of `shmcache proxy` only (cli/proxy_config.py; a test keeps the two equal):
# the environment may carry them for a proxy, so `serve` does not warn about them.
OTHER_COMMAND_SETTINGS = frozenset({"listen", "listen_cert_file", "listen_key_file",
                                    "listen_client_ca_file", "workers"})
# The two forms of the password are one setting for precedence.
_PASSWORD_FORMS = ("password", "password_file")
# What connecting to etcd takes (`shmcache check --against-etcd` reads only these).
ETCD_SETTINGS = ("endpoints", "ca_file", "cert_file", "key_file", "user", *_PASSWORD_FORMS)


@dataclass
class ServeConfig:
    """The effective settings of one ``shmcache serve`` and where each came from."""

    name: str
    endpoints: list[str]
    prefix: str
    ring_size: int
    snapshot_interval: float
    snapshot_bytes: int | None
    verify_interval: float
    mode: int
    group: str | int | None
    remove_on_exit: bool
    ca_file: str | None
    cert_file: str | None
    key_file: str | None
    user: str | None
    password: str | None
    password_file: str | None
    indexes: dict[str, str]
    log_level: str
    log_format: str
    metrics: tuple[str, int] | None
    config_file: str | None = None
    sources: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def describe(self) -> list[str]:
        """``setting = value  (source)`` lines, secrets masked."""
        lines = []
        for name, s in SETTINGS.items():
            v = getattr(self, name)
            if s.secret and v is not None:
                shown = "(set)"
            elif name == "mode":
                shown = f"{v:03o}"
            elif name == "metrics" and v is not None:
                shown = f"{v[0]}:{v[1]}"
            else:
                shown = repr(v)
            lines.append(f"{name} = {shown}  ({self.sources.get(name, 'default')})")
        return lines


def _fail(name: str, value: Any, origin: str, reason: str,
          table: Mapping[str, Setting] | None = None) -> ConfigError:
    s = (SETTINGS if table is None else table).get(name)
    shown = "(hidden)" if s is not None and s.secret else repr(value)
    return ConfigError(_one_line(f"{name} = {shown} (from {origin}): {reason}"))


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _read_file(path: str, table: Mapping[str, Setting]) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path}: no such file") from None
    except PermissionError:
        raise ConfigError(f"config file {path}: not readable by uid {os.geteuid()}") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path}: is a directory") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(_one_line(f"config file {path}: not valid TOML: {exc}")) from None
    for key in data:
        if key not in table:
            close = difflib.get_close_matches(key, table, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"config file {path}: unknown setting {key!r}{hint}; known: "
                              f"{', '.join(table)}")
    return data


def load(name: str, flags: Mapping[str, Any] | None = None,
         environ: Mapping[str, str] | None = None,
         config_file: str | None = None,
         only: Collection[str] | None = None) -> ServeConfig:
    """The effective settings for cache ``name``.

    ``flags`` maps setting names to the strings given on the command line (None
    or absent: not given). ``environ`` defaults to ``os.environ``; a config file
    is read from ``config_file``, else from ``$SHMCACHE_CONFIG`` if set.
    ``only``: read just these settings (the others keep their defaults).
    Raises ``ConfigError`` on the first bad setting.
    """
    values, sources, warnings, config_file = resolve(
        name, SETTINGS, flags, environ, config_file, only, "`shmcache serve`")
    cfg = ServeConfig(name=name, config_file=config_file, sources=sources, warnings=warnings,
                      **values)
    _cross_check(cfg)
    if cfg.password_file is not None:
        cfg.password = _read_password(cfg)
    return cfg


def resolve(name: str, table: Mapping[str, Setting], flags: Mapping[str, Any] | None,
            environ: Mapping[str, str] | None, config_file: str | None,
            only: Collection[str] | None, command: str,
            ) -> tuple[dict[str, Any], dict[str, str], list[str], str | None]:
    """The settings of ``table`` from flags > environment > config file > defaults:
    (values, sources, warnings, config file). Shared by ``serve`` and ``proxy``; an
    environment variable naming a setting of either command is not warned about."""
    from ..ipc import shm as _shm

    try:
        _shm.validate_name(name)
    except ShmCacheError as exc:
        raise ConfigError(f"{exc} (letters, digits, '_', '-' and '.')") from None
    environ = os.environ if environ is None else environ
    flags = flags or {}
    warnings: list[str] = []
    if config_file is None and environ.get("SHMCACHE_CONFIG"):
        config_file = environ["SHMCACHE_CONFIG"]

    # Layers, lowest precedence first: (origin text, {setting: raw value}, from_file).
    layers: list[tuple[str, dict[str, Any], bool]] = []
    if config_file is not None:
        data = _read_file(config_file, table)
        base = os.path.dirname(os.path.abspath(config_file))
        for key in ("ca_file", "cert_file", "key_file", "password_file"):
            v = data.get(key)
            if isinstance(v, str) and v and not os.path.isabs(v):
                data[key] = os.path.join(base, v)  # relative to the file, not to the cwd
        layers.append((f"config file {config_file}", data, True))
    env_layer: dict[str, Any] = {}
    for key, value in environ.items():
        if not key.startswith(ENV_PREFIX) or key in _ENV_NOT_SETTINGS:
            continue
        setting = key[len(ENV_PREFIX):].lower()
        if setting not in table:
            if setting not in SETTINGS and setting not in OTHER_COMMAND_SETTINGS:
                warnings.append(f"ignoring environment variable {key}: not a setting of "
                                f"{command}")
        elif value != "":  # an empty variable counts as unset (EnvironmentFile placeholders)
            env_layer[setting] = value
    layers.append(("environment", env_layer, False))
    layers.append(("command line", {k: v for k, v in flags.items() if v is not None}, False))

    values: dict[str, Any] = {n: s.default for n, s in table.items()}
    sources: dict[str, str] = {}
    for origin, layer, from_file in layers:
        if only is not None:
            layer = {k: v for k, v in layer.items() if k in only}
        both = [k for k in _PASSWORD_FORMS if k in layer]
        if len(both) == 2:
            raise ConfigError(f"password and password_file are both set (in the {origin}); "
                              f"set one of them")
        if both:  # the higher source's password form replaces the lower's
            for k in _PASSWORD_FORMS:
                values[k] = None
                sources.pop(k, None)
        for key, raw in layer.items():
            s = table[key]
            where = _where(origin, key, table)
            try:
                values[key] = s.parse(raw, from_file)
            except ValueError as exc:
                raise _fail(key, raw, where, str(exc), table) from None
            sources[key] = where

    return values, sources, warnings, config_file


def _where(origin: str, key: str, table: Mapping[str, Setting]) -> str:
    if origin == "environment":
        return f"environment {ENV_PREFIX}{key.upper()}"
    if origin == "command line":
        return f"flag {table[key].flag}" if key in table else "command line"
    return origin


def check_etcd_tls(cfg: Any, err: Callable[[str, str], ConfigError]) -> set[str]:
    """What ``serve`` and ``proxy`` check alike of their etcd settings (``endpoints``,
    ``cert_file``, ``key_file`` of ``cfg``): a client certificate comes with its key, and
    the endpoints use one scheme, which is returned ({"http"}, {"https"}, or none)."""
    if (cfg.cert_file is None) != (cfg.key_file is None):
        have, missing = ("cert_file", "key_file") if cfg.cert_file else ("key_file", "cert_file")
        raise err(have, f"a client certificate needs both cert_file and key_file; {missing} "
                        f"is not set")
    schemes = {("https" if e.startswith("https://") else "http") for e in cfg.endpoints}
    if len(schemes) > 1:
        raise err("endpoints", "mixes http:// and https:// endpoints; all members use one")
    return schemes


def _cross_check(cfg: ServeConfig) -> None:
    src = cfg.sources

    def err(name: str, reason: str) -> ConfigError:
        return _fail(name, getattr(cfg, name), src.get(name, "default"), reason)

    schemes = check_etcd_tls(cfg, err)
    tls = any(f is not None for f in (cfg.ca_file, cfg.cert_file, cfg.key_file))
    if "https" in schemes and cfg.ca_file is None:
        raise err("endpoints", "https:// endpoints need ca_file, the CA that signed etcd's "
                               "certificate (grpc does not use the system trust store)")
    if tls and "http" in schemes:
        which = next(n for n in ("ca_file", "cert_file", "key_file") if getattr(cfg, n))
        raise err("endpoints", f"{which} is set but the endpoints are http://; use https:// "
                               f"URLs for TLS")
    if cfg.user is not None and cfg.password is None and cfg.password_file is None:
        raise err("user", "needs password or password_file")
    if cfg.user is None:
        for k in _PASSWORD_FORMS:
            if getattr(cfg, k) is not None:
                raise err(k, "is set but user is not")
    if cfg.group is not None and not cfg.mode & 0o040:
        raise err("group", f"is set but mode {cfg.mode:03o} gives the group no access; "
                           f"use mode 640")
    if cfg.metrics is not None:
        try:
            import prometheus_client  # noqa: F401
        except ImportError:
            raise err("metrics", "needs the prometheus_client package: "
                                 "pip install 'shmcache[metrics]'") from None


def _read_password(cfg: ServeConfig) -> str:
    path = cfg.password_file
    assert path is not None
    where = cfg.sources.get("password_file", "default")
    try:
        with open(path, encoding="utf-8") as f:
            first = f.readline()
    except (OSError, UnicodeDecodeError) as exc:
        raise _fail("password_file", path, where, f"cannot read it: {exc}") from None
    password = first.rstrip("\r\n")
    if not password:
        raise _fail("password_file", path, where, "its first line is empty")
    st = os.stat(path)
    if st.st_mode & 0o004:
        cfg.warnings.append(f"password_file {path} is readable by every user "
                            f"(mode {st.st_mode & 0o777:03o}); chmod 600 or 640 it")
    return password


def run_configured(command: str, args: Any, names: Iterable[str],
                   load_config: Callable[..., Any], run: Callable[[Any], int]) -> int:
    """``shmcache COMMAND NAME [flags]`` for a command configured like ``serve``: its
    settings from flags > SHMCACHE_* environment > --config file > defaults, printed
    with their sources by ``--check-config`` (exit 0), else ``run(config)``. A bad
    setting is one line on stderr and exit 2."""
    flags = {name: getattr(args, name, None) for name in names}
    try:
        cfg = load_config(args.name, flags, config_file=args.config)
        if args.check_config:
            for line in cfg.describe():
                print(line)
            for warning in cfg.warnings:
                print(f"warning: {warning}", file=sys.stderr)
            return 0
        return run(cfg)
    except ConfigError as exc:
        print(f"shmcache {command}: {exc}", file=sys.stderr)
        return 2
