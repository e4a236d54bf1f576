"""Test tiers: every test file belongs to one tier, applied as a registered pytest marker at collection.

    unit       no listening socket, no server, no child process: cores and policies driven by hand
    inprocess  loopback servers (gRPC, HTTP, UDP gossip) inside the test process
    cluster    child processes: `python -m llmgw` members through tests/harness.py (llmgw.cluster's launcher),
               one-shot CLI or tool runs
    system     root and network namespaces, a fresh venv (packaging), an external model server (llama.cpp)

`make test-fast` runs `pytest -m "unit and not slow"` under the "fast" hypothesis profile (property-test budgets,
below); `pytest -m "unit or inprocess"` adds the in-process tier. With -m, files of tiers it cannot select are not
imported at all.
A test file missing from TEST_TIERS is a collection error (a new file must be classified); tests/test_tiers.py
checks the table against the files on disk. A unit test that binds or listens on a socket or starts a process fails
(the guard below), so the unit tier stays what its name says.
"""

from __future__ import annotations

import _posixsubprocess
import contextlib
import gc
import itertools
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings
from hypothesis.errors import InvalidArgument

TESTS_DIR = Path(__file__).resolve().parent
ROOT = TESTS_DIR.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TIERS = {
    "unit": "no listening socket, server or child process",
    "inprocess": "loopback servers inside the test process",
    "cluster": "child processes: llmgw members through the cluster launcher, one-shot CLI or tool runs",
    "system": "root/network namespaces, a fresh venv, or an external model server",
}

# file -> tier, or (tier, {test function: tier}) when a few tests of an otherwise single-tier file need more
# (typically one `python -m llmgw ...` run among unit tests). The one place a test's tier is decided.
TEST_TIERS: dict[str, str | tuple[str, dict[str, str]]] = {
    # ---- unit: codecs, cores, policies, configuration, source checks without tools ----
    "test_admission.py": "unit",
    "test_gc_tuning.py": "unit",
    "test_attempt.py": "unit",
    "test_breaker.py": "unit",
    "test_capacity.py": "unit",
    "test_codec.py": "unit",
    "test_codec_fuzz.py": "unit",
    "test_config.py": ("unit", {"test_config_module_cli_check_reports_missing_command": "cluster",
                                "test_bad_config_is_a_clear_error_with_exit_status_2": "cluster"}),
    "test_deadlines.py": "unit",
    "test_deploy_manifests.py": ("unit", {"test_the_docs_overlay_for_your_registry_renames_the_image": "cluster",
                                          "test_probe_and_metrics_paths_are_served_by_a_real_gateway": "cluster"}),
    "test_eventloop.py": ("unit", {"test_cli_rejects_an_unknown_event_loop": "cluster"}),
    "test_gateway_layers.py": ("unit", {"test_importing_the_request_path_loads_no_transport": "cluster"}),
    "test_hedging_policy.py": "unit",
    "test_imports.py": "unit",
    "test_logs.py": ("unit", {"test_library_code_is_silent_without_setup": "cluster"}),
    "test_picker.py": "unit",
    "test_reference_interop.py": "unit",
    "test_request_path.py": "unit",
    "test_resilience_units.py": "unit",
    "test_ring.py": "unit",
    "test_rollout_core.py": ("unit", {"test_command_template_runs_with_each_value_as_one_argument": "cluster",
                                      "test_command_template_with_shell_quotes_values": "cluster",
                                      "test_command_nonzero_exit_is_a_clear_error": "cluster",
                                      "test_command_timeout_kills_it": "cluster",
                                      "test_command_that_cannot_start": "cluster",
                                      "test_command_hook_plugs_into_a_rollout": "cluster"}),
    "test_routing.py": "unit",
    "test_simulator.py": "unit",
    "test_stall_race.py": "unit",
    "test_swim_core.py": "unit",
    "test_swim_merge.py": "unit",
    "test_swim_parts.py": "unit",
    "test_tenancy_digest.py": "unit",
    "test_tenancy_fair.py": "unit",
    "test_tenancy_keys.py": "unit",
    "test_tenancy_limits.py": "unit",
    "test_tiers.py": "unit",
    "test_topology.py": "unit",
    "test_tracing.py": ("unit", {"test_off_imports_nothing_from_opentelemetry": "cluster",
                                 "test_otlp_exporter_is_configured_by_the_standard_environment": "inprocess"}),
    "test_upstream_fidelity.py": "unit",
    "test_upstream_sse.py": "unit",
    "test_upstream_load.py": "unit",
    "test_upstream_config.py": "unit",
    # ---- inprocess: loopback servers in this process ----
    "test_agent.py": "inprocess",
    "test_docs_library.py": "inprocess",
    "test_gateway.py": "inprocess",
    "test_gossip_node.py": "inprocess",
    "test_hostile_gossip.py": "inprocess",
    "test_http_admin.py": "inprocess",
    "test_http_openai.py": "inprocess",
    "test_http_lean_front.py": "inprocess",
    "test_http_server.py": "inprocess",
    "test_metrics.py": "inprocess",
    "test_openai_sdk.py": "inprocess",
    "test_reliability_gossip_loss.py": "inprocess",
    "test_replica.py": "inprocess",
    "test_rollout_cli.py": "inprocess",
    "test_sessions.py": "inprocess",
    "test_status_cli.py": "inprocess",
    "test_tenancy_gateway.py": "inprocess",
    "test_tenancy_upstream.py": "inprocess",
    "test_upstream_client.py": "inprocess",
    "test_upstream_http1.py": "inprocess",
    "test_upstream_discovery.py": "inprocess",
    "test_upstream_mock.py": "inprocess",
    "test_upstream_probe.py": "inprocess",
    "test_upstream_gateway.py": "inprocess",
    "test_upstream_faults.py": "inprocess",
    "test_workers_metrics.py": "inprocess",
    "test_tracing_gateway.py": "inprocess",
    "test_served_bookkeeping.py": "inprocess",
    # ---- cluster: child processes ----
    "test_agent_process.py": "cluster",
    "test_upstream_cli.py": "cluster",
    "test_bench_openai.py": "cluster",
    "test_cli_main.py": "cluster",
    "test_client_cli.py": "cluster",
    "test_cluster.py": "cluster",
    "test_dataplane.py": "cluster",
    "test_gossip_process.py": "cluster",
    "test_grpc_fork.py": "cluster",
    "test_hostile_requests.py": "cluster",
    "test_member_process.py": "cluster",
    "test_mixed_cluster.py": "cluster",
    "test_reliability_chaos.py": "cluster",
    "test_reliability_gray.py": "cluster",
    "test_reliability_overload.py": "cluster",
    "test_reliability_restart.py": "cluster",
    "test_shutdown.py": "cluster",
    "test_workers_gateway.py": "cluster",
    "test_workers_grpc_admin.py": "cluster",
    "test_resilience.py": "cluster",
    "test_sourcecode.py": "cluster",
    "test_stall_acceptance.py": "cluster",
    "test_tenancy_cluster.py": "cluster",
    "test_tls.py": "cluster",
    "test_wiring.py": "cluster",
    # ---- system: root, a fresh venv, an external model server ----
    "test_llamacpp_server.py": "system",
    "test_llamacpp_gateway.py": "system",
    "test_netns.py": "system",
    "test_packaging.py": "system",
}


def tier_of(file_name: str, test_name: str) -> str | None:
    """The tier of test function `test_name` in tests/`file_name`; None when the file is not in the table."""
    entry = TEST_TIERS.get(file_name)
    if entry is None:
        return None
    if isinstance(entry, str):
        return entry
    file_tier, exceptions = entry
    return exceptions.get(test_name, file_tier)


def _compiled_markexpr(markexpr: str) -> Any | None:
    """pytest's own compiled `-m` expression (the grammar and answers of its deselection itself); None when that
    parser is not there or the expression is invalid (pytest then reports it)."""
    try:
        from _pytest.mark import expression as mark_expression
    except ImportError:
        return None
    parse_error = getattr(mark_expression, "ParseError", SyntaxError)  # pytest 8 raises ParseError, 9 SyntaxError
    try:
        return mark_expression.Expression.compile(markexpr)
    except (SyntaxError, parse_error):
        return None


def _marks_matcher(tier: str, others: dict[str, bool], asked: list[str]) -> Callable[..., bool]:
    """A test of `tier` whose other marks are `others` (absent when unlisted); a name the expression reads that
    `others` does not list is appended to `asked`."""
    def matcher(name: str, /, **kwargs: object) -> bool:
        if name in TIERS:
            return name == tier
        if name not in others and name not in asked:
            asked.append(name)
        return others.get(name, False)
    return matcher


_MAX_FREE_MARKS = 8


def _expression_may_select(markexpr: str, tier: str) -> bool:
    """Whether `-m markexpr` can select a test of `tier`, whatever its other marks (slow, parametrize marks ...):
    every assignment of the other names the expression reads is tried. True when in doubt."""
    expression = _compiled_markexpr(markexpr)
    if expression is None:
        return True
    names: list[str] = []  # names other than tiers, in the order the expression read them
    while len(names) <= _MAX_FREE_MARKS:
        known = list(names)
        for values in itertools.product((False, True), repeat=len(known)):
            # A name read only under some assignment (short-circuit) joins `names`, and the next round tries it.
            if expression.evaluate(_marks_matcher(tier, dict(zip(known, values, strict=True)), names)):
                return True
        if len(names) == len(known):
            return False
    return True


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """With -m, a test file none of whose tiers the expression can select is not even imported: `make test-fast`
    then loads no server, cluster or tool code (importing the files it deselects was a third of its run time)."""
    markexpr = config.getoption("markexpr", default="")
    if not markexpr or collection_path.parent != TESTS_DIR:
        return None
    entry = TEST_TIERS.get(collection_path.name)
    if entry is None:
        return None  # not a test file, or an unclassified one: collected, so the collection error names it
    tiers = {entry} if isinstance(entry, str) else {entry[0], *entry[1].values()}
    if any(_expression_may_select(markexpr, tier) for tier in tiers):
        return None
    return True


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    unclassified: set[str] = set()
    for item in items:
        path = Path(item.path)
        if path.parent != TESTS_DIR:
            continue
        name = getattr(item, "originalname", item.name)
        tier = tier_of(path.name, name)
        if tier is None:
            unclassified.add(path.name)
            continue
        item.add_marker(getattr(pytest.mark, tier))
    if unclassified:
        tiers = "\n".join(f"  {tier}: {what}" for tier, what in TIERS.items())
        raise pytest.UsageError(
            f"test files without a tier: {', '.join(sorted(unclassified))}. Add each to TEST_TIERS in "
            f"tests/conftest.py as one of:\n{tiers}")


# ---- the unit-tier guard -----------------------------------------------------------------------------------------
class UnitTierViolation(RuntimeError):
    """A unit-tier test bound a socket or started a process."""


@contextlib.contextmanager
def _unit_guard(nodeid: str) -> Iterator[list[str]]:
    """While active, binding/listening on a socket or starting a process raises UnitTierViolation; every attempt
    is also recorded, so a test that swallows the exception still fails."""
    seen: list[str] = []

    def refuse(what: str) -> Callable[..., object]:
        def refused(*args: object, **kwargs: object) -> object:
            message = (f"{nodeid} is in the unit tier (tests/conftest.py TEST_TIERS) but {what}; "
                       f"move it (or its file) to the tier it needs: inprocess for loopback servers, cluster for "
                       f"child processes")
            seen.append(message)
            raise UnitTierViolation(message)
        return refused

    patches: list[tuple[object, str, object]] = [
        (socket.socket, "bind", refuse("binds a socket")),
        (socket.socket, "listen", refuse("listens on a socket")),
        # Every way to a child process: subprocess and asyncio (both through fork_exec, which subprocess holds
        # its own reference to since 3.11, or posix_spawn), multiprocessing (fork or fork_exec), os.system.
        (_posixsubprocess, "fork_exec", refuse("starts a process")),
        *([(subprocess, "_fork_exec", refuse("starts a process"))] if hasattr(subprocess, "_fork_exec") else []),
        (os, "posix_spawn", refuse("starts a process")),
        (os, "posix_spawnp", refuse("starts a process")),
        (os, "fork", refuse("forks")),
        (os, "forkpty", refuse("forks")),
        (os, "system", refuse("runs a shell command")),
    ]
    saved = [(target, name, getattr(target, name)) for target, name, _ in patches]
    try:
        for target, name, replacement in patches:
            setattr(target, name, replacement)
        yield seen
    finally:
        for target, name, original in saved:
            setattr(target, name, original)


def _guarded_phase(item: pytest.Item) -> Iterator[None]:
    if item.get_closest_marker("unit") is None:
        return (yield)
    with _unit_guard(item.nodeid) as seen:
        result = yield
    if seen:
        raise UnitTierViolation(seen[0])
    return result


# Setup, call and teardown: a fixture that starts a server is as much a violation as the test body doing it.
@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    return (yield from _guarded_phase(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    return (yield from _guarded_phase(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    return (yield from _guarded_phase(item))


# ---- process-wide GC state ----------------------------------------------------------------------------------------
# A gateway or replica served inside the test process settles the collector for serving (llmgw.gc_tuning: freeze,
# higher thresholds). That is process-wide; left in place it would change how every later test's garbage is collected
# (a memory test counting cyclic garbage saw it). Each test gets back the collector it started with.
@pytest.fixture(autouse=True)
def _restore_gc_state() -> Iterator[None]:
    thresholds = gc.get_threshold()
    frozen = gc.get_freeze_count()
    yield
    if gc.get_freeze_count() != frozen:
        gc.unfreeze()
    gc.set_threshold(*thresholds)


# ---- property-test budgets: hypothesis settings profiles ---------------------------------------------------------
# LLMGW_HYPOTHESIS_PROFILE names the profile. Unset, hypothesis chooses as it always does (its "default", or its own
# "ci" on a CI machine) and every property test runs the examples its decorator asks for: that is `make test`.
# `make test-fast` sets "fast": a few derandomized examples per property (the same ones on every run, no example
# database), so the unit tier takes seconds. Tests pin their budget as max_examples=examples(N), never a bare N, so
# the fast profile can scale it down; a test without a pin follows the profile's max_examples.
HYPOTHESIS_PROFILE_ENV = "LLMGW_HYPOTHESIS_PROFILE"
FAST_PROFILE = "fast"
FAST_MAX_EXAMPLES = 10

settings.register_profile(FAST_PROFILE, max_examples=FAST_MAX_EXAMPLES, derandomize=True, database=None)


def _load_hypothesis_profile() -> str:
    """Load the profile the environment names (before any test module is imported: decorators read it); its name,
    or "" when hypothesis keeps its own choice."""
    name = os.environ.get(HYPOTHESIS_PROFILE_ENV, "")
    if name:
        try:
            settings.get_profile(name)  # first: load_profile would record an unknown name as current, then raise
        except InvalidArgument:
            raise pytest.UsageError(f"{HYPOTHESIS_PROFILE_ENV}={name!r} is not a hypothesis settings profile; use "
                                    f"{FAST_PROFILE!r}, 'default' or 'ci', or leave it unset") from None
        settings.load_profile(name)
    return name


HYPOTHESIS_PROFILE = _load_hypothesis_profile()


def examples(pinned: int) -> int:
    """A property test's max_examples: `pinned` (what `make test` runs), or under the fast profile a tenth of it
    (a test pinned low has costly examples), between 2 and FAST_MAX_EXAMPLES."""
    if HYPOTHESIS_PROFILE != FAST_PROFILE:
        return pinned
    return min(pinned, max(2, min(FAST_MAX_EXAMPLES, pinned // 10)))
