"""How the command line prints keys, values and ranges: one-line text, and etcdctl's JSON."""

from __future__ import annotations

import base64
import time
from typing import Any

from ..types import CountResult, KeyValue, ListResult

__all__ = ["count_json", "kv_json", "plural", "range_json", "text"]

_NAMED_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def text(b: bytes) -> str:
    """Key or value bytes for text output, unambiguous and on one line.

    Valid printable UTF-8 is shown as itself. A backslash becomes ``\\\\``, newline,
    CR and tab ``\\n \\r \\t``, other control or non-printable characters ``\\xNN``
    (ASCII) or ``\\uNNNN``/``\\UNNNNNNNN``, and a byte that is not UTF-8 ``\\xNN``
    (always 80-ff: a code point there is written ``\\u00NN``). So the byte ``\\xff``
    and the four characters ``\\xff`` print differently, and no value splits a line.
    ``--json`` and ``get --raw`` give the exact bytes.
    """
    s = b.decode("utf-8", "surrogateescape")
    if s.isprintable() and "\\" not in s:
        return s
    out = []
    for c in s:
        o = ord(c)
        if c in _NAMED_ESCAPES:
            out.append(_NAMED_ESCAPES[c])
        elif 0xDC80 <= o <= 0xDCFF:  # an undecodable byte (surrogateescape)
            out.append(f"\\x{o - 0xDC00:02x}")
        elif c.isprintable():
            out.append(c)
        elif o < 0x80:
            out.append(f"\\x{o:02x}")
        elif o <= 0xFFFF:
            out.append(f"\\u{o:04x}")
        else:
            out.append(f"\\U{o:08x}")
    return "".join(out)


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


def kv_json(kv: KeyValue, keys_only: bool = False) -> dict[str, Any]:
    """A KeyValue as ``etcdctl -w json`` writes one: its fields in its order, key and value
    standard base64, ``lease`` left out when 0 (etcd's JSON omits empty fields), and
    ``value`` for a keys-only read (empty, so etcd leaves it out)."""
    d: dict[str, Any] = {"key": _b64(kv.key), "create_revision": kv.create_revision,
                         "mod_revision": kv.mod_revision, "version": kv.version}
    if not keys_only:
        d["value"] = _b64(kv.value)
    if kv.lease:
        d["lease"] = kv.lease
    return d


def range_json(res: ListResult, keys_only: bool = False) -> dict[str, Any]:
    """A ListResult as ``etcdctl get --prefix -w json`` writes a range response: ``header``
    (its ``revision`` only), ``kvs``, ``count`` and ``more``, each left out when empty as
    etcd leaves them out, plus ``continue_token`` for the next page (shmcache's own).
    ``count`` is the number of keys in this page: etcd's counts the whole range, which is
    the same number unless --limit cut the page short."""
    d: dict[str, Any] = {"header": {"revision": res.revision}}
    if res.items:
        d["kvs"] = [kv_json(kv, keys_only) for kv in res.items]
    if res.more:
        d["more"] = True
    if res.items:
        d["count"] = len(res.items)
    if res.continue_token is not None:
        d["continue_token"] = res.continue_token
    return d


def count_json(res: CountResult) -> dict[str, Any]:
    """A CountResult as ``etcdctl get --count-only -w json`` writes the range response:
    ``header`` (its ``revision`` only) and ``count``, left out when 0 as etcd leaves it."""
    d: dict[str, Any] = {"header": {"revision": res.revision}}
    if res.count:
        d["count"] = res.count
    return d


def plural(n: int, word: str, plural_form: str | None = None) -> str:
    """``1 key``, ``2 keys``, ``1,234 keys``; ``plural(2, "process", "processes")``."""
    return f"{n:,} {word if n == 1 else plural_form or word + 's'}"


def since(unix_time: float, *, date: bool = False) -> str:
    """``"12:00:03 UTC (41s"`` (with ``date``: ``"2026-12-06 12:00:03 UTC (41s"``): when a
    state began and how long ago, for the status lines that say since when something fails."""
    fmt = "%Y-%m-%d %H:%M:%S UTC" if date else "%H:%M:%S UTC"
    return f"{time.strftime(fmt, time.gmtime(unix_time))} ({max(0.0, time.time() - unix_time):.0f}s"
