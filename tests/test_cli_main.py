"""The `llmgw` entry point: --version, the name --help gives itself, and flags + config reaching a subcommand."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import llmgw
from llmgw.__main__ import main, version

ROOT = Path(__file__).resolve().parent.parent


def test_version_prints_llmgw_and_the_distribution_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    out = capsys.readouterr().out.strip()
    assert out == f"llmgw {version()}"
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        expected = dist_version("llmgw")
    except PackageNotFoundError:
        expected = llmgw.__version__
    assert version() == expected


def test_version_falls_back_to_the_source_tree_when_not_installed(monkeypatch):
    import importlib.metadata

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    assert version() == llmgw.__version__


def test_help_names_python_dash_m_when_run_as_a_module():
    proc = subprocess.run([sys.executable, "-m", "llmgw", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: python -m llmgw "), proc.stdout[:200]


def test_installed_script_names_itself_llmgw():
    script = Path(sys.executable).parent / "llmgw"
    if not script.exists():
        script_path = shutil.which("llmgw")
        assert script_path, "the llmgw console script is not installed next to this interpreter nor on PATH"
        script = Path(script_path)
    proc = subprocess.run([str(script), "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: llmgw [-h] [--version] COMMAND"), proc.stdout[:200]
    assert "__main__.py" not in proc.stdout
    sub = subprocess.run([str(script), "status", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert sub.stdout.startswith("usage: llmgw status "), sub.stdout[:200]
