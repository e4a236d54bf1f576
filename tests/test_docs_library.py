"""Every ```python block of docs/library.md runs, in order, in one namespace: the documentation cannot rot."""

from __future__ import annotations

import contextlib
import io
import os
import re
import traceback

import pytest

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "library.md")
# A fenced block opened by ```python (optionally indented) and closed by the next ``` line.
FENCE = re.compile(r"^(?P<indent>[ \t]*)```python[ \t]*\n(?P<body>.*?)^[ \t]*```[ \t]*$", re.M | re.S)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line number of the opening fence, dedented code) of every ```python block."""
    blocks = []
    for match in FENCE.finditer(text):
        indent = match.group("indent")
        body = "".join(
            line[len(indent):] if line.startswith(indent) else line
            for line in match.group("body").splitlines(keepends=True)
        )
        blocks.append((text.count("\n", 0, match.start()) + 1, body))
    return blocks


def test_extractor_finds_blocks_and_ignores_other_languages():
    sample = "a\n```python\nx = 1\n```\n```text\nnot code\n```\n  ```python\n  y = x + 1\n  ```\n"
    assert python_blocks(sample) == [(2, "x = 1\n"), (8, "y = x + 1\n")]


def test_library_doc_examples_run():
    with open(DOC, encoding="utf-8") as f:
        text = f.read()
    blocks = python_blocks(text)
    assert blocks, "docs/library.md has no ```python example"
    namespace: dict = {"__name__": "docs_library"}
    for line, code in blocks:
        compiled = compile(code, f"docs/library.md (block at line {line})", "exec")
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                exec(compiled, namespace)
            except Exception:  # noqa: BLE001 - name the block: a bare traceback would point into an anonymous string
                pytest.fail(f"docs/library.md block at line {line} raised:\n{traceback.format_exc()}")
