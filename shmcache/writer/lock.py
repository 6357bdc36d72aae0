"""The writer lock: a mode-600 lock file next to the segments, flock'ed by the running writer.

Only the writer's user (and root) can open the file, so no reader can hold the
lock and keep writers out, as one could when the lock was the control segment's
own flock (every reader can open that segment). Who holds it is read from
/proc/locks, so ``shmcache status`` never takes it; ``shmcache rm`` takes it
while it removes the cache (``remove_cache``).

Concurrency contract: ``lock_writer`` once per writer, its descriptor held for the
writer's life; everything else may run in any process at any time.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from ..errors import CacheExistsError, WriterRunningError
from ..format import control, layout
from ..ipc import control_reader
from ..ipc import shm as _shm
from ..ipc.shm import SHM_DIR, not_a_segment, not_owner, open_entry, validate_name


@dataclass(frozen=True)
class WriterLock:
    """Who holds a cache's writer lock (the flock on its lock file), for messages.

    ``holders`` are the pids found holding it (from /proc/locks, or the processes that
    have the file open when the pid there is gone: a child that inherited the lock);
    0 stands for a holder this process cannot see (another PID namespace).
    ``writer_pid`` is the writer recorded in the control segment (0: none),
    ``writer_alive`` whether it runs and ``liveness`` how that was judged
    (``control_reader.writer_liveness``: by "heartbeat", the pid is another namespace's).
    """

    holders: tuple[int, ...]
    writer_pid: int
    writer_alive: bool
    liveness: str

    @property
    def stuck(self) -> bool:
        """Held, but not by the live recorded writer: no writer can start while it lasts."""
        if not self.holders or not self.writer_alive:
            return bool(self.holders)
        return not (self.liveness == "heartbeat" or self.writer_pid in self.holders
                    or 0 in self.holders)

    def describe(self, cache_name: str) -> str:
        """One line for rm and a refused writer: a live writer or a stuck lock."""
        if not self.stuck:
            return f"cache {cache_name!r} has a running writer (pid {self.writer_pid})"
        return (f"cache {cache_name!r}'s writer lock {SHM_DIR}{layout.lock_name(cache_name)} "
                f"is {self.holder_text()}")

    def holder_text(self) -> str:
        """``held by pid 12 (...), not by its recorded writer (...): a stuck lock ...``."""
        who = ", ".join(process_text(p) for p in self.holders)
        if self.writer_pid == 0:
            writer = "none"
        else:
            writer = f"pid {self.writer_pid}, {'alive' if self.writer_alive else 'not running'}"
        return (f"held by {who}, not by its recorded writer ({writer}): a stuck lock, "
                f"unless a writer is starting")


STUCK_LOCK_HINT = ("Stop the process that holds it (a child the writer forked keeps it), "
                   "then start the writer; `shmcache rm --force` removes the cache anyway")


def process_text(pid: int) -> str:
    """``pid 123 (python3 -m shmcache serve ...)``, or what pid 0 (not visible) stands for."""
    if pid <= 0:
        return "a process this one cannot see (another PID namespace?)"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read(4096)
    except OSError:
        raw = b""
    # One line, whatever the arguments hold (NULs between them, newlines in a -c script).
    cmd = " ".join(raw.replace(b"\0", b" ").decode(errors="replace").split())
    if len(cmd) > 80:
        cmd = cmd[:77] + "..."
    return f"pid {pid} ({cmd})" if cmd else f"pid {pid}"


def writer_lock(cache_name: str) -> WriterLock | None:
    """Who holds cache ``cache_name``'s writer lock now, without taking it; None if nobody
    does (or there is no lock file: a cache of an earlier version, see ``lock_writer``).

    Read from /proc/locks, so asking never keeps a starting writer out. The lock file
    is mode 600: only its owner (the writer's user) and root can open and lock it.
    """
    try:
        st = os.lstat(SHM_DIR + layout.lock_name(validate_name(cache_name)))
    except OSError:
        return None
    holders = _flock_holders(st)
    return None if not holders else WriterLock(holders, *recorded_writer(cache_name))


def stuck_lock_text(cache_name: str) -> str | None:
    """For ``shmcache status``: who holds a stuck writer lock (``WriterLock.holder_text``),
    None when the lock is free or held by the live writer."""
    lock = writer_lock(cache_name)
    return lock.holder_text() if lock is not None and lock.stuck else None


def lock_writer(cache_name: str) -> int:
    """Take cache ``cache_name``'s writer lock for a writer; returns the descriptor that holds
    it (closing it releases the lock; the kernel drops it when the process dies).

    The lock file (``layout.lock_name``, next to the segments) is created mode 600 and
    opened without following links, so no reader, and no other user, can open it, let
    alone lock it: a reader that flocks the segments it can read keeps no writer out.
    A file there that is not this user's regular file raises SegmentPermissionError;
    a lock held by another process raises CacheExistsError (a live writer, or a stuck
    lock, as ``WriterLock.describe`` says).
    """
    fd = _lock_file(cache_name)
    assert fd is not None  # (a writer's open raises instead)
    if not _flock(fd):
        held = _holder(cache_name)
        raise CacheExistsError(held.describe(cache_name).replace(
            "has a running writer", "already has a running writer"),
            hint=STUCK_LOCK_HINT if held.stuck else None)
    return fd


def _flock(fd: int) -> bool:
    """Take an exclusive flock on ``fd`` without waiting; False (``fd`` closed) if held."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        os.close(fd)
        return False


def _holder(cache_name: str) -> WriterLock:
    """Who holds the lock that was just found held (a holder that let go since: unknown)."""
    return writer_lock(cache_name) or WriterLock((0,), *recorded_writer(cache_name))


def _lock_file(cache_name: str, *, writer: bool = True) -> int | None:
    """Open (creating it if missing) the lock file; for a ``writer`` it must be this
    process's own regular file (else SegmentPermissionError). For ``remove_cache``
    (``writer`` False) any owner's file will do and a link or other entry gives None:
    ``remove_cache`` unlinks it last, and no writer starts while it is there.

    ``remove_cache`` unlinks the file while it holds the lock, so a descriptor opened
    before could lock an inode nobody else will ever open again: hence the check,
    once opened, that the name still leads to it, and the retry.
    """
    name = layout.lock_name(cache_name)
    path = SHM_DIR + name
    for _ in range(100):
        try:
            fd = _open_lock_file(path)
        except OSError as exc:
            if exc.errno == errno.ELOOP and not writer:
                return None
            if exc.errno == errno.ELOOP:
                raise not_a_segment(name) from None
            if exc.errno != errno.EACCES:
                raise
            try:  # someone else's file (also for root with fs.protected_regular)
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            raise not_owner(name, st) from None
        if fd is None:
            continue  # created and removed by someone else meanwhile
        st = os.fstat(fd)
        problem = None
        if not stat.S_ISREG(st.st_mode):
            problem = not_a_segment(name)
        elif writer and st.st_uid != os.geteuid():
            problem = not_owner(name, st)
        if problem is not None:
            os.close(fd)
            if writer:
                raise problem
            return None
        if writer and stat.S_IMODE(st.st_mode) != 0o600:
            os.fchmod(fd, 0o600)
        if _same_entry(path, st):
            return fd
        os.close(fd)  # unlinked (by `shmcache rm`) since it was opened: open the new one
    raise OSError(errno.EAGAIN, f"{path} keeps being replaced")


def _open_lock_file(path: str) -> int | None:
    """Open an existing lock file, else create it mode 600; None if it appeared and went."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        return os.open(path, flags)
    except FileNotFoundError:
        pass
    try:
        return os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return None


def _same_entry(path: str, st: os.stat_result) -> bool:
    try:
        now = os.lstat(path)
    except OSError:
        return False
    return (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)


def _flock_holders(st: os.stat_result) -> tuple[int, ...]:
    """The processes holding a flock on the file ``st`` describes (see ``WriterLock``)."""
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids = []
    try:
        with open("/proc/locks") as f:
            for line in f:
                # "1: FLOCK  ADVISORY  WRITE 1234 00:1a:5678 0 EOF"; waiters have "->".
                parts = line.split()
                if len(parts) > 5 and parts[1] == "FLOCK" and parts[5] == key:
                    pids.append(int(parts[4]))
    except (OSError, ValueError):
        return ()
    if not pids:
        return ()
    # /proc/locks names the process that took the lock; it may have exited while a
    # child it forked keeps the lock (pid 0 or a dead pid): look for who has the file open.
    live = tuple(p for p in pids if p > 0 and os.path.exists(f"/proc/{p}"))
    return live or tuple(_openers(st)) or (0,)


def _openers(st: os.stat_result) -> Iterator[int]:
    """Pids of the processes (that this one may inspect) with the file ``st`` open."""
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        fd_dir = f"/proc/{entry}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                fst = os.stat(f"{fd_dir}/{fd}")
            except OSError:
                continue
            if (fst.st_dev, fst.st_ino) == (st.st_dev, st.st_ino):
                yield int(entry)
                break


def recorded_writer(cache_name: str) -> tuple[int, bool, str]:
    """(pid recorded as the writer in the control segment, whether it runs, how that was
    judged: ``control_reader.writer_liveness``); (0, False, "pid") without a control segment."""
    try:
        fd = open_entry(layout.control_name(cache_name), os.O_RDONLY)
    except OSError:
        return 0, False, "pid"
    if fd is None:
        return 0, False, "pid"
    try:
        return _writer_of(fd)
    finally:
        os.close(fd)


def _writer_of(ctl_fd: int) -> tuple[int, bool, str]:
    try:
        head = os.pread(ctl_fd, layout.C_WRITER_PIDNS + 8, 0)
    except OSError:
        return 0, False, "pid"
    if len(head) < layout.C_WRITER_PIDNS + 8:
        return 0, False, "pid"
    return (control.writer_identity(head)[0], *control_reader.writer_liveness(head))


def lock_control(ctl_fd: int) -> int | None:
    """Take the flock on the control segment (``ctl_fd``) that writers of earlier shmcache
    versions took as their lock, and keep it if free, so their tools see this process;
    if it is held, the pid of the earlier writer holding it, if that writer is alive.

    Any reader can open and lock the control segment, so a lock there counts only
    when the writer recorded beside it is alive (a reader's lock is ignored: None).
    """
    try:
        fcntl.flock(ctl_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        pass
    pid, alive, _how = _writer_of(ctl_fd)
    return pid if alive else None


def lock_for_removal(cache_name: str) -> int | None:
    """The writer lock, taken for ``remove_cache`` (with the control segment's, see
    ``lock_control``); WriterRunningError while a writer of this version or an earlier
    one holds the cache, or a process that is not its writer holds the lock. None when
    the lock file's name holds something else (a planted link: nothing to lock)."""
    fd = _lock_file(cache_name, writer=False)
    if fd is not None and not _flock(fd):
        held = _holder(cache_name)
        raise WriterRunningError(
            held.describe(cache_name), pid=held.holders[0] if held.stuck else held.writer_pid,
            hint=STUCK_LOCK_HINT if held.stuck else None)
    try:
        ctl = open_entry(layout.control_name(cache_name), os.O_RDONLY)
    except OSError:  # a link or other non-segment at the name: removed all the same
        ctl = None
    if ctl is not None:
        try:
            pid = lock_control(ctl)
        finally:
            os.close(ctl)  # writers of this version wait on the lock file
        if pid is not None:
            if fd is not None:
                os.close(fd)
            raise WriterRunningError(f"cache {cache_name!r} has a running writer (pid {pid})",
                                     pid=pid)
    return fd


def remove_cache(cache_name: str, *, force: bool = False) -> list[str]:
    """Unlink every segment of a cache, its socket file and its lock file; returns the names
    of the segments (and the lock file, if it was there) removed.

    Unless ``force``, refuses with WriterRunningError while a writer holds the
    cache: removing its segments under it would let a second writer start on
    the same name (split brain). The check takes the writer lock (creating the
    lock file if needed) and holds it while it unlinks, the lock file last, so
    no writer can start on the segments being removed either. A lock held by a
    process that is not the cache's live writer is refused too, with a message
    that says so (``WriterLock.describe``). ``force`` is for a writer that is
    stuck; a running one notices within its heartbeat period that its control
    segment is gone and exits.
    """
    validate_name(cache_name)
    lock_path = SHM_DIR + layout.lock_name(cache_name)
    had_lock_file = os.path.lexists(lock_path)
    fd = None if force else lock_for_removal(cache_name)
    try:
        removed = []
        for seg in _shm.list_segments(cache_name):
            if _shm.unlink(seg):
                removed.append(seg)
        try:  # the consistent-read socket file a killed writer left (not a segment)
            os.unlink(SHM_DIR + layout.sync_socket_name(cache_name))
        except OSError:
            pass
        try:
            os.unlink(lock_path)
            if had_lock_file:
                removed.append(layout.lock_name(cache_name))
        except FileNotFoundError:
            pass
        return removed
    finally:
        if fd is not None:
            os.close(fd)
