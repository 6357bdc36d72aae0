"""Writer: list and watch an etcd key range, keep its state, publish it into the cache's segments.

Concurrency contract: one Writer per cache name per host, enforced with an
exclusive flock on the control segment (a second writer gets CacheExistsError;
the lock dies with its holder, so a crashed writer never blocks its successor).
The thread that calls ``run()`` applies events and publishes them; a sync
thread publishes the consistent-read counters (ControlWriter.publish is
locked); ``stop()`` may be called from any thread or a signal handler.
"""

from __future__ import annotations

import fcntl
import gc
import grp
import logging
import os
import random
import select
import signal
import stat
import threading
import time
from typing import Any

from sortedcontainers import SortedDict

from . import _codec, _etcd, _shm, _sync, control, layout, ring, snapshot
from .errors import CacheExistsError, CorruptSegmentError, ShmCacheError, WriterError

__all__ = ["Writer"]

log = logging.getLogger("shmcache.writer")

_B = layout
DEFAULT_ENDPOINT = "http://127.0.0.1:2379"
KV = tuple[bytes, int, int, int, int]  # value, create_revision, mod_revision, version, lease


def parse_size(text: str | int) -> int:
    """'64MiB', '512k', '1G' or an int -> bytes."""
    if isinstance(text, int):
        return text
    t = text.strip().lower().replace(" ", "")
    units = {"kib": 1 << 10, "k": 1 << 10, "kb": 1000, "mib": 1 << 20, "m": 1 << 20,
             "mb": 10**6, "gib": 1 << 30, "g": 1 << 30, "gb": 10**9, "b": 1, "": 1}
    for unit in sorted(units, key=len, reverse=True):
        if t.endswith(unit):
            num = t[: len(t) - len(unit)] if unit else t
            try:
                return int(float(num) * units[unit])
            except ValueError:
                break
    raise ValueError(f"cannot parse size {text!r} (use e.g. 64MiB, 512KiB, 1GiB)")


def _parse_faults(spec: str) -> dict[str, float]:
    """``SHMCACHE_FAULT="append:0.05,snapshot:0.2"``: crash-test hooks, see _fault_point."""
    out = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        point, _, prob = part.partition(":")
        out[point] = float(prob or 1.0)
    return out


_FAULTS = _parse_faults(os.environ.get("SHMCACHE_FAULT", ""))


def _text(b: bytes) -> str:
    """Key bytes for a log line: the text itself, not a bytes repr."""
    return b.decode("utf-8", "backslashreplace")


def _fault_point(point: str) -> None:
    """Crash-test hook: SIGKILL this process here with the configured probability.

    Used by the checker (tests/checker.py) to kill the writer in the middle of
    appending a record and of publishing a snapshot. Costs one dict lookup
    when SHMCACHE_FAULT is unset, which it always is in production.
    """
    p = _FAULTS.get(point)
    if p and random.random() < p:
        log.warning("SHMCACHE_FAULT: killing the writer at fault point %r", point)
        os.kill(os.getpid(), signal.SIGKILL)


class _Relist(Exception):
    def __init__(self, reason: str) -> None:
        self.reason = reason


class Writer:
    """The one process per host that feeds a cache from etcd.

    ``Writer(name, endpoints=[...], prefix=b"/registry/").run()`` blocks until
    ``stop()``. Segments outlive the writer: readers keep serving the last
    published data (``Reader.status().writer_alive`` turns False), and a
    restarted writer resumes from the published revision without a relist when
    etcd still has that history. ``remove_on_close=True`` unlinks every segment
    of the cache when the writer stops.
    """

    # Largest range whose keys the progress check scans in etcd (see _on_progress).
    PROGRESS_SCAN_LIMIT = 10_000

    def __init__(
        self,
        name: str,
        endpoints: list[str] | str | None = None,
        prefix: bytes | str = b"",
        *,
        ring_size: int | str = 64 << 20,
        snapshot_interval: float = 30.0,
        snapshot_bytes: int | str | None = None,
        progress_interval: float = 1.0,
        mode: int = 0o600,
        group: str | int | None = None,
        remove_on_close: bool = False,
        backoff_max: float = 5.0,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        user: str | None = None,
        password: str | None = None,
        etcd_timeout: float = 5.0,
    ) -> None:
        self.name = _shm.validate_name(name)
        self.prefix = prefix.encode() if isinstance(prefix, str) else bytes(prefix)
        if len(self.prefix) > layout.MAX_PREFIX_LEN:
            raise ValueError(f"prefix longer than {layout.MAX_PREFIX_LEN} bytes")
        self.range_end = layout.prefix_range_end(self.prefix)
        # etcd rejects an empty key; b"\0" with range end b"\0" means every key.
        self.range_key = self.prefix or b"\0"
        self.ring_size = layout.align8(parse_size(ring_size))
        if not layout.MIN_RING_CAPACITY <= self.ring_size <= layout.MAX_RING_CAPACITY:
            raise ValueError(f"ring size must be between {layout.MIN_RING_CAPACITY} bytes and "
                             f"{layout.MAX_RING_CAPACITY} bytes, not {self.ring_size}")
        self.snapshot_interval = snapshot_interval
        self.snapshot_bytes = (parse_size(snapshot_bytes) if snapshot_bytes is not None
                               else min(self.ring_size // 4, 16 << 20))
        self.progress_interval = progress_interval
        if mode & 0o022:
            raise ValueError(f"mode {mode:o} lets group or others write the segments")
        self.mode = mode
        self.group = group
        self.remove_on_close = remove_on_close
        # A fresh settings object per Writer: nothing the caller holds is shared.
        settings = _etcd.EtcdSettings(
            endpoints=[DEFAULT_ENDPOINT], timeout=etcd_timeout, ca_cert=ca_file,
            cert_key=key_file, cert_cert=cert_file, user=user, password=password)
        if endpoints is not None:
            settings.endpoints = [endpoints] if isinstance(endpoints, str) else list(endpoints)
        if not settings.endpoints:
            raise ValueError("no etcd endpoints given")
        self.etcd_settings = settings
        self.backoff_max = backoff_max

        self._stop = threading.Event()
        # stop() only sets this flag and writes a byte to the wake pipe (it may run
        # in a signal handler, where taking any lock can deadlock); the ticker
        # thread then sets _stop and closes the etcd calls the loop may block in.
        self._stop_requested = False
        self._wake_r: int | None = None
        self._wake_w: int | None = None
        self._fatal: ShmCacheError | None = None
        self._ctl_ino = 0
        # Segments this writer created, by name -> inode: on a forced removal it
        # unlinks only these, never a successor's segments of the same name.
        self._own_segments: dict[str, int] = {}
        # Since when etcd has not answered (unix time), and the last error; None
        # while connected. Shown by status, the metrics and systemd's STATUS.
        self.etcd_down_since: float | None = None
        self.last_etcd_error = ""
        self._stream: _etcd.WatchStream | None = None
        self._ctl: control.ControlWriter | None = None
        self._ctl_seg: _shm.Segment | None = None
        self._lock_fd: int | None = None
        self._ring: ring.RingWriter | None = None
        self._ring_seg: _shm.Segment | None = None
        self.kv: SortedDict = SortedDict()
        # Snapshots are built from the live one (the base, mapped read-only) plus
        # the changes since it (the delta), in a thread, so the watch loop keeps
        # publishing while a large snapshot is written (see _SnapshotBuild).
        self._delta: dict[bytes, KV | None] = {}
        self._data_len = 0  # bytes self.kv takes in a snapshot's data area
        self._base: tuple[_shm.Segment, snapshot.Snapshot] | None = None
        self._build: _SnapshotBuild | None = None
        self.revision = 0
        self.epoch = 0
        self.etcd_revision = 0
        self._snap_seq = 0
        self._snap_ring_pos = 0
        self._bytes_since_snapshot = 0
        self._last_snapshot = 0.0
        self._last_event = 0.0
        self._progress_candidate: int | None = None
        self._progress_outstanding = False
        self._progress_sent = 0.0
        self._watch_created = 0.0
        self._unsynced_until = 0
        self._healthy = False
        self._head_unpublished = False
        self._conn: _etcd.Connection | None = None
        # Notified whenever the published revision moves (sync rounds wait on it).
        self._revision_moved = threading.Condition()
        self._remove_strays_later = True
        self.ready = threading.Event()
        self.stats = {"events": 0, "records": 0, "bytes": 0, "snapshots": 0, "relists": 0,
                      "reconnects": 0, "progress_requests": 0, "progress_anomalies": 0,
                      "sync_requests": 0, "sync_rounds": 0,
                      # (service.py, issue 4) watch streams opened / responses received,
                      # and the last snapshot's publish time, key count and size, for
                      # metrics and the watchdog's "is the loop making progress" test.
                      "watches": 0, "watch_responses": 0, "snapshot_seconds": 0.0,
                      "snapshot_seconds_total": 0.0, "snapshot_keys": 0, "snapshot_bytes": 0}
        # (service.py, issue 4) callback(loaded, total) called after each page of a
        # relist; service.py logs progress with it. An exception it raises aborts the list.
        self.list_progress: Any = None

    # -- segments --------------------------------------------------------------

    def _attach_control(self) -> bool:
        """Open or create the control segment and take the writer lock; True if it existed."""
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
                control.ControlWriter.initialise(seg.buf, self.prefix)
                seg.close()
                existed = False
            except FileExistsError:
                pass
            opened = _shm.open_writable(cname)
            if opened is None:
                raise WriterError(f"control segment {cname} vanished while starting")
        seg, fd = opened
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = control.writer_identity(seg.buf)[0]
            seg.close()
            os.close(fd)
            raise CacheExistsError(f"cache {self.name!r} already has a running writer "
                                   f"(pid {pid})") from None
        self._lock_fd = fd
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
                control.ControlWriter.initialise(seg.buf, self.prefix, seq=(seq | 1) + 1)
                existed = False
        self._ctl_seg = seg
        self._ctl = control.ControlWriter(seg.buf)
        self._ctl.claim()
        # Continue the numbering: a fresh snapshot must never reuse the name the
        # control segment (and attached readers) still point at.
        self._snap_seq = self._ctl.get(_B.B_SNAP_SEQ)
        return existed

    def _new_ring(self, capacity: int) -> None:
        assert self._ctl is not None
        gen = self._ctl.get(_B.B_RING_GEN) + 1
        name = layout.ring_name(self.name, gen)
        _shm.unlink(name)  # leftover of a writer that crashed while creating it
        seg = _shm.create(name, layout.RING_DATA + capacity, self.mode, self.group)
        self._own_segments[name] = _inode(name)
        ring.RingWriter.init_segment(seg.buf, gen, capacity)
        old = self._ring_seg
        self._ring_seg = seg
        self._ring = ring.RingWriter(seg.buf, capacity, gen)
        if old is not None:
            old.close()

    def _restore(self) -> str | None:
        """Rebuild state from the segments a previous writer left; None if it did, else why not.

        Every record a reader can reach, [tail, head), is validated first (stamp,
        CRC, revision order): the ones after the snapshot rebuild the state, so a
        bad one there means a relist; a bad one before the snapshot only costs
        history, so the tail moves up to the snapshot (watches from before it get
        CompactedError, as after any lap).
        """
        assert self._ctl_seg is not None and self._ctl is not None
        buf = self._ctl_seg.buf
        b = control.read_block(buf, spins=10)
        if b is None:
            return "the control block was left mid-publish"
        if b.snap_seq == 0:
            return "no snapshot was published"
        try:
            control.validate_block(b, self._ctl_seg.name)
            served = control.read_prefix(buf, b.prefix_len)
            if served != self.prefix:
                return f"the cache was serving prefix {_text(served)!r}, not {_text(self.prefix)!r}"
            rname = layout.ring_name(self.name, b.ring_gen)
            opened = _shm.open_writable(rname)
            if opened is None:
                return f"ring segment {rname} is missing"
            rseg, rfd = opened
            os.close(rfd)
            ring.check_ring_header(rseg.buf, rseg.size, rseg.name, b.ring_gen, b.ring_capacity)
            sname = layout.snapshot_name(self.name, b.snap_seq)
            sseg = _shm.open_readonly(sname)
            if sseg is None:
                return f"snapshot segment {sname} is missing"
            snap = snapshot.Snapshot(sseg.name, sseg.buf, sseg.size)
            if snap.revision != b.snap_revision or snap.epoch != b.epoch:
                raise CorruptSegmentError(f"snapshot is at revision {snap.revision} epoch "
                                          f"{snap.epoch}, the control segment says "
                                          f"{b.snap_revision} epoch {b.epoch}")
            kv: SortedDict = SortedDict()
            delta: dict[bytes, KV | None] = {}
            tail, compact = b.ring_tail, b.compact_revision
            cap = b.ring_capacity
            try:
                for e in snap.range(b"", None):
                    kv[e.key] = (e.value, e.create_revision, e.mod_revision, e.version, e.lease)
                try:
                    for _rec in ring.iter_records(rseg.buf, cap, b.ring_tail, b.snap_ring_pos,
                                                  lambda: b.ring_tail,
                                                  max_revision=b.snap_revision, name=rseg.name):
                        pass
                except CorruptSegmentError as exc:
                    log.warning("ring history before the snapshot is damaged (%s); dropping "
                                "the events up to revision %d", exc, b.snap_revision)
                    tail, compact = b.snap_ring_pos, b.snap_revision
                for _pos, rev, _nxt, payload in ring.iter_records(
                        rseg.buf, cap, b.snap_ring_pos, b.ring_head, lambda: tail,
                        after_revision=b.snap_revision, max_revision=b.revision,
                        name=rseg.name):
                    for ev in _codec.decode(payload, rev, rseg.name):
                        if ev.type == "PUT":
                            t = (ev.kv.value, ev.kv.create_revision, ev.kv.mod_revision,
                                 ev.kv.version, ev.kv.lease)
                            kv[ev.kv.key] = delta[ev.kv.key] = t
                        else:
                            kv.pop(ev.kv.key, None)
                            delta[ev.kv.key] = None
                rw = ring.RingWriter(rseg.buf, cap, b.ring_gen)
                rw.restore(b.ring_head, tail)
            except BaseException:
                snap.close()
                sseg.close()
                raise
        except (CorruptSegmentError, ring.Lapped, ring.TornRecord, OSError, ValueError) as exc:
            return str(exc) or type(exc).__name__
        self._ring_seg = rseg
        self._ring = rw
        self._own_segments[rseg.name] = _inode(rseg.name)
        self.kv = kv
        self._delta = delta
        self._data_len = sum(snapshot.entry_span(k, v[0]) for k, v in kv.items())
        self._base = (sseg, snap)
        _freeze_gc()
        self.revision = b.revision
        self.epoch = b.epoch
        self._snap_seq = b.snap_seq
        self._snap_ring_pos = b.snap_ring_pos
        self._last_snapshot = time.monotonic()
        if tail != b.ring_tail:
            self._ctl.publish({_B.B_RING_TAIL: tail, _B.B_COMPACT_REVISION: compact}, wake=False)
        log.info("resumed cache %r at revision %d (epoch %d, %d keys)", self.name,
                 self.revision, self.epoch, len(kv))
        return None

    def _switch_ring(self, capacity: int, reason: str) -> None:
        """Continue in a new ring generation of ``capacity`` bytes, in the same epoch.

        The old ring is sealed at its head first (ring.RingWriter.seal): watches
        that still read it finish it and continue in the new one, so no watch
        loses an event. The new ring's history begins at the current revision:
        a snapshot of the current state is published with it.
        """
        assert self._ctl is not None and self._ring is not None
        if self._build is not None:
            self._finish_build(self._build, wait=True)  # it points into the old ring
        old, old_gen = self._ring, self._ring.generation
        old.seal(self.revision)
        self._new_ring(capacity)
        assert self._ring is not None
        self._publish_snapshot({
            _B.B_RING_TAIL: 0, _B.B_RING_GEN: self._ring.generation,
            _B.B_RING_CAPACITY: capacity, _B.B_COMPACT_REVISION: self.revision})
        _shm.unlink(layout.ring_name(self.name, old_gen))
        log.info("ring log replaced at revision %d: generation %d -> %d, %d -> %d bytes; "
                 "watches continue into it (%s)", self.revision, old_gen,
                 self._ring.generation, old.capacity, capacity, reason)

    def _apply_permissions(self) -> None:
        """Give every segment of the cache this writer's mode and group (a restart may change them)."""
        gid = None
        if self.group is not None:
            gid = self.group if isinstance(self.group, int) else grp.getgrnam(self.group).gr_gid
        for name in _shm.list_segments(self.name):
            path = _shm.SHM_DIR + name
            try:
                st = os.stat(path)
                changes = []
                if stat.S_IMODE(st.st_mode) != self.mode:
                    os.chmod(path, self.mode)
                    changes.append(f"mode {stat.S_IMODE(st.st_mode):o} -> {self.mode:o}")
                if gid is not None and st.st_gid != gid:
                    os.chown(path, -1, gid)
                    changes.append(f"group {st.st_gid} -> {gid}")
            except OSError as exc:
                log.warning("cannot set the permissions of %s: %s", name, exc)
                continue
            if changes:
                log.info("segment %s: %s", name, ", ".join(changes))

    def _publish_snapshot(self, extra: dict[int, int] | None = None,
                          prefix: bytes | None = None) -> None:
        """Build a snapshot of the current state now and point the control segment at it.

        For the paths that cannot wait (a new epoch, the ring about to overwrite
        events newer than the live snapshot): a build already running in the
        background is finished first, then a new one runs in this thread.
        """
        if self._build is not None:
            self._finish_build(self._build, wait=True)
        b = _SnapshotBuild(self)
        b.run()
        if b.error is not None and not b.full:
            self._build_failed(b)
            self._close_base()
            b = _SnapshotBuild(self)  # from the whole state
            b.run()
        if b.error is not None:
            self._discard_build(b)
            raise b.error
        self._publish_build(b, extra, prefix)

    def _finish_build(self, b: _SnapshotBuild, wait: bool = False) -> None:
        """Publish the background build if it is done (or wait for it)."""
        if wait:
            b.done.wait()
        elif not b.done.is_set():
            return
        self._build = None
        if b.error is not None:
            self._build_failed(b)
        else:
            self._publish_build(b)

    def _build_failed(self, b: _SnapshotBuild) -> None:
        """Drop a failed build; its changes go back to the delta (the base is unchanged)."""
        self._discard_build(b)
        log.warning("snapshot build at revision %d failed: %s", b.revision, b.error)
        if b.changes is not None:
            b.changes.update(self._delta)
            self._delta = b.changes
        self._bytes_since_snapshot += b.bytes_since
        if isinstance(b.error, CorruptSegmentError):
            self._close_base()  # the next build starts from the whole state

    def _discard_build(self, b: _SnapshotBuild) -> None:
        if b.seg is not None:  # (run() has unmapped it)
            _shm.unlink(b.name)

    def _drop_build(self) -> None:
        """Wait for a background build and throw it away unpublished."""
        if self._build is not None:
            self._build.done.wait()
            self._discard_build(self._build)
            self._build = None

    def _close_base(self, background: bool = False) -> None:
        """Unmap the base snapshot; the next build is then a whole-state one (which
        starts a new delta). ``background``: in a short-lived thread, for a base that
        may be the last mapping of an unlinked segment, whose pages the unmap frees
        (70 ms for 377 MB: munmap releases the GIL, but it would hold up this thread)."""
        if self._base is None:
            return
        seg, snap = self._base
        self._base = None
        if background:
            threading.Thread(target=_close_all, args=(snap, seg), name="shmcache-unmap",
                             daemon=True).start()
        else:
            _close_all(snap, seg)

    def _publish_build(self, b: _SnapshotBuild, extra: dict[int, int] | None = None,
                       prefix: bytes | None = None) -> None:
        """Point the control segment at a finished snapshot and make it the next base."""
        assert self._ctl is not None and self._ring is not None and b.seg is not None
        _fault_point("snapshot")  # filled, not published
        old = self._snap_seq
        # The head goes out with the snapshot: records appended but not yet
        # published (mid-response) are part of the state the snapshot holds.
        updates = {_B.B_SNAP_SEQ: b.seq, _B.B_SNAP_REVISION: b.revision,
                   _B.B_SNAP_SIZE: b.plan.total, _B.B_SNAP_RING_POS: b.ring_pos,
                   _B.B_KEY_COUNT: len(self.kv), _B.B_RING_HEAD: self._ring.head,
                   _B.B_REVISION: self.revision}
        if extra:
            updates.update(extra)
        self._ctl.publish(updates, prefix=prefix)
        self._snap_seq = b.seq
        self._snap_ring_pos = b.ring_pos
        self.stats["snapshots"] += 1
        if old and old != b.seq:
            # Readers that mapped it keep their mapping; new readers use the new one.
            # Unlinked while the base still maps it: unlinking the last reference
            # frees hundreds of MB with the GIL held (posix_ipc), unmapping does
            # not hold it, so the pages are freed by _close_base below, off this thread.
            _shm.unlink(layout.snapshot_name(self.name, old))
        self._close_base(background=True)
        sseg = _shm.open_readonly(b.name)
        self._own_segments[b.name] = _inode(b.name)
        if sseg is not None:  # (None: removed by hand; the next build is a whole-state one)
            self._base = (sseg, snapshot.Snapshot(sseg.name, sseg.buf, sseg.size))
        # (service.py, issue 4) gauges of the last publish, for metrics.
        self.stats["snapshot_seconds"] = b.seconds
        self.stats["snapshot_seconds_total"] += b.seconds
        self.stats["snapshot_keys"] = b.plan.count
        self.stats["snapshot_bytes"] = b.plan.total
        log.info("snapshot published: revision %d, %d keys, %d bytes, built in %.1f ms (%s)",
                 b.revision, b.plan.count, b.plan.total, b.seconds * 1000,
                 "whole state" if b.full else f"{len(b.changes or ())} changes")

    def _reset_history(self, revision: int, reason: str, ring_capacity: int | None = None) -> None:
        """Start a new epoch at ``revision``: fresh snapshot, empty ring history."""
        assert self._ctl is not None
        if ring_capacity is not None or self._ring is None:
            self._new_ring(ring_capacity or self.ring_size)
        assert self._ring is not None
        self._drop_build()  # of the old epoch: never to be published
        self._close_base()
        self.revision = revision
        self.epoch = self._ctl.get(_B.B_EPOCH) + 1
        self._ring.records.clear()
        self._ring.tail = self._ring.head
        self._publish_snapshot({
            _B.B_SYNC_REVISION: min(self._ctl.get(_B.B_SYNC_REVISION), revision),
            _B.B_EPOCH: self.epoch, _B.B_REVISION: revision, _B.B_COMPACT_REVISION: revision,
            _B.B_RING_HEAD: self._ring.head, _B.B_RING_TAIL: self._ring.head,
            _B.B_RING_GEN: self._ring.generation, _B.B_RING_CAPACITY: self._ring.capacity,
            _B.B_ETCD_REVISION: max(self.etcd_revision, revision)}, prefix=self.prefix)
        old_gen = self._ring.generation - 1
        if old_gen > 0:
            _shm.unlink(layout.ring_name(self.name, old_gen))
        log.info("history reset to epoch %d at revision %d: %s", self.epoch, revision, reason)

    def _remove_strays(self) -> None:
        """Unlink segments of this cache that the control segment does not point at."""
        assert self._ctl is not None
        keep = {layout.control_name(self.name),
                layout.ring_name(self.name, self._ctl.get(_B.B_RING_GEN)),
                layout.snapshot_name(self.name, self._ctl.get(_B.B_SNAP_SEQ))}
        for seg in _shm.list_segments(self.name):
            if seg not in keep:
                _shm.unlink(seg)

    # -- applying events ---------------------------------------------------------

    def _append(self, revision: int, payload: bytes, n_events: int) -> None:
        assert self._ctl is not None and self._ring is not None
        rw = self._ring
        if not rw.fits(len(payload)):
            cap = self.ring_size
            while rw.record_size(len(payload)) > cap // 4:
                cap *= 2
            # The record cannot go into this ring: continue in a larger one. Watches
            # read on through the seal, so they see no gap and no CompactedError.
            self._switch_ring(cap, f"a {len(payload)}-byte revision needs a {cap}-byte ring")
            rw = self._ring
        pl = rw.place(len(payload))
        if pl.end - rw.capacity > self._snap_ring_pos and self._build is not None:
            self._finish_build(self._build, wait=True)
        if pl.end - rw.capacity > self._snap_ring_pos:
            # Writing would overwrite events newer than the live snapshot, and then
            # readers could not rebuild the current state: republish first.
            self._publish_snapshot()
        updates: dict[int, int] = {}
        if pl.new_tail != self._ctl.get(_B.B_RING_TAIL):
            updates[_B.B_RING_TAIL] = pl.new_tail
        if pl.compact_revision is not None:
            updates[_B.B_COMPACT_REVISION] = pl.compact_revision
        if updates:
            # The tail moves before the bytes are overwritten: a reader that re-reads
            # it after copying knows whether its copy can be torn.
            self._ctl.publish(updates, wake=False)
        rw.write(pl, revision, payload,
                 on_payload=(lambda: _fault_point("append")) if _FAULTS else None)
        _fault_point("append")  # the record is complete but not published
        self.revision = revision
        self._bytes_since_snapshot += len(payload)
        self.stats["events"] += n_events
        self.stats["records"] += 1
        self.stats["bytes"] += len(payload)
        self._head_unpublished = True

    def _publish_head(self) -> None:
        """Make every appended record visible and wake the readers: once per watch response.

        A response that catches up a backlog carries many revisions; publishing
        them together costs one seqlock write and one FUTEX_WAKE instead of one per
        record, and readers still see whole revisions only.
        """
        if not self._head_unpublished:
            return
        assert self._ctl is not None and self._ring is not None
        self._ctl.publish({_B.B_RING_HEAD: self._ring.head, _B.B_REVISION: self.revision,
                           _B.B_KEY_COUNT: len(self.kv),
                           _B.B_ETCD_REVISION: max(self.etcd_revision, self.revision)})
        self._head_unpublished = False
        with self._revision_moved:
            self._revision_moved.notify_all()

    def _flush(self, revision: int, batch: list[_codec.EventTuple]) -> None:
        """Append one revision's record, then apply it to the state.

        In that order because appending may first publish a snapshot, which must
        hold exactly the state at the previous revision.
        """
        self._append(revision, _codec.encode(batch), len(batch))
        kv = self.kv
        delta = self._delta
        span = snapshot.entry_span
        for typ, key, value, create, mod, version, lease, _prev in batch:
            old = kv.get(key)
            if old is not None:
                self._data_len -= span(key, old[0])
            if typ == 0:
                kv[key] = delta[key] = (value, create, mod, version, lease)
                self._data_len += span(key, value)
            elif old is not None:
                del kv[key]
                delta[key] = None

    def _apply_events(self, events: Any) -> None:
        """Apply a watch response's events, one ring record per revision.

        etcd never splits one revision's events across watch responses (without
        the fragment option, which is not used), so each response's revisions are
        complete.
        """
        batch: list[_codec.EventTuple] = []
        batch_rev = 0
        for ev in events:
            e = ev.kv
            rev = e.mod_revision
            if rev != batch_rev:
                if batch:
                    self._flush(batch_rev, batch)
                    batch = []
                if rev <= self.revision:
                    raise _Relist(f"etcd sent revision {rev} after the cache reached "
                                  f"{self.revision}")
                batch_rev = rev
            if ev.HasField("prev_kv"):
                p = ev.prev_kv
                prev = (p.key, p.value, p.create_revision, p.mod_revision, p.version, p.lease)
            else:
                # etcd leaves prev_kv out when it can no longer read the revision
                # before the event (compacted while the watch caught up); the state
                # holds that value exactly, and past-revision reads depend on it.
                old = self.kv.get(e.key)
                prev = (e.key, *old) if old is not None else None
            if ev.type == 0:
                batch.append((0, e.key, e.value, e.create_revision, rev, e.version, e.lease, prev))
            else:
                batch.append((1, e.key, b"", 0, rev, 0, 0, prev))
        if batch:
            self._flush(batch_rev, batch)
        self._publish_head()
        self._last_event = time.monotonic()

    def _on_progress(self, revision: int) -> None:
        """A progress notification: etcd's watch has delivered every event up to ``revision``.

        etcd < 3.4.31 / 3.5.13 may send a requested progress notification ahead of
        events it has not delivered yet (etcd issues 15220, 17507): events already
        queued for the stream, and, on a watch created behind etcd's revision
        (unsynced), all the events etcd's catch-up loop has yet to send. Three
        defences, each cheap because progress only matters while the range idles:

        1. A notification is only a candidate until the answer to a progress
           request sent *after* it arrives; an event at or below the candidate
           in between discards it (queued events go out before later answers).
        2. On a watch created unsynced, no candidate is taken until an event
           response reaches the creation revision or 2 s have passed (etcd's
           catch-up loop runs every 100 ms).
        3. Before publishing candidate P, Range reads at P check that the key
           count matches the state and (for ranges up to PROGRESS_SCAN_LIMIT
           keys) that no key was modified after the cache's revision: pending
           puts and deletes show. (Keys created and deleted again inside the
           window escape this, and in larger ranges so do pending updates of
           existing keys.)
        A late event at or below the published revision still relists into a
        new epoch: the failure is explicit, never silent.
        """
        assert self._ctl is not None
        self._progress_outstanding = False
        self.etcd_revision = max(self.etcd_revision, revision)
        if self._unsynced_until and time.monotonic() - self._watch_created < 2.0:
            self._progress_candidate = None
            return
        cand = self._progress_candidate
        if cand is not None and cand > self.revision and not self._progress_plausible(cand):
            self.stats["progress_anomalies"] += 1
            log.warning("progress notification for revision %d ignored: etcd still has events "
                        "after %d to deliver", cand, self.revision)
            cand = self._progress_candidate = None
        if cand is not None and cand > self.revision:
            self.revision = cand
            self._ctl.publish({_B.B_REVISION: cand, _B.B_ETCD_REVISION: self.etcd_revision})
            with self._revision_moved:
                self._revision_moved.notify_all()
        self._progress_candidate = revision if revision > self.revision else None
        if self._progress_candidate is not None and self._stream is not None:
            self._request_progress()

    def _progress_plausible(self, revision: int) -> bool:
        """Whether etcd's range at ``revision`` agrees with the state (see _on_progress, 3)."""
        conn = self._conn
        if conn is None or conn.client is None:
            return False
        try:
            if conn.count(self.range_key, self.range_end, revision) != len(self.kv):
                return False
            # etcd filters by mod revision only by scanning the range: affordable
            # for small ranges; large ones rely on the count and defences 1 and 2.
            if len(self.kv) <= self.PROGRESS_SCAN_LIMIT:
                return conn.modified_since(self.range_key, self.range_end, revision,
                                           self.revision + 1) == 0
        except Exception as exc:  # compacted meanwhile, or etcd gone: not confirmed
            log.debug("progress check at %d failed: %s", revision, _etcd.describe(exc))
            return False
        return True

    def _request_progress(self) -> None:
        now = time.monotonic()
        # etcd < 3.4.31/3.5.13 may never answer a request made while the watch is
        # unsynced (etcd issue 17507): after 5 s, ask again rather than wait forever.
        if self._stream is not None and (not self._progress_outstanding
                                         or now - self._progress_sent > 5.0):
            self._progress_outstanding = True
            self._progress_sent = now
            self.stats["progress_requests"] += 1
            self._stream.request_progress()

    def _maybe_snapshot(self) -> None:
        """Publish a finished background build; start one when the cadence says so."""
        if self._build is not None:
            self._finish_build(self._build)
            return
        if self._bytes_since_snapshot and (
                self._bytes_since_snapshot >= self.snapshot_bytes
                or time.monotonic() - self._last_snapshot >= self.snapshot_interval):
            if self._base is None:
                self._publish_snapshot()  # a whole-state build: no base to start from
                return
            self._build = _SnapshotBuild(self)
            threading.Thread(target=self._build.run, name="shmcache-snapshot",
                             daemon=True).start()

    # -- main loop -----------------------------------------------------------------

    def _ticker(self) -> None:
        """Heartbeat, stop requests, the control segment's presence and idle progress requests.

        Runs beside the watch loop and wakes every 0.25 s, or at once when
        ``stop()`` writes to the wake pipe.
        """
        wake = self._wake_r
        assert wake is not None
        while not self._stop_requested and not self._stop.is_set():
            try:
                ready, _, _ = select.select([wake], [], [], 0.25)
                if ready:
                    os.read(wake, 4096)
            except OSError:
                pass
            if self._stop_requested or self._stop.is_set():
                break
            ctl = self._ctl
            if ctl is None:
                continue
            ctl.heartbeat()
            if not self._control_still_ours():
                break
            now = time.monotonic()
            if (now - self._last_event >= self.progress_interval
                    and now - self._progress_sent >= self.progress_interval):
                self._request_progress()
        self._stop.set()
        # Unblock the loop wherever it waits on etcd: the watch stream, or a
        # connect or list call (up to their timeouts otherwise).
        stream = self._stream
        if stream is not None:
            stream.close()
        conn = self._conn
        if conn is not None:
            conn.close()

    def _control_still_ours(self) -> bool:
        """False (and the writer stops with an error) once the control segment was unlinked.

        After `shmcache rm --force`, or anything else that unlinks it, nobody can
        attach to what this writer publishes, and a new writer may take the
        name: publishing on would only feed segments no reader sees.
        """
        cname = layout.control_name(self.name)
        try:
            same = os.stat(_shm.SHM_DIR + cname).st_ino == self._ctl_ino
        except FileNotFoundError:
            same = False
        except OSError:
            return True  # cannot tell: keep serving
        if not same:
            self._fatal = WriterError(
                f"control segment {cname} was removed while this writer ran (shmcache rm "
                f"--force?): readers can no longer attach to what it publishes",
                hint="Stopping; start the writer again to republish the cache")
            log.error("%s; stopping", self._fatal.message)
        return same

    def _sync_loop(self, sock: Any) -> None:
        """Serve consistent-read requests from readers (see _sync.py), one round at a time."""
        assert self._ctl is not None
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([sock], [], [], 0.25)
            except (OSError, ValueError):
                return
            if not ready or not _sync.drain(sock):
                continue
            self.stats["sync_requests"] += 1
            # Requests that arrive from here on are served by the next round.
            started = self._ctl.get(_B.B_SYNC_STARTED) + 1
            self._ctl.publish({_B.B_SYNC_STARTED: started}, wake=False)
            try:
                target = self._sync_round()
            except Exception as exc:  # etcd down: readers time out and retry
                log.warning("sync round %d failed: %s", started, _etcd.describe(exc))
                continue
            if target is not None:
                self.stats["sync_rounds"] += 1
                self._ctl.publish({_B.B_SYNC_DONE: started, _B.B_SYNC_REVISION: target})

    def _sync_round(self, timeout: float = 10.0) -> int | None:
        """Learn etcd's current revision R, then wait until the cache has reached it.

        R comes from a linearizable read issued after the requests arrived, so it
        covers every write that completed before those sync() calls. An idle
        range reaches R through progress notifications (double-confirmed, see
        _on_progress).
        """
        conn = self._conn
        if conn is None or conn.client is None:
            raise _WatchBroken("not connected to etcd")
        target = conn.current_revision(self.range_key, self.range_end)
        deadline = time.monotonic() + timeout
        ctl = self._ctl
        assert ctl is not None

        def published() -> int:
            # What readers can see, not self.revision, which runs ahead of the
            # block while a watch response is being appended.
            return ctl.get(_B.B_REVISION)

        with self._revision_moved:
            while published() < target and not self._stop.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    log.warning("sync: cache stuck at revision %d below etcd's %d",
                                published(), target)
                    return None
                self._request_progress()
                self._revision_moved.wait(min(remaining, 0.5))
        return target if published() >= target else None

    def _relist(self, conn: _etcd.Connection, reason: str) -> None:
        t0 = time.monotonic()
        log.info("listing %r from etcd (%s)", _text(self.prefix), reason)
        rev, items = conn.list_range(self.range_key, self.range_end,
                                     progress=self.list_progress)  # (issue 4: progress hook)
        self.etcd_revision = max(self.etcd_revision, rev)
        self.kv = SortedDict(items)  # (its size is counted by the whole-state build below)
        _freeze_gc()
        self.stats["relists"] += 1
        self._reset_history(rev, reason)
        log.info("listed %d keys at revision %d in %.2fs", len(items), rev,
                 time.monotonic() - t0)

    def run(self) -> None:
        """Serve until ``stop()``: attach, list or resume, then watch and publish.

        Raises WriterError if the cache's control segment is removed while it
        runs (it stops publishing), CacheExistsError if another writer holds it.
        """
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            self._run()
        finally:
            for fd in (self._wake_r, self._wake_w):
                os.close(fd)
            self._wake_r = self._wake_w = None
        if self._fatal is not None:
            raise self._fatal

    def _run(self) -> None:
        if self._stop_requested:
            return
        existed = self._attach_control()
        self._apply_permissions()
        ticker = threading.Thread(target=self._ticker, name="shmcache-ticker", daemon=True)
        ticker.start()
        sync_sock = None
        try:
            sync_sock = _sync.bind(self.name)
        except OSError as exc:
            log.warning("consistent reads (Reader.sync) unavailable: cannot bind the request "
                        "socket: %s", exc)
        syncer = None
        if sync_sock is not None:
            syncer = threading.Thread(target=self._sync_loop, args=(sync_sock,),
                                      name="shmcache-sync", daemon=True)
            syncer.start()
        try:
            why_not = self._restore() if existed else "first start"
            if why_not is None:
                assert self._ctl is not None and self._ring is not None
                if self._ring.capacity != self.ring_size:
                    self._switch_ring(self.ring_size, f"the ring size setting is "
                                      f"{self.ring_size} bytes")
                self._ctl.publish({})  # wake readers: the writer is back
            elif existed:
                why_not = f"cannot resume from the existing segments: {why_not}"
                log.warning("%s; relisting", why_not)
            self._loop(why_not)
        finally:
            self._stop.set()
            self._wake()
            with self._revision_moved:
                self._revision_moved.notify_all()
            ticker.join(timeout=2)
            if syncer is not None:
                syncer.join(timeout=2)
            if sync_sock is not None:
                sync_sock.close()
            self._shutdown()

    def _loop(self, relist_reason: str | None) -> None:
        """Connect, (re)list when needed, watch; reconnect with backoff on etcd errors.

        The pause between attempts doubles from 0.1 s to ``backoff_max`` while
        etcd stays unreachable and starts over once a watch has worked.
        """
        conn = _etcd.Connection(self.etcd_settings)
        self._conn = conn
        if self._stop.is_set():
            conn.close()  # stop() came first: the ticker may have missed this connection
        backoff = 0.1
        need_list = relist_reason is not None
        reason = relist_reason or ""
        try:
            while not self._stop.is_set():
                try:
                    conn.connect()
                    log.info("connected to etcd %s (version %s)", conn.endpoint, conn.version)
                    current = conn.current_revision(self.range_key, self.range_end)
                    self._etcd_reachable(current)
                    if not need_list and current < self.revision:
                        need_list, reason = True, (f"etcd is at revision {current}, behind the "
                                                   f"cache's {self.revision} (a new cluster?)")
                    if need_list:
                        self._relist(conn, reason)
                        need_list = False
                    if self._remove_strays_later:
                        self._remove_strays()
                        self._remove_strays_later = False
                    self.ready.set()
                    self._healthy = False
                    self._watch(conn)
                except _Relist as exc:
                    need_list, reason = True, exc.reason
                    log.warning("relisting: %s", exc.reason)
                except Exception as exc:
                    if self._stop.is_set():
                        break
                    if not _etcd.is_grpc_error(exc) and not isinstance(exc, (OSError, _WatchBroken)):
                        raise
                    if _etcd.is_compacted(exc):
                        need_list, reason = True, "etcd compacted past the cache's revision"
                        continue
                    if self._healthy:
                        backoff = 0.1  # the last watch worked: start over from short waits
                        self._healthy = False
                    self.stats["reconnects"] += 1
                    self._etcd_unreachable(_etcd.describe(exc))
                    log.warning("etcd error (%s); retrying in %.1fs", _etcd.describe(exc), backoff)
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, self.backoff_max)
        finally:
            conn.close()

    def _watch(self, conn: _etcd.Connection) -> None:
        start = self.revision + 1
        stream = conn.watch(self.range_key, self.range_end, start)
        self._stream = stream
        self.stats["watches"] += 1  # (issue 4)
        self._progress_candidate = None
        self._progress_outstanding = False
        try:
            for resp in stream:
                self.stats["watch_responses"] += 1  # (issue 4: watchdog liveness, metrics)
                if self._stop.is_set():
                    return
                if resp.compact_revision:
                    raise _Relist(f"etcd compacted to revision {resp.compact_revision}, past the "
                                  f"cache's {self.revision}")
                if resp.canceled:
                    raise _WatchBroken(f"etcd cancelled the watch: {resp.cancel_reason or '?'}")
                self.etcd_revision = max(self.etcd_revision, resp.header.revision)
                self._healthy = True
                if resp.created:
                    log.info("watching %r from revision %d", _text(self.prefix), start)
                    # Created behind etcd's revision: unsynced until etcd's catch-up
                    # loop has sent the events up to here (see _on_progress).
                    self._watch_created = time.monotonic()
                    created_at = int(resp.header.revision)
                    self._unsynced_until = created_at if created_at >= start else 0
                    continue
                if resp.events:
                    if self._unsynced_until and resp.header.revision >= self._unsynced_until:
                        self._unsynced_until = 0
                    if self._progress_candidate is not None and any(
                            ev.kv.mod_revision <= self._progress_candidate for ev in resp.events):
                        self._progress_candidate = None  # it overtook events: not truthful
                        self.stats["progress_anomalies"] += 1
                    self._apply_events(resp.events)
                else:
                    self._on_progress(int(resp.header.revision))
                self._maybe_snapshot()
            if not self._stop.is_set():
                raise _WatchBroken("etcd closed the watch stream")
        finally:
            self._stream = None
            stream.close()

    def stop(self) -> None:
        """Ask ``run()`` to return after the record in progress.

        Safe from any thread and from a signal handler: it sets a flag and writes
        one byte to a pipe, and takes no lock (a handler that runs while its own
        thread holds a lock the stop path needs would deadlock). The writer's
        ticker thread wakes on the byte and cancels the etcd call the loop waits in.
        """
        self._stop_requested = True
        self._wake()

    def _wake(self) -> None:
        fd = self._wake_w
        if fd is not None:
            try:
                os.write(fd, b"\0")
            except OSError:  # full (a wake is pending anyway) or closed (run() ended)
                pass

    def _etcd_reachable(self, revision: int) -> None:
        self.etcd_revision = max(self.etcd_revision, revision)
        if self.etcd_down_since is not None:
            log.info("etcd reachable again after %.1fs", time.time() - self.etcd_down_since)
        self.etcd_down_since = None
        self.last_etcd_error = ""
        if self._ctl is not None:
            self._ctl.set_etcd_down_since(0)

    def _etcd_unreachable(self, error: str) -> None:
        self.last_etcd_error = error
        if self.etcd_down_since is None:
            self.etcd_down_since = time.time()
            if self._ctl is not None:
                self._ctl.set_etcd_down_since(int(self.etcd_down_since * 1e9))

    def _shutdown(self) -> None:
        self._drop_build()  # unpublished: of no use to the next writer
        self._close_base()
        if self._fatal is not None:
            # The cache was removed under this writer: unlink what it created since,
            # but only segments that are still its own (a new writer may already
            # have created segments of the same names).
            for seg_name, ino in self._own_segments.items():
                if ino and _inode(seg_name) == ino:
                    _shm.unlink(seg_name)
        if self._ctl is not None:
            self._ctl.heartbeat()
            self._ctl.release()
        for seg in (self._ring_seg, self._ctl_seg):
            if seg is not None:
                seg.close()
        if self.remove_on_close and self._fatal is None:
            # Before the lock goes: no other writer can have started on these names.
            _shm.remove_cache(self.name, force=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None
        log.info("writer for %r stopped at revision %d", self.name, self.revision)


def _inode(seg_name: str) -> int:
    """Inode of a segment's /dev/shm entry (0 if there is none): tells two segments of one name apart."""
    try:
        return os.stat(_shm.SHM_DIR + seg_name).st_ino
    except OSError:
        return 0


def _freeze_gc() -> None:
    """Keep the cyclic GC from walking the state: a full collection visits every
    tracked object, and with millions of keys that is a pause of tens of ms in the
    watch loop. The state holds no reference cycles (refcounting frees it), so
    moving what exists now into the permanent generation loses nothing."""
    gc.collect()
    gc.freeze()


def _close_all(*objs: Any) -> None:
    for obj in objs:
        obj.close()


class _SnapshotBuild:
    """One snapshot in the making: its inputs frozen at the writer's current revision.

    Made on the writer's watch thread, which then runs ``run()`` itself or in a
    thread of its own. A build from the live snapshot (the base) takes the
    changes since it (the writer starts a new delta), so freezing costs nothing
    however large the state; a full build (no base: after a relist) copies the
    state's keys and values. ``run()`` touches only these frozen inputs and its
    own new segment, and never the control segment: the watch thread publishes
    the result (Writer._publish_build), so readers see snapshots in order and
    only complete ones.
    """

    def __init__(self, w: Writer) -> None:
        assert w._ring is not None
        self.seq = w._snap_seq + 1
        self.name = layout.snapshot_name(w.name, self.seq)
        self.mode, self.group = w.mode, w.group
        self.revision, self.epoch, self.ring_pos = w.revision, w.epoch, w._ring.head
        self.base = w._base[1] if w._base is not None else None
        self.full = self.base is None
        self.changes: dict[bytes, KV | None] | None = None
        self.keys: list[bytes] = []
        self.values: list[KV | None] = []
        if self.full:
            self.keys, self.values = list(w.kv.keys()), list(w.kv.values())
            w._delta = {}
            # Recounted here (O(keys), like the copy above): a whole-state build
            # never depends on the running count being right.
            w._data_len = sum(map(snapshot.entry_span, self.keys, (v[0] for v in self.values)))
        else:
            self.changes, w._delta = w._delta, {}
        self.plan = snapshot.Plan.of(len(w.kv), w._data_len)
        self.bytes_since, w._bytes_since_snapshot = w._bytes_since_snapshot, 0
        w._last_snapshot = time.monotonic()
        self.seg: _shm.Segment | None = None
        self.error: BaseException | None = None
        self.seconds = 0.0
        self.done = threading.Event()

    def run(self) -> None:
        t0 = time.monotonic()
        try:
            _shm.unlink(self.name)
            self.seg = _shm.create(self.name, self.plan.total, self.mode, self.group)
            _fault_point("snapshot")  # created, not filled: a stray for the next writer
            if self.changes is not None:
                self.keys = sorted(self.changes)
                self.values = [self.changes[k] for k in self.keys]
            snapshot.write(self.seg.buf, self.plan, self.revision, self.epoch, self.keys,
                           self.values, self.base)
        except Exception as exc:  # reported by the watch thread (Writer._finish_build)
            self.error = exc
        finally:
            if self.seg is not None:
                self.seg.close()  # here, not on the watch thread: unmapping takes a while
            self.keys, self.values = [], []
            self.seconds = time.monotonic() - t0
            self.done.set()


class _WatchBroken(ShmCacheError):
    """The watch stream ended or was cancelled for a reason other than compaction."""
