"""docs/format.md stays in step with shmcache/format/layout.py: structs, offsets, sizes, constants.

Like tests/test_api_doc.py for the API: the page is the format's prose version,
and a reader of the page must be able to trust every number on it.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest

from shmcache.format import layout, snapshot

DOC = (Path(__file__).parent.parent / "docs" / "format.md").read_text()


def _number(text: str) -> int:
    """'4096', '65,536', '2^40', '1 MiB', '64 + capacity' (-> 64) as an int."""
    text = text.strip().replace(",", "")
    m = re.fullmatch(r"2\^(\d+)", text)
    if m:
        return 1 << int(m[1])
    m = re.fullmatch(r"(\d+) (KiB|MiB|GiB)", text)
    if m:
        return int(m[1]) << {"KiB": 10, "MiB": 20, "GiB": 30}[m[2]]
    return int(text)


def _section(heading: str) -> str:
    """The text of the section whose heading line contains ``heading``, up to the next heading."""
    m = re.search(rf"^#+ [^\n]*{re.escape(heading)}[^\n]*\n(.*?)(?=^#+ )", DOC, re.S | re.M)
    assert m, f"no section {heading!r} in docs/format.md"
    return m[1]


def _table(text: str) -> list[list[str]]:
    """Rows (cells stripped) of the first markdown table in ``text``, without the header."""
    rows = [line for line in text.splitlines() if line.startswith("|")]
    assert len(rows) > 2, f"no table in {text[:80]!r}"
    return [[c.strip() for c in r.strip("|").split("|")] for r in rows[2:]]


STRUCTS = re.findall(r"`layout\.([A-Z_]+)`, `([^`]+)`, (\d+)(?:-byte header| bytes)", DOC)


def test_the_page_names_its_structs() -> None:
    assert {s[0] for s in STRUCTS} >= {"RING_HEADER", "SNAP_HEADER", "SNAP_ENTRY"}


@pytest.mark.parametrize(("name", "fmt", "size"), STRUCTS)
def test_struct_formats_and_sizes(name: str, fmt: str, size: str) -> None:
    s = getattr(layout, name)
    assert isinstance(s, struct.Struct)
    assert (s.format, s.size) == (fmt, int(size))


def test_common_header_and_block_structs() -> None:
    assert f"(`layout.HEAD`, `{layout.HEAD.format}`)" in DOC
    assert (f"`layout.BLOCK` is `{layout.BLOCK.format}` ({layout.BLOCK.size} bytes, "
            f"`BLOCK_FIELDS = {layout.BLOCK_FIELDS}`) at offset {layout.C_BLOCK}") in DOC


def test_control_fixed_words() -> None:
    rows = _table(_section("Fixed words"))
    seen = set()
    for offset, size, _type, field, *_ in rows:
        name = field.strip("`")
        if hasattr(layout, f"C_{name}"):
            assert int(offset) == getattr(layout, f"C_{name}"), field
            # Words are 8 bytes; an area (the index definitions) gives its bound.
            bound = f"≤ {getattr(layout, f'MAX_{name}_LEN', None)}"
            assert int(size) == 8 if size.isdigit() else bound in size, field
            seen.add(name)
        elif name == "block":
            assert (int(offset), int(size)) == (layout.C_BLOCK, layout.BLOCK.size)
        elif name == "prefix":
            assert int(offset) == layout.C_PREFIX
    every = {n[2:] for n in dir(layout) if n.startswith("C_") and n not in
             ("C_BLOCK", "C_PREFIX")}
    assert seen == every, f"control words missing from the table: {every - seen}"
    # The rows tile the segment up to the prefix: no gap, no overlap.
    ends = [(int(r[0]), int(r[0]) + int(r[1])) for r in rows if r[1].isdigit()]
    # The fixed words tile [0, C_PREFIX), and the ones after the index definitions
    # end the segment.
    head = [e for e in ends if e[0] < layout.C_PREFIX]
    tail = [e for e in ends if e[0] > layout.C_PREFIX]
    for part in (head, tail):
        for (_a, end), (start, _b) in zip(part, part[1:], strict=False):
            assert end == start, f"table rows leave a gap or overlap at {end}/{start}"
    assert head[-1][1] == layout.C_PREFIX
    assert tail[0][0] == layout.C_INDEX_DEFS + layout.MAX_INDEX_DEFS_LEN
    assert tail[-1][1] == layout.CONTROL_SIZE
    assert "INDEX_DEFS" in seen


def test_published_block_fields() -> None:
    rows = _table(_section("The published block"))
    assert len(rows) == layout.BLOCK_FIELDS
    for offset, index, field, _meaning in rows:
        i = int(index)
        assert int(offset) == layout.C_BLOCK + 8 * i
        name = field.strip("`")
        if name != "reserved":
            assert getattr(layout, f"B_{name}") == i, field


def test_ring_header_table() -> None:
    rows = {int(r[0]): r for r in _table(_section("Header (`layout.RING_HEADER`"))}
    assert rows[16][3].startswith("generation") and rows[24][3].startswith("capacity")
    assert (int(rows[layout.RING_SEAL_OFF][1]), rows[layout.RING_SEAL_OFF][2]) == (
        layout.RING_SEAL.size, f"{layout.RING_SEAL.size // 8} × u64")
    assert f"`layout.RING_SEAL`, `{layout.RING_SEAL.format}`" in rows[layout.RING_SEAL_OFF][3]
    assert f"`RING_DATA = {layout.RING_DATA}`" in rows[layout.RING_DATA][3]


@pytest.mark.parametrize("heading", ["Header (`layout.SNAP_HEADER`", "Entries (`layout.SNAP_ENTRY`"])
def test_snapshot_tables_tile_their_struct(heading: str) -> None:
    rows = _table(_section(heading))
    offsets = [(int(r[0]), int(r[1])) for r in rows if r[0].isdigit() and r[1].isdigit()]
    for (a, n), (b, _m) in zip(offsets, offsets[1:], strict=False):
        assert a + n == b, f"{heading}: row at {a} + {n} does not reach {b}"
    name = re.search(r"layout\.([A-Z_]+)", heading)
    assert name is not None
    s = getattr(layout, name[1])
    covered = [o for o in offsets if o[0] + o[1] <= s.size]
    assert covered[-1][0] + covered[-1][1] == s.size


def test_snapshot_header_area() -> None:
    assert f"in a {snapshot.HEADER_SIZE}-byte area" in DOC
    assert f"always {snapshot.HEADER_SIZE} (`snapshot.HEADER_SIZE`)" in DOC


# `NAME` = value and `NAME = value`, except block fields set to a value in prose
# ("`RING_TAIL = 0`"): those are checked by test_published_block_fields.
CONSTANTS = [c for c in re.findall(r"`([A-Z][A-Z_]+)` = ([0-9][0-9,^]*(?: [KMG]iB)?)", DOC)
             + re.findall(r"`([A-Z][A-Z_]+) = ([0-9][0-9,^]*)`", DOC)
             if not hasattr(layout, f"B_{c[0]}")]


def test_the_page_names_its_constants() -> None:
    assert {c[0] for c in CONSTANTS} >= {"MIN_RING_CAPACITY", "MAX_RING_CAPACITY", "RING_DATA",
                                          "MAX_RECORD_EVENTS"}


@pytest.mark.parametrize(("name", "value"), CONSTANTS)
def test_constants(name: str, value: str) -> None:
    assert getattr(layout, name) == _number(value)


def test_limits_table() -> None:
    rows = {r[0].strip("`"): r for r in _table(_section("Limits"))}
    assert _number(rows["MAX_PREFIX_LEN"][1].split()[0]) == layout.MAX_PREFIX_LEN
    assert _number(rows["CONTROL_SIZE"][1].split()[0]) == layout.CONTROL_SIZE
    lo, hi = rows["ring capacity"][1].split(", multiple")[0].split(" … ")
    assert (_number(lo), _number(hi)) == (layout.MIN_RING_CAPACITY, layout.MAX_RING_CAPACITY)
