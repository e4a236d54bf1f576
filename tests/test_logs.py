"""llmgw.logs: quiet default, JSON lines, text key=value fields, idempotent setup, request_log."""

from __future__ import annotations

import io
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

from llmgw import logs


@pytest.fixture
def restore_root_logging():
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in saved_handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(saved_level)


def test_json_lines_carry_core_keys_and_extra_fields(restore_root_logging):
    out = io.StringIO()
    logs.setup_logging("info", json=True, stream=out)
    log = logging.getLogger("llmgw.test.json")
    log.info("hello %s", "world", extra={"replica": "r1", "ts": "clash", "when": object})
    log.debug("hidden")
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    obj = json.loads(lines[0])
    assert obj["level"] == "info" and obj["logger"] == "llmgw.test.json" and obj["msg"] == "hello world"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", obj["ts"])
    assert obj["replica"] == "r1"
    assert obj["ts_"] == "clash"  # an extra named like a core key does not overwrite it
    assert obj["when"] == str(object)  # unserialisable values degrade to str, the line survives


def test_json_exception_is_one_line(restore_root_logging):
    out = io.StringIO()
    logs.setup_logging("error", json=True, stream=out)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("llmgw.test").exception("failed")
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    obj = json.loads(lines[0])
    assert obj["level"] == "error" and "RuntimeError: boom" in obj["exc"]


def test_default_is_quiet_warning_level(restore_root_logging):
    out = io.StringIO()
    logs.setup_logging(stream=out)
    log = logging.getLogger("llmgw.test.quiet")
    log.info("not shown")
    logs.request_log(log, id="a", outcome="ok")
    log.warning("shown")
    assert out.getvalue().count("\n") == 1 and "WARNING llmgw.test.quiet: shown" in out.getvalue()


def test_setup_is_idempotent_and_replaces_its_handler(restore_root_logging):
    first, second = io.StringIO(), io.StringIO()
    logs.setup_logging("info", stream=first)
    logs.setup_logging("info", json=True, stream=second)
    logs.setup_logging("info", json=True, stream=second)
    logging.getLogger("llmgw.test.idem").info("once")
    assert first.getvalue() == ""
    assert len(second.getvalue().splitlines()) == 1
    ours = [h for h in logging.getLogger().handlers if getattr(h, "_llmgw_handler", False)]
    assert len(ours) == 1


def test_request_log_text_format(restore_root_logging):
    out = io.StringIO()
    logs.setup_logging("INFO", stream=out)
    logs.request_log(logging.getLogger("llmgw.gateway"), id="req-1", replicas=["r1", "r2"], outcome="ok",
                     ttft_ms=12.5, tokens=20, note="two words", name="clash")
    line = out.getvalue().rstrip("\n")
    assert "\n" not in line
    assert line.split(" ", 1)[1] == ('INFO llmgw.gateway: request id=req-1 replicas=r1,r2 outcome=ok '
                                     'ttft_ms=12.5 tokens=20 note="two words" name_=clash')


def test_request_log_json_fields(restore_root_logging):
    out = io.StringIO()
    logs.setup_logging("info", json=True, stream=out)
    logs.request_log(logging.getLogger("llmgw.gateway"), id="req-2", replica="r3", outcome="unavailable",
                     ttft_ms=None, tokens=7, msg="clash")
    obj = json.loads(out.getvalue())
    assert obj["msg"] == "request"
    assert {k: obj[k] for k in ("id", "replica", "outcome", "ttft_ms", "tokens", "msg_")} == {
        "id": "req-2", "replica": "r3", "outcome": "unavailable", "ttft_ms": None, "tokens": 7, "msg_": "clash"}


@pytest.mark.parametrize("level, expected", [("debug", 10), ("Warning", 30), ("warn", 30), (40, 40)])
def test_parse_level(level, expected):
    assert logs.parse_level(level) == expected


@pytest.mark.parametrize("bad", ["loud", "", True])
def test_bad_level_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="invalid log level"):
        logs.parse_level(bad)


def test_library_code_is_silent_without_setup():
    # A fresh interpreter that imports the ops modules and logs below warning writes nothing at all.
    code = ("import logging, llmgw.logs, llmgw.metrics, llmgw.config;"
            "logging.getLogger('llmgw.x').info('nope');"
            "llmgw.logs.request_log(logging.getLogger('llmgw.y'), id='1')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == ""
