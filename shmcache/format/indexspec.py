"""Secondary index definitions: the spec language, and the index values of one key (pure).

A definition is a name and a spec (docs/api.md, "Secondary indexes"):

- ``segment:N``: the N-th ``/``-separated segment of the key after the cache's
  prefix (one leading ``/`` of the rest is skipped), if it exists and is not empty;
- ``json:POINTER``: the value parsed as JSON, an RFC 6901 pointer into it; a
  scalar is one index value, an array one per scalar element; null, objects,
  a value that is not JSON or lacks the field: no value;
- ``json-map:POINTER``: a JSON object there gives ``k=v`` per scalar member
  (labels: ``json-map:/metadata/labels`` answers ``app=web``);
- a Python callable ``(key, value) -> iterable of bytes`` (``Writer(indexes=...)``
  only: it cannot be written in a config file, and readers never run it).

Scalars are indexed as text: strings as their UTF-8 bytes, ``true``/``false``,
numbers as JSON writes them. Only the writer computes values (once per event);
readers read what it published, so they never parse JSON or run a callable.

The RFC 6901 resolution is written here (20 lines) rather than taken from the
``jsonpointer`` package: the writer needs "absent" rather than an exception on
every miss, on its hot path, and nothing else of the package.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import msgpack

log = logging.getLogger("shmcache.writer")

MAX_INDEXES = 16
MAX_VALUE_LEN = 4096  # longer index values are left out (and logged)
NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
KINDS = ("segment", "json", "json-map")

# Per index, the sorted distinct values of one key; () when it has none in any.
IxVals = tuple[tuple[bytes, ...], ...]
ValueFn = Callable[[bytes, bytes], Iterable[bytes | str]]


class IndexDef(NamedTuple):
    name: str
    spec: str  # as published: the spec text, or "callable:<qualified name>"
    kind: str  # "segment", "json", "json-map" or "callable"
    arg: Any  # N, the pointer's tokens, or the callable


def parse_option(text: str) -> tuple[str, str]:
    """``NAME=SPEC`` (the CLI's ``--index``) -> (name, spec); ValueError with the reason."""
    name, sep, spec = text.partition("=")
    if not sep or not name or not spec:
        raise ValueError(f"--index wants NAME=SPEC (e.g. node=json:/spec/nodeName), "
                         f"not {text!r}")
    make(name, spec)  # validates
    return name, spec


_BAD_ESCAPE = re.compile("~(?![01])")


def _pointer(name: str, ptr: str) -> tuple[str, ...]:
    if ptr == "":
        return ()
    if not ptr.startswith("/"):
        raise ValueError(f"index {name!r}: JSON pointer {ptr!r} must be empty or start with "
                         f"'/' (RFC 6901)")
    tokens = ptr[1:].split("/")
    for t in tokens:
        # RFC 6901: "~" only as "~0" (a tilde) or "~1" (a slash); "~2" or a lone "~" is an
        # error, not a key spelled with a tilde.
        if _BAD_ESCAPE.search(t):
            raise ValueError(f"index {name!r}: JSON pointer {ptr!r} has an invalid escape in "
                             f"{t!r} (write a '~' as ~0 and a '/' as ~1)")
    return tuple(t.replace("~1", "/").replace("~0", "~") for t in tokens)


def make(name: str, spec: str | ValueFn) -> IndexDef:
    """One definition, validated; ValueError naming what is wrong."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ValueError(f"index name {name!r} must be 1-64 characters of letters, digits, "
                         f"'.', '_' or '-'")
    if callable(spec):
        qual = getattr(spec, "__qualname__", type(spec).__name__)
        return IndexDef(name, f"callable:{getattr(spec, '__module__', '?')}.{qual}"[:200],
                        "callable", spec)
    if not isinstance(spec, str):
        raise ValueError(f"index {name!r}: spec must be a string or a callable")
    kind, sep, arg = spec.partition(":")
    if not sep or kind not in KINDS:
        raise ValueError(f"index {name!r}: spec {spec!r} is not one of segment:N, "
                         f"json:POINTER, json-map:POINTER")
    if kind == "segment":
        if not arg.isdigit():
            raise ValueError(f"index {name!r}: segment:N needs a number N >= 0, not {arg!r}")
        return IndexDef(name, spec, kind, int(arg))
    return IndexDef(name, spec, kind, _pointer(name, arg))


def make_all(indexes: Mapping[str, str | ValueFn] | None) -> tuple[IndexDef, ...]:
    if not indexes:
        return ()
    if len(indexes) > MAX_INDEXES:
        raise ValueError(f"at most {MAX_INDEXES} indexes, not {len(indexes)}")
    return tuple(make(n, s) for n, s in indexes.items())


def encode_defs(defs: Iterable[IndexDef]) -> bytes:
    """What the control segment publishes: msgpack ``[[name, spec], ...]``."""
    data: bytes = msgpack.packb([[d.name, d.spec] for d in defs], use_bin_type=True)
    return data


def decode_defs(raw: bytes) -> tuple[tuple[str, str], ...]:
    """(name, spec) pairs from the control segment; ValueError if they do not decode."""
    if not raw:
        return ()
    try:
        got = msgpack.unpackb(raw, raw=False, max_bin_len=0, max_ext_len=0)
        pairs = tuple((n, s) for n, s in got)
    except Exception:
        raise ValueError("index definitions do not decode") from None
    if not all(type(n) is str and type(s) is str for n, s in pairs):
        raise ValueError("index definitions do not decode")
    return pairs


_MISSING = object()


def _resolve(doc: Any, tokens: tuple[str, ...]) -> Any:
    for t in tokens:
        if type(doc) is dict:
            doc = doc.get(t, _MISSING)
            if doc is _MISSING:
                return _MISSING
        elif type(doc) is list:
            if not t.isdigit() or (len(t) > 1 and t[0] == "0") or int(t) >= len(doc):
                return _MISSING
            doc = doc[int(t)]
        else:
            return _MISSING
    return doc


def _scalar(v: Any) -> bytes | None:
    if type(v) is str:
        return v.encode("utf-8", "surrogatepass")
    if v is True:
        return b"true"
    if v is False:
        return b"false"
    if type(v) in (int, float):
        return json.dumps(v).encode()
    return None  # null, objects, arrays


class IndexSet:
    """The definitions of one cache, computing the index values of a key (writer side)."""

    def __init__(self, defs: tuple[IndexDef, ...], prefix: bytes) -> None:
        self.defs = defs
        self.prefix = prefix
        self.names = tuple(d.name for d in defs)
        self._json = any(d.kind in ("json", "json-map") for d in defs)
        self._warned: set[object] = set()

    def __len__(self) -> int:
        return len(self.defs)

    def values(self, key: bytes, value: bytes) -> IxVals:
        """Per index the sorted distinct values of ``key`` = ``value``; () if none at all."""
        doc: Any = _MISSING
        if self._json:
            try:
                doc = json.loads(value)
            except (ValueError, RecursionError):
                doc = _MISSING
        out = []
        any_value = False
        for d in self.defs:
            got: Iterable[bytes | str | None]
            if d.kind == "segment":
                rest = key[len(self.prefix):] if key.startswith(self.prefix) else key
                if rest.startswith(b"/"):
                    rest = rest[1:]
                parts = rest.split(b"/")
                got = (parts[d.arg],) if d.arg < len(parts) and parts[d.arg] else ()
            elif d.kind == "callable":
                got = self._call(d, key, value)
            elif doc is _MISSING:
                got = ()
            else:
                node = _resolve(doc, d.arg)
                if d.kind == "json":
                    items = node if type(node) is list else (node,)
                    got = [_scalar(v) for v in items]
                elif type(node) is dict:
                    got = [f"{k}=".encode("utf-8", "surrogatepass") + s
                           for k, v in node.items() if (s := _scalar(v)) is not None]
                else:
                    got = ()
            vals = self._clean(d, key, got)
            any_value = any_value or bool(vals)
            out.append(vals)
        return tuple(out) if any_value else ()

    def _call(self, d: IndexDef, key: bytes, value: bytes) -> Iterable[bytes | str]:
        try:
            return list(d.arg(key, value))
        except Exception as exc:
            # A bug in the user's function must not stop the cache; the key is left
            # out of this index, and the first failure of each index is logged.
            if d.name not in self._warned:
                self._warned.add(d.name)
                log.error("index %r: %s(%r) raised %r; the key is not indexed (further "
                          "failures of this index are not logged)", d.name, d.spec, key, exc)
            return ()

    def _clean(self, d: IndexDef, key: bytes,
               got: Iterable[bytes | str | None]) -> tuple[bytes, ...]:
        vals = set()
        for v in got:
            if v is None:
                continue
            if type(v) is str:
                v = v.encode("utf-8", "surrogatepass")
            elif type(v) is not bytes:
                if isinstance(v, (bytes, bytearray, memoryview)):
                    v = bytes(v)
                else:
                    self._bad(d, key, f"returned {type(v).__name__}, not bytes")
                    continue
            if len(v) > MAX_VALUE_LEN:
                self._bad(d, key, f"value of {len(v)} bytes is above {MAX_VALUE_LEN}")
                continue
            vals.add(v)
        return tuple(sorted(vals))

    def _bad(self, d: IndexDef, key: bytes, what: str) -> None:
        if (d.name, what[:20]) not in self._warned:
            self._warned.add((d.name, what[:20]))
            log.warning("index %r: key %r: %s; left out of the index", d.name, key, what)


def vals(ix: IxVals | None, i: int) -> tuple[bytes, ...]:
    """Index ``i``'s values in an IxVals that may be () or None (no values anywhere)."""
    return ix[i] if ix else ()
