"""The test tiers (tests/conftest.py): the table classifies every test file and only real ones, the tiers are
registered markers, the unit-tier guard refuses sockets and processes even when a test swallows the refusal, `-m`
leaves files of tiers it cannot select unimported, and property-test budgets follow the hypothesis profile."""

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

import conftest
import pytest
from conftest import (
    FAST_MAX_EXAMPLES,
    FAST_PROFILE,
    HYPOTHESIS_PROFILE_ENV,
    ROOT,
    TEST_TIERS,
    TESTS_DIR,
    TIERS,
    UnitTierViolation,
    _expression_may_select,
    _guarded_phase,
    _load_hypothesis_profile,
    _unit_guard,
    examples,
    pytest_collection_modifyitems,
    pytest_ignore_collect,
    tier_of,
)
from hypothesis import settings


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


# ---- -m: files of tiers the expression cannot select are not imported ------------------------------------------
class _FakeConfig:
    def __init__(self, markexpr: str) -> None:
        self.markexpr = markexpr

    def getoption(self, name: str, default: object = None) -> object:
        assert name == "markexpr"
        return self.markexpr


def test_the_mark_expression_is_judged_for_every_assignment_of_its_other_names():
    cases = {
        "unit and not slow": {"unit"},
        "not unit": {"inprocess", "cluster", "system"},
        "inprocess or unit": {"unit", "inprocess"},
        "slow": set(TIERS),  # any tier may hold a slow test
        "unit and slow and not slow": set(),
        # `foo` is read only once `slow` is true (short-circuit): found and tried in a later round.
        "unit and slow and foo": {"unit"},
        "unit and": set(TIERS),  # invalid (pytest reports it): in doubt, every tier
    }
    for expression, expected in cases.items():
        assert {tier for tier in TIERS if _expression_may_select(expression, tier)} == expected, expression


def test_with_a_mark_expression_files_it_cannot_select_are_not_imported():
    fast = _FakeConfig("unit and not slow")

    def ignored(path: Path, config: _FakeConfig = fast) -> bool | None:
        return pytest_ignore_collect(path, config)  # type: ignore[arg-type]

    assert ignored(TESTS_DIR / "test_gateway.py") is True  # inprocess
    assert ignored(TESTS_DIR / "test_netns.py") is True  # system
    assert ignored(TESTS_DIR / "test_ring.py") is None  # unit
    assert ignored(TESTS_DIR / "test_config.py") is None  # unit, with a few cluster tests
    assert ignored(TESTS_DIR / "test_config.py", _FakeConfig("cluster")) is None  # for those few
    assert ignored(TESTS_DIR / "test_ring.py", _FakeConfig("cluster")) is True
    assert ignored(TESTS_DIR / "test_brand_new.py") is None  # unclassified: collected, so the error names it
    assert ignored(TESTS_DIR / "harness.py") is None
    assert ignored(TESTS_DIR / "test_gateway.py", _FakeConfig("")) is None  # no -m: everything
    assert ignored(ROOT / "test_gateway.py") is None  # not in tests/


# ---- property-test budgets -------------------------------------------------------------------------------------
def test_the_fast_profile_runs_few_derandomized_examples_without_a_database():
    fast = settings.get_profile(FAST_PROFILE)
    assert (fast.max_examples, fast.derandomize, fast.database) == (FAST_MAX_EXAMPLES, True, None)


def test_examples_is_the_pinned_budget_unless_the_fast_profile_scales_it_down(monkeypatch):
    budgets = (1, 2, 20, 60, 150, 1000)
    for profile in ("", "default", "ci"):
        monkeypatch.setattr(conftest, "HYPOTHESIS_PROFILE", profile)
        assert [examples(n) for n in budgets] == list(budgets), profile
    monkeypatch.setattr(conftest, "HYPOTHESIS_PROFILE", FAST_PROFILE)
    assert [examples(n) for n in budgets] == [1, 2, 2, 6, 10, 10]


def test_an_unknown_profile_name_is_a_clear_usage_error(monkeypatch):
    monkeypatch.setenv(HYPOTHESIS_PROFILE_ENV, "fastest")
    with pytest.raises(pytest.UsageError, match="LLMGW_HYPOTHESIS_PROFILE='fastest' is not a hypothesis settings"):
        _load_hypothesis_profile()
    monkeypatch.delenv(HYPOTHESIS_PROFILE_ENV)
    assert _load_hypothesis_profile() == ""  # unset: hypothesis keeps its own choice


def test_every_pinned_example_budget_goes_through_examples():
    """A bare max_examples=N would ignore the fast profile (and a bare one in `make test-fast` is the slow part)."""
    bare = []
    for path in sorted(TESTS_DIR.glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Call):
                bare += [f"{path.name}:{node.lineno}" for keyword in node.keywords
                         if keyword.arg == "max_examples" and isinstance(keyword.value, ast.Constant)]
    assert bare == [], "use max_examples=examples(N) (tests/conftest.py)"
