"""Fault points: ``SHMCACHE_FAULT`` makes the writer die or fail at named steps of publishing.

Syntax: comma-separated ``POINT[:PROBABILITY[:ACTION]]``; the probability
defaults to 1, the action to ``kill``::

    SHMCACHE_FAULT="append:0.05,snapshot:0.2"      SIGKILL the writer there (the fault checker)
    SHMCACHE_FAULT="snapshot:1:enospc"             raise OSError(ENOSPC) there, as a full /dev/shm
    SHMCACHE_FAULT="ring_switch:0.5:error"         raise RuntimeError there (an unexpected bug)

The points, each on the writer's way to making something visible to readers
(docs/design.md, "Publishing is a transaction"):

- ``append``: a ring record, after its payload (header not written) and after its header
- ``tail``: before the tail and oldest watchable revision an append needs are published
- ``head``: before the head of appended records is published (``publish_head``)
- ``progress``: before a progress revision is published
- ``snapshot``: a snapshot segment created, not yet filled
- ``index``: an index segment created, not yet filled
- ``snapshot_publish``: a snapshot filled, not yet published
- ``overlay``: a delta segment created, not yet filled
- ``ring_switch``: a new ring generation's segment created, not yet initialised
- ``epoch``: a new epoch's snapshot filled, not yet published (``reset``)
- ``restore``: before a resumed writer's first publish (``restore``)
- ``drop_event``: lose the first event applied after start, once (see drop_event)

Tests set points in-process with ``configure``. Unset (always, in production)
a fault point costs one dict lookup, and the append path checks ``FAULTS``
(empty) before it looks up anything.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import signal
from typing import Any

log = logging.getLogger("shmcache.writer")

ACTIONS = ("kill", "enospc", "error")


def parse(spec: str) -> dict[str, tuple[float, str]]:
    """``"append:0.05,snapshot::enospc"`` -> ``{"append": (0.05, "kill"), "snapshot": (1.0, "enospc")}``."""
    out = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        point, _, rest = part.partition(":")
        prob, _, action = rest.partition(":")
        action = action or "kill"
        if action not in ACTIONS:
            raise ValueError(f"SHMCACHE_FAULT: unknown action {action!r} for point {point!r} "
                             f"(one of {', '.join(ACTIONS)})")
        out[point] = (float(prob or 1.0), action)
    return out


# Mutated in place only (configure), so modules holding a reference see changes.
FAULTS: dict[str, tuple[float, str]] = parse(os.environ.get("SHMCACHE_FAULT", ""))


_fired: set[str] = set()


def configure(spec: str) -> None:
    """Replace the configured points (``""``: none); for tests in this process."""
    new = parse(spec)
    FAULTS.clear()
    FAULTS.update(new)
    _fired.clear()


def once(name: str) -> bool:
    """True the first time fault point ``name`` is reached, if it is configured."""
    if name in FAULTS and name not in _fired:
        _fired.add(name)
        log.warning("SHMCACHE_FAULT: fault point %r fires", name)
        return True
    return False


def drop_event(batch: list[Any]) -> list[Any]:
    """``drop_event``: lose the first event applied after start, once, as a writer bug
    would (the verifier's test: the check against etcd must find it and relist)."""
    return batch[1:] if once("drop_event") else batch


def point(name: str) -> None:
    """Act at fault point ``name`` with its configured probability: SIGKILL this process,
    or raise ``OSError(ENOSPC)`` (``enospc``) or ``RuntimeError`` (``error``)."""
    f = FAULTS.get(name)
    if f is None or not (f[0] and random.random() < f[0]):
        return
    action = f[1]
    if action == "kill":
        log.warning("SHMCACHE_FAULT: killing the writer at fault point %r", name)
        os.kill(os.getpid(), signal.SIGKILL)
        return
    if action == "enospc":
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (SHMCACHE_FAULT {name})")
    raise RuntimeError(f"SHMCACHE_FAULT: unexpected error at fault point {name!r}")
