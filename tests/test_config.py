"""Settings of `shmcache serve`: precedence flags > environment > file > defaults, and errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from shmcache.cli import commands as cli
from shmcache.cli.config import SETTINGS, ConfigError, load


def _file(tmp_path: Path, text: str, name: str = "c.toml") -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_defaults_without_any_source() -> None:
    """With no file, environment or flag, every setting has its documented default."""
    cfg = load("c1", {}, environ={})
    assert cfg.endpoints == ["http://127.0.0.1:2379"]
    assert cfg.prefix == "" and cfg.ring_size == 64 << 20 and cfg.snapshot_interval == 30.0
    assert cfg.snapshot_bytes is None and cfg.mode == 0o600 and cfg.group is None
    assert cfg.ca_file is None and cfg.user is None and cfg.password is None
    assert (cfg.log_level, cfg.log_format, cfg.metrics) == ("info", "plain", None)
    assert cfg.sources == {} and cfg.warnings == []


def test_precedence_flags_over_environment_over_file(tmp_path: Path) -> None:
    """Each setting comes from the highest source that sets it, and says which one."""
    path = _file(tmp_path, '''
endpoints = ["http://10.0.0.1:2379", "http://10.0.0.2:2379"]
prefix = "/file/"
ring_size = "1MiB"
snapshot_interval = 5
log_level = "debug"
mode = "640"
metrics = "127.0.0.1:9464"
''')
    env = {"SHMCACHE_PREFIX": "/env/", "SHMCACHE_RING_SIZE": "2MiB",
           "SHMCACHE_LOG_FORMAT": "json", "SHMCACHE_ETCD_BINARY": "/x/etcd"}
    flags = {"ring_size": "4MiB", "metrics": "off", "prefix": None}
    cfg = load("c1", flags, environ=env, config_file=path)
    assert cfg.ring_size == 4 << 20 and cfg.sources["ring_size"] == "flag --ring-size"
    assert cfg.prefix == "/env/" and cfg.sources["prefix"] == "environment SHMCACHE_PREFIX"
    assert cfg.log_format == "json"
    assert cfg.log_level == "debug" and cfg.sources["log_level"] == f"config file {path}"
    assert cfg.endpoints == ["http://10.0.0.1:2379", "http://10.0.0.2:2379"]
    assert cfg.snapshot_interval == 5.0 and cfg.mode == 0o640
    assert cfg.metrics is None  # a flag can switch off what the file switched on
    assert "snapshot_bytes" not in cfg.sources
    assert cfg.warnings == []  # SHMCACHE_ETCD_BINARY is not a serve setting, and not a typo


def test_config_file_from_shmcache_config_and_unknown_env_warns(tmp_path: Path) -> None:
    """$SHMCACHE_CONFIG names the file when --config is not given; unknown SHMCACHE_* warn."""
    path = _file(tmp_path, 'prefix = "/from-file/"\n')
    cfg = load("c1", {}, environ={"SHMCACHE_CONFIG": path, "SHMCACHE_RINGSIZE": "1MiB"})
    assert cfg.prefix == "/from-file/" and cfg.config_file == path
    assert cfg.ring_size == 64 << 20
    assert any("SHMCACHE_RINGSIZE" in w for w in cfg.warnings)


def test_password_and_password_file_are_one_setting(tmp_path: Path) -> None:
    """A higher source's password replaces a lower one's password_file; a file's path is
    relative to the config file, and only its first line counts."""
    (tmp_path / "pw").write_text("s3cret\nignored\n")
    os.chmod(tmp_path / "pw", 0o600)
    path = _file(tmp_path, 'user = "shmcache"\npassword_file = "pw"\n')
    cfg = load("c1", {}, environ={}, config_file=path)
    assert cfg.password == "s3cret" and cfg.password_file == str(tmp_path / "pw")
    cfg = load("c1", {}, environ={"SHMCACHE_PASSWORD": "from-env"}, config_file=path)
    assert cfg.password == "from-env" and cfg.password_file is None
    assert cfg.sources["password"] == "environment SHMCACHE_PASSWORD"
    assert "from-env" not in "\n".join(cfg.describe())  # never printed
    with pytest.raises(ConfigError, match="password and password_file are both set"):
        load("c1", {"user": "u", "password": "a", "password_file": str(tmp_path / "pw")},
             environ={})


def test_tls_paths_relative_to_config_file(tmp_path: Path) -> None:
    for f in ("ca.pem", "c.pem", "k.pem"):
        (tmp_path / f).write_text("x")
    path = _file(tmp_path, 'endpoints = "https://127.0.0.1:2379"\nca_file = "ca.pem"\n'
                           'cert_file = "c.pem"\nkey_file = "k.pem"\n')
    cfg = load("c1", {}, environ={}, config_file=path)
    assert cfg.ca_file == str(tmp_path / "ca.pem") and cfg.key_file == str(tmp_path / "k.pem")


def test_world_readable_password_file_warns(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("pw\n")
    os.chmod(tmp_path / "pw", 0o644)
    cfg = load("c1", {"user": "u", "password_file": str(tmp_path / "pw")}, environ={})
    assert any("readable by every user" in w for w in cfg.warnings)


# (where the bad value is set, the value, what the one-line error must contain)
BAD = [
    ("file", 'ring_sise = "1MiB"', "unknown setting 'ring_sise' (did you mean 'ring_size'?)"),
    ("file", 'ring_size = "64XB"', "ring_size = '64XB' (from config file"),
    ("file", 'ring_size = "1KiB"', "must be between 64KiB and 1TiB"),
    ("file", "ring_size = true", "got a boolean"),
    ("file", "mode = 640", "is not a file mode (write \"640\" or 0o640"),
    ("env", ("SHMCACHE_MODE", "666"), "mode = '666' (from environment SHMCACHE_MODE): 666 lets "
                                      "group or others write"),
    ("env", ("SHMCACHE_REMOVE_ON_EXIT", "maybe"), "expected true or false"),
    ("flag", ("log_level", "loud"), "log_level = 'loud' (from flag --log-level): must be one of"),
    ("flag", ("metrics", "9464"), "expected HOST:PORT"),
    ("flag", ("metrics", "example.com:9464"), "is not an IP address"),
    ("flag", ("snapshot_interval", "-1"), "must be a positive number of seconds"),
    ("flag", ("endpoints", "ftp://x:1"), "scheme must be http or https"),
    ("flag", ("endpoints", "http://a:1,https://b:2"), "mixes http:// and https://"),
    ("flag", ("endpoints", "https://127.0.0.1:2379"), "https:// endpoints need ca_file"),
    ("flag", ("ca_file", "/nonexistent/ca.pem"), "ca_file = '/nonexistent/ca.pem' (from flag "
                                                 "--ca-file): no such file"),
    ("flag", ("user", "u"), "user = 'u' (from flag --user): needs password or password_file"),
    ("flag", ("password", "p"), "password = (hidden) (from flag --password): is set but user"),
    ("flag", ("group", "no-such-group-xyz"), "no group named 'no-such-group-xyz'"),
    ("flag", ("group", "0"), "gives the group no access; use mode 640"),
    ("file", "prefix = [1]", "expected a string, got a list"),
    ("file", "ring_size = ", "not valid TOML"),
]


@pytest.mark.parametrize(("where", "bad", "message"), BAD, ids=[m[:40] for _, _, m in BAD])
def test_invalid_settings_name_the_setting_and_why(tmp_path: Path, where: str, bad: object,
                                                   message: str) -> None:
    """Every bad value fails before anything starts, in one line naming setting, source, reason."""
    flags: dict[str, str] = {}
    env: dict[str, str] = {}
    path = None
    if where == "file":
        path = _file(tmp_path, str(bad) + "\n")
    elif where == "env":
        k, v = bad  # type: ignore[misc]
        env[k] = v
    else:
        k, v = bad  # type: ignore[misc]
        flags[k] = v
    with pytest.raises(ConfigError) as ei:
        load("c1", flags, environ=env, config_file=path)
    text = str(ei.value)
    assert message in text
    assert "\n" not in text


def test_cross_checks_for_tls_settings(tmp_path: Path) -> None:
    (tmp_path / "c.pem").write_text("x")
    with pytest.raises(ConfigError, match="needs both cert_file and key_file; key_file is not"):
        load("c1", {"cert_file": str(tmp_path / "c.pem"), "ca_file": str(tmp_path / "c.pem"),
                    "endpoints": "https://h:1"}, environ={})
    with pytest.raises(ConfigError, match="ca_file is set but the endpoints are http://"):
        load("c1", {"ca_file": str(tmp_path / "c.pem")}, environ={})


def test_missing_config_file_and_bad_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load("c1", {}, environ={}, config_file=str(tmp_path / "none.toml"))
    with pytest.raises(ConfigError, match="invalid cache name"):
        load("bad/name", {}, environ={})


def test_every_setting_has_a_flag_and_an_environment_variable() -> None:
    parser = cli.build_parser()
    serve = parser._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    flags = {o for a in serve._actions for o in a.option_strings}
    for s in SETTINGS.values():
        assert s.flag in flags
        assert s.env == "SHMCACHE_" + s.name.upper()


def test_check_config_prints_values_and_sources(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    path = _file(tmp_path, 'prefix = "/p/"\nring_size = "8MiB"\n')
    monkeypatch.setenv("SHMCACHE_SNAPSHOT_INTERVAL", "7")
    rc = cli.main(["serve", "c1", "--config", path, "--ring-size", "16MiB", "--check-config"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "ring_size = 16777216  (flag --ring-size)" in out
    assert "snapshot_interval = 7.0  (environment SHMCACHE_SNAPSHOT_INTERVAL)" in out
    assert f"prefix = '/p/'  (config file {path})" in out
    assert "mode = 600  (default)" in out


def test_serve_with_bad_config_exits_2_with_one_line(tmp_path: Path) -> None:
    """The real command: exit code 2 and exactly one line on stderr, before any etcd contact."""
    path = _file(tmp_path, 'endpoints = ["http://127.0.0.1:1"]\nring_size = "lots"\n')
    out = subprocess.run([sys.executable, "-m", "shmcache", "serve", "c1", "--config", path],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("shmcache serve: ring_size = 'lots' (from config file")
    assert "cannot parse size" in lines[0]


def test_durations_take_units_in_every_source(tmp_path: Path) -> None:
    """Seconds settings take `30s`, `5m`, `250ms`, `1h` or a number, in the file, the
    environment and flags alike; `0s` disables verification as `0` does."""
    from shmcache._units import parse_seconds

    path = _file(tmp_path, 'snapshot_interval = "5m"\nverify_interval = "0s"\n')
    cfg = load("c1", {}, environ={}, config_file=path)
    assert (cfg.snapshot_interval, cfg.verify_interval) == (300.0, 0.0)
    cfg = load("c1", {"snapshot_interval": "250ms"},
               environ={"SHMCACHE_VERIFY_INTERVAL": "1h"}, config_file=path)
    assert (cfg.snapshot_interval, cfg.verify_interval) == (0.25, 3600.0)
    assert parse_seconds("1.5m") == 90.0 and parse_seconds("30 S") == 30.0
    assert parse_seconds(7) == 7.0 and parse_seconds("2") == 2.0
    for bad in ("", "s", "1d", "1m30s", "nan", "fast", "-"):
        with pytest.raises(ValueError, match=r"cannot parse duration .* \(use e.g. 30s, 5m"):
            parse_seconds(bad)
    with pytest.raises(ConfigError, match="snapshot_interval = '1d' .*cannot parse duration"):
        load("c1", {"snapshot_interval": "1d"}, environ={})


def test_only_the_etcd_settings() -> None:
    """``load(only=ETCD_SETTINGS)`` (check --against-etcd) reads the connection settings and
    leaves the writer's other settings alone, a bad one included."""
    from shmcache.cli.config import ETCD_SETTINGS

    env = {"SHMCACHE_ENDPOINTS": "http://10.0.0.9:2379", "SHMCACHE_RING_SIZE": "nonsense",
           "SHMCACHE_USER": "u", "SHMCACHE_PASSWORD": "p"}
    cfg = load("c1", {}, environ=env, only=ETCD_SETTINGS)
    assert cfg.endpoints == ["http://10.0.0.9:2379"] and (cfg.user, cfg.password) == ("u", "p")
    assert cfg.ring_size == 64 << 20
    with pytest.raises(ConfigError, match="user = 'u' .*needs password or password_file"):
        load("c1", {"user": "u"}, environ={}, only=ETCD_SETTINGS)
