"""``shmcache demo`` runs etcd, a writer and readers, prints live figures and leaves nothing behind."""

from __future__ import annotations

import re
import subprocess
import sys

import psutil

from shmcache.ipc import shm as _shm


def test_demo_runs_and_cleans_up() -> None:
    # The demo's cache is named after its process (demo-PID): another test run on the
    # host may have a demo of its own running meanwhile, so only this one is checked.
    proc = subprocess.Popen(
        [sys.executable, "-m", "shmcache", "demo", "--duration", "4", "--keys", "2000",
         "--readers", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = proc.communicate(timeout=120)
    mine = f"demo-{proc.pid}"
    assert proc.returncode == 0, stdout + stderr
    rows = [line for line in stdout.splitlines() if re.match(r"\s+\d+\s+[\d,]+\s+[\d,]+", line)]
    assert len(rows) >= 3, stdout
    # every row: two readers each doing reads, a propagation figure, a lag and a revision
    for row in rows[1:]:
        rates = [int(x.replace(",", "")) for x in row.split()[1:3]]
        assert all(rate > 0 for rate in rates), row
        assert "ms" in row and "rev" in row
    assert "0 shared-memory segments left" in stdout
    assert mine not in set(_shm.list_caches())
    leftovers = [p for p in psutil.process_iter(["cmdline"])
                 if mine in " ".join(p.info["cmdline"] or [])]
    assert leftovers == []


def test_demo_speaks_etcd_through_etcdapi_alone() -> None:
    """The demo's own etcd client is shmcache.etcdapi's: python-etcd3 (whose generated
    modules need protobuf<4 or the pure-Python protobuf) is never imported."""
    code = ("import sys\n"
            "from shmcache.cli.demo import run_demo\n"
            "rc = run_demo(duration=2, readers=1, keys=500)\n"
            "assert 'etcd3' not in sys.modules, 'the demo imported python-etcd3'\n"
            "sys.exit(rc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "loaded 500 keys" in out.stdout and "0 shared-memory segments left" in out.stdout
