"""Style and types are checked like behaviour: the linter, the type checker and the compiled cores' stubs.

The settings live in pyproject.toml ([tool.ruff*], [tool.mypy*]); this file only runs the tools, with the
interpreter running the tests (the project's venv), so `make test` fails on a lint or type error. ruff and mypy
are in the dev extra: a missing tool fails here rather than silently skipping the check.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "llmgw" / "_core"
TOOL_TIMEOUT_S = 600  # a cold mypy run over llmgw takes ~10 s on one core; this only bounds a hang

# Cython adds these to every compiled module and class; they are not part of the API the stubs describe.
STUBTEST_ALLOWLIST = """
llmgw\\._core\\..*\\.__reduce_cython__
llmgw\\._core\\..*\\.__setstate_cython__
llmgw\\._core\\.\\w+\\.__test__
llmgw\\._core\\.\\w+\\.__pyx_capi__
# Cython reports __init__(self, *args, **kwargs) for a class whose __init__ takes no argument; it still rejects any.
llmgw\\._core\\.broadcast\\.BroadcastQueue\\.__init__
"""


def _run_tool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=TOOL_TIMEOUT_S, check=False)


def _assert_clean(proc: subprocess.CompletedProcess[str], what: str) -> None:
    assert proc.returncode == 0, f"{what} failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}"


def test_ruff_passes_on_every_python_file_of_the_project() -> None:
    paths = ["llmgw", "tests", "benchmarks", "tools", "setup.py"]
    _assert_clean(_run_tool("ruff", "check", "--no-fix", *paths), "ruff check " + " ".join(paths))


def test_mypy_passes_on_the_package() -> None:
    _assert_clean(_run_tool("mypy", "llmgw"), "mypy llmgw")


def test_every_compiled_core_module_has_a_stub() -> None:
    modules = sorted(p.stem for p in CORE.glob("*.pyx"))
    assert modules, f"no .pyx files under {CORE}"
    missing = [m for m in modules if not (CORE / f"{m}.pyi").is_file()]
    assert not missing, f"llmgw/_core modules without a .pyi stub: {missing}"
    assert (ROOT / "llmgw" / "py.typed").is_file(), "llmgw/py.typed (PEP 561 marker) is missing"


def test_stubs_match_the_compiled_modules(tmp_path: Path) -> None:
    """mypy's stubtest imports each compiled module and compares every public name and signature with its .pyi."""
    allowlist = tmp_path / "stubtest-allowlist.txt"
    allowlist.write_text(STUBTEST_ALLOWLIST)
    modules = [f"llmgw._core.{p.stem}" for p in sorted(CORE.glob("*.pyi"))]
    assert modules, f"no .pyi stubs under {CORE}"
    proc = _run_tool("mypy.stubtest", "--allowlist", str(allowlist), *modules)
    _assert_clean(proc, "stubtest " + " ".join(modules))
