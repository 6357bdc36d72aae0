"""Argument checks of the public API, written once: each error names the argument.

A wrong type is a ``TypeError``, a value out of range a ``ValueError``, both
raised before anything is read, so a caller's mistake never turns into a wrong
answer (``bytes(5)`` is five NUL bytes) or an error from deep inside a read.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["as_bytes", "count", "opt_revision", "opt_seconds", "page_args", "read_args",
           "revision", "seconds", "shard", "shard_text"]


def _kind(value: Any) -> str:
    return type(value).__name__


def as_bytes(value: Any, name: str) -> bytes:
    """A key, prefix or index value: bytes (or bytearray, memoryview) as they are, str as
    UTF-8; anything else (an int above all: ``bytes(5)``) is a TypeError."""
    if type(value) is bytes:
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"{name} must be bytes or str, not {_kind(value)}")


def _int(value: Any, name: str, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be {what} (an int), not {_kind(value)}")
    return value


def revision(value: Any, name: str) -> int:
    """A revision: an int >= 0."""
    if _int(value, name, "a revision") < 0:
        raise ValueError(f"{name} must be a revision >= 0, not {value}")
    return int(value)


def opt_revision(value: Any, name: str) -> int | None:
    """None, or a revision."""
    return None if value is None else revision(value, name)


def count(value: Any, name: str, minimum: int = 0) -> int | None:
    """None, or an int >= ``minimum`` (a limit, a page size)."""
    if value is None:
        return None
    if _int(value, name, "a number of keys") < minimum:
        raise ValueError(f"{name} must be >= {minimum}, not {value}")
    return int(value)


def seconds(value: Any, name: str) -> float:
    """A finite number of seconds >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, not {_kind(value)}")
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a number of seconds >= 0, not {value}")
    return float(value)


def opt_seconds(value: Any, name: str) -> float | None:
    """None, or a number of seconds."""
    return None if value is None else seconds(value, name)


def read_args(rev: Any, min_revision: Any, timeout: Any) -> None:
    """``revision``, ``min_revision`` and ``timeout`` of a read (get, list, by_index)."""
    opt_revision(rev, "revision")
    opt_revision(min_revision, "min_revision")
    opt_seconds(timeout, "timeout")


def page_args(limit: Any, rev: Any, continue_token: Any, min_revision: Any,
              timeout: Any) -> None:
    """The arguments ``list`` and ``by_index`` share; raises on the first bad one."""
    count(limit, "limit")
    read_args(rev, min_revision, timeout)
    if continue_token is not None and not isinstance(continue_token, str):
        raise TypeError(f"continue_token must be a str from ListResult.continue_token, not "
                        f"{_kind(continue_token)}")
    if continue_token is not None and rev is not None:
        raise ValueError("pass continue_token or revision, not both (a token carries its "
                         "revision)")


def shard(value: Any) -> tuple[int, int] | None:
    """None, or a shard ``(i, n)``: ints with ``n >= 1`` and ``0 <= i < n`` (the keys with
    ``zlib.crc32(key) % n == i``)."""
    if value is None:
        return None
    if not isinstance(value, tuple) or len(value) != 2 or any(
            isinstance(x, bool) or not isinstance(x, int) for x in value):
        raise TypeError(f"shard must be a pair of ints (i, n), not {value!r}")
    i, n = value
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"shard must be (i, n) with n >= 1 and 0 <= i < n, not {value!r}")
    return int(i), int(n)


def shard_text(text: str | None, name: str) -> tuple[int, int] | None:
    """None, or a shard written ``I/N`` (the command line's ``--shard``), checked as ``shard``."""
    if text is None:
        return None
    i, sep, n = text.partition("/")
    if not sep or not i.isdigit() or not n.isdigit():
        raise ValueError(f"{name} wants I/N (e.g. 0/4: the keys with crc32(key) % 4 == 0), "
                         f"not {text!r}")
    return shard((int(i), int(n)))
