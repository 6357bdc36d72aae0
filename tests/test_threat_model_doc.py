"""docs/design.md's "Threat model" stays true: every test it cites exists, every fault kind it
names is one the checker draws, and the one claim no other test shows (readers do not check
who owns the segments) is shown here."""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path
from typing import Any

import pytest

import shmcache
from shmcache.ipc import shm as _shm
from tests import checker
from tests.etcdserver import EtcdServer
from tests.helpers import WriterProcess, put, wait_rev

ROOT = Path(__file__).resolve().parent.parent
DESIGN_MD = ROOT / "docs" / "design.md"


def _section(title: str) -> str:
    text = DESIGN_MD.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else len(text)]


def _tests_defined() -> set[str]:
    """Every test function in tests/ (module level or in a class)."""
    names: set[str] = set()
    for path in (ROOT / "tests").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and \
                    node.name.startswith("test_"):
                names.add(node.name)
    return names


def test_every_test_the_threat_model_cites_exists() -> None:
    """A claim of the threat model names the test that shows it: a renamed or removed test
    makes the claim unsupported, and this fails until the section is updated."""
    section = _section("Threat model")
    cited = set(re.findall(r"`(test_\w+)`", section))
    assert len(cited) >= 40, sorted(cited)  # (the pattern still finds the citations)
    missing = sorted(cited - _tests_defined())
    assert not missing, f"docs/design.md, Threat model, cites tests that do not exist: {missing}"
    for path in re.findall(r"`(tests/\w+\.py)`", section):
        assert (ROOT / path).exists(), path


def test_the_fault_kinds_the_docs_name_are_drawn_by_default() -> None:
    """The threat model's and "How correctness is tested"'s fault kinds are checker.FAULTS, all
    drawn by default (the control flips and the cluster swap included)."""
    named = set(re.findall(r"`((?:flip|cluster)_\w+)`",
                           _section("Threat model") + _section("How correctness is tested")))
    named -= {"flip_"}
    assert {"cluster_swap", "flip_control_block", "flip_control_prefix"} <= named
    assert named <= set(checker.FAULTS), sorted(named - set(checker.FAULTS))


def test_readers_do_not_check_who_owns_the_segments(
        etcd_session: EtcdServer, etcd_client: Any, cache_name: str,
        unique_prefix: bytes) -> None:
    """A reader checks that a segment is a regular file, not who owns it: a cache whose
    segments belong to another user (as one planted before the writer's first start would)
    is read like the writer's own. The threat model's warning about name squatting rests on
    this; should readers start checking owners, this fails and the section needs updating."""
    if os.geteuid() != 0:
        pytest.skip("needs root to give the segments to another user")
    rev = put(etcd_client, unique_prefix + b"k", b"planted?")
    w = WriterProcess(cache_name, etcd_session.endpoint, unique_prefix).start()
    try:
        with shmcache.Reader(cache_name) as r:
            wait_rev(r, rev)
        segments = _shm.list_segments(cache_name)
        assert segments
        for seg in segments:
            os.chown("/dev/shm" + seg, 65534, 65534)  # nobody's, not the writer's
        with shmcache.Reader(cache_name) as r:
            kv = r.get(unique_prefix + b"k")
            assert kv is not None and kv.value == b"planted?"
            assert os.stat("/dev/shm" + segments[0]).st_uid == 65534
    finally:
        w.close()
