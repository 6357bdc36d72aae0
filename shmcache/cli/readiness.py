"""``shmcache status``: a cache's state, and whether it is ready (the readiness probe).

Ready means readers can attach, a writer is alive, it has reached etcd since it
started and reaches it now, and publishing has not failed for longer than a
grace period (docs/operations.md, "Readiness").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from typing import Any

from ..errors import ShmCacheError
from .output import since as _since
from .output import text as _text


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _reader(name: str, timeout: float = 2.0) -> Any:
    from ..reader.reader import Reader

    return Reader(name, timeout=timeout)


def _status(name: str) -> tuple[Any, str | None, bool]:
    """The cache's Status, why readers cannot attach (None: they can), and whether its
    writer has reached etcd since it started.

    A live writer that has not loaded the range yet (etcd unreachable since it
    started, say) has no snapshot, so no Reader attaches; its control segment
    still tells the writer's state, which is when an operator asks for it. With
    no writer alive either, the Reader's error stands.
    """
    from ..errors import InvalidNameError
    from ..ipc import control_reader
    from ..reader.janitor import pinned_bytes

    try:
        with _reader(name, timeout=0.0) as r:  # no waiting: the control segment answers
            st, unattachable = r.status(), None
    except InvalidNameError:
        raise
    except ShmCacheError as exc:
        st, unattachable = None, exc
    try:
        cr = control_reader.ControlReader.open(name)
    except ShmCacheError:
        if unattachable is not None:
            raise unattachable from None
        raise
    try:
        reached = cr.etcd_reached()
        if st is None and unattachable is not None:
            try:
                st = cr.status(name, None)
            except ShmCacheError:
                raise unattachable from None
    finally:
        cr.close()
    if unattachable is not None and not st.writer_alive:
        raise unattachable from None
    if unattachable is not None:  # (a Reader's status() counts them itself)
        st = dataclasses.replace(st, pinned_bytes=pinned_bytes(name))
    return st, unattachable.message if unattachable is not None else None, reached


# A writer that has failed to publish for this long fails the readiness probe
# (``status --publish-grace``): shorter failures (an old snapshot not yet freed)
# heal on the writer's next attempt, within seconds.
PUBLISH_GRACE = 30.0


def _not_ready(st: Any, unattachable: str | None, reached: bool, grace: float) -> str | None:
    """Why the cache is not ready (one line), or None: readers can attach, a writer is
    alive, it has reached etcd and reaches it now, and publishing has not failed for
    ``grace`` seconds."""
    if not st.writer_alive:
        return "no writer is running (readers serve the last published revision)"
    if unattachable is not None:
        return f"readers cannot attach yet: {unattachable}"
    if st.etcd_unreachable_since is not None:
        return f"the writer cannot reach etcd: {_etcd_state(st)}"
    if not reached:
        return "the writer has not reached etcd yet"
    since = st.publish_failing_since
    if since is not None and time.time() - since >= grace:
        return (f"the writer cannot publish for {time.time() - since:.0f}s, the cache is stuck "
                f"at revision {st.revision}: {st.publish_error}")
    return None


def cmd_status(args: argparse.Namespace) -> int:
    """Exit 0 when the cache is ready (see _not_ready), 1 when it is not (the reason is in
    the output), 2 when there is no cache to show."""
    from ..writer.lock import stuck_lock_text

    st, unattachable, reached = _status(args.name)
    why_not = _not_ready(st, unattachable, reached, args.publish_grace)
    stuck_lock = stuck_lock_text(st.name)  # it keeps every writer out until its holder lets go
    d = {**st.as_dict(), "writer_lock": stuck_lock}
    if args.json:
        d["ready"] = why_not is None
        d["not_ready_reason"] = why_not
        print(json.dumps(d, indent=2))
        return 0 if why_not is None else 1
    age = "-" if st.heartbeat_age is None else f"{st.heartbeat_age:.1f}s ago"
    rows = [
        ("cache", st.name), ("prefix", _text(st.prefix) or "(whole keyspace)"),
        ("writer", f"pid {st.writer_pid} {'alive' if st.writer_alive else 'NOT RUNNING'}"),
        ("heartbeat", age), ("etcd", _etcd_state(st) if reached or not st.writer_alive
                             or st.etcd_unreachable_since else "not reached yet"),
        ("publishing", _publish_state(st)), ("revision", st.revision),
        ("etcd revision seen", st.etcd_revision), ("epoch", st.epoch),
        ("oldest watchable", st.oldest_watchable_revision),
        ("snapshot revision", st.snapshot_revision), ("keys", st.key_count),
        ("ring", f"{st.ring_used} of {st.ring_capacity} bytes used"),
        ("format version", st.format_version),
    ]
    for iname, spec in st.indexes.items():
        rows.append((f"index {iname}", spec))
    if unattachable:
        rows.append(("readers", f"cannot attach yet: {unattachable}"))
    if stuck_lock:
        rows.append(("writer lock", stuck_lock))
    if st.pinned_bytes is not None:
        rows.append(("pinned by readers", f"{st.pinned_bytes} bytes of unlinked segments"))
    rows.append(("ready", "yes" if why_not is None else f"NO: {why_not}"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0 if why_not is None else 1


def _publish_state(st: Any) -> str:
    since = st.publish_failing_since
    if not st.writer_alive:
        return "unknown (no writer running)"
    if since is None:
        return "ok"
    return f"FAILING since {_since(since, date=True)}): {_one_line(st.publish_error or '')}"


def _etcd_state(st: Any) -> str:
    since = st.etcd_unreachable_since
    if not st.writer_alive:
        return "unknown (no writer running)"
    if since is None:
        return "reachable"
    return f"unreachable since {_since(since, date=True)})"
