"""Crash-test hooks: ``SHMCACHE_FAULT="append:0.05,snapshot:0.2"`` kills the writer at named points.

The fault checker (tests/checker.py) sets the variable so that the writer is
SIGKILLed in the middle of appending a ring record or publishing a snapshot,
the two places where a crash leaves half-written bytes behind. Unset (always,
in production) a fault point costs one dict lookup.
"""

from __future__ import annotations

import logging
import os
import random
import signal
from typing import Any

log = logging.getLogger("shmcache.writer")


def parse(spec: str) -> dict[str, float]:
    """``"append:0.05,snapshot"`` -> ``{"append": 0.05, "snapshot": 1.0}``."""
    out = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        point, _, prob = part.partition(":")
        out[point] = float(prob or 1.0)
    return out


FAULTS = parse(os.environ.get("SHMCACHE_FAULT", ""))


_fired: set[str] = set()


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
    """SIGKILL this process here with the configured probability of fault point ``name``."""
    p = FAULTS.get(name)
    if p and random.random() < p:
        log.warning("SHMCACHE_FAULT: killing the writer at fault point %r", name)
        os.kill(os.getpid(), signal.SIGKILL)
