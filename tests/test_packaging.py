"""The wheel ``python -m build`` makes, installed into a fresh venv: it holds the C
speedups and py.typed, its console script serves a cache, and users' type checkers
see its annotations (PEP 561).

The fresh venv gets the wheel alone (``--no-deps``); its dependencies come from this
interpreter's site-packages through a .pth line placed after the venv's own, so
nothing is downloaded and the shmcache it imports is the installed one, not this
checkout (every child runs outside the repository, without PYTHONPATH).
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import WriterProcess

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    dist = tmp_path_factory.mktemp("dist")
    # The sdist first, then the wheel from the sdist (build's default): what a user
    # builds, and no file left in this checkout's build/ directory slips in.
    subprocess.run([sys.executable, "-m", "build", "--outdir", str(dist), str(ROOT)],
                   check=True, capture_output=True, timeout=600)
    [_sdist] = dist.glob("shmcache-*.tar.gz")
    [wheel] = dist.glob("shmcache-*.whl")
    env = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True,
                   timeout=120)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(env / "bin" / "python"),
                    "install", "--no-deps", "--no-index", "-q", str(wheel)],
                   check=True, capture_output=True, timeout=300)
    [site] = env.glob("lib/python*/site-packages")
    (site / "zz_shmcache_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    yield env


def _run(env: Path, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(args, cwd=env, env=environ, capture_output=True, text=True,
                          timeout=120, **kw)


def test_the_wheel_holds_the_c_speedups_and_py_typed(venv: Path) -> None:
    out = _run(venv, str(venv / "bin" / "python"), "-c",
               "import os, shmcache; from shmcache.format import snapshot; "
               "print(shmcache.__file__); print(snapshot._speedups.__file__); "
               "print(snapshot.USE_SPEEDUPS); "
               "print(os.path.exists(os.path.join(os.path.dirname(shmcache.__file__), 'py.typed')))")
    assert out.returncode == 0, out.stderr
    package, speedups, used, typed = out.stdout.split("\n")[:4]
    site = str(next(venv.glob("lib/python*/site-packages")))
    assert package.startswith(site) and speedups.startswith(site), out.stdout
    assert (used, typed) == ("True", "True")


def test_the_installed_console_script_serves_a_cache(venv: Path, etcd_session: Any,
                                                     etcd_client: Any, cache_name: str,
                                                     unique_prefix: bytes) -> None:
    etcd_client.put(unique_prefix + b"a", b"1")
    w = WriterProcess(cache_name, etcd_session.endpoint, unique_prefix)
    w.args[:3] = [str(venv / "bin" / "shmcache")]  # the wheel's console script
    try:
        w.start()
        got = _run(venv, str(venv / "bin" / "python"), "-c",
                   "import shmcache, sys; "
                   f"r = shmcache.Reader({cache_name!r}, timeout=30); "
                   f"print(r.get({unique_prefix + b'a'!r}).value.decode(), shmcache.__file__)")
        assert got.returncode == 0, got.stderr
        value, where = got.stdout.split()
        assert value == "1" and where.startswith(str(venv)), got.stdout
        status = _run(venv, str(venv / "bin" / "shmcache"), "status", cache_name)
        assert status.returncode == 0, status.stdout + status.stderr
    finally:
        w.close()


def test_users_type_checkers_see_the_annotations(venv: Path) -> None:
    """mypy, pointed at the venv's interpreter, reads shmcache's annotations (py.typed):
    a wrong use is a type error naming shmcache's types, not a missing-stubs error."""
    user = venv / "user_code.py"
    user.write_text('import shmcache\n\nn: int = shmcache.Reader("x").get(b"k")\n')
    out = _run(venv, sys.executable, "-m", "mypy", "--no-incremental", "--python-executable",
               str(venv / "bin" / "python"), str(user))
    assert out.returncode == 1, out.stdout + out.stderr
    assert 'expression has type "KeyValue | None"' in out.stdout, out.stdout
    assert "py.typed" not in out.stdout
