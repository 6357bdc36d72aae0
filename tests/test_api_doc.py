"""docs/api.md stays true: one level-3 heading per name in shmcache.__all__, and every signature
it shows (method headings, constructor blocks) matches the code, defaults included."""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

import pytest

import shmcache

API_MD = Path(__file__).resolve().parent.parent / "docs" / "api.md"
# Classes whose every public method and property must have a "#### `Class.member`" heading.
DOCUMENTED_MEMBERS = ("Reader", "Watch", "AsyncWatch", "Subscription", "Writer")


def _sections() -> dict[str, tuple[list[str], str | None]]:
    """name -> (its "#### `...`" headings, the signature in its first ```python block)."""
    out: dict[str, tuple[list[str], str | None]] = {}
    current: str | None = None
    lines = API_MD.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("### "):
            m = re.fullmatch(r"### `([A-Za-z_]+)`", line)
            assert m, f"level-3 heading not of the form ### `name`: {line!r}"
            current = m[1]
            assert current not in out, f"{current} documented twice"
            block = None
            # A signature block, if any, comes before the first paragraph.
            j = i + 1
            while j < len(lines) and not lines[j].strip():
                j += 1
            if j + 1 < len(lines) and lines[j] == "```python":
                block = lines[j + 1]
            out[current] = ([], block)
        elif line.startswith("#### "):
            m = re.fullmatch(r"#### `(.+)`", line)
            assert m and current is not None, f"bad level-4 heading {line!r}"
            out[current][0].append(m[1])
        elif line.startswith("## "):
            current = None
    return out


def _documented_params(text: str) -> list[tuple[str, Any]]:
    """``"a, b=1, *, c=None"`` -> [("a", empty), ("b", 1), ("*", empty), ("c", None)]."""
    params: list[tuple[str, Any]] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, eq, default = part.partition("=")
        # Defaults are written as Python expressions: 64 << 20, 0o600, b''.
        params.append((name.strip(), eval(default, {"__builtins__": {}}) if eq
                       else inspect.Parameter.empty))
    return params


def _actual_params(obj: Any) -> list[tuple[str, Any]]:
    sig = inspect.signature(obj)
    out: list[tuple[str, Any]] = []
    star = False
    for p in sig.parameters.values():
        if p.name == "self":
            continue
        if p.kind is p.KEYWORD_ONLY and not star:
            out.append(("*", inspect.Parameter.empty))
            star = True
        if p.kind is p.VAR_POSITIONAL:
            star = True
        out.append((p.name, p.default))
    return out


def _check_signature(label: str, obj: Any, documented: str) -> None:
    assert _documented_params(documented) == _actual_params(obj), (
        f"docs/api.md shows {label}({documented}), the code has {inspect.signature(obj)}")


def test_headings_are_exactly_all() -> None:
    documented = set(_sections())
    public = set(shmcache.__all__)
    assert not public - documented, f"public names missing from docs/api.md: {public - documented}"
    assert not documented - public, f"docs/api.md documents non-public names: {documented - public}"


@pytest.mark.parametrize("name", sorted(shmcache.__all__))
def test_signatures_match_the_code(name: str) -> None:
    """The constructor or function block and every "#### `Name.member(...)`" heading
    match the code; properties are documented without parentheses."""
    headings, block = _sections().get(name, ([], None))
    obj = getattr(shmcache, name)
    if block is not None:
        m = re.fullmatch(rf"{name}\((.*)\)", block)
        assert m, f"signature block of {name} does not start with {name}(: {block!r}"
        _check_signature(name, obj, m[1])
    for h in headings:
        m = re.fullmatch(rf"{name}\.([a-z_]+)(?:\((.*)\))?", h)
        assert m, f"heading {h!r} under {name} is not {name}.member or {name}.member(...)"
        member = inspect.getattr_static(obj, m[1], None)
        assert member is not None, f"docs/api.md documents {h}, which does not exist"
        if m[2] is None:
            assert isinstance(member, property), f"{h} is documented as a property but is not"
        else:
            assert callable(member), f"{h} is documented as a method but is not callable"
            _check_signature(f"{name}.{m[1]}", getattr(obj, m[1]), m[2])


@pytest.mark.parametrize("name", DOCUMENTED_MEMBERS)
def test_every_public_method_and_property_is_documented(name: str) -> None:
    cls = getattr(shmcache, name)
    headings = {re.sub(r"\(.*", "", h) for h in _sections()[name][0]}
    public = {f"{name}.{k}" for k, v in vars(cls).items()
              if not k.startswith("_") and (callable(v) or isinstance(v, property))}
    assert not public - headings, f"undocumented in docs/api.md: {sorted(public - headings)}"


def test_callables_have_a_signature_block_or_headings() -> None:
    """Every public class with a constructor users call, and every function, shows how to
    call it."""
    sections = _sections()
    for name in ("Reader", "Subscription", "Writer", "remove"):
        assert sections[name][1] is not None, f"{name} has no ```python signature block"
