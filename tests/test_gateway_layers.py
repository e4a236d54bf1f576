"""The gateway's layering rules: the request path knows no transport, and each front maps every error kind."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import grpc
import pytest

from llmgw.gateway.api import DeadlineExceeded, ErrorKind, GatewayError, InvalidArgument, ResourceExhausted, Unavailable

ROOT = pathlib.Path(__file__).resolve().parent.parent
# The transport-neutral core: these modules and everything they import from llmgw.
NEUTRAL_ROOTS = ("llmgw.gateway.request_path", "llmgw.gateway.service", "llmgw.gateway.attempt",
                 "llmgw.gateway.capacity", "llmgw.gateway.replica_stream", "llmgw.gateway.events")
FORBIDDEN = ("grpc", "llmgw._proto", "google.protobuf")


def _module_file(name: str) -> pathlib.Path | None:
    base = ROOT / name.replace(".", "/")
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def _imports(path: pathlib.Path) -> set[str]:
    """Every absolute module name a file imports, anywhere in it (also inside functions)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _import_graph(roots) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in graph:
            continue
        path = _module_file(name)
        if path is None:  # an attribute imported from a module, not a module
            continue
        graph[name] = _imports(path)
        # A submodule import also runs its packages' __init__.
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))
        todo.extend(n for n in graph[name] if n.startswith("llmgw"))
    return graph


def test_the_request_path_imports_no_transport():
    graph = _import_graph(NEUTRAL_ROOTS)
    assert "llmgw.gateway.request_path" in graph and "llmgw.gateway.capacity" in graph
    offenders = {module: sorted(n for n in names if n.split(".")[0] == "grpc" or n.startswith(FORBIDDEN))
                 for module, names in graph.items()}
    assert {m: n for m, n in offenders.items() if n} == {}
    # The walk itself can find an offender: the gRPC transport is one.
    assert any(n.startswith("grpc") for n in _imports(_module_file("llmgw.gateway.grpc_transport")))


def test_importing_the_request_path_loads_no_transport():
    code = ("import sys, llmgw.gateway.service, llmgw.gateway.request_path; "
            "print(sorted(m for m in sys.modules if m == 'grpc' or m.startswith(('grpc.', 'llmgw._proto'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_every_error_kind_has_a_grpc_status_and_an_http_answer():
    from llmgw.gateway.server import GRPC_STATUS
    from llmgw.http.openai_api import HTTP_ERRORS, from_gateway_error

    assert set(GRPC_STATUS) == set(ErrorKind) == set(HTTP_ERRORS)
    for kind in ErrorKind:
        assert GRPC_STATUS[kind].name.lower() == kind.value  # the status of the same name
        error = GatewayError("m")
        error.kind = kind
        answer = from_gateway_error(error)
        assert (answer.status, answer.type) == HTTP_ERRORS[kind] and answer.code == kind.value
    assert GRPC_STATUS[ErrorKind.RESOURCE_EXHAUSTED] is grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.parametrize("error, status, type_, code, headers", [
    (InvalidArgument("bad"), 400, "invalid_request_error", "invalid_argument", {}),
    (ResourceExhausted("full", retry_after_s=2.2), 429, "rate_limit_error", "resource_exhausted",
     {"Retry-After": "3"}),
    (ResourceExhausted("full", retry_after_s=0.1), 429, "rate_limit_error", "resource_exhausted",
     {"Retry-After": "1"}),
    (Unavailable("none"), 503, "service_unavailable", "unavailable", {}),
    (DeadlineExceeded("late"), 504, "timeout", "deadline_exceeded", {}),
    (GatewayError("?"), 500, "server_error", "unknown", {}),
])
def test_http_answers_of_the_gateways_errors(error, status, type_, code, headers):
    from llmgw.http.openai_api import from_gateway_error

    answer = from_gateway_error(error)
    assert (answer.status, answer.type, answer.code, answer.headers, answer.message) == (
        status, type_, code, headers, error.message)
    assert answer.body() == {"error": {"message": error.message, "type": type_, "param": None, "code": code}}
