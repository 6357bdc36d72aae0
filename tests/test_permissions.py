"""Users and groups: readers and writers run as other uids (setpriv) against real writers.

Modes 600 (only the writer's user), 640 + group (members) and 644 (everyone): a
reader without access gets SegmentPermissionError naming the segment, its owner,
group and mode and the writer setting that grants access, and every reader
command says so in one line with exit 2. A writer asked for a group it may not
give its segments refuses at start in one line (exit 2). The systemd example
(unit, sysusers file, config) puts the writer in the readers' group.

Throwaway accounts (a readers group, a member and an outsider) are created with
groupadd/useradd for this module and removed after it; the tests skip when not
root or without setpriv. etcd and the writers of the read tests run as root.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import select
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import shmcache
from shmcache.format import layout
from shmcache.ipc import shm as _shm
from tests.etcdserver import EtcdServer
from tests.helpers import CHILD_ENV, Account, Accounts, WriterProcess, put, throwaway_accounts

EXAMPLES = Path(__file__).parents[1] / "examples" / "systemd"
OPERATIONS_MD = Path(__file__).parents[1] / "docs" / "operations.md"
@pytest.fixture(scope="module")
def accounts() -> Iterator[Accounts]:
    with throwaway_accounts() as acc:
        yield acc


def _cli(account: Account, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(account.argv(sys.executable, "-m", "shmcache", *args),
                          capture_output=True, text=True, timeout=120, cwd="/", env=CHILD_ENV)


# A reader API call as another uid: what it raised, as JSON on stdout.
_ATTACH = """
import json, sys
import shmcache
try:
    with shmcache.Reader(sys.argv[1]) as r:
        kv = r.get(sys.argv[2].encode())
        print(json.dumps({"value": kv.value.decode() if kv else None}))
except shmcache.ShmCacheError as exc:
    print(json.dumps({"type": type(exc).__name__, "permission": isinstance(exc, PermissionError),
                      "segment": getattr(exc, "segment", None), "uid": getattr(exc, "uid", None),
                      "gid": getattr(exc, "gid", None), "mode": getattr(exc, "mode", None),
                      "message": str(exc)}))
"""


def _api(account: Account, name: str, key: bytes) -> dict[str, object]:
    out = subprocess.run(account.argv(sys.executable, "-c", _ATTACH, name, key.decode()),
                         capture_output=True, text=True, timeout=60, cwd="/", env=CHILD_ENV)
    assert out.returncode == 0, out.stderr
    result: dict[str, object] = json.loads(out.stdout)
    return result


@dataclass
class Cache:
    name: str
    prefix: bytes
    key: bytes
    revision: int  # the revision that put ``key``


@contextlib.contextmanager
def _serve(etcd: EtcdServer, mode: str, extra: list[str], as_user: Account | None = None
           ) -> Iterator[Cache]:
    """A writer with ``--mode mode`` (and ``extra``) serving one key; as root or ``as_user``."""
    client = etcd.client()
    name = f"t-{secrets.token_hex(4)}"
    prefix = b"/t/" + secrets.token_hex(8).encode() + b"/"
    w = WriterProcess(name, etcd.endpoint, prefix, extra=["--mode", mode, *extra])
    if as_user is not None:
        w.args = as_user.argv(*w.args)
        w.env = {"HOME": "/", "PYTHONDONTWRITEBYTECODE": "1"}
    try:
        rev = put(client, prefix + b"k1", b"v1")
        w.start()
        yield Cache(name, prefix, prefix + b"k1", rev)
    finally:
        w.close()
        client.close()


@pytest.fixture(scope="module")
def cache_600(accounts: Accounts, etcd_session: EtcdServer) -> Iterator[Cache]:
    with _serve(etcd_session, "600", []) as c:
        yield c


@pytest.fixture(scope="module")
def cache_640(accounts: Accounts, etcd_session: EtcdServer) -> Iterator[Cache]:
    with _serve(etcd_session, "640", ["--group", accounts.readers]) as c:
        yield c


@pytest.fixture(scope="module")
def cache_644(accounts: Accounts, etcd_session: EtcdServer) -> Iterator[Cache]:
    with _serve(etcd_session, "644", []) as c:
        yield c


# Every reader command, as an operator would type it (PREFIX and KEY filled in).
READER_COMMANDS = {
    "status": ["status", "{name}"],
    "get": ["get", "{name}", "{key}"],
    "list": ["list", "{name}", "{prefix}"],
    "watch": ["watch", "{name}", "{prefix}"],
    "check": ["check", "{name}"],
    "bench": ["bench", "{name}", "--readers", "1", "--seconds", "0.2"],
}


def _command(cmd: str, cache: Cache) -> list[str]:
    return [a.format(name=cache.name, key=cache.key.decode(), prefix=cache.prefix.decode())
            for a in READER_COMMANDS[cmd]]


def _assert_refused_in_one_line(out: subprocess.CompletedProcess[str], cmd: str,
                                *fragments: str) -> None:
    assert out.returncode == 2, (out.returncode, out.stderr)
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith(f"shmcache {cmd}: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


# -- mode 600: only the writer's user ------------------------------------------------------


def test_mode_600_reader_as_another_uid_gets_segment_permission_error(
        accounts: Accounts, cache_600: Cache) -> None:
    """The API raises SegmentPermissionError (a PermissionError) naming the control segment,
    its owner, group and mode, and the writer settings that would grant access."""
    res = _api(accounts.outsider, cache_600.name, cache_600.key)
    assert res["type"] == "SegmentPermissionError" and res["permission"] is True, res
    assert res["segment"] == layout.control_name(cache_600.name)
    assert (res["uid"], res["gid"], res["mode"]) == (0, 0, 0o600), res
    message = str(res["message"])
    for fragment in (layout.control_name(cache_600.name), "owned by user root (uid 0)",
                     "group root (gid 0)", "mode 600", f"user {accounts.outsider.name}",
                     "--mode 640 --group GROUP", "--mode 644"):
        assert fragment in message, (fragment, message)


@pytest.mark.parametrize("cmd", sorted(READER_COMMANDS))
def test_mode_600_every_reader_command_refuses_in_one_line(
        accounts: Accounts, cache_600: Cache, cmd: str) -> None:
    out = _cli(accounts.outsider, *_command(cmd, cache_600))
    _assert_refused_in_one_line(out, cmd, "cannot read segment", "mode 600", "--mode 644")


# -- mode 640 + group: the group's members -------------------------------------------------


def test_mode_640_group_members_get_list_and_watch(
        accounts: Accounts, cache_640: Cache, etcd_client: Any) -> None:
    member, c = accounts.member, cache_640
    assert _api(member, c.name, c.key) == {"value": "v1"}
    out = _cli(member, "get", c.name, c.key.decode())
    assert (out.returncode, out.stdout) == (0, "v1\n"), out.stderr
    out = _cli(member, "list", c.name, c.prefix.decode())
    assert (out.returncode, out.stdout) == (0, f"{c.key.decode()}\tv1\n"), out.stderr
    # A watch from the cache's revision now receives the next put (whenever it starts).
    with shmcache.Reader(c.name) as r:
        since = r.revision
    proc = subprocess.Popen(
        member.argv(sys.executable, "-m", "shmcache", "watch", c.name, c.prefix.decode(),
                    "--since", str(since)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/", env=CHILD_ENV)
    try:
        rev = put(etcd_client, c.prefix + b"k2", b"v2")
        assert proc.stdout is not None
        line = _first_line(proc.stdout.fileno(), timeout=60)
    finally:
        proc.kill()
        _, err = proc.communicate(timeout=30)
    assert line == f"{rev}\tPUT\t{c.prefix.decode()}k2\tv2\n".encode(), (line, err)


def _first_line(fd: int, timeout: float) -> bytes:
    """The first line written to pipe ``fd`` (what came before EOF or the deadline if none)."""
    data = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.partition(b"\n")[0] + b"\n" if b"\n" in data else data


def test_mode_640_segments_carry_the_group(accounts: Accounts, cache_640: Cache) -> None:
    """Every segment (and nothing else) is mode 640 in the readers' group."""
    segs = _shm.list_segments(cache_640.name)
    assert layout.control_name(cache_640.name) in segs
    for seg in segs:
        st = os.stat(_shm.SHM_DIR + seg)
        assert (st.st_mode & 0o777, st.st_gid) == (0o640, accounts.readers_gid), seg


def test_mode_640_non_members_are_refused_with_the_group_to_join(
        accounts: Accounts, cache_640: Cache) -> None:
    res = _api(accounts.outsider, cache_640.name, cache_640.key)
    assert res["type"] == "SegmentPermissionError", res
    assert (res["gid"], res["mode"]) == (accounts.readers_gid, 0o640), res
    for cmd in ("get", "list", "watch"):
        out = _cli(accounts.outsider, *_command(cmd, cache_640))
        _assert_refused_in_one_line(
            out, cmd, "mode 640", f"group {accounts.readers} (gid {accounts.readers_gid})",
            f"Add this process's user to group {accounts.readers}")


# -- mode 644: everyone --------------------------------------------------------------------


def test_mode_644_any_user_reads(accounts: Accounts, cache_644: Cache) -> None:
    c = cache_644
    assert _api(accounts.outsider, c.name, c.key) == {"value": "v1"}
    out = _cli(accounts.outsider, "get", c.name, c.key.decode())
    assert (out.returncode, out.stdout) == (0, "v1\n"), out.stderr
    out = _cli(accounts.outsider, "list", c.name, c.prefix.decode())
    assert (out.returncode, out.stdout) == (0, f"{c.key.decode()}\tv1\n"), out.stderr


def test_a_refusal_despite_mode_644_blames_something_else(cache_name: str) -> None:
    """Mode 644 and still refused (a security module, a mount): the hint does not tell the
    operator to set the mode the segment already has. (The refusal itself cannot be made
    here: the message is built from a real segment's stat.)"""
    seg_name = layout.control_name(cache_name)
    seg = _shm.create(seg_name, 4096, 0o644)
    try:
        exc = _shm._read_denied(seg_name)
    finally:
        seg.close()
        _shm.unlink(seg_name)
    assert exc.mode == 0o644 and "with mode 644" in str(exc)
    assert "--mode" not in str(exc) and "security module" in str(exc), str(exc)


# -- a writer that is not root -------------------------------------------------------------


def test_non_root_writer_refuses_a_group_it_is_not_in(
        accounts: Accounts, etcd_session: EtcdServer, cache_name: str,
        unique_prefix: bytes) -> None:
    """One line and exit 2 before anything is created (it used to die on its first segment
    with PermissionError and a traceback, exit 1)."""
    out = _cli(accounts.outsider, "serve", cache_name, "--endpoints", etcd_session.endpoint,
               "--prefix", unique_prefix.decode(), "--mode", "640", "--group", accounts.readers,
               "--log-level", "warning")
    _assert_refused_in_one_line(
        out, "serve", f"cannot give the segments group {accounts.readers}",
        f"runs as user {accounts.outsider.name}",
        f"usermod -aG {accounts.readers} {accounts.outsider.name}",
        f"SupplementaryGroups={accounts.readers}")
    assert _shm.list_segments(cache_name) == []
    # A numeric group id is checked the same way.
    out = _cli(accounts.outsider, "serve", cache_name, "--endpoints", etcd_session.endpoint,
               "--mode", "640", "--group", str(accounts.readers_gid), "--log-level", "warning")
    _assert_refused_in_one_line(out, "serve", f"(gid {accounts.readers_gid})",
                                f"usermod -aG {accounts.readers} {accounts.outsider.name}")


def test_writer_rejects_a_group_that_does_not_exist(cache_name: str) -> None:
    """A ValueError naming the group at construction (it used to be a KeyError from the
    first segment's creation, inside run())."""
    from shmcache import Writer

    missing = f"shmt-none-{secrets.token_hex(3)}"
    with pytest.raises(ValueError, match=f"no group named '{missing}'"):
        Writer(cache_name, "http://127.0.0.1:9", mode=0o640, group=missing)
    assert _shm.list_segments(cache_name) == []


def test_non_root_writer_in_the_group_serves_it(
        accounts: Accounts, etcd_session: EtcdServer) -> None:
    """As the systemd unit runs it: a system user in the readers' group. Its segments are
    its own, mode 640, in that group; a non-member is told whom to ask."""
    member = accounts.member
    with _serve(etcd_session, "640", ["--group", accounts.readers], as_user=member) as c:
        for seg in _shm.list_segments(c.name):
            st = os.stat(_shm.SHM_DIR + seg)
            assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (
                member.uid, accounts.readers_gid, 0o640), seg
        assert _api(member, c.name, c.key) == {"value": "v1"}
        res = _api(accounts.outsider, c.name, c.key)
        assert res["type"] == "SegmentPermissionError", res
        assert f"owned by user {member.name} (uid {member.uid})" in str(res["message"])


def _unnamed_ids(count: int) -> list[int]:
    """``count`` ids that name no user and no group here."""
    import grp
    import pwd

    taken = {p.pw_uid for p in pwd.getpwall()} | {g.gr_gid for g in grp.getgrall()}
    base = 61000 + secrets.randbelow(3000)
    return [i for i in range(base, base + 100) if i not in taken][:count]


def test_numeric_group_without_a_name_as_in_kubernetes(
        accounts: Accounts, etcd_session: EtcdServer) -> None:
    """The pod examples: uids and a shared gid (fsGroup) that /etc has no names for. A
    non-root writer with that gid as a supplementary group serves ``--group GID``; a
    reader with it reads; one without is told the gid."""
    uid_w, uid_r, uid_o, shared = _unnamed_ids(4)
    writer = Account("", uid_w, uid_w, False, (shared,))
    with _serve(etcd_session, "640", ["--group", str(shared)], as_user=writer) as c:
        assert _api(Account("", uid_r, uid_r, False, (shared,)), c.name, c.key) == {
            "value": "v1"}
        res = _api(Account("", uid_o, uid_o, False), c.name, c.key)
        assert res["type"] == "SegmentPermissionError", res
        assert (res["uid"], res["gid"], res["mode"]) == (uid_w, shared, 0o640), res
        assert (f"owned by uid {uid_w} and gid {shared} with mode 640; this process runs as "
                f"uid {uid_o} in gids {uid_o}.") in str(res["message"]), res


# -- the systemd example -------------------------------------------------------------------


def _unit() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in (EXAMPLES / "shmcache@.service").read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_systemd_unit_puts_the_writer_in_the_configured_group() -> None:
    """mycache.toml's ``group`` is one the unit's writer is in (Group= or
    SupplementaryGroups=), and the sysusers file creates that group and the user."""
    group = tomllib.loads((EXAMPLES / "mycache.toml").read_text())["group"]
    unit = _unit()
    (user,) = unit["User"]
    groups = set(unit.get("Group", [])) | {
        g for v in unit.get("SupplementaryGroups", []) for g in v.split()}
    assert group in groups, (group, groups)
    sysusers = [ln.split() for ln in (EXAMPLES / "shmcache.sysusers.conf").read_text()
                .splitlines() if ln.strip() and not ln.startswith("#")]
    assert ["u", user] in [ln[:2] for ln in sysusers]
    assert ["g", group] in [ln[:2] for ln in sysusers]
    assert ["m", user, group] in [ln[:3] for ln in sysusers]  # for `sudo -u shmcache ...` too


def test_sysusers_file_makes_the_writer_a_member(tmp_path: Path) -> None:
    """systemd-sysusers, run on an empty root, creates the user, the group and the membership."""
    tool = shutil.which("systemd-sysusers")
    if tool is None:
        pytest.skip("systemd-sysusers not installed")
    group = tomllib.loads((EXAMPLES / "mycache.toml").read_text())["group"]
    (user,) = _unit()["User"]
    (tmp_path / "etc").mkdir()
    out = subprocess.run([tool, f"--root={tmp_path}", str(EXAMPLES / "shmcache.sysusers.conf")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    members = {ln.split(":")[0]: ln.split(":")[3].split(",")
               for ln in (tmp_path / "etc" / "group").read_text().splitlines()}
    assert user in members[group], members
    assert user in {ln.split(":")[0] for ln in (tmp_path / "etc" / "passwd").read_text()
                    .splitlines()}


def test_systemd_unit_documentation_names_only_what_exists() -> None:
    """A ``Documentation=file://`` must name a file that exists once installed; nothing
    installs the docs, so the unit points at them in a comment instead."""
    for value in _unit().get("Documentation", []):
        for uri in value.split():
            if uri.startswith("file://"):
                assert Path(uri[len("file://"):]).exists(), uri
    assert "docs/operations.md" in (EXAMPLES / "shmcache@.service").read_text()


def test_the_section_the_hints_name_exists() -> None:
    assert "\n## Grant readers access\n" in OPERATIONS_MD.read_text()

