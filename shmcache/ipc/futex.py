"""Cross-process broadcast wake-ups on a 32-bit shared-memory word via the Linux futex syscall."""

from __future__ import annotations

import ctypes
import errno
import math
import mmap
import operator
import os
import platform
from typing import Any

__all__ = ["Bell", "address_of", "wait", "wake_all"]

# Shared (non-private) ops on purpose.  The *_PRIVATE variants (op | 128) key the
# wait queue on (mm, virtual address), so they only match threads of one process.
# The shared ops key a MAP_SHARED file page on (inode, page offset), which is the
# same for every process that maps the tmpfs file backing the POSIX segment, at
# whatever address and with whatever protection it mapped it.
_FUTEX_WAIT = 0
_FUTEX_WAKE = 1
# For a word in this process's private memory (Bell): no page lookup, no shared key.
_PRIVATE = 128
_INT_MAX = 2**31 - 1

# Longest timeout handed to the kernel; anything above it (including +inf) is
# treated as "no timeout" rather than risking a time_t overflow.
_MAX_TIMEOUT = float(2**31 - 1)

# The futex word is a native-endian u32 in the kernel's eyes, while the writer
# stores it with struct '<I'; both supported architectures are little-endian
# (big-endian aarch64 reports "aarch64_be" and is rejected below).
_SYSCALL_NUMBERS = {
    "x86_64": 202,
    "amd64": 202,
    "aarch64": 98,
    "arm64": 98,
}


def _futex_syscall_number(system: str, machine: str, pointer_size: int) -> int:
    """Return SYS_futex for a platform, or raise OSError(ENOSYS) if it is unsupported."""
    if system != "Linux":
        raise OSError(errno.ENOSYS, f"shmcache futex wake-ups need Linux, not {system!r}")
    number = _SYSCALL_NUMBERS.get(machine.lower())
    # A 32-bit userland on a 64-bit kernel (i386/x32/arm32 compat) uses other
    # syscall numbers and a different struct timespec layout.
    if number is None or pointer_size != 8:
        raise OSError(
            errno.ENOSYS,
            f"shmcache futex wake-ups are unsupported on {machine!r} with "
            f"{pointer_size * 8}-bit pointers (supported: 64-bit x86_64, aarch64)",
        )
    return number


# Failing lazily on purpose: importing this module must not break the package on
# an unsupported platform; wait()/wake_all() raise the recorded error instead.
try:
    _SYS_FUTEX: int | None = _futex_syscall_number(
        platform.system(), platform.machine(), ctypes.sizeof(ctypes.c_void_p)
    )
    _UNSUPPORTED: OSError | None = None
except OSError as exc:
    _SYS_FUTEX = None
    _UNSUPPORTED = exc

_syscall: Any = None
if _SYS_FUTEX is not None:
    # Our own CDLL instance so that setting restype/argtypes here cannot clash
    # with other code using ctypes' shared module-level handles.  CDLL calls
    # release the GIL, so a blocked wait() does not stall other threads.
    _syscall = ctypes.CDLL(None, use_errno=True).syscall
    _syscall.restype = ctypes.c_long


class _Timespec(ctypes.Structure):
    # struct timespec on 64-bit Linux: time_t and long are both 64-bit.
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _PyBuffer(ctypes.Structure):
    # Mirrors CPython's Py_buffer (Include/pybuffer.h), stable across 3.x.
    _fields_ = [
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.c_void_p),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.POINTER(ctypes.c_ssize_t)),
        ("strides", ctypes.POINTER(ctypes.c_ssize_t)),
        ("suboffsets", ctypes.POINTER(ctypes.c_ssize_t)),
        ("internal", ctypes.c_void_p),
    ]


_PyBUF_SIMPLE = 0

# Indexing (rather than attribute access) returns fresh function objects, so our
# argtypes do not leak into ctypes.pythonapi's cached attributes.  pythonapi is
# a PyDLL: the GIL stays held and a set Python error is raised after the call.
_PyObject_GetBuffer = ctypes.pythonapi["PyObject_GetBuffer"]
_PyObject_GetBuffer.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
_PyObject_GetBuffer.restype = ctypes.c_int
_PyBuffer_Release = ctypes.pythonapi["PyBuffer_Release"]
_PyBuffer_Release.argtypes = [ctypes.POINTER(_PyBuffer)]
_PyBuffer_Release.restype = None


def address_of(buf: mmap.mmap, offset: int) -> int:
    """Return the virtual address of byte ``offset`` of ``buf`` (read-only mmaps included).

    ``offset`` must leave room for a 32-bit word inside the buffer and the word
    must be 4-byte aligned (the kernel rejects unaligned futex words with
    EINVAL); otherwise ValueError is raised.

    The address is a raw pointer into the mapping: it is valid only while the
    mmap stays open (and is not resized).  Using it after ``buf.close()`` makes
    wait()/wake_all() fail with EFAULT at best, or act on whatever got mapped
    there since.  The buffer export taken here is released before returning, so
    it does not keep ``buf`` from being closed.
    """
    offset = operator.index(offset)
    view = _PyBuffer()
    # ctypes.c_char.from_buffer() insists on a writable buffer; the raw buffer
    # protocol with PyBUF_SIMPLE accepts read-only mappings too.
    _PyObject_GetBuffer(buf, ctypes.byref(view), _PyBUF_SIMPLE)
    try:
        base = view.buf or 0
        length = view.len
    finally:
        _PyBuffer_Release(ctypes.byref(view))
    if offset < 0 or offset + 4 > length:
        raise ValueError(
            f"futex word at offset {offset} does not fit in a {length}-byte buffer"
        )
    address = base + offset
    if address % 4:
        raise ValueError(f"futex word at offset {offset} is not 4-byte aligned")
    return address


def _check_supported() -> int:
    if _SYS_FUTEX is None:
        assert _UNSUPPORTED is not None
        raise OSError(_UNSUPPORTED.errno, _UNSUPPORTED.strerror)
    return _SYS_FUTEX


def wait(addr: int, expected: int, timeout: float | None, private: bool = False) -> bool:
    """Block until the u32 at ``addr`` may differ from ``expected``, a wake arrives, or timeout.

    Returns True when woken, when the word already differed from ``expected``
    on entry (EAGAIN; the kernel compares atomically with queueing, so a
    publish+wake_all() that happens after the caller read the word is never
    lost), or when interrupted by a signal (EINTR).  Returns False when
    ``timeout`` seconds elapsed with the word still equal to ``expected``.

    True is only a hint: wake-ups can be spurious and another publish may
    follow, so callers must re-read the word and loop, recomputing the time
    left against their own deadline.  ``expected`` is taken modulo 2**32.

    ``timeout`` None waits forever.  Waiters should always pass a finite
    timeout anyway, so that a missed wake (a writer that died between bumping
    the word and waking, or a segment that was replaced under the reader)
    cannot hang them; a timeout <= 0 only checks the word.

    ``addr`` must come from address_of() on a mapping that is still open.  It
    works on a PROT_READ mapping: for FUTEX_WAIT the kernel first tries a
    writable page lookup and, on EFAULT, falls back to a read-only one (it only
    needs to read the word), and the shared key is the same as the writer's.
    The GIL is released while blocked. ``private``: ``addr`` is in this process's
    own memory (a Bell), never shared with another process.
    """
    sys_futex = _check_supported()
    if timeout is not None and math.isnan(timeout):
        raise ValueError("timeout must not be NaN")
    if timeout is None or timeout > _MAX_TIMEOUT:
        ts_ptr = None
    else:
        # FUTEX_WAIT takes a *relative* timeout (measured on CLOCK_MONOTONIC).
        nanos = int(timeout * 1e9) if timeout > 0 else 0
        ts = _Timespec(nanos // 1_000_000_000, nanos % 1_000_000_000)
        ts_ptr = ctypes.byref(ts)
    # syscall() is variadic: pass every argument with an explicit C type so
    # that 64-bit values are not truncated to int.
    rc = _syscall(
        ctypes.c_long(sys_futex),
        ctypes.c_void_p(addr),
        ctypes.c_long(_FUTEX_WAIT | (_PRIVATE if private else 0)),
        ctypes.c_long(expected & 0xFFFFFFFF),
        ts_ptr,
        ctypes.c_void_p(None),
        ctypes.c_long(0),
    )
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err == errno.ETIMEDOUT:
        return False
    if err in (errno.EAGAIN, errno.EINTR):
        return True
    raise OSError(err, f"futex wait at 0x{addr:x}: {os.strerror(err)}")


def wake_all(addr: int, private: bool = False) -> int:
    """Wake every process blocked in wait() on the word at ``addr``; return how many woke.

    One FUTEX_WAKE syscall regardless of the number of waiters.  Call it after
    the new word value is stored (control_writer._store: one 8-byte copy into the shared mapping), so a
    waiter that enters wait() later sees the new value and returns at once
    (EAGAIN), while a waiter already queued is woken here.  Safe to call with
    no waiters (returns 0).  Meant for the single writer; ``addr`` must come
    from address_of() on a mapping that is still open.
    """
    sys_futex = _check_supported()
    rc = _syscall(
        ctypes.c_long(sys_futex),
        ctypes.c_void_p(addr),
        ctypes.c_long(_FUTEX_WAKE | (_PRIVATE if private else 0)),
        ctypes.c_long(_INT_MAX),
        ctypes.c_void_p(None),
        ctypes.c_void_p(None),
        ctypes.c_long(0),
    )
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"futex wake at 0x{addr:x}: {os.strerror(err)}")
    return int(rc)


class Bell:
    """A wake-up one thread waits on and any thread, or a signal handler, rings, taking no lock.

    ``threading.Event.set`` takes the event's lock: called from a signal handler
    that interrupted a thread inside that same event's ``wait`` or ``clear``, it
    would deadlock. A Bell is a counter in private memory and a FUTEX_WAKE.

    Concurrency contract: one thread at a time waits (``clear`` then ``wait``);
    ``ring`` may be called from anywhere. A ring after the last ``clear`` makes
    ``wait`` return at once (as ``Event.set`` after ``clear``). Two rings racing
    with each other may count once, which still wakes the waiter.
    """

    __slots__ = ("_word", "_addr", "_seen", "_waiting")

    def __init__(self) -> None:
        self._word = ctypes.c_uint32(0)
        self._addr = ctypes.addressof(self._word)
        self._seen = 0
        self._waiting = False

    def ring(self) -> None:
        self._word.value = (self._word.value + 1) & 0xFFFFFFFF
        # Stored first, read second: a waiter that sets _waiting after this read
        # finds the word changed when the kernel compares it, and returns.
        if self._waiting:
            wake_all(self._addr, private=True)

    def clear(self) -> None:
        self._seen = self._word.value

    def is_set(self) -> bool:
        """Rung since the last ``clear``."""
        return bool(self._word.value != self._seen)

    def wait(self, timeout: float | None) -> None:
        """Until rung since the last ``clear`` (returns at once if it was), or ``timeout``."""
        self._waiting = True
        try:
            wait(self._addr, self._seen, timeout, private=True)
        finally:
            self._waiting = False
