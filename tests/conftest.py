"""Shared fixtures: real etcd servers, unique names and prefixes, and a session-wide leak check."""

from __future__ import annotations

import contextlib
import glob
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import posix_ipc
import psutil
import pytest

from tests.etcdserver import EtcdServer
from tests.python_etcd3 import use_pure_python_protobuf

# Before any test module imports protobuf (through shmcache.etcdapi): python-etcd3,
# the tests' third-party etcd client, needs the pure-Python implementation in this
# process; the processes the tests start keep protobuf's default (upb).
use_pure_python_protobuf()

SHM_DIR = "/dev/shm"
# POSIX shared memory "/x" is /dev/shm/x; a POSIX semaphore "/x" is /dev/shm/sem.x.
SHM_PATTERN = "shmcache.*"
SEM_PATTERN = "sem.shmcache.*"

# Segment files are <name>.ctl, <name>.ring.<n>, <name>.snap.<n>, <name>.idx.<n>, <name>.ovl.<n>,
# next to the writer's lock file <name>.lock and its socket file <name>.sync
# (shmcache/format/layout.py); anything else counts as <name>.<suffix>.
_SEGMENT_RE = re.compile(
    r"(?:sem\.)?shmcache\.(?P<name>.+?)(?:\.(?:ctl|lock|sync|ring\.\d+|snap\.\d+|idx\.\d+|ovl\.\d+)|\.[^.]*)?"
)
_FIXTURE_NAME_RE = re.compile(r"t-[0-9a-f]{8}")

# Cache names the cache_name fixture handed out in this session.
_session_cache_names: set[str] = set()

# multiprocessing starts these once and keeps them until the interpreter exits;
# they are not leaked by any test.
_INTERPRETER_HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")


# ----------------------------------------------------------------------------
# configuration


def pytest_configure(config: pytest.Config) -> None:
    # etcd3 0.12's generated rpc_pb2 builds descriptors the way protobuf's
    # pure-Python implementation deprecates; a hundred copies per run bury
    # the warnings that are about our own code.
    config.addinivalue_line(
        "filterwarnings",
        "ignore:Call to deprecated create function:DeprecationWarning:etcd3\\.",
    )


# --runslow (the "slow" marker is declared in pyproject.toml)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--runslow", action="store_true", default=False, help="also run tests marked slow"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow"):
        return
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


# ----------------------------------------------------------------------------
# helpers


def _ipc_files(pattern: str = "*") -> set[str]:
    """Names of /dev/shm entries belonging to shmcache that match ``pattern``."""
    return {
        os.path.basename(p)
        for base in (SHM_PATTERN, SEM_PATTERN)
        for p in glob.glob(os.path.join(SHM_DIR, base.replace("*", pattern)))
    }


def _unlink_ipc(filename: str) -> None:
    """Remove one /dev/shm entry through the POSIX API that created it."""
    try:
        if filename.startswith("sem."):
            posix_ipc.unlink_semaphore("/" + filename[len("sem.") :])
        else:
            posix_ipc.unlink_shared_memory("/" + filename)
    except posix_ipc.ExistentialError:
        pass  # already gone: whoever raced us did the cleanup


def _cache_name_of(filename: str) -> str:
    m = _SEGMENT_RE.fullmatch(filename)
    return m["name"] if m else filename


def _ours(filenames: set[str]) -> set[str]:
    """The subset of new /dev/shm ``filenames`` this session must answer for.

    Other runs on the host (a demo, another pytest) create caches meanwhile,
    and a cache's snapshot may sit unmapped between writer and readers, so
    ownership is decided per cache name: a ``cache_name``-style name this
    session did not hand out is another session's; any other name is
    another run's while a process other than this one has one of its
    objects open or mapped.
    """
    by_name: dict[str, set[str]] = {}
    for f in filenames:
        by_name.setdefault(_cache_name_of(f), set()).add(f)
    undecided = {
        name: files
        for name, files in by_name.items()
        if name not in _session_cache_names and not _FIXTURE_NAME_RE.fullmatch(name)
    }
    foreign_names = {
        _cache_name_of(f)
        for f in _used_by_other_processes({f for files in undecided.values() for f in files})
    }
    return {
        f
        for name, files in by_name.items()
        if name in _session_cache_names or (name in undecided and name not in foreign_names)
        for f in files
    }


def _used_by_other_processes(filenames: set[str]) -> set[str]:
    """The subset of /dev/shm ``filenames`` that another process has open or mapped."""
    wanted = {os.path.join(SHM_DIR, f): f for f in filenames}
    used: set[str] = set()
    me = os.getpid()
    for proc in psutil.process_iter():
        if len(used) == len(wanted):
            break
        if proc.pid == me:
            continue
        # Read /proc directly: psutil.memory_maps() parses smaps, which is
        # much slower, and open_files() skips non-regular files.
        try:
            with open(f"/proc/{proc.pid}/maps") as maps:
                for line in maps:
                    path = line.rstrip("\n").removesuffix(" (deleted)").rsplit(" ", 1)[-1]
                    if path in wanted:
                        used.add(wanted[path])
            fd_dir = f"/proc/{proc.pid}/fd"
            for fd in os.listdir(fd_dir):
                with contextlib.suppress(OSError):
                    target = os.readlink(os.path.join(fd_dir, fd))
                    if target in wanted:
                        used.add(wanted[target])
        except OSError:
            continue  # exited meanwhile, or not ours to inspect
    return used


def _is_interpreter_helper(proc: psutil.Process) -> bool:
    try:
        cmdline = " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    return any(h in cmdline for h in _INTERPRETER_HELPERS)


def _describe(proc: psutil.Process) -> str:
    try:
        return f"pid {proc.pid}: {' '.join(proc.cmdline()) or proc.name()}"
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return f"pid {proc.pid}: <exited>"


# ----------------------------------------------------------------------------
# session-wide leak check


@pytest.fixture(scope="session", autouse=True)
def _no_leaks() -> Iterator[None]:
    """Fail the session if it leaves shmcache IPC objects or child processes behind.

    Only IPC objects that appeared during the session and that ``_ours`` does
    not attribute to another run on the host count. Leaks are cleaned up
    before failing, so one bad run does not poison the next.
    """
    before = _ipc_files()
    yield
    problems: list[str] = []

    # Give children that are already on their way out a moment to exit;
    # wait_procs also reaps the ones that are zombies by now.
    children = [
        p for p in psutil.Process().children(recursive=True) if not _is_interpreter_helper(p)
    ]
    _, alive = psutil.wait_procs(children, timeout=3.0)
    if alive:
        problems.append(
            "child processes still running after the session (killed now):\n  "
            + "\n  ".join(_describe(p) for p in alive)
        )
        for p in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(alive, timeout=3.0)

    leaked = sorted(_ours(_ipc_files() - before))
    if leaked:
        problems.append(
            f"shared memory / semaphores left in {SHM_DIR} (unlinked now):\n  "
            + "\n  ".join(leaked)
        )
        for name in leaked:
            _unlink_ipc(name)

    if problems:
        pytest.fail("resource leak:\n" + "\n".join(problems), pytrace=False)


# ----------------------------------------------------------------------------
# etcd


@pytest.fixture
def etcd_server(tmp_path: Path) -> Iterator[EtcdServer]:
    """A fresh etcd server of the test's own, free to be killed, paused or restarted."""
    server = EtcdServer(data_dir=tmp_path / "etcd")
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def etcd_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    """One etcd server shared by the session; tests must use unique key prefixes and
    must not stop, pause or compact it."""
    server = EtcdServer(data_dir=tmp_path_factory.mktemp("etcd-session"))
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def etcd_client(etcd_session: EtcdServer) -> Iterator[Any]:
    """An etcd3 client connected to the session server."""
    client = etcd_session.client()
    try:
        yield client
    finally:
        client.close()


# ----------------------------------------------------------------------------
# unique names


@pytest.fixture
def unique_prefix() -> bytes:
    """A key prefix no other test uses, ``b"/t/<16 hex>/"``."""
    return b"/t/" + secrets.token_hex(8).encode() + b"/"


@pytest.fixture
def cache_name() -> Iterator[str]:
    """A cache name no other test uses, ``t-<8 hex>``; its /dev/shm objects are removed after."""
    name = f"t-{secrets.token_hex(4)}"
    _session_cache_names.add(name)
    yield name
    for filename in _ipc_files(name) | _ipc_files(f"{name}.*"):
        _unlink_ipc(filename)


# ----------------------------------------------------------------------------
# one writer per test module (tests/test_aio.py, test_subscribe.py, test_forking.py,
# test_examples.py); each test works under its own sub-prefix. Modules that need a
# writer of their own per test define a ``writer`` fixture locally, which wins.


@pytest.fixture(scope="module")
def writer(etcd_session: EtcdServer) -> Iterator[tuple[Any, bytes]]:
    """One writer process for the module, serving a fresh ``/t/<hex>/`` prefix."""
    from tests.helpers import WriterProcess

    name = f"t-{secrets.token_hex(4)}"
    prefix = b"/t/" + secrets.token_hex(8).encode() + b"/"
    w = WriterProcess(name, etcd_session.endpoint, prefix)
    try:
        w.start()
        yield w, prefix
    finally:
        w.close()


@pytest.fixture
def sub_prefix(writer: tuple[Any, bytes]) -> bytes:
    """A sub-prefix of the module writer's prefix no other test uses."""
    return writer[1] + secrets.token_hex(4).encode() + b"/"


@pytest.fixture
def reader(writer: tuple[Any, bytes]) -> Iterator[Any]:
    """A Reader attached to the module writer's cache, closed afterwards."""
    import shmcache

    r = shmcache.Reader(writer[0].name)
    yield r
    r.close()
