"""Tests for shmcache.ipc.futex with real processes sharing a POSIX shared memory segment."""

from __future__ import annotations

import ctypes
import errno
import mmap
import multiprocessing
import os
import resource
import secrets
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import posix_ipc
import pytest

from shmcache.ipc import futex as _futex

SEG_SIZE = mmap.PAGESIZE
WORD_OFF = 64  # not at the start of the page, so the offset arithmetic matters
N_READERS = 4
SPAWN = multiprocessing.get_context("spawn")


# ----------------------------------------------------------------------------
# helpers (module level so spawn children can import them)


def _open_readonly(name: str) -> tuple[posix_ipc.SharedMemory, mmap.mmap]:
    shm = posix_ipc.SharedMemory(name, read_only=True)
    try:
        mm = mmap.mmap(shm.fd, SEG_SIZE, prot=mmap.PROT_READ)
    finally:
        shm.close_fd()
    return shm, mm


def _read_word(mm: mmap.mmap) -> int:
    value: int = struct.unpack_from("<I", mm, WORD_OFF)[0]
    return value


def _reader_main(name: str, timeout: float, ready: multiprocessing.Queue[object],
                 results: multiprocessing.Queue[object]) -> None:
    """Wait once on a read-only mapping and report (pid, woke, wake time, new value)."""
    _, mm = _open_readonly(name)
    try:
        addr = _futex.address_of(mm, WORD_OFF)
        expected = _read_word(mm)
        ready.put((os.getpid(), addr, expected))
        woke = _futex.wait(addr, expected, timeout)
        t_wake = time.monotonic()  # CLOCK_MONOTONIC is system-wide on Linux
        results.put((os.getpid(), woke, t_wake, _read_word(mm)))
    finally:
        mm.close()


def _idle_main(name: str, timeout: float, results: multiprocessing.Queue[object]) -> None:
    """Wait with an unchanged value and report (result, wall time, cpu time) of the wait."""
    _, mm = _open_readonly(name)
    try:
        addr = _futex.address_of(mm, WORD_OFF)
        expected = _read_word(mm)
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.monotonic()
        woke = _futex.wait(addr, expected, timeout)
        elapsed = time.monotonic() - t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
        results.put((woke, elapsed, cpu))
    finally:
        mm.close()


def _blocked_in_futex_wait(pid: int, addr: int) -> bool | None:
    """Whether a thread of ``pid`` sits in FUTEX_WAIT on ``addr`` (None: can't tell)."""
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return None
    for task in tasks:
        try:
            fields = (task / "syscall").read_text().split()
        except OSError:
            return None
        if (len(fields) >= 3 and fields[0] == str(_futex._SYS_FUTEX)
                and int(fields[1], 16) == addr and int(fields[2], 16) == _futex._FUTEX_WAIT):
            return True
    return False


def _reap(procs: list[multiprocessing.process.BaseProcess]) -> None:
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join()


# ----------------------------------------------------------------------------
# fixtures


@pytest.fixture
def segment() -> Iterator[tuple[str, mmap.mmap]]:
    """A fresh segment mapped read-write by the test (the writer), unlinked afterwards."""
    name = f"/shmcache.t-futex-{secrets.token_hex(6)}"
    shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, size=SEG_SIZE)
    try:
        mm = mmap.mmap(shm.fd, SEG_SIZE)
        shm.close_fd()
        try:
            struct.pack_into("<I", mm, WORD_OFF, 41)
            yield name, mm
        finally:
            mm.close()
    finally:
        shm.unlink()
    assert not os.path.exists(f"/dev/shm/{name.lstrip('/')}")


# ----------------------------------------------------------------------------
# tests


def test_wake_all_wakes_every_readonly_reader(segment: tuple[str, mmap.mmap]) -> None:
    name, mm = segment
    addr = _futex.address_of(mm, WORD_OFF)
    ready: multiprocessing.Queue[object] = SPAWN.Queue()
    results: multiprocessing.Queue[object] = SPAWN.Queue()
    procs = [SPAWN.Process(target=_reader_main, args=(name, 10.0, ready, results))
             for _ in range(N_READERS)]
    for p in procs:
        p.start()
    try:
        infos = [ready.get(timeout=30) for _ in procs]
        assert all(expected == 41 for _, _, expected in infos)

        # Make sure every reader is really queued in the kernel before waking,
        # otherwise it would just see the new value (EAGAIN) and we would not be
        # testing the wake-up.  /proc/<pid>/task/*/syscall shows the blocking call.
        deadline = time.monotonic() + 10
        verified = True
        pending = {pid: raddr for pid, raddr, _ in infos}
        while pending and time.monotonic() < deadline:
            for pid, raddr in list(pending.items()):
                state = _blocked_in_futex_wait(pid, raddr)
                if state is None:
                    verified = False
                    pending.pop(pid)
                elif state:
                    pending.pop(pid)
            time.sleep(0.005)
        assert not pending, f"readers never blocked in FUTEX_WAIT: {sorted(pending)}"
        if not verified:  # /proc/<pid>/syscall unavailable: give them time instead
            time.sleep(0.5)

        struct.pack_into("<I", mm, WORD_OFF, 42)
        t0 = time.monotonic()
        woken = _futex.wake_all(addr)  # one syscall for all waiters
        t_call = time.monotonic() - t0

        got = [results.get(timeout=5) for _ in procs]
    finally:
        _reap(procs)

    assert woken == N_READERS
    assert all(p.exitcode == 0 for p in procs)
    latencies = sorted(t_wake - t0 for _, _, t_wake, _ in got)
    assert all(woke for _, woke, _, _ in got)
    assert all(value == 42 for _, _, _, value in got)
    # (Woken by the call, not by their 10 s timeout: woke is True and the kernel counted them.)
    print(f"\nfutex wake_all: {woken} readers woken by one call ({t_call * 1e6:.0f} us); "
          f"wake latency min {latencies[0] * 1e3:.3f} ms, max {latencies[-1] * 1e3:.3f} ms")


def test_wait_times_out_when_value_unchanged(segment: tuple[str, mmap.mmap]) -> None:
    name, _ = segment
    _, ro = _open_readonly(name)
    try:
        addr = _futex.address_of(ro, WORD_OFF)
        for timeout in (0.05, 0.3):
            t0 = time.monotonic()
            assert _futex.wait(addr, _read_word(ro), timeout) is False
            elapsed = time.monotonic() - t0
            assert elapsed >= 0.9 * timeout, elapsed
            assert elapsed < timeout + 30, elapsed  # the timeout ends it (no tight bound)
        t0 = time.monotonic()
        assert _futex.wait(addr, _read_word(ro), 0) is False  # zero: just a check
        assert _futex.wait(addr, _read_word(ro), -1.0) is False
        assert time.monotonic() - t0 < 30  # (no sleep: nothing would end one but a timeout)
    finally:
        ro.close()


def test_wait_with_stale_expected_returns_immediately(segment: tuple[str, mmap.mmap]) -> None:
    name, mm = segment
    _, ro = _open_readonly(name)
    try:
        addr = _futex.address_of(ro, WORD_OFF)
        stale = _read_word(ro)
        struct.pack_into("<I", mm, WORD_OFF, stale + 1)
        for timeout in (60.0, None):
            # True is EAGAIN (the word differs), not the timeout (False); None would hang.
            assert _futex.wait(addr, stale, timeout) is True
        # expected is compared as a u32.
        struct.pack_into("<I", mm, WORD_OFF, 0xFFFFFFFF)
        assert _futex.wait(addr, -1, 0.05) is False
    finally:
        ro.close()


def test_idle_waiter_uses_no_cpu(segment: tuple[str, mmap.mmap]) -> None:
    name, _ = segment
    results: multiprocessing.Queue[object] = SPAWN.Queue()
    proc = SPAWN.Process(target=_idle_main, args=(name, 1.0, results))
    proc.start()
    try:
        woke, elapsed, cpu = results.get(timeout=30)
    finally:
        _reap([proc])
    assert proc.exitcode == 0
    assert woke is False
    assert elapsed >= 0.9
    assert cpu < 0.05, f"idle waiter burned {cpu:.3f} s of CPU in {elapsed:.2f} s"


def test_address_of_readonly_and_readwrite(segment: tuple[str, mmap.mmap]) -> None:
    name, mm = segment
    _, ro = _open_readonly(name)
    try:
        rw_addr = _futex.address_of(mm, WORD_OFF)
        ro_addr = _futex.address_of(ro, WORD_OFF)
        assert rw_addr % 4 == 0 and ro_addr % 4 == 0
        # Both addresses point at the same word through different mappings.
        struct.pack_into("<I", mm, WORD_OFF, 0xDEADBEEF)
        assert ctypes.c_uint32.from_address(rw_addr).value == 0xDEADBEEF
        assert ctypes.c_uint32.from_address(ro_addr).value == 0xDEADBEEF
        assert _futex.address_of(ro, 0) == ro_addr - WORD_OFF
        assert _futex.address_of(ro, SEG_SIZE - 4) == ro_addr - WORD_OFF + SEG_SIZE - 4
        assert _futex.wake_all(rw_addr) == 0  # no waiters: fine
    finally:
        ro.close()  # address_of must not leave a buffer export behind
    with pytest.raises(ValueError):
        _futex.address_of(ro, 0)  # closed mapping


@pytest.mark.parametrize("offset", [1, 2, 3, WORD_OFF + 2, -4, -1, SEG_SIZE - 2, SEG_SIZE,
                                    SEG_SIZE + 4, 2**40])
def test_address_of_rejects_bad_offsets(segment: tuple[str, mmap.mmap], offset: int) -> None:
    name, mm = segment
    _, ro = _open_readonly(name)
    try:
        for buf in (mm, ro):
            with pytest.raises(ValueError):
                _futex.address_of(buf, offset)
    finally:
        ro.close()


def test_bad_address_raises_oserror() -> None:
    with pytest.raises(OSError) as info:
        _futex.wait(0, 0, 0.01)
    assert info.value.errno == errno.EFAULT
    with pytest.raises(OSError) as info:
        _futex.wait(4096 + 2, 0, 0.01)  # unaligned
    assert info.value.errno in (errno.EINVAL, errno.EFAULT)


def test_unsupported_platforms_are_rejected() -> None:
    assert _futex._futex_syscall_number("Linux", "x86_64", 8) == 202
    assert _futex._futex_syscall_number("Linux", "aarch64", 8) == 98
    for system, machine, ptr in [("Darwin", "arm64", 8), ("Linux", "riscv64", 8),
                                 ("Linux", "x86_64", 4), ("Windows", "AMD64", 8)]:
        with pytest.raises(OSError) as info:
            _futex._futex_syscall_number(system, machine, ptr)
        assert info.value.errno == errno.ENOSYS
