"""``shmcache proxy NAME --listen HOST:PORT``: etcd's gRPC API served from the cache NAME.

The main thread keeps signals: SIGTERM or SIGINT stops the server (calls in flight
get a grace period), then the Reader and the forwarding channels are closed.
Exit codes as every command's (docs/operations.md): 0 stopped by a signal, 2 a
bad setting, no such cache, or an address it cannot listen on.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from typing import Any

from ..errors import ShmCacheError
from .config import ConfigError, run_configured
from .proxy_config import PROXY_SETTINGS, ProxyConfig, load_proxy

__all__ = ["PROXY_METRICS", "add_parser", "cmd_proxy", "run_proxy"]

log = logging.getLogger("shmcache.proxy")

# How long calls in flight may take to finish after SIGTERM before they are cancelled.
STOP_GRACE = 5.0
# (name, type, help): the proxy's Prometheus metrics (docs/operations.md lists them).
PROXY_METRICS = [
    ("shmcache_proxy_requests_total", "counter",
     "finished requests by service, method, gRPC code and how (served from the cache, or "
     "forwarded to etcd)"),
    ("shmcache_proxy_watch_streams", "gauge", "watch streams open now"),
    ("shmcache_proxy_watches", "gauge", "watches open now, over all streams"),
    ("shmcache_proxy_revision", "gauge", "revision the cache the proxy serves is at"),
]


class _Collector:
    """The proxy's counters at scrape time (ProxyMetrics.snapshot: one copy under its lock)."""

    def __init__(self, server: Any) -> None:
        self._server = server

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        cache = self._server.name
        snap = self._server.metrics.snapshot()
        (req_name, _, req_help), (s_name, _, s_help), (w_name, _, w_help), \
            (r_name, _, r_help) = PROXY_METRICS
        req = CounterMetricFamily(req_name.removesuffix("_total"), req_help,
                                  labels=["cache", "service", "method", "code", "how"])
        for (service, method, code, how), n in sorted(snap.requests.items()):
            req.add_metric([cache, service, method, code, how], n)
        yield req
        for name, help_text, value in ((s_name, s_help, snap.watch_streams),
                                       (w_name, w_help, snap.watches)):
            g = GaugeMetricFamily(name, help_text, labels=["cache"])
            g.add_metric([cache], value)
            yield g
        try:
            rev = self._server.reader.revision
        except Exception:  # (a closed Reader during shutdown: no sample)
            return
        g = GaugeMetricFamily(r_name, r_help, labels=["cache"])
        g.add_metric([cache], rev)
        yield g


def run_proxy(cfg: ProxyConfig) -> int:
    """Serve until SIGTERM/SIGINT; returns the exit code (0). Raises ConfigError for an
    address it cannot listen on, ShmCacheError for a cache it cannot attach to."""
    from ..proxy.server import ListenTLS, ProxyServer
    from .metrics import start_metrics_server
    from .service import setup_logging

    setup_logging(cfg.log_level, cfg.log_format)
    for warning in cfg.warnings:
        log.warning("%s", warning)
    tls = None
    if cfg.listen_cert_file is not None and cfg.listen_key_file is not None:
        tls = ListenTLS(cfg.listen_cert_file, cfg.listen_key_file, cfg.listen_client_ca_file)
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        try:
            server = ProxyServer(cfg.name, cfg.listen, cfg.endpoints, tls=tls,
                                 ca_file=cfg.ca_file, cert_file=cfg.cert_file,
                                 key_file=cfg.key_file, workers=cfg.workers)
        except ShmCacheError:  # (no such cache: said as every command says it)
            raise
        except (RuntimeError, OSError) as exc:  # grpcio: "Failed to bind to address ..."
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ConfigError(f"listen = {cfg.listen!r}: cannot listen there: "
                              f"{reason}") from None
        metrics_server = None
        try:
            if cfg.metrics is not None:
                metrics_server, port = start_metrics_server(None, *cfg.metrics,
                                                            collector=_Collector(server))
                log.info("metrics at http://%s:%d/metrics", cfg.metrics[0], port)
            server.start()
            while not stop.wait(1.0):
                pass
        finally:
            server.stop(STOP_GRACE)
            if metrics_server is not None:
                metrics_server.shutdown()
                metrics_server.server_close()
        log.info("stopped")
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def cmd_proxy(args: argparse.Namespace) -> int:
    """Settings as ``serve``'s: flags > SHMCACHE_* environment > --config file > defaults."""
    return run_configured("proxy", args, PROXY_SETTINGS, load_proxy, run_proxy)


def add_parser(sub: Any, setting_flags: Any) -> None:
    """The ``proxy`` subcommand; ``setting_flags(parser, names, table)`` adds one flag per
    setting (commands._setting_flags)."""
    s = sub.add_parser(
        "proxy", help="serve etcd's gRPC API to unmodified etcd clients from cache NAME",
        description="Serve etcd's v3 gRPC API (KV, Watch, Lease, Maintenance, Cluster, Auth) "
                    "from cache NAME: ranges and watches over the cache's prefix come from "
                    "shared memory, everything else is forwarded to --endpoints. Settings as "
                    "for `serve`: flags, SHMCACHE_* environment, --config TOML file. See "
                    "docs/operations.md, 'Serve etcd clients from the cache'.")
    s.add_argument("name")
    s.add_argument("--config", default=None, metavar="FILE",
                   help="TOML file of settings (default: $SHMCACHE_CONFIG if set)")
    s.add_argument("--check-config", action="store_true",
                   help="print the effective settings and where each came from, then exit")
    setting_flags(s, None, PROXY_SETTINGS)
    s.set_defaults(func=cmd_proxy)
