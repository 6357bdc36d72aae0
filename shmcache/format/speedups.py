"""The one place that chooses the C speedups or pure Python, as msgpack and py-lmdb do.

``_speedups`` (format/_speedups.c, built by setup.py) holds C versions of the
snapshot lookup and range walk and of the index segment's runs and tables; each
has a pure-Python twin in snapshot.py or indexseg.py that tests compare it with.
Without a compiler at install time it is None and the twins run.
"""

from __future__ import annotations

import os
from typing import Any

_speedups: Any
try:
    from . import _speedups as _c_speedups  # type: ignore[attr-defined]  # (C: no stub)

    _speedups = _c_speedups
except ImportError:  # no compiler at install time: the pure-Python versions
    _speedups = None

# SHMCACHE_PURE_PYTHON=1 forces the reference implementation (tests compare both).
USE_SPEEDUPS = _speedups is not None and not os.environ.get("SHMCACHE_PURE_PYTHON")
