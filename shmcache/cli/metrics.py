"""The writer's Prometheus metrics: the table of what is exported, read at scrape time.

Concurrency contract: the collector runs on prometheus_client's HTTP thread and
only reads (the writer's stats dict copied at once, the control segment like a
reader, the service's liveness); nothing is updated between scrapes.
"""

from __future__ import annotations

import time
from typing import Any

from ..format import layout
from .config import ConfigError

# (name, type, help, source). Sources: "block.X" = the published control block,
# "stats.X" = Writer.stats, anything else computed in _Collector.
METRICS: list[tuple[str, str, str, str]] = [
    ("shmcache_revision", "gauge", "etcd revision the cache is exact at (what readers see)",
     "block.revision"),
    ("shmcache_etcd_revision_seen", "gauge", "newest etcd revision seen in a watch response",
     "etcd_revision"),
    ("shmcache_revision_lag", "gauge", "etcd_revision_seen - revision", "lag"),
    ("shmcache_epoch", "gauge", "history epoch (grows on every relist)", "block.epoch"),
    ("shmcache_oldest_watchable_revision", "gauge",
     "smallest since_revision a new watch may use", "block.compact_revision"),
    ("shmcache_keys", "gauge", "keys in the cache", "block.key_count"),
    ("shmcache_events_applied", "counter", "etcd events applied", "stats.events"),
    ("shmcache_records_appended", "counter", "ring records appended (one per revision)",
     "stats.records"),
    ("shmcache_bytes_appended", "counter", "ring payload bytes appended", "stats.bytes"),
    ("shmcache_ring_capacity_bytes", "gauge", "ring log capacity", "block.ring_capacity"),
    ("shmcache_ring_used_bytes", "gauge", "ring bytes holding watchable history", "ring_used"),
    ("shmcache_snapshots_published", "counter", "snapshots published", "stats.snapshots"),
    ("shmcache_last_snapshot_publish_seconds", "gauge", "time the last snapshot took to publish",
     "stats.snapshot_seconds"),
    ("shmcache_snapshot_publish_seconds", "counter", "time spent publishing snapshots",
     "stats.snapshot_seconds_total"),
    ("shmcache_last_snapshot_keys", "gauge", "keys in the last snapshot", "stats.snapshot_keys"),
    ("shmcache_last_snapshot_bytes", "gauge", "size of the last snapshot segment",
     "stats.snapshot_bytes"),
    ("shmcache_snapshot_revision", "gauge", "revision of the live snapshot", "block.snap_revision"),
    ("shmcache_relists", "counter", "full lists of the range (first start included)",
     "stats.relists"),
    ("shmcache_reconnects", "counter", "etcd errors that made the writer reconnect",
     "stats.reconnects"),
    ("shmcache_watch_restarts", "counter", "watch streams opened after the first",
     "watch_restarts"),
    ("shmcache_watch_responses", "counter", "watch responses received", "stats.watch_responses"),
    ("shmcache_watch_decode_errors_total", "counter",
     "watch responses the writer could not decode (each watched again from its revision)",
     "stats.watch_decode_errors"),
    ("shmcache_progress_requests", "counter", "progress requests sent to etcd",
     "stats.progress_requests"),
    ("shmcache_progress_proofs", "counter",
     "idle-range progress proven by linearizable ranges (etcd left requests unanswered)",
     "stats.progress_proofs"),
    ("shmcache_cluster_changes_total", "counter",
     "times etcd was found to be another cluster than the cache's (each relists)",
     "stats.cluster_changes"),
    ("shmcache_verify_mismatches_total", "counter",
     "checks of the published snapshot against etcd that found a difference (each relists)",
     "stats.verify_mismatches"),
    ("shmcache_verify_rounds_total", "counter", "completed checks of the snapshot against etcd",
     "stats.verify_rounds"),
    ("shmcache_verify_last_revision", "gauge", "revision of the last completed check",
     "stats.verify_revision"),
    ("shmcache_verify_seconds", "gauge", "duration of the last completed check",
     "stats.verify_seconds"),
    ("shmcache_progress_anomalies", "counter",
     "progress notifications that overtook events (etcd issue 15220)",
     "stats.progress_anomalies"),
    ("shmcache_etcd_reachable", "gauge",
     "1 while the writer reaches etcd, 0 while its attempts fail", "etcd_reachable"),
    ("shmcache_etcd_unreachable_seconds", "gauge",
     "seconds since the writer last reached etcd (0 while it does)", "etcd_unreachable_seconds"),
    ("shmcache_heartbeat_age_seconds", "gauge", "seconds since the writer's last heartbeat",
     "heartbeat_age"),
    ("shmcache_loop_stalled_seconds", "gauge", "seconds since the writer's loop last made progress",
     "stalled"),
    ("shmcache_publish_errors_total", "counter",
     "failed attempts to publish (a full /dev/shm); each is retried", "stats.publish_errors"),
    ("shmcache_publish_failing", "gauge",
     "1 while publishing fails (readers keep the last published revision), else 0",
     "publish_failing"),
    ("shmcache_ready", "gauge", "1 once the first snapshot is published", "ready"),
    ("shmcache_healthy", "gauge",
     "1 while the cache follows etcd: the loop makes progress, etcd is reachable and "
     "publishing works", "healthy"),
]


class _Collector:
    """Reads the writer's state at scrape time; nothing is updated in between."""

    def __init__(self, svc: Any) -> None:
        self.svc = svc

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        svc = self.svc
        w = svc.writer
        stats = dict(w.stats)
        block = svc.block()
        hb_age = svc.heartbeat_age()
        stalled = time.monotonic() - svc.liveness.last_change
        values: dict[str, float | None] = {
            "etcd_revision": w.etcd_revision,
            "lag": (max(0, w.etcd_revision - block.revision) if block is not None else None),
            "ring_used": (block.ring_head - block.ring_tail if block is not None else None),
            "watch_restarts": max(0, stats.get("watches", 0) - 1),
            "etcd_reachable": 0.0 if w.etcd_down_since is not None else 1.0,
            "etcd_unreachable_seconds": (time.time() - w.etcd_down_since
                                         if w.etcd_down_since is not None else 0.0),
            "heartbeat_age": hb_age,
            "stalled": stalled,
            "publish_failing": 0.0 if w.publish_failing_since is None else 1.0,
            "ready": 1.0 if w.ready.is_set() else 0.0,
            "healthy": 1.0 if svc.healthy(stalled) else 0.0,
        }
        labels = [svc.cfg.name]
        info = GaugeMetricFamily("shmcache_info", "cache, prefix and format version",
                                 labels=["cache", "prefix", "format_version"])
        info.add_metric([svc.cfg.name, svc.cfg.prefix, str(layout.FORMAT_VERSION)], 1)
        yield info
        for name, kind, help_text, source in METRICS:
            if source.startswith("block."):
                v: Any = getattr(block, source[6:]) if block is not None else None
            elif source.startswith("stats."):
                v = stats.get(source[6:])
            else:
                v = values[source]
            if v is None:
                continue
            if kind == "counter":
                fam: Any = CounterMetricFamily(name, help_text, labels=["cache"])
            else:
                fam = GaugeMetricFamily(name, help_text, labels=["cache"])
            fam.add_metric(labels, float(v))
            yield fam


def start_metrics_server(svc: Any, host: str, port: int,
                         collector: Any = None) -> tuple[Any, int]:
    """Serve /metrics on host:port from a private registry; returns (server, bound port).
    ``collector``: what to export instead of the writer service ``svc``'s table (the proxy's)."""
    try:
        from prometheus_client import CollectorRegistry, start_http_server
        from prometheus_client.process_collector import ProcessCollector
    except ImportError:
        raise ConfigError("metrics: needs the prometheus_client package: "
                          "pip install 'shmcache[metrics]'") from None
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(svc) if collector is None else collector)
    ProcessCollector(registry=registry)
    try:
        result = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise ConfigError(f"metrics = '{host}:{port}': cannot listen there: "
                          f"{exc.strerror or exc}") from None
    server = result[0] if isinstance(result, tuple) else None
    bound = server.server_address[1] if server is not None else port
    return server, int(bound)
