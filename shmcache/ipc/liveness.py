"""Whether a process still runs: its start time in /proc, and this process's PID namespace.

A pid and its start time name a process uniquely (a recycled pid starts later);
the control segment records both for its writer (control_reader.writer_liveness).
"""

from __future__ import annotations

import os


def process_start_ticks(pid: int) -> int | None:
    """Start time of live process ``pid`` in clock ticks since boot; None if there is none.

    Together with the pid it names a process uniquely: a recycled pid has a
    different start time. A zombie (state ``Z``: killed, not yet reaped by its
    parent) or a dying process (``X``) counts as none: it will never beat or
    publish again.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after
    # the last ')'. Then field 3 is the state and field 22 the start time.
    try:
        rest = data[data.rindex(b")") + 2:].split()
        if rest[0] in (b"Z", b"X", b"x"):
            return None
        return int(rest[19])
    except (ValueError, IndexError):
        return None


def pid_namespace() -> int:
    """Inode of this process's PID namespace (0 if /proc does not tell)."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0
