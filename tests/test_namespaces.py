"""Readers in other PID and network namespaces (as in another container sharing /dev/shm).

A reader started with ``unshare --pid --net --fork --mount-proc`` cannot see the
writer's pid in /proc and cannot reach its abstract socket: get/list/watch read
shared memory as always, ``sync()`` goes through the socket file beside the
segments, and ``status()`` judges the writer by its heartbeat (``liveness``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from typing import Any

import pytest

import shmcache
from shmcache.format import layout
from tests.helpers import WriterProcess, put


def _can_unshare() -> str | None:
    if os.geteuid() != 0:
        return "creating PID and network namespaces needs root"
    if not shutil.which("unshare"):
        return "no unshare(1) on this machine"
    r = subprocess.run(["unshare", "--pid", "--net", "--fork", "--mount-proc", "true"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        return f"unshare cannot create namespaces here: {r.stderr.strip()}"
    return None


SKIP = _can_unshare()
pytestmark = pytest.mark.skipif(SKIP is not None, reason=SKIP or "")

READER = r"""
import json, sys, time
import shmcache
name, prefix, since = sys.argv[1], sys.argv[2].encode(), int(sys.argv[3])
r = shmcache.Reader(name, timeout=10)
out = {"pid_visible": __import__("os").path.exists("/proc/%d" % r.status().writer_pid)}
st = r.status()
out["alive"], out["liveness"] = st.writer_alive, st.liveness
out["get"] = r.get(prefix + b"a").value.decode()
out["list"] = [kv.key.decode() for kv in r.list(prefix)]
out["watch"] = [(e.type, e.kv.key.decode()) for e in r.watch(prefix, since_revision=since).poll(timeout=2)]
out["sync"] = r.sync(timeout=10)
print(json.dumps(out), flush=True)
# Then report liveness until told to stop (stdin closes).
for line in sys.stdin:
    st = r.status()
    print(json.dumps({"alive": st.writer_alive, "liveness": st.liveness}), flush=True)
"""


def _in_namespaces(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["unshare", "--pid", "--net", "--fork", "--mount-proc", sys.executable, "-c", READER,
         *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_reader_in_other_namespaces_gets_lists_watches_syncs(
        etcd_session: Any, etcd_client: Any, cache_name: str, unique_prefix: bytes) -> None:
    p = unique_prefix
    put(etcd_client, p + b"a", b"1")
    w = WriterProcess(cache_name, etcd_session.endpoint, p)
    proc = None
    try:
        w.start()
        with shmcache.Reader(cache_name) as r:
            since = r.revision
            assert r.wait(put(etcd_client, p + b"b", b"2"), timeout=10)
        assert os.path.exists(f"/dev/shm{layout.sync_socket_name(cache_name)}")
        proc = _in_namespaces(cache_name, p.decode(), str(since))
        assert proc.stdout is not None and proc.stdin is not None
        line = proc.stdout.readline()
        assert line, proc.stderr.read() if proc.stderr else ""
        got = json.loads(line)
        assert got["pid_visible"] is False  # the writer's pid is not in this /proc
        assert (got["alive"], got["liveness"]) == (True, "heartbeat")
        assert got["get"] == "1" and got["list"] == [(p + b"a").decode(), (p + b"b").decode()]
        assert got["watch"] == [["PUT", (p + b"b").decode()]]
        with shmcache.Reader(cache_name) as r:
            assert got["sync"] >= r.status().revision - 1
            assert r.status().liveness == "pid"  # here, in the writer's namespaces
        # The writer dies: the reader over there sees it within the heartbeat limit.
        w.kill()
        time.sleep(layout.HEARTBEAT_DEAD_SECONDS + 0.5)
        proc.stdin.write("status\n")
        proc.stdin.flush()
        after = json.loads(proc.stdout.readline())
        assert after == {"alive": False, "liveness": "heartbeat"}
    finally:
        if proc is not None:
            if proc.stdin is not None:
                proc.stdin.close()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        w.close()
    assert not os.path.exists(f"/dev/shm{layout.sync_socket_name(cache_name)}")
