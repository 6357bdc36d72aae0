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

__all__ = ["import_python_etcd3", "protobuf_major"]


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


def import_python_etcd3() -> Any:
    """The ``etcd3`` module (python-etcd3).

    Under protobuf>=4 this sets ``PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python`` in
    *this* process's environment (and so its children's) before protobuf is first
    imported. A process that must keep the C (upb) implementation, a benchmark's
    parent for one, must not call it: its python-etcd3 work belongs in a child
    process that does. RuntimeError if this process imported protobuf with another
    implementation already (the import would fail with protobuf's "Descriptors
    cannot be created directly"). Under protobuf 3.x nothing is set (it would
    needlessly give up a C++ build where one is installed).
    """
    if protobuf_major() >= 4:
        if "google.protobuf.internal.api_implementation" in sys.modules:
            from google.protobuf.internal import api_implementation

            if api_implementation.Type() != "python":
                raise RuntimeError(
                    "python-etcd3 needs the pure-Python protobuf, but this process imported "
                    f"protobuf with the {api_implementation.Type()!r} implementation first; "
                    "use it in a child process (or set PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION"
                    "=python before anything imports protobuf)")
        os.environ.setdefault("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", "python")
    import etcd3  # imported lazily: readers must not need grpc/protobuf

    return etcd3
