"""Logging setup for the llmgw commands: quiet by default, text or JSON lines, one line per request.

Library code only ever does ``logging.getLogger("llmgw.<area>")``; the CLI calls :func:`setup_logging` once (calling
it again replaces the previous setup, it never stacks handlers). Structured fields travel as ``extra=`` and are
rendered by both formats: ``key=value`` pairs after the text message, or top-level keys of the JSON object.
"""

from __future__ import annotations

import datetime as _dt
import json as _json
import logging
import sys
from collections.abc import Callable, Mapping
from typing import IO, Any

__all__ = ["JsonFormatter", "TextFormatter", "add_context_fields", "parse_level", "request_log", "setup_logging"]

# Attributes every LogRecord has; anything else on a record came from `extra=` and is a structured field.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None))) | {
    "message", "asctime", "taskName"}
# Keys the JSON object always has; an extra field with one of these names is renamed with a trailing "_".
_CORE_KEYS = ("ts", "level", "logger", "msg")
_OURS = "_llmgw_handler"  # marks the handler setup_logging installed, so a second call replaces it

_LEVELS = {"critical": logging.CRITICAL, "error": logging.ERROR, "warning": logging.WARNING,
           "warn": logging.WARNING, "info": logging.INFO, "debug": logging.DEBUG}


def parse_level(level: str | int) -> int:
    """``"info"``/``"INFO"``/``20`` -> 20; anything else is a ValueError naming the accepted names."""
    if isinstance(level, bool):
        raise ValueError(f"invalid log level {level!r}")
    if isinstance(level, int):
        return level
    try:
        return _LEVELS[str(level).strip().lower()]
    except KeyError:
        raise ValueError(f"invalid log level {level!r}; use one of: critical, error, warning, info, debug") from None


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _RECORD_ATTRS and not k.startswith("_")}


def _timestamp(record: logging.LogRecord) -> str:
    ts = _dt.datetime.fromtimestamp(record.created, tz=_dt.UTC)
    return ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z"


def _text_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple, set, frozenset)):
        return ",".join(_text_value(v) for v in value)
    text = str(value)
    # Quote only when a reader splitting on spaces and "=" would otherwise mis-read the pair.
    if not text or any(c.isspace() or c in '="' for c in text):
        return _json.dumps(text, ensure_ascii=False)
    return text


class TextFormatter(logging.Formatter):
    """``2024-05-01T12:00:00.123Z INFO llmgw.gateway: request id=abc replica=r1 outcome=ok``"""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_timestamp(record)} {record.levelname} {record.name}: {record.getMessage()}"
        fields = _extras(record)
        if fields:
            line += " " + " ".join(f"{k}={_text_value(v)}" for k, v in fields.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, the record's extra fields, and exc if any."""

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {"ts": _timestamp(record), "level": record.levelname.lower(), "logger": record.name,
                               "msg": record.getMessage()}
        for key, value in _extras(record).items():
            obj[key + "_" if key in _CORE_KEYS else key] = value
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            obj["stack"] = self.formatStack(record.stack_info)
        # default=str: an odd extra value (an enum, a Path, an exception) must not cost the whole line.
        return _json.dumps(obj, ensure_ascii=False, default=str)


# Providers of fields every record gets while they apply, e.g. llmgw.tracing's trace_id/span_id while a request
# span is open in the current task. Empty unless tracing is on: then a record costs one list check more.
_context_providers: list[Callable[[], Mapping[str, Any] | None]] = []


def add_context_fields(provider: Callable[[], Mapping[str, Any] | None]) -> Callable[[], None]:
    """Add ``provider()``'s fields to every record the handler of :func:`setup_logging` writes (a field the record
    already has wins). Returns a function that removes the provider."""
    _context_providers.append(provider)

    def remove() -> None:
        try:
            _context_providers.remove(provider)
        except ValueError:
            pass

    return remove


class _ContextFields(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        for provider in _context_providers:
            try:
                fields = provider()
            except Exception:  # noqa: BLE001 - a broken provider must not cost the log line itself
                continue
            if fields:
                for key, value in fields.items():
                    if not hasattr(record, key):
                        setattr(record, key, value)
        return True


def setup_logging(level: str | int = "warning", json: bool = False, stream: IO[str] | None = None) -> logging.Handler:
    """Send log records at ``level`` and above to ``stream`` (default: the current ``sys.stderr``).

    Configures the root logger, so the libraries underneath (grpc, aiohttp) obey the same level. Idempotent:
    a second call replaces the handler of the first instead of adding another. Returns the installed handler.
    """
    numeric = parse_level(level)
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _OURS, False):
            root.removeHandler(handler)
            handler.close()
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    setattr(handler, _OURS, True)
    handler.addFilter(_ContextFields())
    handler.setFormatter(JsonFormatter() if json else TextFormatter())
    root.addHandler(handler)
    root.setLevel(numeric)
    return handler


def request_log(logger: logging.Logger, msg: str = "request", /, **fields: Any) -> None:
    """The one info line per finished request, e.g.
    ``request_log(log, id=rid, replicas=["r1", "r2"], outcome="ok", ttft_ms=12.5, tokens=20)``.

    Field names that clash with LogRecord attributes (``name``, ``msg``, ``args``, ...) get a trailing ``_``
    rather than raising inside the request path. Costs one level check when info is disabled."""
    if not logger.isEnabledFor(logging.INFO):
        return
    extra: Mapping[str, Any] = {(k + "_" if k in _RECORD_ATTRS else k): v for k, v in fields.items()}
    logger.info(msg, extra=extra)
