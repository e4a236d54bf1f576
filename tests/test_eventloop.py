"""llmgw.eventloop: which loop the serving processes run on."""

import asyncio
import subprocess
import sys

import pytest
import uvloop  # a declared dependency (pyproject.toml): every environment `make` builds has it

from llmgw import eventloop


async def _running_loop_type():
    return type(asyncio.get_running_loop())


def test_auto_and_uvloop_run_on_uvloop_asyncio_on_the_stock_loop():
    assert eventloop.run(_running_loop_type(), "auto") is uvloop.Loop
    assert eventloop.run(_running_loop_type(), "uvloop") is uvloop.Loop
    assert not issubclass(eventloop.run(_running_loop_type(), "asyncio"), uvloop.Loop)


def test_environment_variable_sets_the_default(monkeypatch):
    monkeypatch.setenv(eventloop.ENV_VAR, "asyncio")
    assert not issubclass(eventloop.run(_running_loop_type()), uvloop.Loop)
    monkeypatch.setenv(eventloop.ENV_VAR, "uvloop")
    assert eventloop.run(_running_loop_type()) is uvloop.Loop
    monkeypatch.setenv(eventloop.ENV_VAR, "trio")
    with pytest.raises(ValueError, match="LLMGW_EVENT_LOOP='trio'"):
        eventloop.run(_running_loop_type())


def test_unknown_choice_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown event loop 'gevent'"):
        eventloop.loop_factory("gevent")


def test_cli_rejects_an_unknown_event_loop():
    proc = subprocess.run([sys.executable, "-m", "llmgw", "replica", "--event-loop", "gevent"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "invalid choice: 'gevent'" in proc.stderr
