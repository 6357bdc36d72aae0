"""Test helpers: a writer in a real child process, etcd's own answers to compare against,
and throwaway users and groups to run processes as."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import shmcache
from shmcache import KeyValue
from shmcache.format import layout
from shmcache.writer.lock import remove_cache


class WriterProcess:
    """``python -m shmcache serve`` in a child process; ``kill``/``restart`` like an operator would."""

    def __init__(self, name: str, endpoint: str, prefix: bytes, ring_size: str = "4MiB",
                 extra: list[str] | None = None) -> None:
        self.name = name
        self.args = [sys.executable, "-m", "shmcache", "serve", name, "--endpoints", endpoint,
                     "--prefix", prefix.decode(), "--ring-size", ring_size,
                     "--log-level", "info"] + (extra or [])
        self.proc: subprocess.Popen[bytes] | None = None
        self.env: dict[str, str] = {}
        self.log_path = f"/tmp/shmcache-test-writer-{name}.log"

    def start(self, wait: bool = True) -> WriterProcess:
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **self.env})
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until this writer process has published a snapshot and claimed the cache."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"writer exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with shmcache.Reader(self.name) as r:
                    st = r.status()
                    if st.writer_pid == self.proc.pid and st.writer_alive:
                        return
            except shmcache.ShmCacheError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"writer not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-4000:]
        except OSError:
            return ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def terminate(self, timeout: float = 10.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        return self.proc.returncode

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if hasattr(self, "_log"):
            self._log.close()
        remove_cache(self.name, force=True)  # cleanup: another writer may hold the name
        if not os.environ.get("SHMCACHE_KEEP_LOGS"):
            try:
                os.unlink(self.log_path)
            except OSError:
                pass


def wait_until(cond: Any, what: Any = "", timeout: float = 15.0) -> None:
    """Poll ``cond()`` until it is true; AssertionError naming ``what`` (a string, or a
    callable giving one, evaluated only on failure) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() >= deadline:
            raise AssertionError(f"condition not met in {timeout:.0f}s: "
                                 f"{what() if callable(what) else what}")
        time.sleep(0.05)


def writer_fixture(**settings: Any) -> Any:
    """A ``cache`` fixture for a test module: a writer process (WriterProcess with
    ``settings``) serving the test's ``unique_prefix`` of the session's etcd, yielded with
    the prefix as ``(writer, prefix)`` and closed after the test."""
    @pytest.fixture
    def cache(etcd_session: Any, cache_name: str,
              unique_prefix: bytes) -> Iterator[tuple[WriterProcess, bytes]]:
        w = WriterProcess(cache_name, etcd_session.endpoint, unique_prefix, **settings)
        try:
            w.start()
            yield w, unique_prefix
        finally:
            w.close()
    return cache


def kv_stub(client: Any) -> Any:
    """The ``shmcache.etcdapi`` KV stub for ``client``: an ``ApiClient``'s own, or one on a
    python-etcd3 client's channel. The helpers below build etcdapi messages, which
    python-etcd3's own ``kvstub`` must never be handed (they are other classes);
    either client's ``metadata`` carries its auth token."""
    from shmcache.etcdapi import Stub
    from tests.etcdserver import ApiClient

    return client.kv if isinstance(client, ApiClient) else Stub(client.channel, "KV")


def _kv(kv: Any) -> KeyValue:
    return KeyValue(kv.key, kv.value, kv.create_revision, kv.mod_revision, kv.version, kv.lease)


def etcd_range(client: Any, prefix: bytes, revision: int = 0) -> list[KeyValue]:
    """etcd's own answer for a prefix at an exact revision (``client``: see ``kv_stub``)."""
    from shmcache.etcdapi import rpc

    req = rpc.RangeRequest(key=prefix, range_end=layout.prefix_range_end(prefix),
                           revision=revision)
    resp = kv_stub(client).Range(req, 10, metadata=client.metadata)
    return [_kv(kv) for kv in resp.kvs]


def etcd_get(client: Any, key: bytes, revision: int = 0) -> KeyValue | None:
    from shmcache.etcdapi import rpc

    resp = kv_stub(client).Range(rpc.RangeRequest(key=key, revision=revision), 10,
                                 metadata=client.metadata)
    return _kv(resp.kvs[0]) if resp.kvs else None


def etcd_current_revision(client: Any) -> int:
    from shmcache.etcdapi import rpc

    resp = kv_stub(client).Range(rpc.RangeRequest(key=b"\0", count_only=True), 10,
                                 metadata=client.metadata)
    return int(resp.header.revision)


def etcd_events(endpoint: str, prefix: bytes, since: int, until: int,
                timeout: float = 15.0) -> list[shmcache.Event]:
    """etcd's own watch events for ``prefix`` with revision in (since, until].

    ``until`` must be the revision of an event under ``prefix`` (the caller's
    last write there): the helper reads etcd's stream until it has seen it.
    """
    from shmcache.writer.etcd import connection as _etcd

    conn = _etcd.Connection(_etcd.EtcdSettings(endpoints=[endpoint]))
    conn.connect()
    stream = conn.watch(prefix, layout.prefix_range_end(prefix), since + 1)
    out: list[shmcache.Event] = []
    timer = threading.Timer(timeout, stream.close)
    timer.start()
    try:
        if until <= since:
            return out
        for resp in stream:
            if resp.compact_revision:  # (etcd cancelled the watch: no history from `since`)
                raise AssertionError(f"etcd compacted to revision {resp.compact_revision}")
            for ev in resp.events:
                kv = ev.kv
                p = ev.prev_kv if ev.HasField("prev_kv") else None
                prev = (KeyValue(p.key, p.value, p.create_revision, p.mod_revision, p.version,
                                 p.lease) if p is not None else None)
                if ev.type == 0:
                    k = KeyValue(kv.key, kv.value, kv.create_revision, kv.mod_revision,
                                 kv.version, kv.lease)
                    out.append(shmcache.Event("PUT", k, prev, kv.mod_revision))
                else:
                    k = KeyValue(kv.key, b"", 0, kv.mod_revision, 0, 0)
                    out.append(shmcache.Event("DELETE", k, prev, kv.mod_revision))
            if out and out[-1].revision >= until:
                break
    except Exception as exc:
        if not out or out[-1].revision < until:
            raise AssertionError(f"etcd's watch did not reach revision {until} "
                                 f"(got {len(out)} events): {exc}") from None
    finally:
        timer.cancel()
        stream.close()
        conn.close()
    return [e for e in out if e.revision <= until]


def drain(w: shmcache.Watch, until_revision: int, timeout: float = 15.0) -> list[shmcache.Event]:
    """Poll a watch until it has delivered everything up to ``until_revision``."""
    out: list[shmcache.Event] = []
    deadline = time.monotonic() + timeout
    while w.revision < until_revision:
        if time.monotonic() > deadline:
            raise AssertionError(f"watch stuck at revision {w.revision} < {until_revision}; "
                                 f"got {len(out)} events")
        out.extend(w.poll(timeout=0.5))
    out.extend(w.poll(timeout=0))
    return out


def put(client: Any, key: bytes | str, value: bytes | str, lease: Any = None) -> int:
    """etcd put; returns the revision it created. ``lease``: a lease id or an object
    with one (python-etcd3's ``Lease``)."""
    from shmcache.etcdapi import rpc

    k = key.encode() if isinstance(key, str) else key
    v = value.encode() if isinstance(value, str) else value
    lease_id = getattr(lease, "id", lease) or 0
    req = rpc.PutRequest(key=k, value=v, lease=lease_id)
    return int(kv_stub(client).Put(req, 10, metadata=client.metadata).header.revision)


def delete(client: Any, key: bytes | str, prefix: bool = False) -> int:
    from shmcache.etcdapi import rpc

    k = key.encode() if isinstance(key, str) else key
    req = rpc.DeleteRangeRequest(key=k, range_end=layout.prefix_range_end(k) if prefix else b"")
    return int(kv_stub(client).DeleteRange(req, 10, metadata=client.metadata).header.revision)


def txn(client: Any, ops: list[tuple[str, bytes, bytes]]) -> int:
    """A multi-op transaction of ("put", key, value) / ("delete", key, b"") ops; its revision."""
    from shmcache.etcdapi import rpc

    reqs = []
    for op, k, v in ops:
        if op == "put":
            reqs.append(rpc.RequestOp(request_put=rpc.PutRequest(key=k, value=v)))
        else:
            reqs.append(rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=k)))
    resp = kv_stub(client).Txn(rpc.TxnRequest(compare=[], success=reqs, failure=[]), 10,
                               metadata=client.metadata)
    assert resp.succeeded
    return int(resp.header.revision)


def wait_rev(r: Any, rev: int) -> None:
    """Until Reader ``r`` has reached ``rev`` (15 s at most)."""
    assert r.wait(rev, timeout=15), f"reader stuck at {r.revision} < {rev}"


# -- other users: throwaway accounts, processes run as them through setpriv ---------------

# A child as another uid: no bytecode written into the checkout, no root's home.
CHILD_ENV = {**os.environ, "HOME": "/", "PYTHONDONTWRITEBYTECODE": "1"}


@dataclass(frozen=True)
class Account:
    name: str  # empty for ids with no entry in /etc/passwd (as in a container)
    uid: int
    gid: int
    init_groups: bool  # the groups /etc/group gives ``name``; else ``groups``
    groups: tuple[int, ...] = ()

    def argv(self, *args: str) -> list[str]:
        """``args`` run through setpriv as this account."""
        if self.init_groups:
            groups = ["--init-groups"]
        elif self.groups:
            groups = ["--groups", ",".join(map(str, self.groups))]
        else:
            groups = ["--clear-groups"]
        return ["setpriv", "--reuid", str(self.uid), "--regid", str(self.gid), *groups, *args]


@dataclass(frozen=True)
class Accounts:
    readers: str  # a group
    readers_gid: int
    member: Account  # in ``readers``
    outsider: Account  # in no group but its own


def _run(cmd: list[str]) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)


def _grant_search(paths: list[Path]) -> list[tuple[Path, int]]:
    """Add search permission for others (o+x) to every directory from / down to each of
    ``paths`` that lacks it; returns (directory, old mode) to restore."""
    out: list[tuple[Path, int]] = []
    seen: set[Path] = set()
    for path in paths:
        for d in reversed([path, *path.parents]):
            if d in seen:
                continue
            seen.add(d)
            mode = stat.S_IMODE(os.stat(d).st_mode)
            if not mode & stat.S_IXOTH:
                os.chmod(d, mode | stat.S_IXOTH)
                out.append((d, mode))
    return out


@contextlib.contextmanager
def throwaway_accounts() -> Iterator[Accounts]:
    """A readers group, a member of it and an outsider, made with groupadd/useradd and
    removed on exit; skips the test when not root, without the tools, or when another
    uid cannot import shmcache from this interpreter. (Use it in a module-scoped fixture.)"""
    if os.geteuid() != 0:
        pytest.skip("needs root: creates users and groups and runs processes as them")
    for tool in ("setpriv", "useradd", "userdel", "groupadd", "groupdel"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    import grp
    import pwd

    tag = secrets.token_hex(3)
    group, member, outsider = f"shmt{tag}r", f"shmt{tag}m", f"shmt{tag}o"
    made_users: list[str] = []
    made_group = False
    granted: list[tuple[Path, int]] = []
    try:
        _run(["groupadd", "--system", group])
        made_group = True
        for user, extra in ((member, ["--groups", group]), (outsider, [])):
            _run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                  "--user-group", *extra, user])
            made_users.append(user)
        pw_m, pw_o = pwd.getpwnam(member), pwd.getpwnam(outsider)
        acc = Accounts(group, grp.getgrnam(group).gr_gid,
                       Account(member, pw_m.pw_uid, pw_m.pw_gid, True),
                       Account(outsider, pw_o.pw_uid, pw_o.pw_gid, False))
        # A checkout in a mode-700 directory (mktemp -d) keeps other uids out of the
        # venv: let them search (o+x, not list) the directories on the way while the
        # accounts live; put the modes back after.
        granted.extend(_grant_search([Path(__file__).resolve().parents[1],
                                      Path(sys.executable).parent]))
        probe = subprocess.run(
            acc.outsider.argv(sys.executable, "-c", "import shmcache"), capture_output=True,
            text=True, timeout=60, cwd="/", env=CHILD_ENV)
        if probe.returncode != 0:
            pytest.skip(f"another uid cannot import shmcache from {sys.executable} (is the "
                        f"path traversable?): {probe.stderr.strip()[-300:]}")
        yield acc
    finally:
        for user in made_users:
            subprocess.run(["userdel", user], capture_output=True, timeout=60)
            # userdel removes the user's own group with USERGROUPS_ENAB; make sure.
            subprocess.run(["groupdel", user], capture_output=True, timeout=60)
        if made_group:
            subprocess.run(["groupdel", group], capture_output=True, timeout=60)
        for d, mode in reversed(granted):
            with contextlib.suppress(OSError):
                os.chmod(d, mode)
