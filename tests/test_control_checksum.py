"""The control block cannot lie: its checksum is checked by readers, ``shmcache check`` and the
writer's restore, and damage is reported as the control segment's.

Writers are real processes against a real etcd; the damage is done by hand to the real
segment in /dev/shm while no writer runs (a running writer would republish over it).
"""

from __future__ import annotations

import mmap
import os
import struct
import subprocess
import sys
from typing import Any

import pytest

import shmcache
from shmcache.errors import CorruptSegmentError
from shmcache.format import control, layout
from shmcache.ipc import shm as _shm
from shmcache.writer import control_writer
from tests.etcdserver import EtcdServer
from tests.helpers import WriterProcess, etcd_current_revision, etcd_range, put, wait_rev

_Q = struct.Struct("<Q")
_REVISION = layout.C_BLOCK + 8 * layout.B_REVISION
_KEY_COUNT = layout.C_BLOCK + 8 * layout.B_KEY_COUNT


def _stopped_writer_cache(name: str, endpoint: str, prefix: bytes, client: Any) -> WriterProcess:
    """A cache with 10 keys whose writer has stopped cleanly (its segments stay)."""
    for i in range(10):
        put(client, prefix + b"k%d" % i, b"v%d" % i)
    w = WriterProcess(name, endpoint, prefix).start()
    with shmcache.Reader(name) as r:
        wait_rev(r, etcd_current_revision(client))
    assert w.terminate() == 0
    return w


def _poke(name: str, offset: int, data: bytes) -> None:
    """Write ``data`` at ``offset`` of cache ``name``'s control segment, as a stray process would."""
    opened = _shm.open_writable(layout.control_name(name))
    assert opened is not None
    seg, fd = opened
    try:
        seg.buf[offset:offset + len(data)] = data
    finally:
        seg.close()
        os.close(fd)


def _word(name: str, offset: int) -> int:
    seg = _shm.open_readonly(layout.control_name(name))
    assert seg is not None
    try:
        v: int = _Q.unpack_from(seg.buf, offset)[0]
        return v
    finally:
        seg.close()


def test_revision_raised_while_the_writer_is_stopped_makes_it_relist(
        etcd_session: EtcdServer, etcd_client: Any, cache_name: str,
        unique_prefix: bytes) -> None:
    """REVISION raised by hand past 5 events the writer never published: the restarted
    writer finds the block failing its checksum and relists (it used to resume after
    them, 5 keys differing from etcd, and ``check`` said OK)."""
    p = unique_prefix
    w = _stopped_writer_cache(cache_name, etcd_session.endpoint, p, etcd_client)
    try:
        revs = [put(etcd_client, p + b"missed%d" % i, b"x") for i in range(5)]
        _poke(cache_name, _REVISION, _Q.pack(revs[-1]))
        epoch = _word(cache_name, layout.C_BLOCK + 8 * layout.B_EPOCH)
        w.start()
        with shmcache.Reader(cache_name) as r:
            wait_rev(r, etcd_current_revision(etcd_client))
            assert list(r.list(p)) == etcd_range(etcd_client, p)
            assert r.status().epoch == epoch + 1
        assert "fails its checksum" in w.log()
    finally:
        w.close()


@pytest.mark.parametrize("where", ["block", "prefix"])
def test_a_flipped_byte_in_the_block_or_prefix_is_corrupt_control_segment(
        where: str, etcd_session: EtcdServer, etcd_client: Any, cache_name: str,
        unique_prefix: bytes) -> None:
    """One flipped bit in KEY_COUNT (which no bounds check sees) or in the prefix: a new
    Reader raises CorruptSegmentError naming the control segment (a flipped prefix used to
    raise ValueError "outside the key range", a flipped count was served), and
    ``shmcache check`` reports it (exit 1)."""
    p = unique_prefix
    w = _stopped_writer_cache(cache_name, etcd_session.endpoint, p, etcd_client)
    try:
        offset = _KEY_COUNT if where == "block" else layout.C_PREFIX + 1
        seg = _shm.open_readonly(layout.control_name(cache_name))
        assert seg is not None
        byte = seg.buf[offset]
        seg.close()
        _poke(cache_name, offset, bytes([byte ^ 0x04]))
        cname = layout.control_name(cache_name)
        with pytest.raises(CorruptSegmentError, match="fails its checksum") as err:
            with shmcache.Reader(cache_name) as r:
                r.get(p + b"k1")
        assert err.value.segment == cname
        out = subprocess.run([sys.executable, "-m", "shmcache", "check", cache_name],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 1, out.stdout + out.stderr
        assert f"VIOLATION: {cname}: the published block" in out.stdout
        assert "Traceback" not in out.stderr
    finally:
        w.close()


def test_check_shows_the_cluster_id(etcd_session: EtcdServer, etcd_client: Any,
                                    cache_name: str, unique_prefix: bytes) -> None:
    """An intact cache: ``check`` says the checksum holds and which etcd cluster it is from,
    and Status.cluster_id is that cluster."""
    w = _stopped_writer_cache(cache_name, etcd_session.endpoint, unique_prefix, etcd_client)
    try:
        with shmcache.Reader(cache_name) as r:
            cid = r.status().cluster_id
        from etcd3.etcdrpc import rpc_pb2
        header = etcd_client.maintenancestub.Status(rpc_pb2.StatusRequest(), 10,
                                                    metadata=etcd_client.metadata).header
        assert cid == header.cluster_id != 0
        out = subprocess.run([sys.executable, "-m", "shmcache", "check", cache_name],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
        assert f"checksum ok, etcd cluster {cid:x}" in out.stdout
    finally:
        w.close()


# -- read_block on its own (pure logic: a buffer, no writer) ------------------------------

def _published() -> mmap.mmap:
    m = mmap.mmap(-1, layout.CONTROL_SIZE)
    control_writer.ControlWriter.initialise(m, b"/app/")
    cw = control_writer.ControlWriter(m)
    cw.set_cluster_id(0xABC)
    cw.publish({layout.B_EPOCH: 1, layout.B_REVISION: 7}, prefix=b"/app/")
    return m


class _TornOnce(bytearray):
    """A control segment whose first copy of the block comes back torn (as a CPU that
    reorders loads could make it), and intact after."""

    torn = 0

    def __getitem__(self, key: Any) -> Any:
        data = super().__getitem__(key)
        if isinstance(key, slice) and key.start == layout.C_BLOCK and not self.torn:
            self.torn += 1
            return data[:8] + bytes([data[8] ^ 1]) + data[9:]
        return data


def test_a_torn_copy_is_read_again_and_damage_is_an_error() -> None:
    m = _published()
    try:
        b = control.read_block(m)
        assert b is not None and (b.revision, b.cluster_id) == (7, 0xABC)
        torn = _TornOnce(m[:])
        assert control.read_block(torn) == b  # the second copy passes
        assert torn.torn == 1
        m[layout.C_CLUSTER_ID] ^= 1  # the cluster id is covered too
        with pytest.raises(CorruptSegmentError, match="fails its checksum") as err:
            control.read_block(m, name="/shmcache.x.ctl")
        assert err.value.segment == "/shmcache.x.ctl"
    finally:
        m.close()


def test_a_writer_rewrites_a_damaged_block_with_a_valid_checksum() -> None:
    """A new ControlWriter over a damaged block publishes a block readers accept again
    (the writer's restore relists before it does; this is what its publish stores)."""
    m = _published()
    try:
        m[_KEY_COUNT] ^= 1
        with pytest.raises(CorruptSegmentError):
            control.read_block(m)
        cw = control_writer.ControlWriter(m)
        cw.publish({layout.B_KEY_COUNT: 0})
        b = control.read_block(m)
        assert b is not None and b.key_count == 0 and b.cluster_id == 0xABC
    finally:
        m.close()
