"""`shmcache serve` as a system service: sd_notify and watchdog, metrics, logs, signals, restarts.

The writer runs as a real child process (``python -m shmcache serve``); a unix
datagram socket stands in for systemd, and metrics are scraped over HTTP.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import shmcache
from shmcache.cli import check as _check
from shmcache.cli.service import ListProgress, Liveness, Notifier, watchdog_interval
from tests.etcdserver import EtcdServer, free_port
from tests.helpers import WriterProcess, drain, etcd_events, etcd_range, put, txn


class FakeSystemd:
    """An AF_UNIX datagram socket in the abstract namespace, collecting sd_notify messages."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.name = f"shmcache-test-notify-{os.getpid()}-{secrets.token_hex(4)}"
        self.sock.bind("\0" + self.name)
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._stop = False
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return "@" + self.name

    def _receive(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(4096)
            except (TimeoutError, OSError):
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            self.messages.append((time.monotonic(), fields))

    def times(self, key: str, since: float = 0.0, until: float = float("inf")) -> list[float]:
        return [t for t, f in list(self.messages) if key in f and since <= t <= until]

    def wait_for(self, key: str, timeout: float,
                 since: float = 0.0) -> tuple[float, dict[str, str]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for t, f in list(self.messages):
                if key in f and t >= since:
                    return t, f
            time.sleep(0.02)
        raise AssertionError(f"no {key} within {timeout}s; got {self.messages}")

    def statuses(self) -> list[str]:
        return [f["STATUS"] for _, f in list(self.messages) if "STATUS" in f]

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def systemd(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeSystemd]:
    fake = FakeSystemd()
    monkeypatch.setenv("NOTIFY_SOCKET", fake.address)
    try:
        yield fake
    finally:
        fake.close()


def _writer_log(w: WriterProcess) -> str:
    with open(w.log_path, errors="replace") as f:
        return f.read()


def _scrape(port: int) -> dict[str, float]:
    """Samples of a /metrics page, as {'name{labels}': value} and {'name': value} for our cache."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[s.name] = s.value
            if "cache" in s.labels:
                out[f"{s.name}{{{s.labels['cache']}}}"] = s.value
    return out


# -- units: the notify protocol, the watchdog variables, the progress tools --------------

def test_notifier_abstract_and_path_sockets(tmp_path: Path) -> None:
    """One datagram per message, newline-separated fields; '@' is the abstract namespace."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as abstract, \
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as path_sock:
        name = f"shmcache-test-{secrets.token_hex(4)}"
        abstract.bind("\0" + name)
        path_sock.bind(str(tmp_path / "notify"))
        n1, n2 = Notifier("@" + name), Notifier(str(tmp_path / "notify"))
        assert n1.notify("READY=1", "STATUS=revision 5") and n2.notify("WATCHDOG=1")
        assert abstract.recv(100) == b"READY=1\nSTATUS=revision 5"
        assert path_sock.recv(100) == b"WATCHDOG=1"
        n1.close(), n2.close()
    off = Notifier.from_environ({})
    assert not off.enabled and not off.notify("READY=1")
    gone = Notifier(str(tmp_path / "nobody-listens"))
    assert gone.notify("READY=1") is False  # logged, never raised


def test_watchdog_interval_from_environment() -> None:
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "3000000"}) == 3.0
    assert watchdog_interval({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"}, pid=2) is None
    assert watchdog_interval({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "2"}, pid=2) == 3.0


def test_list_progress_logs_rate_and_eta_and_aborts_on_stop(
        caplog: pytest.LogCaptureFixture) -> None:
    stopping = threading.Event()
    p = ListProgress(stopping, interval=0.0)
    caplog.set_level("INFO", "shmcache.service")
    p(2000, 6000)
    time.sleep(0.01)
    p(4000, 6000)
    p(6000, 6000)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1
    assert re.fullmatch(r"listing: 4000 of 6000 keys loaded \(67%\), \d+ keys/s, "
                        r"about [\d.]+s left", lines[0])
    stopping.set()
    with pytest.raises(InterruptedError):
        p(2000, 6000)


def test_liveness_counts_loop_progress_not_time() -> None:
    class W:
        stats = {"watch_responses": 0, "progress_requests": 0}

    live = Liveness(W())
    live.update()
    time.sleep(0.05)
    W.stats["progress_requests"] += 1  # the ticker sends these even when the loop is stuck
    assert live.update() >= 0.05
    W.stats["watch_responses"] += 1
    assert live.update() < 0.01
    # A retried publish (a full /dev/shm) is the loop working, not stuck: the watchdog
    # must not restart a writer for a state a restart does not cure.
    time.sleep(0.05)
    W.stats["publish_errors"] = 1
    assert live.update() < 0.01


# -- the real service -----------------------------------------------------------------------

def test_systemd_ready_status_watchdog_and_stopping(
        systemd: FakeSystemd, etcd_server: EtcdServer, cache_name: str, unique_prefix: bytes,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """READY=1 only after the first snapshot; STATUS= with revision and lag; WATCHDOG=1 at half
    of WATCHDOG_USEC while the loop makes progress and not while etcd hangs it; STOPPING=1."""
    client = etcd_server.client()
    rev = put(client, unique_prefix + b"a", b"1")
    monkeypatch.setenv("WATCHDOG_USEC", "3000000")
    w = WriterProcess(cache_name, etcd_server.endpoint, unique_prefix)
    try:
        w.start(wait=False)
        t_ready, fields = systemd.wait_for("READY", timeout=30)
        # The snapshot was published before READY=1: a reader attaches and finds the key.
        with shmcache.Reader(cache_name) as r:
            assert r.status().snapshot_revision >= rev and r.get(unique_prefix + b"a") is not None
        assert systemd.statuses()[0].startswith("starting")
        assert re.match(r"revision \d+, etcd \d+ \(lag \d+\), 1 keys", fields["STATUS"])
        assert systemd.times("STATUS")[0] < t_ready
        time.sleep(4.0)
        pings = systemd.times("WATCHDOG", since=t_ready)
        assert len(pings) >= 2
        gaps = [b - a for a, b in zip(pings, pings[1:], strict=False)]
        # Every WATCHDOG_USEC / 2 = 1.5 s (plus the 0.25 s supervision tick), never faster.
        assert min(gaps) >= 1.4 and sorted(gaps)[len(gaps) // 2] <= 2.0, gaps

        # etcd hangs (SIGSTOP): no watch responses, the loop makes no progress, and
        # systemd would see the pings stop. gRPC's keepalive notices after ~15 s.
        etcd_server.pause()
        t_pause = time.monotonic()
        time.sleep(7.0)
        etcd_server.resume()
        t_resume = time.monotonic()
        assert systemd.times("WATCHDOG", since=t_pause + 3.8, until=t_resume) == []
        systemd.wait_for("WATCHDOG", timeout=5, since=t_resume)
        assert "writer loop made no progress for" in _writer_log(w)
        assert any("no progress" in s for s in systemd.statuses())

        t0 = time.monotonic()
        assert w.terminate() == 0
        stopping = systemd.wait_for("STOPPING", timeout=2, since=t0)[1]
        assert stopping["STATUS"] == "stopping (SIGTERM)"
    finally:
        client.close()
        w.close()


def test_unreachable_etcd_at_start_retries_then_becomes_ready(
        systemd: FakeSystemd, etcd_server: EtcdServer, cache_name: str,
        unique_prefix: bytes) -> None:
    """Started while etcd is down, the writer logs its retries with growing backoff, reports
    it in STATUS=, and becomes ready once etcd is there, on the same port."""
    etcd_server.stop()
    w = WriterProcess(cache_name, etcd_server.endpoint, unique_prefix)
    client = None
    try:
        w.start(wait=False)
        time.sleep(3.0)
        assert w.proc is not None and w.proc.poll() is None, _writer_log(w)
        log = _writer_log(w)
        waits = [float(x) for x in re.findall(r"UNAVAILABLE.*; retrying in ([\d.]+)s", log)]
        assert len(waits) >= 3 and waits == sorted(waits) and waits[-1] > waits[0], log
        assert not systemd.times("READY")
        assert any(s.startswith("waiting for etcd") for s in systemd.statuses())
        etcd_server.start()
        systemd.wait_for("READY", timeout=20)
        client = etcd_server.client()
        last = put(client, unique_prefix + b"k", b"v")
        with shmcache.Reader(cache_name) as r:
            assert r.wait(last, timeout=10)
            assert r.get(unique_prefix + b"k").value == b"v"
    finally:
        if client is not None:
            client.close()
        w.close()


def test_metrics_scraped_over_http(etcd_session: EtcdServer, etcd_client: Any, cache_name: str,
                                   unique_prefix: bytes) -> None:
    """The /metrics page reports the writer's state; values match etcd and the readers' view."""
    p = unique_prefix
    for i in range(10):
        put(etcd_client, p + b"pre%d" % i, b"x")
    port = free_port()
    w = WriterProcess(cache_name, etcd_session.endpoint, p,
                      extra=["--metrics", f"127.0.0.1:{port}"])
    try:
        w.start()
        assert f"metrics at http://127.0.0.1:{port}/metrics" in _writer_log(w)
        for i in range(20):
            put(etcd_client, p + b"k%d" % i, b"v" * 100)
        last = txn(etcd_client, [("put", p + b"t1", b"a"), ("put", p + b"t2", b"b")])
        r = shmcache.Reader(cache_name)
        assert r.wait(last, timeout=10)
        st = r.status()
        m = _scrape(port)
        c = f"{{{cache_name}}}"
        assert m["shmcache_revision" + c] >= last and m["shmcache_revision" + c] <= r.revision
        assert m["shmcache_etcd_revision_seen" + c] >= m["shmcache_revision" + c]
        assert m["shmcache_events_applied_total" + c] == 22
        assert m["shmcache_records_appended_total" + c] == 21  # one per revision
        assert m["shmcache_bytes_appended_total" + c] > 20 * 100
        assert m["shmcache_keys" + c] == len(r.list(p).items) == 32
        assert m["shmcache_ring_capacity_bytes" + c] == 4 << 20 == st.ring_capacity
        assert m["shmcache_ring_used_bytes" + c] == st.ring_used > 0
        assert m["shmcache_snapshots_published_total" + c] >= 1
        assert m["shmcache_last_snapshot_keys" + c] == 10  # the first snapshot, after the list
        assert 0 < m["shmcache_last_snapshot_publish_seconds" + c] < 5
        assert m["shmcache_snapshot_publish_seconds_total" + c] > 0
        assert m["shmcache_relists_total" + c] == 1
        assert m["shmcache_reconnects_total" + c] == 0
        assert m["shmcache_watch_restarts_total" + c] == 0
        assert m["shmcache_watch_responses_total" + c] >= 2  # etcd batches revisions
        assert m["shmcache_progress_requests_total" + c] >= 0
        assert m["shmcache_heartbeat_age_seconds" + c] < 1.0
        assert m["shmcache_ready" + c] == 1 and m["shmcache_healthy" + c] == 1
        assert m["shmcache_epoch" + c] == st.epoch
        assert m["process_resident_memory_bytes"] > 0
        # Idle: progress answers keep coming, so the count grows without events.
        before = m["shmcache_watch_responses_total" + c]
        time.sleep(2.5)
        m = _scrape(port)
        assert m["shmcache_watch_responses_total" + c] > before
        assert m["shmcache_events_applied_total" + c] == 22
        r.close()
    finally:
        w.close()


def test_sigterm_under_load_stops_within_2s_with_a_consistent_cache(
        etcd_session: EtcdServer, etcd_client: Any, cache_name: str, unique_prefix: bytes) -> None:
    """SIGTERM while etcd writes stream in: exit 0 within 2 s, the last record complete,
    every segment and invariant intact, and the data equal to etcd's at the cache's revision."""
    p = unique_prefix
    w = WriterProcess(cache_name, etcd_session.endpoint, p, ring_size="1MiB")
    stop = threading.Event()
    written = [0]

    def load() -> None:
        client = etcd_session.client()
        i = 0
        try:
            while not stop.is_set():
                ops = [("put", p + b"k%03d" % ((i * 20 + j) % 300), os.urandom(200))
                       for j in range(20)]
                written[0] = txn(client, ops)
                i += 1
        finally:
            client.close()

    loader = threading.Thread(target=load)
    try:
        w.start()
        loader.start()
        r = shmcache.Reader(cache_name)
        time.sleep(2.0)
        assert r.revision > 0 and written[0] > 0
        t0 = time.monotonic()
        rc = w.terminate()
        elapsed = time.monotonic() - t0
        stop.set()
        loader.join()
        print(f"\nSIGTERM under load: process exited in {elapsed:.3f}s "
              f"({r.revision} revisions cached)")
        assert rc == 0 and elapsed < 2.0
        assert re.search(r"stopped in [\d.]+s", _writer_log(w))
        facts, problems = _check.check_cache(cache_name)
        assert problems == [], problems
        res = r.list(p)
        assert res.items == etcd_range(etcd_client, p, res.revision)
        assert not r.status().writer_alive
        r.close()
    finally:
        stop.set()
        if loader.is_alive():
            loader.join()
        w.close()


def test_restart_resumes_without_relist(etcd_session: EtcdServer, etcd_client: Any,
                                        cache_name: str, unique_prefix: bytes) -> None:
    """Stopped and started again while etcd keeps its history: the log says resumed, no list,
    and a watch opened before the stop sees every event of the gap exactly once."""
    p = unique_prefix
    put(etcd_client, p + b"a", b"1")
    w = WriterProcess(cache_name, etcd_session.endpoint, p)
    try:
        w.start()
        r = shmcache.Reader(cache_name)
        since = r.revision
        watch = r.watch(p, since_revision=since)
        epoch = r.status().epoch
        assert w.terminate() == 0
        first_run = _writer_log(w)
        # The prefix is logged as text, not as a bytes repr.
        assert f"listing '{p.decode()}' from etcd (first start)" in first_run, first_run
        for i in range(5):
            put(etcd_client, p + b"gap%d" % i, b"x")
        w.start()
        last = put(etcd_client, p + b"after", b"y")
        assert drain(watch, last) == etcd_events(etcd_session.endpoint, p, since, last)
        second_run = _writer_log(w)[len(first_run):]
        assert re.search(r"resumed cache '.*' at revision \d+", second_run), second_run
        assert "listing" not in second_run
        assert r.status().epoch == epoch
        r.close()
    finally:
        w.close()


def test_two_services_side_by_side(etcd_session: EtcdServer, etcd_client: Any, cache_name: str,
                                   unique_prefix: bytes) -> None:
    """Two caches of different names and prefixes on one host, each with its metrics port."""
    other = f"t-{secrets.token_hex(4)}"
    p1, p2 = unique_prefix + b"one/", unique_prefix + b"two/"
    ports = free_port(), free_port()
    w1 = WriterProcess(cache_name, etcd_session.endpoint, p1,
                       extra=["--metrics", f"127.0.0.1:{ports[0]}"])
    w2 = WriterProcess(other, etcd_session.endpoint, p2,
                       extra=["--metrics", f"127.0.0.1:{ports[1]}"])
    try:
        w1.start(wait=False), w2.start(wait=False)
        w1.wait_ready(), w2.wait_ready()
        put(etcd_client, p1 + b"k", b"1")
        last = put(etcd_client, p2 + b"k", b"2")
        with shmcache.Reader(cache_name) as r1, shmcache.Reader(other) as r2:
            assert r1.wait(last, timeout=10) and r2.wait(last, timeout=10)
            assert [(kv.key, kv.value) for kv in r1.list(p1).items] == [(p1 + b"k", b"1")]
            assert [(kv.key, kv.value) for kv in r2.list(p2).items] == [(p2 + b"k", b"2")]
            assert r1.status().writer_pid == w1.pid and r2.status().writer_pid == w2.pid
        assert _scrape(ports[0])[f"shmcache_keys{{{cache_name}}}"] == 1
        assert f"shmcache_keys{{{other}}}" in _scrape(ports[1])
        assert w1.terminate() == 0 and w2.terminate() == 0
    finally:
        w1.close()
        w2.close()


def test_large_initial_list_logs_progress_as_json(etcd_session: EtcdServer, etcd_client: Any,
                                                 cache_name: str, unique_prefix: bytes) -> None:
    """A list of several pages logs keys loaded, rate and ETA; with --log-format json every
    line on stderr is one JSON object."""
    p = unique_prefix
    for start in range(0, 7000, 100):
        txn(etcd_client, [("put", p + b"k%05d" % i, b"v") for i in range(start, start + 100)])
    w = WriterProcess(cache_name, etcd_session.endpoint, p, extra=["--log-format", "json"])
    try:
        w.start()
        assert w.terminate() == 0
        records = [json.loads(line) for line in _writer_log(w).splitlines()]
        assert all({"ts", "level", "logger", "msg"} <= set(r) for r in records)
        msgs = [r["msg"] for r in records]
        progress = [m for m in msgs if m.startswith("listing: ")]
        assert progress, msgs
        assert re.fullmatch(r"listing: \d+ of 7000 keys loaded \(\d+%\), \d+ keys/s, "
                            r"about [\d.]+s left", progress[0])
        assert any(re.fullmatch(r"listed 7000 keys at revision \d+ in [\d.]+s", m) for m in msgs)
        assert any(m.startswith("snapshot published:") and "7000 keys" in m for m in msgs)
    finally:
        w.close()


def test_status_command_table_and_json(etcd_session: EtcdServer, etcd_client: Any,
                                       cache_name: str, unique_prefix: bytes) -> None:
    """`shmcache status NAME` shows the running writer; --json has the same facts."""
    import subprocess
    import sys

    w = WriterProcess(cache_name, etcd_session.endpoint, unique_prefix)
    try:
        w.start()
        last = put(etcd_client, unique_prefix + b"k", b"v")
        with shmcache.Reader(cache_name) as r:
            assert r.wait(last, timeout=10)
        out = subprocess.run([sys.executable, "-m", "shmcache", "status", cache_name],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0
        assert re.search(rf"writer\s+pid {w.pid} alive", out.stdout)
        assert re.search(r"keys\s+1\b", out.stdout)
        js = subprocess.run([sys.executable, "-m", "shmcache", "status", cache_name, "--json"],
                            capture_output=True, text=True, timeout=30)
        d = json.loads(js.stdout)
        assert d["writer_pid"] == w.pid and d["writer_alive"] and d["revision"] >= last
    finally:
        w.close()


def test_sigterm_while_etcd_hangs_is_prompt(etcd_server: EtcdServer, cache_name: str,
                                            unique_prefix: bytes) -> None:
    """SIGTERM while the writer waits on an etcd that accepts connections but never answers."""
    etcd_server.pause()
    w = WriterProcess(cache_name, etcd_server.endpoint, unique_prefix)
    try:
        w.start(wait=False)
        time.sleep(2.0)  # inside its first connect, which would time out after 5 s
        t0 = time.monotonic()
        assert w.terminate() == 0
        assert time.monotonic() - t0 < 2.0
    finally:
        etcd_server.resume()
        w.close()


EXAMPLES = Path(__file__).parents[1] / "examples" / "systemd"


def test_example_unit_is_valid_and_declares_the_service_contract(tmp_path: Path) -> None:
    """The template unit: notify type, watchdog, restart on failure, a system user; and
    `systemd-analyze verify` accepts it where systemd is installed."""
    import shutil
    import subprocess
    import sys

    text = (EXAMPLES / "shmcache@.service").read_text()
    lines = {ln.split("=", 1)[0]: ln.split("=", 1)[1] for ln in text.splitlines()
             if "=" in ln and not ln.startswith("#")}
    assert lines["Type"] == "notify" and lines["Restart"] == "on-failure"
    assert int(lines["WatchdogSec"]) >= 10 and lines["User"] == "shmcache"
    assert "--config /etc/shmcache/%i.toml" in lines["ExecStart"]
    assert "RemoveIPC" in text and "DynamicUser=yes" in text  # the warning is there
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed")
    exe = os.path.join(os.path.dirname(sys.executable), "shmcache")
    unit = tmp_path / "shmcache@mycache.service"
    unit.write_text(text.replace("/usr/bin/shmcache", exe))
    out = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                         timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "shmcache@mycache.service" not in out.stderr, out.stderr


def test_example_config_uses_only_known_settings() -> None:
    import tomllib

    from shmcache.cli.config import SETTINGS

    data = tomllib.loads((EXAMPLES / "mycache.toml").read_text())
    assert set(data) <= set(SETTINGS)
    assert set(data) >= {"endpoints", "ring_size", "ca_file", "password_file", "metrics"}


# -- issue 18: healthy means following etcd; the writer's lifecycle (review findings) -------

def test_healthy_is_0_while_etcd_is_unreachable(etcd_server: EtcdServer, cache_name: str,
                                                unique_prefix: bytes) -> None:
    """The issue showed ``shmcache_etcd_reachable 0`` beside ``shmcache_healthy 1``: the loop
    kept "progressing" by reconnecting. Healthy now needs etcd reachable (and publishing)."""
    port = free_port()
    w = WriterProcess(cache_name, etcd_server.endpoint, unique_prefix,
                      extra=["--metrics", f"127.0.0.1:{port}"])
    try:
        w.start()
        c = f"{{{cache_name}}}"
        assert _scrape(port)["shmcache_healthy" + c] == 1
        etcd_server.stop()
        deadline = time.monotonic() + 30
        while (m := _scrape(port))["shmcache_etcd_reachable" + c] != 0:
            assert time.monotonic() < deadline, _writer_log(w)
            time.sleep(0.1)
        assert m["shmcache_reconnects_total" + c] >= 1 and m["shmcache_loop_stalled_seconds" + c] < 30
        assert m["shmcache_healthy" + c] == 0
        assert m["shmcache_publish_failing" + c] == 0 and m["shmcache_publish_errors_total" + c] == 0
        etcd_server.start()
        while _scrape(port)["shmcache_healthy" + c] != 1:
            assert time.monotonic() < deadline + 30, _writer_log(w)
            time.sleep(0.1)
    finally:
        w.close()


def _run_in_thread(w: shmcache.Writer) -> threading.Thread:
    t = threading.Thread(target=w.run, name="test-writer-run", daemon=True)
    t.start()
    return t


def _wait_until(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_stop_never_writes_into_a_closed_and_reused_fd(
        cache_name: str, unique_prefix: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    """A ``stop()`` that loaded the wake pipe's fd just before ``run()`` returned writes its
    byte later: the fd must still be the writer's pipe then. (run() used to close the pipe
    on return, so the byte could land in whatever file reused the number.)"""
    import stat

    from shmcache.writer import writer as writer_mod

    real_os = os
    in_write, go = threading.Event(), threading.Event()
    fds: list[int] = []

    class HeldWrite:
        """os, except that the thread named "stopper" pauses inside os.write."""

        def __getattr__(self, name: str) -> Any:
            return getattr(real_os, name)

        def write(self, fd: int, data: bytes) -> int:
            if threading.current_thread().name == "stopper":
                fds.append(fd)
                in_write.set()
                go.wait(30)
            return real_os.write(fd, data)

    w = shmcache.Writer(cache_name, "http://127.0.0.1:1", unique_prefix, verify_interval=0,
                        remove_on_close=True)
    t = _run_in_thread(w)
    _wait_until(lambda: any(th.name == "shmcache-ticker" for th in threading.enumerate()), 20,
                "the writer's ticker")
    monkeypatch.setattr(writer_mod, "os", HeldWrite())
    stopper = threading.Thread(target=w.stop, name="stopper")
    stopper.start()
    try:
        assert in_write.wait(10)
        t.join(30)  # the ticker sees the stop flag within its 0.25 s round
        assert not t.is_alive()
        assert stat.S_ISFIFO(os.fstat(fds[0]).st_mode)  # still the pipe, not a free number
    finally:
        go.set()
        stopper.join(10)
        t.join(10)


def test_ticker_keeps_beating_after_an_error(
        cache_name: str, unique_prefix: bytes) -> None:
    """An exception in one round of the ticker (here from the idle progress request) is
    logged and the next round runs: readers judge the writer by its heartbeat."""
    w = shmcache.Writer(cache_name, "http://127.0.0.1:1", unique_prefix, verify_interval=0,
                        remove_on_close=True)
    rounds: list[int] = []

    def failing(_interval: float) -> None:
        rounds.append(1)
        raise RuntimeError("a bug in one round")

    w._feed.request_progress_if_idle = failing  # type: ignore[method-assign]
    t = _run_in_thread(w)
    try:
        _wait_until(lambda: len(rounds) >= 4, 20, "four ticker rounds after the first error")
        ctl = shmcache.ipc.control_reader.ControlReader.open(cache_name)
        try:
            beat = ctl.writer_identity()[2]
            _wait_until(lambda: ctl.writer_identity()[2] > beat, 10, "a newer heartbeat")
        finally:
            ctl.close()
    finally:
        w.stop()
        t.join(30)
    assert not t.is_alive()


def test_the_verifier_thread_is_joined_when_run_returns(
        etcd_session: EtcdServer, cache_name: str, unique_prefix: bytes,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``run()`` returns only after the verifier thread has ended, even mid-round."""
    from shmcache.writer import verify as _verify

    entered = threading.Event()

    def slow_round(*_args: Any, **_kwargs: Any) -> Any:
        entered.set()
        time.sleep(1.0)  # a round in progress when the writer stops (not a synchronisation)
        raise _verify.Inconclusive("test round")

    monkeypatch.setattr(_verify, "compare_cache", slow_round)
    w = shmcache.Writer(cache_name, etcd_session.endpoint, unique_prefix, verify_interval=0.05,
                        remove_on_close=True)
    t = _run_in_thread(w)
    try:
        assert entered.wait(30)
        w.stop()
        t.join(30)
        assert not t.is_alive()
        assert not [th for th in threading.enumerate() if th.name == "shmcache-verify"]
    finally:
        w.stop()
        t.join(30)


def test_signal_handler_takes_no_lock() -> None:
    """SIGTERM's handler may interrupt the main thread while it holds a logging lock: it
    must not log (or take any other lock). Here another thread holds the service logger's
    handler lock; the handler still returns at once and the writer is asked to stop."""
    import logging
    import signal
    from types import SimpleNamespace

    from shmcache.cli import service

    class Writer:
        stats: dict[str, int] = {}
        list_progress = None
        stops = 0

        def stop(self) -> None:
            self.stops += 1

    class Quiet(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            pass

    handler = Quiet()
    logger = logging.getLogger("shmcache.service")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        handler.acquire()
        held.set()
        release.wait(30)
        handler.release()

    holder = threading.Thread(target=hold)
    holder.start()
    w = Writer()
    svc = service._Service(SimpleNamespace(name="x"), w, {})  # type: ignore[arg-type]
    try:
        assert held.wait(10)
        sig = threading.Thread(target=svc.on_signal, args=(signal.SIGTERM, None))
        sig.start()
        sig.join(5)
        assert not sig.is_alive(), "the signal handler waited for a logging lock"
        assert w.stops == 1
    finally:
        release.set()
        holder.join(10)
        logger.removeHandler(handler)
        logger.setLevel(level)
        svc.close()


def test_publish_error_text_and_fixed_words_are_never_read_torn() -> None:
    """The error text lives outside the seqlock: a reader in another process that reads it
    while the writer replaces it gets one whole text (or "(being updated)"), never a mix;
    and a word being rewritten (the failure time, the heartbeat, the ring tail that readers
    load alone) never reads as 0."""
    import mmap
    import struct

    from shmcache.format import control, layout
    from shmcache.writer import control_writer

    buf = mmap.mmap(-1, layout.CONTROL_SIZE)
    texts = ["OSError: [Errno 28] No space left on device", "x" * layout.MAX_PUBLISH_ERROR_LEN,
             "RuntimeError: é" * 20, ""]
    w = control_writer.ControlWriter(buf)
    w.set_publish_error(texts[0], 1)
    w.heartbeat()
    w.publish({layout.B_RING_TAIL: 8}, wake=False)
    pid = os.fork()
    if pid == 0:  # the writer: replace the text as fast as it can for a second
        try:
            end = time.monotonic() + 1.0
            i = 0
            while time.monotonic() < end:
                i += 1
                w.set_publish_error(texts[i % len(texts)], 1)
                w.heartbeat()
                w.publish({layout.B_RING_TAIL: 8 + i % 2 * 8}, wake=False)
        finally:
            os._exit(0)
    seen: set[str | None] = set()
    try:
        while os.waitpid(pid, os.WNOHANG) == (0, 0):
            text, since = control.publish_failure(buf, spins=3)
            # (struct.pack_into zeroes a word before storing it: readers saw 0 here)
            assert since == 1e-9 and control.writer_identity(buf)[2] != 0
            assert struct.unpack_from("<Q", buf, layout.C_BLOCK + 8 * layout.B_RING_TAIL)[0]
            seen.add(text)
    finally:
        buf.close()
    assert seen <= {*texts, "(being updated)"}, seen - {*texts, "(being updated)"}
    assert len(seen & set(texts)) >= 2
    w2 = control_writer.ControlWriter(mmap.mmap(-1, layout.CONTROL_SIZE))
    w2.set_publish_error("é" * layout.MAX_PUBLISH_ERROR_LEN, 5)  # cut at a character
    assert control.publish_failure(w2.buf)[0] == "é" * (layout.MAX_PUBLISH_ERROR_LEN // 2)
    w2.set_publish_error(None)
    assert control.publish_failure(w2.buf) == (None, None)
