"""``python bench/run.py --smoke`` exercises every benchmark code path at toy sizes.

Skipped unless the bench extra (``pip install -e ".[bench]"``) is installed: the
default test run does not need it. Without Debian's redis-server the run skips
the Redis alternative (and says so in the results).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("lmdb", "matplotlib", "tqdm")),
    reason="needs the bench extra (pip install -e '.[bench]')")
def test_bench_smoke_run(tmp_path: object) -> None:
    out = subprocess.run([sys.executable, "bench/run.py", "--smoke", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    with open(os.path.join(str(tmp_path), "smoke.json")) as f:
        results = json.load(f)
    assert results["stamp"] and results["throughput"]
    assert not results.get("errors"), results.get("errors")
