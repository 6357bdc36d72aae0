"""What a proxy process counts: requests by method and code, served from the cache or
forwarded to etcd, and the watch streams and watches open now.

Concurrency contract: every gRPC handler thread calls the recording methods; one
lock guards the counters, held for a dict update only. ``snapshot()`` copies
them under the lock for a scrape (the Prometheus collector lives in the CLI).
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass


@dataclass(frozen=True)
class MetricsSnapshot:
    """Counters at one instant: ``requests[(service, method, code, how)]`` with ``how``
    "served" (from the cache) or "forwarded" (to etcd), and the open streams and watches."""

    requests: dict[tuple[str, str, str, str], int]
    watch_streams: int
    watches: int


class ProxyMetrics:
    """Counters of one proxy process; all methods are thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: Counter[tuple[str, str, str, str]] = Counter()
        self._streams = 0
        self._watches = 0

    def request(self, service: str, method: str, code: str, *, forwarded: bool) -> None:
        """Count one finished request; ``code`` is the gRPC status name ("OK", "OUT_OF_RANGE")."""
        key = (service, method, code, "forwarded" if forwarded else "served")
        with self._lock:
            self._requests[key] += 1

    def stream_opened(self) -> None:
        with self._lock:
            self._streams += 1

    def stream_closed(self) -> None:
        with self._lock:
            self._streams -= 1

    def watches_changed(self, delta: int) -> None:
        """A stream created (+1) or cancelled/closed (-n) watches."""
        with self._lock:
            self._watches += delta

    def snapshot(self) -> MetricsSnapshot:
        with self._lock:
            return MetricsSnapshot(dict(self._requests), self._streams, self._watches)
