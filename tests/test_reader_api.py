"""The Reader's contract: clear errors for bad names, missing caches and corrupt bytes; fork and
pickling behaviour; the public surface; the reader-side CLI."""

from __future__ import annotations

import base64
import json
import mmap
import os
import pickle
import subprocess
import sys
import time
from typing import Any

import posix_ipc
import pytest

import shmcache
from shmcache.format import layout
from shmcache.ipc import shm as _shm
from tests.helpers import WriterProcess, etcd_range, put


@pytest.fixture
def cache(etcd_session: Any, etcd_client: Any, cache_name: str, unique_prefix: bytes) -> Any:
    """A cache with 20 keys whose writer has been stopped cleanly (segments kept)."""
    p = unique_prefix
    for i in range(20):
        put(etcd_client, p + b"k%02d" % i, b"value-%d" % i)
    w = WriterProcess(cache_name, etcd_session.endpoint, p, ring_size="256KiB")
    w.start()
    yield w
    w.close()


def _flip(segment: str, offset: int) -> None:
    shm = posix_ipc.SharedMemory(segment, flags=0, size=0)
    with mmap.mmap(shm.fd, os.fstat(shm.fd).st_size) as m:
        m[offset] ^= 0xFF
    shm.close_fd()


def test_all_is_pinned() -> None:
    """The public surface changes only on purpose."""
    assert shmcache.__all__ == sorted(shmcache.__all__)
    assert set(shmcache.__all__) == {
        "AsyncWatch", "CacheExistsError", "CompactedError", "CorruptSegmentError", "CountResult",
        "Event", "FutureRevisionError",
        "InvalidNameError", "KeyValue", "ListResult", "NotFoundError", "Reader",
        "SegmentPermissionError", "ShmCacheError", "StaleError", "Status", "Subscription",
        "TimeoutError", "VersionMismatchError", "Watch", "Writer", "WriterError",
            "WriterRunningError", "remove"}
    for name in shmcache.__all__:
        assert getattr(shmcache, name) is not None
    for exc in ("CompactedError", "CorruptSegmentError", "NotFoundError", "StaleError",
                "TimeoutError", "InvalidNameError", "VersionMismatchError", "WriterError"):
        assert issubclass(getattr(shmcache, exc), shmcache.ShmCacheError)
    assert issubclass(shmcache.TimeoutError, TimeoutError)
    assert issubclass(shmcache.CorruptSegmentError, ValueError)


def test_reader_never_imports_etcd_grpc_protobuf(cache: WriterProcess, unique_prefix: bytes) -> None:
    """A reader-only process reads the cache without importing etcd3, grpc or protobuf."""
    code = (
        "import sys, shmcache\n"
        f"r = shmcache.Reader({cache.name!r})\n"
        f"assert r.get({unique_prefix + b'k01'!r}).value == b'value-1'\n"
        f"assert len(r.list({unique_prefix!r}).items) == 20\n"
        "bad = [m for m in sys.modules\n"
        "       if m.split('.')[0] in ('etcd3', 'grpc') or m.startswith('google.protobuf')]\n"
        "print(bad)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("name", ["", "a" * 65, "a/b", "a b", "../x", "ü", "a\0"])
def test_invalid_names_raise_invalid_name_error(name: str) -> None:
    with pytest.raises(shmcache.InvalidNameError) as ei:
        shmcache.Reader(name)
    assert isinstance(ei.value, ValueError)
    assert "[A-Za-z0-9._-]" in str(ei.value)


def test_unknown_cache_raises_not_found(cache_name: str) -> None:
    with pytest.raises(shmcache.NotFoundError) as ei:
        shmcache.Reader(cache_name)
    assert cache_name in str(ei.value) and "shmcache serve" in str(ei.value)
    assert isinstance(ei.value, FileNotFoundError)


def test_control_segment_garbage_and_version_mismatch(cache_name: str) -> None:
    """A control segment with foreign bytes or another format version gives a clear error."""
    seg = _shm.create(layout.control_name(cache_name), layout.CONTROL_SIZE)
    try:
        seg.buf[:16] = b"NOTSHMC!" + b"\x01\x00\x00\x00\x01\x00\x00\x00"
        with pytest.raises(shmcache.CorruptSegmentError, match="bad control magic"):
            shmcache.Reader(cache_name)
        layout.HEAD.pack_into(seg.buf, 0, layout.MAGIC[layout.KIND_CONTROL], 99,
                              layout.KIND_CONTROL)
        with pytest.raises(shmcache.VersionMismatchError) as ei:
            shmcache.Reader(cache_name)
        assert ei.value.found == 99 and ei.value.expected == layout.FORMAT_VERSION
        assert "version 99" in str(ei.value) and f"version {layout.FORMAT_VERSION}" in str(ei.value)
        seg.buf[:16] = b"\0" * 16  # a writer that has not finished creating it
        with pytest.raises(shmcache.CorruptSegmentError, match="not initialised"):
            shmcache.Reader(cache_name)
    finally:
        seg.close()
        _shm.unlink(seg.name)


def test_corrupt_snapshot_entry_is_detected(cache: WriterProcess, unique_prefix: bytes) -> None:
    """A flipped byte in a snapshot value raises CorruptSegmentError and `shmcache check` fails."""
    cache.terminate()
    r = shmcache.Reader(cache.name)
    assert r.get(unique_prefix + b"k05").value == b"value-5"
    ok = subprocess.run([sys.executable, "-m", "shmcache", "check", cache.name],
                        capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    st = r.status()
    snap = layout.snapshot_name(cache.name, r._view.snap_seq)
    # Find the value bytes of k05 in the segment and flip one.
    with open("/dev/shm/" + snap[1:], "rb") as f:
        data = f.read()
    _flip(snap, data.index(b"value-5"))
    with pytest.raises(shmcache.CorruptSegmentError, match="checksum"):
        r.get(unique_prefix + b"k05")
    with pytest.raises(shmcache.CorruptSegmentError):
        r.list(unique_prefix)
    assert r.get(unique_prefix + b"k06").value == b"value-6"  # other entries still served
    bad = subprocess.run([sys.executable, "-m", "shmcache", "check", cache.name],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 1
    assert "VIOLATION" in bad.stdout and "checksum" in bad.stdout
    assert st.key_count == 20
    r.close()


def test_prefix_outside_range_raises_value_error(cache: WriterProcess, unique_prefix: bytes) -> None:
    with shmcache.Reader(cache.name) as r:
        with pytest.raises(ValueError, match="outside the key range"):
            r.get(b"/elsewhere")
        with pytest.raises(ValueError, match="outside the key range"):
            r.list(b"/")
        with pytest.raises(ValueError, match="outside the key range"):
            r.watch(b"/t/")
        with pytest.raises(TypeError):
            r.get(12)  # type: ignore[arg-type]


def test_reader_cannot_be_pickled(cache: WriterProcess) -> None:
    with shmcache.Reader(cache.name) as r, pytest.raises(TypeError, match="pass the cache name"):
        pickle.dumps(r)


def test_reader_works_after_fork(cache: WriterProcess, etcd_client: Any,
                                 unique_prefix: bytes) -> None:
    """A Reader created before fork() answers in the child, including new writes."""
    r = shmcache.Reader(cache.name)
    assert r.get(unique_prefix + b"k00") is not None
    rev = put(etcd_client, unique_prefix + b"k00", b"after-fork")
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            ok = r.wait(rev, timeout=10) and r.get(unique_prefix + b"k00").value == b"after-fork"
            os.write(wfd, b"ok" if ok else b"bad")
        except BaseException as exc:  # report anything to the parent
            os.write(wfd, repr(exc).encode()[:200])
        finally:
            os._exit(0)
    os.close(wfd)
    answer = os.read(rfd, 300)
    os.waitpid(pid, 0)
    os.close(rfd)
    assert answer == b"ok"
    r.close()


def test_reads_are_exact_and_status_is_complete(cache: WriterProcess, etcd_client: Any,
                                               unique_prefix: bytes) -> None:
    with shmcache.Reader(cache.name) as r:
        res = r.list(unique_prefix, limit=5)
        assert [kv.key for kv in res.items] == [unique_prefix + b"k%02d" % i for i in range(5)]
        assert r.list(unique_prefix).items == etcd_range(etcd_client, unique_prefix, res.revision)
        assert r.list(unique_prefix + b"k1").items == etcd_range(etcd_client,
                                                                 unique_prefix + b"k1",
                                                                 res.revision)
        assert r.list(unique_prefix, limit=0).items == []
        st = r.status()
        assert st.writer_alive and st.writer_pid == cache.pid
        assert 0 <= st.heartbeat_age < 2
        assert st.key_count == 20 and st.prefix == unique_prefix
        assert st.ring_capacity == 256 * 1024 and st.epoch == 1
        assert st.revision >= st.snapshot_revision >= st.oldest_watchable_revision
        assert r.wait(r.revision + 10_000, timeout=0.2) is False


def test_watch_from_now_and_poll_timeout(cache: WriterProcess, etcd_client: Any,
                                         unique_prefix: bytes) -> None:
    with shmcache.Reader(cache.name) as r, r.watch(unique_prefix) as w:
        t0 = time.monotonic()
        assert w.poll(timeout=0.3) == []
        assert time.monotonic() - t0 >= 0.25  # (it waited; nothing but the timeout ends it)
        rev = put(etcd_client, unique_prefix + b"new", b"1")
        evs = w.poll(timeout=5)
        assert [(e.type, e.kv.key, e.revision) for e in evs] == [("PUT", unique_prefix + b"new",
                                                                  rev)]


def test_cli_reader_commands(cache: WriterProcess, unique_prefix: bytes) -> None:
    """status/get/list/watch/check/rm from the command line."""
    def run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "shmcache", *args], capture_output=True,
                              text=True, timeout=timeout)

    st = json.loads(run("status", cache.name, "--json").stdout)
    assert st["key_count"] == 20 and st["writer_alive"] is True
    table = run("status", cache.name).stdout
    assert "revision" in table and "alive" in table
    assert run("get", cache.name, (unique_prefix + b"k03").decode()).stdout == "value-3\n"
    missing = run("get", cache.name, (unique_prefix + b"nope").decode())
    assert missing.returncode == 1 and "not found" in missing.stderr
    listed = json.loads(run("list", cache.name, unique_prefix.decode(), "--json").stdout)
    assert len(listed["kvs"]) == 20 and base64.b64decode(listed["kvs"][0]["value"]) == b"value-0"
    # since 0 is older than the cache's history: an explicit CompactedError, exit 2, on its
    # own (no signal: one sent before the command is up would decide the exit code instead).
    watch = run("watch", cache.name, unique_prefix.decode(), "--since", "0", timeout=60)
    assert watch.returncode == 2 and "CompactedError" not in watch.stderr \
        and "no longer holds" in watch.stderr
    assert run("check", cache.name).returncode == 0
    bad = run("status", "no-such-cache-here")
    assert bad.returncode == 2 and "no shmcache named" in bad.stderr
    cache.terminate()
    rm = run("rm", cache.name)
    assert rm.returncode == 0 and ".ctl" in rm.stdout
    assert _shm.list_segments(cache.name) == []


# -- the C fast path of Reader.get ---------------------------------------------------------

def test_fast_get_answers_exactly_like_the_python_path(
        etcd_client: Any, writer: Any, sub_prefix: bytes, reader: shmcache.Reader) -> None:
    """get() through _speedups.reader_get gives what the Python path gives, for snapshot
    keys, keys changed after the snapshot (overlay), deleted and missing keys, str keys
    and keys outside the prefix; it steps aside when the writer publishes, when
    max_staleness is set and once the Reader is closed."""
    from shmcache.format import snapshot as snapshot_mod
    from shmcache.reader import reader as reader_mod
    from tests.helpers import delete, etcd_get

    if reader_mod._reader_get is None or not snapshot_mod.USE_SPEEDUPS:
        pytest.skip("shmcache.format._speedups was not built")
    assert snapshot_mod._speedups.CONTROL_SEQ_OFF == layout.C_SEQ
    p = sub_prefix
    for i in range(30):
        put(etcd_client, p + b"k%02d" % i, b"v%d" % i)
    put(etcd_client, p + b"k05", b"changed")
    rev = delete(etcd_client, p + b"k07")
    assert reader.wait(rev, timeout=10)
    reader.get(p + b"k00")  # refresh: the fast state now matches the published block
    assert reader._fast_state is not None
    probes = [p + b"k%02d" % i for i in range(32)] + [p, p + b"zz"]

    def python_path(key: bytes) -> Any:
        st, reader._fast_state = reader._fast_state, None
        try:
            return reader.get(key)
        finally:
            reader._fast_state = st

    for key in probes:
        want = etcd_get(etcd_client, key, rev)
        assert reader.get(key) == python_path(key) == want, key
    assert reader.get((p + b"k05").decode()).value == b"changed"
    # Outside the prefix: the same error either way.
    outside = b"/elsewhere/" + p
    with pytest.raises(ValueError) as fast_err:
        reader.get(outside)
    with pytest.raises(ValueError) as slow_err:
        python_path(outside)
    assert str(fast_err.value) == str(slow_err.value)
    # A publish moves SEQ: the fast path must not answer from the old view.
    rev2 = put(etcd_client, p + b"k05", b"again")
    assert reader.wait(rev2, timeout=10)
    assert reader.get(p + b"k05").value == b"again"
    reader.max_staleness = 3600
    assert reader._fast_state is None
    reader.max_staleness = None
    assert reader._fast_state is not None
    reader.close()
    assert reader._fast_state is None
    with pytest.raises(shmcache.ShmCacheError, match="closed"):
        reader.get(p + b"k00")
