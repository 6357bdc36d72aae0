"""Every user-facing failure of the command line in one line, one scheme of exit codes, and
docs and examples that say what the code does (issue 18, items 6 and 9).

Commands run as real child processes; those that read a cache run against a real writer
(tests/helpers.WriterProcess, the module's ``writer`` fixture) and a real etcd.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import shmcache
from shmcache.cli import commands as cli
from shmcache.cli import config
from shmcache.reader import pages as _pages
from tests.helpers import WriterProcess, put

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "shmcache"]
OPERATIONS_MD = ROOT / "docs" / "operations.md"

# A Python that cannot import some modules, as on a host without an extra: the first
# argument names them (comma-separated), the rest is the shmcache command line.
_BLOCKER = """
import sys
BLOCKED = set(sys.argv.pop(1).split(","))
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, Blocker())
from shmcache.cli.commands import main
sys.exit(main(sys.argv[1:]))
"""
WRITER_EXTRA = ("grpc", "google")
METRICS_EXTRA = ("prometheus_client",)


def _run(*args: str, env: dict[str, str] | None = None,
         timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=None if env is None else {**os.environ, **env})


def _run_without(modules: tuple[str, ...], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _BLOCKER, ",".join(modules), *args],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)


def _one_line(out: subprocess.CompletedProcess[str], command: str) -> str:
    """The single stderr line ``shmcache COMMAND: ...`` of a failed command."""
    assert "Traceback" not in out.stderr + out.stdout, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"shmcache {command}: "), out.stderr
    return lines[0]


# -- missing extras, a user without a password ------------------------------------------------

@pytest.mark.parametrize("args", [
    ["serve", "t-noextra", "--endpoints", "http://127.0.0.1:1"],
    ["check", "t-noextra", "--against-etcd"],
    ["demo", "--duration", "1"],
], ids=["serve", "check", "demo"])
def test_missing_writer_extra_is_one_line(args: list[str]) -> None:
    """Without grpc/protobuf: one line naming the extra to install, exit 2, nothing started."""
    out = _run_without(WRITER_EXTRA, *args)
    line = _one_line(out, args[0])
    assert out.returncode == 2
    assert "pip install 'shmcache[writer]'" in line and "grpc" in line
    assert "starting etcd" not in out.stdout  # demo: refused before it starts anything


def test_demo_without_an_etcd_binary_is_one_line() -> None:
    out = _run("demo", "--duration", "1", env={"SHMCACHE_ETCD_BINARY": "/nonexistent/etcd"})
    line = _one_line(out, "demo")
    assert out.returncode == 2 and "SHMCACHE_ETCD_BINARY" in line
    assert "starting etcd" not in out.stdout


def test_missing_metrics_extra_is_one_line() -> None:
    out = _run_without(METRICS_EXTRA, "serve", "t-noextra", "--metrics", "127.0.0.1:0",
                       "--check-config")
    line = _one_line(out, "serve")
    assert out.returncode == 2 and "pip install 'shmcache[metrics]'" in line


def test_check_user_without_password_is_one_line(writer: tuple[WriterProcess, bytes],
                                                  etcd_session: Any) -> None:
    """A user and no password: refused in one line before etcd is asked."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHMCACHE_")}
    out = subprocess.run([*CLI, "check", writer[0].name, "--against-etcd", "--user", "u",
                          "--endpoints", etcd_session.endpoint],
                         capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
    line = _one_line(out, "check")
    assert out.returncode == 2 and "needs password or password_file" in line


def test_other_import_errors_are_not_blamed_on_an_extra() -> None:
    with pytest.raises(ImportError, match="nope"):
        cli._missing_extra(ImportError("nope", name="nope"))


# -- check -----------------------------------------------------------------------------------

def test_check_etcd_flags_need_against_etcd() -> None:
    """--values (or an etcd flag) without --against-etcd would be ignored: refused instead."""
    for args, named in ((["--values"], "--values"),
                        (["--endpoints", "http://x:1", "--values"], "--values, --endpoints")):
        out = _run("check", "t-nocache", *args)
        assert out.returncode == 2 and named in _one_line(out, "check"), out.stderr


def test_check_against_etcd_reads_shmcache_endpoints(writer: tuple[WriterProcess, bytes],
                                                     etcd_session: Any) -> None:
    """SHMCACHE_ENDPOINTS is the endpoint of `check --against-etcd`, as of `serve`."""
    out = _run("check", writer[0].name, "--against-etcd",
               env={"SHMCACHE_ENDPOINTS": etcd_session.endpoint})
    assert out.returncode == 0, out.stdout + out.stderr
    assert re.search(r"^ok: etcd: [\d,]+ keys? equal at revision", out.stdout, re.M), out.stdout


def test_check_and_rm_of_an_unknown_cache_are_errors() -> None:
    """No such cache is an error (exit 2, ``shmcache COMMAND:``), not a violation."""
    for cmd in ("check", "rm"):
        out = _run(cmd, "t-nosuchcache")
        line = _one_line(out, cmd)
        assert out.returncode == 2 and "no shmcache named 't-nosuchcache'" in line
        assert "VIOLATION" not in out.stdout


# -- exit codes: one scheme, one documented table ----------------------------------------------

def _exit_code_rows() -> dict[str, str]:
    """docs/operations.md's exit code table: code -> the row's text."""
    text = OPERATIONS_MD.read_text()
    section = text[text.index("## Exit codes"):]
    section = section[:section.index("\n## ", 4)]
    rows = {}
    for line in section.splitlines():
        m = re.fullmatch(r"\| `(\d+)` \|(.*)\|", line)
        if m:
            rows[m[1]] = m[2]
    return rows


def test_exit_codes_match_the_documented_table(writer: tuple[WriterProcess, bytes],
                                               sub_prefix: bytes, etcd_client: Any) -> None:
    """Each situation exits with the code docs/operations.md gives it, and the table's row
    for that code names the situation."""
    name = writer[0].name
    rev = put(etcd_client, sub_prefix + b"k", b"v")
    with shmcache.Reader(name) as r:
        assert r.wait(rev, timeout=15)
    p = sub_prefix.decode()
    cases = [  # (arguments, exit code, words of the table's row)
        (["get", name, p + "k"], 0, "done"),
        (["list", name, p], 0, "done"),
        (["check", name], 0, "done"),
        (["get", name, p + "missing"], 1, "`get`: no such key"),
        (["get", "t-nosuchcache", "k"], 2, "no such cache"),
        (["list", "t-nosuchcache"], 2, "no such cache"),
        (["check", "t-nosuchcache"], 2, "no such cache"),
        (["rm", "t-nosuchcache"], 2, "no such cache"),
        (["list", name, "/outside/"], 2, "a bad argument"),
        (["get", name], 2, "a usage error"),
        (["check", name, "--values"], 2, "a usage error"),
    ]
    rows = _exit_code_rows()
    assert set(rows) >= {"0", "1", "2", "130"}, rows
    procs = [subprocess.Popen([*CLI, *a], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=ROOT) for a, _, _ in cases]
    for (args, code, words), proc in zip(cases, procs, strict=True):
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == code, (args, out, err)
        assert words in rows[str(code)], (code, words, rows[str(code)])
        assert "Traceback" not in err
        if code == 2:
            assert err.strip().splitlines()[-1].startswith(f"shmcache {args[0]}: "), err


# -- list --json is etcdctl's -w json ---------------------------------------------------------

def _etcdctl() -> str | None:
    from shmcache.cli.demo_etcd import find_etcd_binary

    try:
        beside = os.path.join(os.path.dirname(find_etcd_binary()), "etcdctl")
    except RuntimeError:
        beside = ""
    return beside if os.access(beside, os.X_OK) else shutil.which("etcdctl")


def test_list_json_is_etcdctl_json(writer: tuple[WriterProcess, bytes], sub_prefix: bytes,
                                   etcd_client: Any, etcd_session: Any) -> None:
    """`list --json` prints what `etcdctl get --prefix -w json` prints for the same range at
    the same revision (header: its revision only; lease left out when 0)."""
    etcdctl = _etcdctl()
    if etcdctl is None:
        pytest.skip("no etcdctl binary")
    lease = etcd_client.lease(600)
    try:
        _compare_with_etcdctl(etcdctl, writer[0].name, sub_prefix, etcd_client, etcd_session,
                              lease)
    finally:
        lease.revoke()


def _compare_with_etcdctl(etcdctl: str, name: str, sub_prefix: bytes, etcd_client: Any,
                          etcd_session: Any, lease: Any) -> None:
    put(etcd_client, sub_prefix + b"a", b"\xff\x00binary")
    put(etcd_client, sub_prefix + b"a", b"twice")
    rev = put(etcd_client, sub_prefix + b"b\n", b"leased", lease=lease)
    with shmcache.Reader(name) as r:
        assert r.wait(rev, timeout=15)
    ours = json.loads(_run("list", name, sub_prefix.decode(), "--json").stdout)
    at = ours["header"]["revision"]
    theirs = json.loads(subprocess.run(
        [etcdctl, "--endpoints", etcd_session.endpoint, "get", "--prefix", "-w", "json",
         f"--rev={at}", sub_prefix.decode()], capture_output=True, text=True, timeout=30,
        check=True, env={**os.environ, "ETCDCTL_API": "3"}).stdout)
    assert theirs["header"]["revision"] >= at  # etcd's header: its current revision
    del theirs["header"], ours["header"]
    assert ours == theirs
    assert list(ours) == ["kvs", "count"] and len(ours["kvs"]) == 2
    assert list(ours["kvs"][0]) == ["key", "create_revision", "mod_revision", "version",
                                    "value"]
    assert ours["kvs"][1]["lease"] == lease.id
    assert base64.b64decode(ours["kvs"][0]["value"]) == b"twice"

    page = json.loads(_run("list", name, sub_prefix.decode(), "--json", "--limit", "1").stdout)
    assert page["more"] is True and page["count"] == 1 and page["continue_token"]
    empty = json.loads(_run("list", name, sub_prefix.decode() + "none/", "--json").stdout)
    assert empty == {"header": {"revision": empty["header"]["revision"]}}  # as etcdctl


def test_list_prints_singular_plural(writer: tuple[WriterProcess, bytes], sub_prefix: bytes,
                                     etcd_client: Any) -> None:
    rev = put(etcd_client, sub_prefix + b"only", b"1")
    with shmcache.Reader(writer[0].name) as r:
        assert r.wait(rev, timeout=15)
    out = _run("list", writer[0].name, sub_prefix.decode())
    assert out.returncode == 0 and out.stderr.startswith("(1 key at revision "), out.stderr


# -- smaller things ----------------------------------------------------------------------------

def test_continue_token_errors_name_the_call_not_the_encoding() -> None:
    """A by_index token given to a list (or another index) says so in the caller's terms."""
    token = _pages.encode("c", 1, 5, _pages.index_bound("node", b"n-1"), b"k")
    with pytest.raises(ValueError) as info:
        _pages.decode(token, "c", b"/a/", 1, 0)
    msg = str(info.value)
    assert "\\x00" not in msg and "index\\x00" not in msg
    assert msg == ("continue_token belongs to by_index('node', b'n-1'), not to the listing of "
                   "prefix b'/a/'")


def test_top_level_help_has_no_markup() -> None:
    out = _run("--help")
    assert out.returncode == 0 and "``" not in out.stdout and "Exit codes" in out.stdout


def test_tls_flags_spelled_as_etcdctl(tmp_path: Path) -> None:
    """--cacert/--cert/--key (etcdctl's spellings) are the aliases; the old --cert-cert,
    --ca-cert and --cert-key still work but are not listed."""
    files = {}
    for n in ("ca", "cert", "key"):
        files[n] = tmp_path / f"{n}.pem"
        files[n].write_text("-----BEGIN-----\n")
    base = ["serve", "t-tls", "--endpoints", "https://127.0.0.1:2379", "--check-config"]
    for flags in (("--cacert", "--cert", "--key"), ("--ca-cert", "--cert-cert", "--cert-key")):
        out = _run(*base, flags[0], str(files["ca"]), flags[1], str(files["cert"]),
                   flags[2], str(files["key"]))
        assert out.returncode == 0, out.stderr
        assert f"cert_file = '{files['cert']}'" in out.stdout
    shown = _run("serve", "--help").stdout
    assert "--cert-cert" not in shown and "--cert CERT_FILE" in shown


def test_durations_take_units_on_flags() -> None:
    """--snapshot-interval 1s is a duration like the sizes take units; demo's --duration too."""
    out = _run("serve", "t-dur", "--snapshot-interval", "1s", "--verify-interval", "5m",
               "--check-config")
    assert out.returncode == 0, out.stderr
    assert "snapshot_interval = 1.0" in out.stdout and "verify_interval = 300.0" in out.stdout
    assert cli._positive_seconds("250ms") == 0.25


def test_bad_json_pointer_escape_is_refused() -> None:
    out = _run("serve", "t-ptr", "--index", "n=json:/spec/~2x", "--check-config")
    line = _one_line(out, "serve")
    assert out.returncode == 2 and "invalid escape" in line and "~0" in line


def test_json_pointer_escapes() -> None:
    """RFC 6901: ~0 is '~', ~1 is '/' (~01 is '~1', not '/'); any other '~' is an error."""
    from shmcache.format.indexspec import make

    assert make("n", "json:/a~1b/~0/~01").arg == ("a/b", "~", "~1")
    for bad in ("/~", "/a~", "/~2x", "/~~1", "/~~01", "/x/~a"):
        with pytest.raises(ValueError, match="invalid escape"):
            make("n", "json:" + bad)


# -- docs and examples ---------------------------------------------------------------------------

def test_operations_md_lists_every_setting_and_metric() -> None:
    """Every setting of config.py is in the settings table, every metric the writer exports
    (_metrics.METRICS, as Prometheus names them: counters end in _total) in the metrics
    table."""
    from shmcache.cli import metrics as _metrics

    text = OPERATIONS_MD.read_text()
    for name in config.SETTINGS:
        assert re.search(rf"^\| [^|]*`{name}`[^|]* \|", text, re.M), \
            f"setting {name} is not in docs/operations.md's settings table"
    names = ["shmcache_info"] + [name if kind != "counter" or name.endswith("_total")
                                 else name + "_total" for name, kind, _, _ in _metrics.METRICS]
    documented = {m for line in text.splitlines() if line.startswith("| `shmcache_")
                  for m in re.findall(r"`(shmcache_[a-z_]+)`", line.split(" | ")[0])}
    for m in names:
        assert m in documented, \
            f"metric {m} is not in docs/operations.md's metrics table"


def test_examples_install_the_extras_their_flags_need() -> None:
    """A manifest whose writer runs with --metrics installs the metrics extra: its writer's
    --metrics passes --check-config with only the extras the manifest names installed."""
    checked = 0
    for path in sorted((ROOT / "examples").glob("*/*.yaml")):
        text = path.read_text()
        if '"--metrics"' not in text:
            continue
        installs = [set(x.split(",")) for x in
                    re.findall(r"pip install \"shmcache\[([a-z,]+)\]\"", text)]
        writer = next((x for x in installs if "writer" in x), None)
        assert writer is not None, f"{path.name}: says nothing of the writer's extras"
        missing = () if "metrics" in writer else METRICS_EXTRA
        out = _run_without(missing, "serve", "t-ex", "--metrics", "0.0.0.0:9464",
                           "--check-config")
        assert out.returncode == 0, (path.name, out.stderr)
        checked += 1
    assert checked, "no example runs the writer with --metrics any more: drop this test"
