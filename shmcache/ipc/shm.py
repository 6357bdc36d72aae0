"""POSIX shared-memory segments: create, open, map, list and unlink by cache name.

Existing entries in /dev/shm are opened as shm_open does (``O_NOFOLLOW``) but
also ``O_NONBLOCK``, and anything but a regular file is refused: /dev/shm is
world-writable and segment names are predictable, so a symbolic link or a FIFO
may have been planted at a name (docs/format.md, "Security").
"""

from __future__ import annotations

import errno
import grp
import mmap
import os
import pwd
import re
import stat
from dataclasses import dataclass

import posix_ipc

from ..errors import (
    CorruptSegmentError,
    InvalidNameError,
    SegmentPermissionError,
)
from ..format import layout

SHM_DIR = "/dev/shm"
_SUFFIX_RE = re.compile(r"ctl|ring\.[0-9]+|snap\.[0-9]+|idx\.[0-9]+|ovl\.[0-9]+")


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not layout.NAME_RE.fullmatch(name):
        raise InvalidNameError(f"invalid cache name {name!r}")
    return name


@dataclass
class Segment:
    """A mapped segment. ``buf`` is PROT_READ for readers, read-write for the writer."""

    name: str
    buf: mmap.mmap
    size: int

    def close(self) -> None:
        """Unmap. Idempotent; afterwards ``buf`` raises ValueError like a closed mmap."""
        try:
            self.buf.close()
        except BufferError:
            # A memoryview over the map is still alive somewhere (a caller kept a
            # value slice). The segment lets go of the map, so it is unmapped when
            # that view is collected, not when this (closed) segment is.
            self.buf = _closed_map()


def _closed_map() -> mmap.mmap:
    m = mmap.mmap(-1, 1)
    m.close()
    return m


def open_readonly(name: str) -> Segment | None:
    """Map an existing segment read-only; None if it does not exist, SegmentPermissionError
    (see ``_read_denied``) if this process may not read it or ``not_a_segment`` if the name
    is a link or another non-regular file.
    """
    try:
        fd = open_entry(name, os.O_RDONLY)
    except SegmentPermissionError:
        raise
    except PermissionError:
        raise _read_denied(name) from None
    if fd is None:
        return None
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return Segment(name, _empty_map(), 0)
        buf = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    return Segment(name, buf, size)


def open_entry(name: str, flags: int) -> int | None:
    """A descriptor on the /dev/shm entry of segment ``name`` (None if there is none).

    Opened as shm_open would, but a link is never followed (glibc adds ``O_NOFOLLOW``
    too: ELOOP) and a FIFO never blocks the open; anything that is not a regular file
    raises ``not_a_segment``. PermissionError (EACCES) is left to the caller.
    """
    try:
        fd = os.open(SHM_DIR + name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        raise not_a_segment(name) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise not_a_segment(name)
    return fd


def _empty_map() -> mmap.mmap:
    # mmap refuses length 0; an anonymous 1-byte map stands in for an empty
    # segment so callers see a zero-length segment and report it as corrupt.
    m = mmap.mmap(-1, 1)
    return m


def create(name: str, size: int, mode: int = 0o600, group: str | int | None = None,
           exclusive: bool = True) -> Segment:
    """Create a segment of ``size`` bytes (zero-filled), with ``mode`` regardless of the umask.

    The space is reserved with posix_fallocate so a full /dev/shm fails here, with
    ENOSPC, instead of as SIGBUS in a reader later. An ``exclusive`` create of a
    name that exists raises FileExistsError. On any failure the segment is unlinked.
    """
    flags = posix_ipc.O_CREX if exclusive else posix_ipc.O_CREAT
    try:
        shm = posix_ipc.SharedMemory(name, flags=flags, mode=mode, size=0)
    except posix_ipc.ExistentialError:  # (not an OSError: posix_ipc's own)
        raise FileExistsError(errno.EEXIST, f"segment {name} exists") from None
    try:
        os.fchmod(shm.fd, mode)  # the creation mode was reduced by the umask
        if group is not None:
            gid = group if isinstance(group, int) else grp.getgrnam(group).gr_gid
            os.fchown(shm.fd, -1, gid)
        os.ftruncate(shm.fd, size)
        try:
            os.posix_fallocate(shm.fd, 0, size)
        except OSError as exc:
            if exc.errno != errno.EOPNOTSUPP and exc.errno != errno.EINVAL:
                raise
        buf = mmap.mmap(shm.fd, size, flags=mmap.MAP_SHARED,
                        prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException:
        shm.close_fd()
        unlink(name)
        raise
    shm.close_fd()
    return Segment(name, buf, size)


def open_writable(name: str) -> tuple[Segment, int] | None:
    """Open an existing segment read-write for the writer; returns it and an fd kept for locking.

    Refuses segments owned by another user or writable by group/other: their
    contents could have been planted by someone else.
    """
    try:
        fd = open_entry(name, os.O_RDWR)
    except SegmentPermissionError:
        raise
    except PermissionError:
        # Not ours and not writable by us: the same refusal as for one we could open.
        try:
            st = os.lstat(SHM_DIR + name)
        except OSError:
            return None  # removed meanwhile
        raise not_owner(name, st) from None
    if fd is None:
        return None
    st = os.fstat(fd)
    if st.st_uid != os.geteuid():
        os.close(fd)
        raise not_owner(name, st)
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        os.close(fd)
        raise SegmentPermissionError(
            f"{name} has mode {stat.S_IMODE(st.st_mode):03o}, writable by group or others",
            segment=name, uid=st.st_uid, gid=st.st_gid, mode=stat.S_IMODE(st.st_mode),
            hint="Remove it with `shmcache rm NAME`; shmcache never creates such segments")
    size = st.st_size
    if size == 0:
        os.close(fd)
        raise CorruptSegmentError("segment is empty (a writer died while creating it)",
                                  segment=name)
    buf = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    return Segment(name, buf, size), fd


def process_gids() -> list[int]:
    """This process's effective and supplementary group ids, sorted."""
    return sorted({os.getegid(), *os.getgroups()})


def user_text(uid: int) -> str:
    """``user shmcache (uid 998)``, or ``uid 998`` for an id with no name on this host."""
    try:
        return f"user {pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def group_text(gid: int) -> str:
    """``group shmcache-readers (gid 997)``, or ``gid 997`` for an id with no name here."""
    try:
        return f"group {grp.getgrgid(gid).gr_name} (gid {gid})"
    except KeyError:
        return f"gid {gid}"


def _read_denied(name: str) -> SegmentPermissionError:
    """The error for a segment this process may not read: who owns it, with which mode,
    who this process is, and the writer setting that would let it read."""
    try:
        st = os.lstat(SHM_DIR + name)  # needs no access to the segment, only to /dev/shm
    except OSError:
        return SegmentPermissionError(
            f"cannot read segment {name}: permission denied", segment=name,
            hint="The writer grants read access with --mode 640 --group GROUP or --mode 644")
    mode = stat.S_IMODE(st.st_mode)
    message = (f"cannot read segment {name}: owned by {user_text(st.st_uid)} and "
               f"{group_text(st.st_gid)} with mode {mode:03o}; this process runs as "
               f"{user_text(os.geteuid())} in gids {', '.join(map(str, process_gids()))}")
    if mode & stat.S_IROTH:
        hint = ("The mode lets every user read: something other than the mode refuses "
                "access (a security module such as SELinux or AppArmor, or how /dev/shm "
                "is mounted)")
    elif mode & stat.S_IRGRP:
        hint = (f"Add this process's user to {group_text(st.st_gid)} and restart the process "
                f"(a running process keeps its groups), or start the writer with --mode 644 "
                f"to let every user read")
    else:
        hint = ("Start the writer with --mode 640 --group GROUP (a group of this process's "
                "user) or --mode 644 (every user); see docs/operations.md, "
                "'Grant readers access'")
    return SegmentPermissionError(message, segment=name, uid=st.st_uid, gid=st.st_gid,
                                  mode=mode, hint=hint)


def not_owner(name: str, st: os.stat_result) -> SegmentPermissionError:
    mode = stat.S_IMODE(st.st_mode)
    return SegmentPermissionError(
        f"{name} is owned by {user_text(st.st_uid)} with mode {mode:03o}, not by this writer "
        f"({user_text(os.geteuid())})", segment=name, uid=st.st_uid, gid=st.st_gid, mode=mode,
        hint="Run the writer as the segment's owner, or remove the cache's segments with "
             "`shmcache rm NAME` as root or as their owner")


def entry_text(st: os.stat_result) -> str:
    """``a symbolic link owned by user x (uid 1000)``: what a /dev/shm entry is, from its lstat."""
    kinds = {stat.S_IFLNK: "a symbolic link", stat.S_IFREG: "a regular file",
             stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a directory"}
    kind = kinds.get(stat.S_IFMT(st.st_mode), "a device or other special file")
    return f"{kind} owned by {user_text(st.st_uid)}"


def not_a_segment(name: str) -> SegmentPermissionError:
    """The error for a segment name that holds a link or another non-regular file."""
    try:
        st = os.lstat(SHM_DIR + name)
    except OSError:
        what, uid, gid, mode = "not a regular file", None, None, None
    else:
        what, uid, gid, mode = entry_text(st), st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)
    return SegmentPermissionError(
        f"{name} is {what}, not a segment: shmcache never follows links or opens other "
        f"files in {SHM_DIR}", segment=name, uid=uid, gid=gid, mode=mode,
        hint="Someone else may have planted it; remove the cache's entries with "
             "`shmcache rm NAME` as root or as their owner")


def unlink(name: str) -> bool:
    """Remove a segment name; processes that have it mapped keep their mapping."""
    try:
        posix_ipc.unlink_shared_memory(name)
        return True
    except posix_ipc.ExistentialError:
        return False


def list_segments(cache_name: str) -> list[str]:
    """Names of every segment that belongs to ``cache_name`` (Linux: from /dev/shm)."""
    validate_name(cache_name)
    base = f"{layout.SEGMENT_PREFIX[1:]}{cache_name}."
    try:
        entries = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return []
    # An exact suffix match: names may contain dots, so cache "a" must not claim
    # the segments of a cache named "a.snap" ("shmcache.a.snap.ctl").
    return sorted("/" + e for e in entries if e.startswith(base)
                  and _SUFFIX_RE.fullmatch(e[len(base):]))


def list_caches() -> list[str]:
    """Cache names that have a control segment on this host."""
    try:
        entries = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return []
    prefix = layout.SEGMENT_PREFIX[1:]
    return sorted(e[len(prefix):-4] for e in entries
                  if e.startswith(prefix) and e.endswith(".ctl"))
