"""shmcache.proxy.metrics: counters that many handler threads update at once."""

from __future__ import annotations

import threading

from shmcache.proxy.metrics import ProxyMetrics


def test_counts_from_many_threads() -> None:
    m = ProxyMetrics()

    def work() -> None:
        for _ in range(1000):
            m.request("KV", "Range", "OK", forwarded=False)
            m.stream_opened()
            m.watches_changed(2)
            m.watches_changed(-1)
            m.stream_closed()
        m.request("KV", "Put", "OK", forwarded=True)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snap = m.snapshot()
    assert snap.requests == {("KV", "Range", "OK", "served"): 8000,
                             ("KV", "Put", "OK", "forwarded"): 8}
    assert (snap.watch_streams, snap.watches) == (0, 8000)
