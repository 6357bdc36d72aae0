"""The writer's hold on a cache's segments: the lock, creation, permissions and removal.

Concurrency contract: one CacheSegments per writer process. ``attach()`` takes
the writer lock (``lock``: a mode-600 lock file no reader can open) for
the writer's whole life (a second writer gets CacheExistsError; the kernel drops
the lock when its holder dies, so a crashed writer never blocks its successor).
``still_ours()`` runs on the ticker thread; everything else on the thread that
runs the writer.

Entries of /dev/shm are changed only through descriptors opened without
following links, and only when they are this writer's own regular files: a
link or another user's file planted at a segment name is logged once and left.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
import stat

from ..errors import CacheExistsError, CorruptSegmentError, SegmentPermissionError, WriterError
from ..format import control, layout, ring
from ..ipc import shm as _shm
from . import control_writer, lock
from . import faults as _faults

log = logging.getLogger("shmcache.writer")


def usable_gid(group: str | int) -> int:
    """The id of ``group`` if this process may give its segments that group, else an error.

    Changing a file's group needs membership in it (the effective or a supplementary
    group) or CAP_CHOWN: checked here, at start, so a writer that could not apply
    ``--group`` says so in one line instead of failing on its first segment.
    ValueError for a group that does not exist, SegmentPermissionError otherwise.
    """
    if isinstance(group, int):
        if not 0 <= group < 2**32 - 1:
            raise ValueError(f"group id {group} is out of range")
        gid = group
    else:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise ValueError(f"no group named {group!r} on this host") from None
    groups = _shm.process_gids()
    if gid in groups or _has_cap_chown():
        return gid
    euid = os.geteuid()
    try:
        user = pwd.getpwuid(euid).pw_name
    except KeyError:
        user = str(euid)
    try:
        gname = grp.getgrgid(gid).gr_name
    except KeyError:
        gname = str(gid)
    raise SegmentPermissionError(
        f"cannot give the segments {_shm.group_text(gid)}: this writer runs as "
        f"{_shm.user_text(euid)}, which is not a member (gids "
        f"{', '.join(map(str, groups))}) and lacks CAP_CHOWN", gid=gid,
        hint=f"Add the writer's user to the group (`usermod -aG {gname} {user}`, or "
             f"SupplementaryGroups={gname} in its systemd unit) and restart it, or pass "
             f"--group with a group it is in")


def _has_cap_chown() -> bool:
    """Whether this process may change a file's group to any group (CAP_CHOWN, bit 0)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) & 1)
    except (OSError, ValueError, IndexError):
        pass
    return os.geteuid() == 0


def inode(seg_name: str) -> int:
    """Inode of a segment's /dev/shm entry (0 if there is none): tells two segments of one name apart."""
    try:
        return os.lstat(_shm.SHM_DIR + seg_name).st_ino
    except OSError:
        return 0


class CacheSegments:
    """Create, lock, track and remove the segments of cache ``name``.

    Construction checks that ``group`` can be applied (``usable_gid``), so a writer
    fails before it touches /dev/shm or etcd.
    """

    def __init__(self, name: str, prefix: bytes, mode: int, group: str | int | None,
                 index_defs: bytes = b"") -> None:
        self.name = name
        self.prefix = prefix
        self.index_defs = index_defs  # the secondary indexes' definitions, encoded
        self.mode = mode
        self.group = group
        self._gid = None if group is None else usable_gid(group)
        self.ctl: control_writer.ControlWriter | None = None
        self.ctl_seg: _shm.Segment | None = None
        self._lock_fd: int | None = None
        self._ctl_fd: int | None = None
        self._ctl_ino = 0
        # /dev/shm entries already reported as not this writer's (name, inode): once each.
        self._reported: set[tuple[str, int]] = set()
        # Segments this writer created, name -> inode: after a forced removal it
        # unlinks only these, never a successor's segments of the same names.
        self._own: dict[str, int] = {}
        self._sync_ino = 0

    def attach(self) -> bool:
        """Take the writer lock, open or create the control segment, claim it; True if it existed."""
        self._lock_fd = lock.lock_writer(self.name)
        try:
            return self._attach_control()
        except BaseException:
            self._release_locks()
            raise

    def _attach_control(self) -> bool:
        cname = layout.control_name(self.name)
        existed = True
        try:
            opened = _shm.open_writable(cname)
        except CorruptSegmentError as exc:
            log.warning("%s; removing it", exc)
            _shm.unlink(cname)
            opened = None
        if opened is None:
            try:
                seg = _shm.create(cname, layout.CONTROL_SIZE, self.mode, self.group)
                control_writer.ControlWriter.initialise(seg.buf, self.prefix)
                seg.close()
                existed = False
            except FileExistsError:
                pass
            opened = _shm.open_writable(cname)
            if opened is None:
                raise WriterError(f"control segment {cname} vanished while starting")
        seg, fd = opened
        pid = lock.lock_control(fd)
        if pid is not None:
            seg.close()
            os.close(fd)
            raise CacheExistsError(f"cache {self.name!r} already has a running writer "
                                   f"(pid {pid}, an earlier shmcache version's)")
        self._ctl_fd = fd
        self._ctl_ino = os.fstat(fd).st_ino
        if existed:
            try:
                control.check_header(seg.buf, seg.size, cname)
            except CorruptSegmentError as exc:
                if seg.size < layout.CONTROL_SIZE:
                    raise WriterError(f"{exc}; remove it with `shmcache rm {self.name}`") from None
                # In place, so readers attached to it see the new writer; SEQ keeps
                # growing so no reader mistakes the new block for one it has seen.
                log.warning("control segment unusable (%s); re-initialising it", exc)
                seq = int.from_bytes(seg.buf[layout.C_SEQ:layout.C_SEQ + 8], "little")
                seg.buf[:] = b"\0" * seg.size
                control_writer.ControlWriter.initialise(seg.buf, self.prefix, seq=(seq | 1) + 1)
                existed = False
        self.ctl_seg = seg
        self.ctl = control_writer.ControlWriter(seg.buf, self.index_defs)
        self.ctl.claim()
        return existed

    def create_ring(self, generation: int, capacity: int) -> tuple[_shm.Segment, ring.RingWriter]:
        """Create (not publish) ring generation ``generation``; on failure nothing is left."""
        name = layout.ring_name(self.name, generation)
        _shm.unlink(name)  # leftover of a writer that crashed while creating it
        seg = _shm.create(name, layout.RING_DATA + capacity, self.mode, self.group)
        try:
            _faults.point("ring_switch")  # created, not initialised
            ring.RingWriter.init_segment(seg.buf, generation, capacity)
        except BaseException:
            seg.close()
            _shm.unlink(name)
            raise
        self.track(name)
        return seg, ring.RingWriter(seg.buf, capacity, generation)

    def track(self, seg_name: str) -> None:
        """Remember a segment as this writer's own (see ``unlink_own``)."""
        self._own[seg_name] = inode(seg_name)

    def gid(self) -> int | None:
        """The segments' group id (checked usable at construction), None for the writer's own."""
        return self._gid

    def track_sync_socket(self) -> None:
        self._sync_ino = inode(layout.sync_socket_name(self.name))

    def unlink_sync_socket(self) -> None:
        """Remove the consistent-read socket file this writer bound (if it is still its own:
        after a forced removal a successor may have bound a new one)."""
        p = _shm.SHM_DIR + layout.sync_socket_name(self.name)
        try:
            if self._sync_ino and os.lstat(p).st_ino == self._sync_ino:
                os.unlink(p)
        except OSError:
            pass

    def apply_permissions(self) -> None:
        """Give every segment this writer's mode and group (a restart may change them)."""
        gid = self.gid()
        for name in _shm.list_segments(self.name):
            fd = self._open_own(name)
            if fd is None:
                continue
            try:
                st = os.fstat(fd)
                changes = []
                if stat.S_IMODE(st.st_mode) != self.mode:
                    os.fchmod(fd, self.mode)
                    changes.append(f"mode {stat.S_IMODE(st.st_mode):o} -> {self.mode:o}")
                if gid is not None and st.st_gid != gid:
                    os.fchown(fd, -1, gid)
                    changes.append(f"group {st.st_gid} -> {gid}")
            except OSError as exc:
                log.warning("cannot set the permissions of %s: %s", name, exc)
                continue
            finally:
                os.close(fd)
            if changes:
                log.info("segment %s: %s", name, ", ".join(changes))

    def _own_file(self, seg_name: str) -> os.stat_result | None:
        """The lstat of ``seg_name`` if it is this writer's own regular file, else None
        (gone, or a link or another user's file: reported once, left alone)."""
        try:
            st = os.lstat(_shm.SHM_DIR + seg_name)
        except OSError:
            return None
        if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid():
            return st
        if (seg_name, st.st_ino) not in self._reported:
            self._reported.add((seg_name, st.st_ino))
            target = ""
            if stat.S_ISLNK(st.st_mode):
                try:
                    target = f" to {os.readlink(_shm.SHM_DIR + seg_name)!r}"
                except OSError:
                    pass
            log.warning("leaving %s%s alone: it is %s%s, not a segment this writer (%s) "
                        "made; someone may have planted it", _shm.SHM_DIR, seg_name,
                        _shm.entry_text(st), target, _shm.user_text(os.geteuid()))
        return None

    def _open_own(self, seg_name: str) -> int | None:
        """A descriptor on ``seg_name`` if it is this writer's own regular file (``_own_file``),
        opened without following a link and checked to be the entry just examined."""
        st = self._own_file(seg_name)
        if st is None:
            return None
        try:
            fd = os.open(_shm.SHM_DIR + seg_name,
                         os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return None  # replaced or removed since: no longer the file examined
        now = os.fstat(fd)
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            os.close(fd)
            return None
        return fd

    def remove_strays(self) -> None:
        """Unlink segments of this cache that the control segment does not point at, when
        they are this writer's own files (``_own_file``)."""
        assert self.ctl is not None
        keep = {layout.control_name(self.name),
                layout.ring_name(self.name, self.ctl.get(layout.B_RING_GEN)),
                layout.snapshot_name(self.name, self.ctl.get(layout.B_SNAP_SEQ)),
                layout.index_name(self.name, self.ctl.get(layout.B_SNAP_SEQ)),
                layout.overlay_name(self.name, self.ctl.get(layout.B_OVL_SEQ))}
        for seg in _shm.list_segments(self.name):
            # (unlink removes a name, never what a link points at: checked for the log)
            if seg not in keep and self._own_file(seg) is not None:
                _shm.unlink(seg)

    def still_ours(self) -> bool:
        """Whether /dev/shm still names our control segment (False after `shmcache rm --force`)."""
        try:
            return os.lstat(_shm.SHM_DIR + layout.control_name(self.name)).st_ino == self._ctl_ino
        except FileNotFoundError:
            return False
        except OSError:
            return True  # cannot tell: keep serving

    def unlink_own(self) -> None:
        """Unlink the segments this writer created that still carry their inode."""
        for seg_name, ino in self._own.items():
            if ino and inode(seg_name) == ino:
                _shm.unlink(seg_name)

    def close(self, remove: bool) -> None:
        """Release the control segment and the lock; ``remove`` unlinks every segment first."""
        if self.ctl is not None:
            self.ctl.heartbeat()
            self.ctl.release()
        if self.ctl_seg is not None:
            self.ctl_seg.close()
        if remove:
            # Before the lock goes: no other writer can have started on these names.
            lock.remove_cache(self.name, force=True)
        self._release_locks()

    def _release_locks(self) -> None:
        for fd in (self._ctl_fd, self._lock_fd):
            if fd is not None:
                os.close(fd)  # releases its flock
        self._ctl_fd = self._lock_fd = None
