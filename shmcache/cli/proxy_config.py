"""Settings of ``shmcache proxy``: read as ``serve`` reads its own (config.resolve):
flags > SHMCACHE_* environment > TOML file (``--config``) > defaults."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .config import (
    OTHER_COMMAND_SETTINGS,
    SETTINGS,
    ConfigError,
    Setting,
    _endpoints,
    _fail,
    _readable_file,
    check_etcd_tls,
    resolve,
)

__all__ = ["PROXY_SETTINGS", "ProxyConfig", "load_proxy"]


def _listen(v: Any, _file: bool) -> str:
    from ..proxy.server import split_listen

    if not isinstance(v, str):
        raise ValueError("expected HOST:PORT such as 127.0.0.1:2379")
    split_listen(v)  # ValueError says what is wrong
    return v.strip()


def _optional_endpoints(v: Any, file: bool) -> list[str]:
    if v in ("", []):
        return []
    return _endpoints(v, file)


def _workers(v: Any, _file: bool) -> int:
    if isinstance(v, bool):
        raise ValueError("expected a number of threads")
    try:
        n = int(v)
    except (TypeError, ValueError):
        raise ValueError(f"expected a number of threads, got {v!r}") from None
    if not 1 <= n <= 10_000:
        raise ValueError("must be between 1 and 10000")
    return n


_SHARED = ("ca_file", "cert_file", "key_file", "log_level", "log_format", "metrics")
PROXY_SETTINGS: dict[str, Setting] = {s.name: s for s in [
    Setting("listen", None, "HOST:PORT to serve etcd's gRPC API on (port 0: any free one)",
            _listen),
    Setting("endpoints", [], "etcd client URLs to forward to (comma-separated; none: "
            "serve reads from the cache only)", _optional_endpoints),
    Setting("listen_cert_file", None, "TLS certificate the proxy serves with (PEM)",
            _readable_file),
    Setting("listen_key_file", None, "private key of listen_cert_file (PEM)", _readable_file),
    Setting("listen_client_ca_file", None, "require client certificates signed by this CA "
            "(PEM; needs listen_cert_file)", _readable_file),
    Setting("workers", 256, "gRPC handler threads (each open watch stream holds one)",
            _workers),
    *(SETTINGS[n] for n in _SHARED),
]}
assert set(PROXY_SETTINGS) - set(SETTINGS) == OTHER_COMMAND_SETTINGS


@dataclass
class ProxyConfig:
    """The effective settings of one ``shmcache proxy`` and where each came from."""

    name: str
    listen: str
    endpoints: list[str]
    listen_cert_file: str | None
    listen_key_file: str | None
    listen_client_ca_file: str | None
    workers: int
    ca_file: str | None
    cert_file: str | None
    key_file: str | None
    log_level: str
    log_format: str
    metrics: tuple[str, int] | None
    config_file: str | None = None
    sources: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def describe(self) -> list[str]:
        """``setting = value  (source)`` lines."""
        return [f"{n} = {getattr(self, n)!r}  ({self.sources.get(n, 'default')})"
                for n in PROXY_SETTINGS]


def load_proxy(name: str, flags: Mapping[str, Any] | None = None,
               environ: Mapping[str, str] | None = None,
               config_file: str | None = None) -> ProxyConfig:
    """The effective settings of a proxy for cache ``name``; ConfigError on the first
    bad one (naming it, its source and why)."""
    values, sources, warnings, config_file = resolve(
        name, PROXY_SETTINGS, flags, environ, config_file, None, "`shmcache proxy`")
    cfg = ProxyConfig(name=name, config_file=config_file, sources=sources, warnings=warnings,
                      **values)
    _cross_check(cfg)
    return cfg


def _cross_check(cfg: ProxyConfig) -> None:
    def err(name: str, reason: str) -> ConfigError:
        return _fail(name, getattr(cfg, name), cfg.sources.get(name, "default"), reason,
                     PROXY_SETTINGS)

    if cfg.listen is None:
        raise ConfigError("listen is not set: give --listen HOST:PORT (e.g. 127.0.0.1:2379), "
                          "SHMCACHE_LISTEN or listen in the config file")
    if (cfg.listen_cert_file is None) != (cfg.listen_key_file is None):
        have, missing = (("listen_cert_file", "listen_key_file") if cfg.listen_cert_file
                         else ("listen_key_file", "listen_cert_file"))
        raise err(have, f"needs {missing} too (a certificate and its key)")
    if cfg.listen_client_ca_file is not None and cfg.listen_cert_file is None:
        raise err("listen_client_ca_file", "needs listen_cert_file and listen_key_file: client "
                                           "certificates are asked over TLS only")
    # Unlike the writer, the proxy dials etcd with grpcio's own TLS: without ca_file
    # the system's trusted CAs verify etcd's certificate.
    schemes = check_etcd_tls(cfg, err)
    upstream = [n for n in ("ca_file", "cert_file", "key_file") if getattr(cfg, n) is not None]
    if upstream and schemes != {"https"}:
        raise err(upstream[0], "is for etcd's https:// endpoints, and none is set")
    if cfg.metrics is not None:
        try:
            import prometheus_client  # noqa: F401
        except ImportError:
            raise err("metrics", "needs the prometheus_client package: "
                                 "pip install 'shmcache[metrics]'") from None
