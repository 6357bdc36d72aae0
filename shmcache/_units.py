"""Sizes and durations as people write them: ``parse_size("64MiB")``, ``parse_seconds("5m")``.

No dependencies (config.py and the command line use them).
"""

from __future__ import annotations

import re
from fractions import Fraction

__all__ = ["parse_seconds", "parse_size"]

# Case-insensitive. Binary units (KiB ... TiB, and the short K, M, G, T) are powers
# of 1024; the SI spellings KB ... TB are powers of 1000, as etcd and systemd read them.
_UNITS = {
    "b": 1, "": 1,
    "k": 1 << 10, "kib": 1 << 10, "kb": 10**3,
    "m": 1 << 20, "mib": 1 << 20, "mb": 10**6,
    "g": 1 << 30, "gib": 1 << 30, "gb": 10**9,
    "t": 1 << 40, "tib": 1 << 40, "tb": 10**12,
}
_BY_LENGTH = sorted(_UNITS, key=len, reverse=True)
_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:e[+-]?[0-9]{1,3})?")


def parse_size(text: str | int) -> int:
    """'64MiB', '512k', '1G', '1TiB', '1.5GiB', '4096' or an int -> a number of bytes.

    Exact (no float rounding); a fractional byte count is truncated. Raises
    ValueError saying how to write a size. Range checks are the caller's.
    """
    if isinstance(text, int):
        return text
    if not isinstance(text, str):
        raise ValueError(f"cannot parse size {text!r} (use e.g. 64MiB, 512KiB, 1GiB, 1TiB)")
    t = text.strip().lower().replace("_", "")  # (digit groups: 64_000_000)
    for unit in _BY_LENGTH:
        if t.endswith(unit):
            num = (t[: len(t) - len(unit)] if unit else t).rstrip()  # "64 MiB" too
            if _NUMBER.fullmatch(num):
                return int(Fraction(num) * _UNITS[unit])
            break
    raise ValueError(f"cannot parse size {text!r} (use e.g. 64MiB, 512KiB, 1GiB, 1TiB)")


# Case-insensitive, as systemd and Go's time.ParseDuration spell them (one unit per value).
_SECONDS = {"": Fraction(1), "s": Fraction(1), "sec": Fraction(1), "ms": Fraction(1, 1000),
            "m": Fraction(60), "min": Fraction(60), "h": Fraction(3600)}
_SECONDS_BY_LENGTH = sorted(_SECONDS, key=len, reverse=True)
_SECONDS_HELP = "use e.g. 30s, 5m, 250ms, 1h or a number of seconds"


def parse_seconds(text: str | int | float) -> float:
    """'30s', '5m', '250ms', '1.5h', '2' or a number -> seconds (float).

    Raises ValueError saying how to write a duration. Range checks are the caller's.
    """
    if isinstance(text, bool) or not isinstance(text, (str, int, float)):
        raise ValueError(f"cannot parse duration {text!r} ({_SECONDS_HELP})")
    if not isinstance(text, str):
        return float(text)
    t = text.strip().lower().replace("_", "")
    for unit in _SECONDS_BY_LENGTH:
        if t.endswith(unit):
            num = (t[: len(t) - len(unit)] if unit else t).rstrip()
            if _NUMBER.fullmatch(num):
                return float(Fraction(num) * _SECONDS[unit])
            break
    raise ValueError(f"cannot parse duration {text!r} ({_SECONDS_HELP})")
