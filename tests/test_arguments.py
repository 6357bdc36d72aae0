"""The public API's arguments (issue 18, item 6): a wrong type is a TypeError, a value out of
range a ValueError, each naming the argument, raised before anything is read; never an
error from inside a read, and never a wrong answer (``bytes(5)`` is five NUL bytes).

Against a real writer (the module's ``writer`` fixture, tests/conftest.py) and real etcd.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

import shmcache
from shmcache import _args

Call = Callable[[Any, bytes], Any]

CASES: list[tuple[str, Call, type[Exception], str]] = [
    ("get int key", lambda r, p: r.get(5), TypeError, "key must be bytes or str, not int"),
    ("get str revision", lambda r, p: r.get(p, revision="3"), TypeError, "revision must be"),
    ("get negative revision", lambda r, p: r.get(p, revision=-1), ValueError,
     "revision must be a revision >= 0, not -1"),
    ("get negative min_revision", lambda r, p: r.get(p, min_revision=-1), ValueError,
     "min_revision must be"),
    ("get negative timeout", lambda r, p: r.get(p, min_revision=1, timeout=-1), ValueError,
     "timeout must be a number of seconds >= 0"),
    ("list int prefix", lambda r, p: r.list(5), TypeError, "prefix must be bytes or str"),
    ("list str limit", lambda r, p: r.list(p, "10"), TypeError, "limit must be"),
    ("list negative limit", lambda r, p: r.list(p, limit=-1), ValueError, "limit must be >= 0"),
    ("list bool limit", lambda r, p: r.list(p, limit=True), TypeError, "limit must be"),
    ("list negative revision", lambda r, p: r.list(p, revision=-2), ValueError,
     "revision must be"),
    ("list int token", lambda r, p: r.list(p, limit=1, continue_token=5), TypeError,
     "continue_token must be a str"),
    ("list str timeout", lambda r, p: r.list(p, min_revision=1, timeout="1"), TypeError,
     "timeout must be a number of seconds"),
    ("list nan timeout", lambda r, p: r.list(p, min_revision=1, timeout=float("nan")),
     ValueError, "timeout must be"),
    ("iter_list page_size 0", lambda r, p: next(r.iter_list(p, page_size=0)), ValueError,
     "page_size must be >= 1"),
    ("by_index int value", lambda r, p: r.by_index("node", 5), TypeError,
     "value must be bytes or str, not int"),
    ("by_index str limit", lambda r, p: r.by_index("node", b"n", limit="2"), TypeError,
     "limit must be"),
    ("by_index negative revision", lambda r, p: r.by_index("node", b"n", revision=-1),
     ValueError, "revision must be"),
    ("watch int prefix", lambda r, p: r.watch(5), TypeError, "prefix must be bytes or str"),
    ("watch str since", lambda r, p: r.watch(p, since_revision="1"), TypeError,
     "since_revision must be"),
    ("watch negative since", lambda r, p: r.watch(p, since_revision=-1), ValueError,
     "since_revision must be a revision >= 0"),
    ("subscribe int prefix", lambda r, p: r.subscribe(5, print), TypeError,
     "prefix must be bytes or str, not int"),
    ("awatch int prefix", lambda r, p: r.awatch(5), TypeError, "prefix must be bytes or str"),
    ("wait str revision", lambda r, p: r.wait("5"), TypeError, "revision must be"),
    ("wait negative timeout", lambda r, p: r.wait(1, timeout=-1), ValueError,
     "timeout must be"),
    ("sync str timeout", lambda r, p: r.sync(timeout="5"), TypeError, "timeout must be"),
    ("negative max_staleness", lambda r, p: setattr(r, "max_staleness", -1), ValueError,
     "max_staleness must be a number of seconds >= 0, not -1"),
    ("str max_staleness", lambda r, p: setattr(r, "max_staleness", "5"), TypeError,
     "max_staleness must be"),
]


@pytest.mark.parametrize(("what", "call", "exc", "message"), CASES, ids=[c[0] for c in CASES])
def test_reader_arguments_are_checked(reader: Any, sub_prefix: bytes, what: str, call: Call,
                                      exc: type[Exception], message: str) -> None:
    """Each bad argument raises the named exception saying which argument and why."""
    with pytest.raises(exc, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        call(reader, sub_prefix)
    assert reader.max_staleness is None  # (a refused setting is not half-applied)


def test_reader_constructor_arguments(writer: tuple[Any, bytes]) -> None:
    name = writer[0].name
    with pytest.raises(ValueError, match="^max_staleness must be a number of seconds >= 0"):
        shmcache.Reader(name, max_staleness=-1)
    with pytest.raises(TypeError, match="^max_staleness must be"):
        shmcache.Reader(name, max_staleness="1")
    with pytest.raises(ValueError, match="^timeout must be"):
        shmcache.Reader(name, timeout=-1)
    with pytest.raises(TypeError, match="^timeout must be"):
        shmcache.Reader(name, timeout=None)  # type: ignore[arg-type]


def test_good_arguments_still_work(reader: Any, sub_prefix: bytes) -> None:
    """bytes, str, bytearray and memoryview keys; int revisions; float and int seconds."""
    rev = reader.revision
    assert reader.get(bytearray(sub_prefix + b"x")) is None
    assert reader.get(memoryview(sub_prefix + b"x"), revision=rev) is None
    assert reader.list(sub_prefix.decode(), 0, min_revision=rev, timeout=1).items == []
    reader.max_staleness = 30
    reader.max_staleness = None
    assert reader.wait(rev, timeout=0)


def test_writer_prefix_must_be_bytes_or_str() -> None:
    """``Writer(name, endpoints, 5)`` once cached the prefix b"\\0" * 5; name and endpoints
    stay positional."""
    with pytest.raises(TypeError, match="^prefix must be bytes or str, not int"):
        shmcache.Writer("t-args", ["http://127.0.0.1:1"], 5)  # type: ignore[arg-type]
    w = shmcache.Writer("t-args", ["http://127.0.0.1:1"], "/a/")
    assert w.prefix == b"/a/"
    assert shmcache.Writer("t-args", "http://127.0.0.1:1", bytearray(b"/b/")).prefix == b"/b/"


def test_helpers_refuse_bool_and_accept_zero() -> None:
    """Pure logic of shmcache._args: bool is not an int here; 0 is a valid revision."""
    assert _args.revision(0, "r") == 0 and _args.seconds(0, "t") == 0.0
    assert _args.opt_revision(None, "r") is None and _args.opt_seconds(None, "t") is None
    assert _args.count(None, "limit") is None
    with pytest.raises(TypeError, match="^r must be a revision"):
        _args.revision(True, "r")
    with pytest.raises(TypeError, match="^t must be a number of seconds, not bool"):
        _args.seconds(False, "t")
    with pytest.raises(ValueError, match="^t must be .* not inf"):
        _args.seconds(float("inf"), "t")
