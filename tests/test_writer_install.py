"""The writer installs beside current protobuf: ``pip install -e ".[writer]" "protobuf>=5"``
in a fresh venv resolves, and that venv's writer serves a cache a reader answers from.

Everything pip needs comes from the package index pip is configured with (pip's own
configuration and cache, as a user's install would); the venv has no python-etcd3,
and its writer runs on protobuf's default (compiled) implementation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import WriterProcess

ROOT = Path(__file__).parent.parent


def _environ() -> dict[str, str]:
    """This environment without what would hand the venv this checkout's or this process's
    packages or protobuf choice."""
    return {k: v for k, v in os.environ.items()
            if k not in ("PYTHONPATH", "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", "VIRTUAL_ENV")}


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    env = tmp_path_factory.mktemp("writer-venv")
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True, timeout=120)
    t0 = time.monotonic()
    out = subprocess.run([str(env / "bin" / "pip"), "install", "-q", "--disable-pip-version-check",
                          "-e", f"{ROOT}[writer]", "protobuf>=5"], cwd=env, env=_environ(),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    print(f"pip install -e .[writer] 'protobuf>=5': {time.monotonic() - t0:.1f}s")
    yield env


def test_the_writer_extra_resolves_with_protobuf_5_or_later(venv: Path) -> None:
    """No python-etcd3 in the venv, protobuf >= 5 on its compiled implementation (upb)."""
    code = ("import importlib.util, json, google.protobuf, grpc\n"
            "from google.protobuf.internal import api_implementation\n"
            "from shmcache.writer.etcd import connection, stream\n"
            "print(json.dumps([google.protobuf.__version__, api_implementation.Type(),\n"
            "                  importlib.util.find_spec('etcd3') is not None, grpc.__version__]))")
    out = subprocess.run([str(venv / "bin" / "python"), "-c", code], cwd=venv, env=_environ(),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    version, implementation, has_etcd3, _grpc = json.loads(out.stdout)
    assert int(version.split(".")[0]) >= 5, version
    assert implementation == "upb" and not has_etcd3, out.stdout


def test_that_writer_serves_a_cache(venv: Path, etcd_session: Any, etcd_client: Any,
                                    cache_name: str, unique_prefix: bytes) -> None:
    """The venv's ``shmcache serve`` lists and watches the test etcd; a reader of the venv
    answers get with what etcd holds, before and after a change."""
    p = unique_prefix
    etcd_client.put(p + b"a", b"1")
    w = WriterProcess(cache_name, etcd_session.endpoint, p)
    w.args[:3] = [str(venv / "bin" / "shmcache")]
    w.env.update(_environ())
    w.env["PYTHONPATH"] = ""  # (empty: ignored by Python)
    try:
        w.start()
        etcd_client.put(p + b"b", b"2")
        code = ("import shmcache, sys, time\n"
                f"r = shmcache.Reader({cache_name!r}, timeout=30)\n"
                "deadline = time.monotonic() + 30\n"
                f"while r.get({p + b'b'!r}) is None and time.monotonic() < deadline:\n"
                "    time.sleep(0.05)\n"
                f"print(r.get({p + b'a'!r}).value.decode(), r.get({p + b'b'!r}).value.decode())")
        got = subprocess.run([str(venv / "bin" / "python"), "-c", code], cwd=venv,
                             env=_environ(), capture_output=True, text=True, timeout=60)
        assert got.returncode == 0, got.stderr + w.log()
        assert got.stdout.split() == ["1", "2"], got.stdout
    finally:
        w.close()
