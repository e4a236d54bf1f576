"""The test tiers (tests/conftest.py): the table classifies every test file and only real ones, the tiers are
registered markers, and the unit-tier guard refuses sockets and processes even when a test swallows the refusal."""

from __future__ import annotations

import _posixsubprocess
import ast
import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import tomllib
import types
from pathlib import Path

import pytest
from conftest import (
    ROOT,
    TEST_TIERS,
    TESTS_DIR,
    TIERS,
    UnitTierViolation,
    _guarded_phase,
    _unit_guard,
    pytest_collection_modifyitems,
    tier_of,
)


def _test_functions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return {node.name for node in tree.body
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test")}


def test_every_test_file_has_a_tier_and_the_table_names_only_existing_files():
    on_disk = {path.name for path in TESTS_DIR.glob("test_*.py")}
    assert sorted(on_disk - set(TEST_TIERS)) == [], "test files missing from TEST_TIERS in tests/conftest.py"
    assert sorted(set(TEST_TIERS) - on_disk) == [], "TEST_TIERS names files that do not exist"


def test_every_entry_names_a_known_tier_and_exceptions_name_real_tests_of_their_file():
    for file_name, entry in TEST_TIERS.items():
        if isinstance(entry, str):
            assert entry in TIERS, f"{file_name}: unknown tier {entry!r}"
            continue
        file_tier, exceptions = entry
        assert file_tier in TIERS, f"{file_name}: unknown tier {file_tier!r}"
        assert exceptions, f"{file_name}: an exception table without entries; use the plain tier"
        functions = _test_functions(TESTS_DIR / file_name)
        for test_name, tier in exceptions.items():
            assert test_name in functions, f"{file_name}: exception for {test_name}, which is not a test there"
            assert tier in TIERS and tier != file_tier, f"{file_name}::{test_name}: tier {tier!r}"


def test_tier_of_reads_file_tiers_and_exceptions():
    assert tier_of("test_codec.py", "test_anything") == "unit"
    assert tier_of("test_config.py", "test_bad_config_is_a_clear_error_with_exit_status_2") == "cluster"
    assert tier_of("test_config.py", "test_some_other_test") == "unit"
    assert tier_of("test_not_a_file.py", "test_x") is None


def test_tiers_and_slow_are_registered_markers():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    registered = {line.split(":")[0] for line in config["tool"]["pytest"]["ini_options"]["markers"]}
    assert set(TIERS) | {"slow"} <= registered


class _FakeItem:
    def __init__(self, path: Path, name: str) -> None:
        self.path = path
        self.name = self.originalname = name
        self.markers: list[str] = []

    def add_marker(self, marker: pytest.MarkDecorator) -> None:
        self.markers.append(marker.name)


def test_collection_marks_each_test_with_its_tier():
    items = [_FakeItem(TESTS_DIR / "test_ring.py", "test_x"),
             _FakeItem(TESTS_DIR / "test_logs.py", "test_library_code_is_silent_without_setup"),
             _FakeItem(TESTS_DIR / "test_netns.py", "test_y")]
    pytest_collection_modifyitems(None, items)  # type: ignore[arg-type]
    assert [item.markers for item in items] == [["unit"], ["cluster"], ["system"]]


def test_an_unclassified_file_is_a_collection_error_naming_it_and_the_tiers():
    items = [_FakeItem(TESTS_DIR / "test_ring.py", "test_x"), _FakeItem(TESTS_DIR / "test_brand_new.py", "test_y")]
    with pytest.raises(pytest.UsageError) as error:
        pytest_collection_modifyitems(None, items)  # type: ignore[arg-type]
    message = str(error.value)
    assert "test_brand_new.py" in message and "test_ring.py" not in message
    assert all(tier in message for tier in TIERS)


def test_this_unit_test_runs_under_the_guard(request):
    assert request.node.get_closest_marker("unit") is not None
    assert socket.socket.bind.__name__ == "refused"
    assert _posixsubprocess.fork_exec.__name__ == "refused"


def test_the_guard_refuses_binding_listening_and_every_way_to_start_a_process():
    async def start_with_asyncio() -> None:
        await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")

    with _unit_guard("tests/test_tiers.py::demo") as seen:
        with (socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp,
              pytest.raises(UnitTierViolation, match=r"demo is in the unit tier .* binds a socket")):
            udp.bind(("127.0.0.1", 0))
        with socket.socket() as tcp, pytest.raises(UnitTierViolation, match="listens on a socket"):
            tcp.listen()
        with pytest.raises(UnitTierViolation, match="starts a process"):
            subprocess.run([sys.executable, "-c", "pass"], timeout=10)
        with pytest.raises(UnitTierViolation, match="starts a process"):
            asyncio.run(start_with_asyncio())
        with pytest.raises(UnitTierViolation, match="forks"):
            os.fork()
        with pytest.raises(UnitTierViolation, match="runs a shell command"):
            os.system("true")
    assert len(seen) == 6


def test_a_unit_test_that_swallows_the_refusal_still_fails():
    item = types.SimpleNamespace(nodeid="tests/test_x.py::test_quiet", get_closest_marker=lambda name: object())
    phase = _guarded_phase(item)  # type: ignore[arg-type]
    next(phase)  # the guard is on: the test body runs here
    # The point: a test that hides the refusal (UnitTierViolation is a RuntimeError).
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, contextlib.suppress(RuntimeError):
        udp.bind(("127.0.0.1", 0))
    with pytest.raises(UnitTierViolation, match="test_quiet is in the unit tier"):
        phase.send(None)


def test_tests_of_other_tiers_run_unguarded():
    item = types.SimpleNamespace(nodeid="tests/test_x.py::test_server", get_closest_marker=lambda name: None)
    phase = _guarded_phase(item)  # type: ignore[arg-type]
    next(phase)
    assert socket.socket.bind.__name__ == "refused"  # still this unit test's own guard, not a new one
    with pytest.raises(StopIteration):
        phase.send(None)
