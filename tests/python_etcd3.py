"""python-etcd3, imported so that it loads under any protobuf (tests and benchmarks).

python-etcd3 0.12 (last release 2020) is kept only as a third-party client: tests
check that it agrees with the cache, benchmarks measure it as the alternative a
user would pick. Its generated modules predate protobuf 4 and load under
protobuf>=4 only with the pure-Python implementation. This module imports nothing
heavy: a benchmark times the imports of the process that calls it.
"""

from __future__ import annotations

import os
import sys
from typing import Any

__all__ = ["import_python_etcd3", "protobuf_major", "use_pure_python_protobuf"]

_VARIABLE = "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION"


def protobuf_major() -> int:
    """The installed protobuf's major version (0 if there is none).

    Importing the ``google.protobuf`` package itself (a version string) does not yet
    pick the implementation: that happens with its first descriptor or message.
    """
    try:
        import google.protobuf
    except ImportError:
        return 0
    return int(google.protobuf.__version__.split(".")[0])


def use_pure_python_protobuf() -> None:
    """Give this process protobuf's pure-Python implementation, and no other process.

    protobuf reads the choice from the environment once, when it is first imported;
    the variable is set for that import only, so the writers and tools a test or a
    benchmark starts run on protobuf's default implementation (upb), as users run
    them. conftest calls it before any test module imports protobuf (through
    shmcache.etcdapi). Under protobuf 3.x nothing is done (it would needlessly give
    up a C++ build where one is installed). RuntimeError if this process imported
    protobuf with another implementation already (``import etcd3`` would fail with
    protobuf's "Descriptors cannot be created directly").
    """
    if protobuf_major() < 4:
        return
    if "google.protobuf.internal.api_implementation" in sys.modules:
        from google.protobuf.internal import api_implementation

        if api_implementation.Type() != "python":
            raise RuntimeError(
                "python-etcd3 needs the pure-Python protobuf, but this process imported "
                f"protobuf with the {api_implementation.Type()!r} implementation first; "
                "use it in a child process (or set PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION"
                "=python before anything imports protobuf)")
        return
    saved = os.environ.get(_VARIABLE)
    os.environ[_VARIABLE] = "python"
    try:
        from google.protobuf.internal import api_implementation  # noqa: F401
    finally:
        if saved is None:
            del os.environ[_VARIABLE]
        else:
            os.environ[_VARIABLE] = saved


def import_python_etcd3() -> Any:
    """The ``etcd3`` module (python-etcd3), after ``use_pure_python_protobuf()``."""
    use_pure_python_protobuf()
    import etcd3  # imported lazily: readers must not need grpc/protobuf

    return etcd3
