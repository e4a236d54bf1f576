"""The neutral vocabulary of upstream failures: every way a call to a model server can fail is one FailureKind.

The client translates aiohttp exceptions, HTTP statuses and stream defects into these once; the gateway decides
what to do with a kind (fail over, back off, pass the server's body to the client) without knowing about HTTP.
"""

from __future__ import annotations

import email.utils
import enum
import math
import time


class FailureKind(enum.Enum):
    CONNECT = "connect"  # refused, unreachable, DNS, TLS handshake: nothing reached the server
    RESET = "reset"  # the connection broke after the request was sent (mid-stream included)
    TIMEOUT_FIRST_BYTE = "timeout_first_byte"  # no response (streamed: no first event) in time
    TIMEOUT_IDLE = "timeout_idle"  # the response started, then went silent for longer than the idle timeout
    RATE_LIMITED = "rate_limited"  # HTTP 429; `retry_after` holds the server's Retry-After, if any
    SERVER_ERROR = "server_error"  # HTTP 5xx, or an error event inside a stream
    CLIENT_ERROR = "client_error"  # HTTP 4xx other than 429: the request is at fault, `body` is the server's own
    MALFORMED = "malformed"  # bytes that are not valid SSE, or data that is not a JSON object
    INCOMPLETE = "incomplete"  # the stream ended without `data: [DONE]`


# Kinds where another server may answer the same request; a CLIENT_ERROR would be refused everywhere.
_RETRYABLE = frozenset(FailureKind) - {FailureKind.CLIENT_ERROR}


class UpstreamError(Exception):
    """One failed upstream call. `body` is the server's response body exactly as it sent it (for HTTP errors and
    in-stream error events), `status` its HTTP status where there was one."""

    def __init__(self, kind: FailureKind, detail: str, *, status: int | None = None, body: bytes | None = None,
                 content_type: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(f"{kind.value}: {detail}")
        self.kind = kind
        self.detail = detail
        self.status = status
        self.body = body
        self.content_type = content_type
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:
        return self.kind in _RETRYABLE


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (RFC 9110: delay-seconds or an HTTP-date), or None when absent or
    unreadable. A date in the past is 0."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    if value.isascii() and value.isdigit():
        return float(int(value))
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        # Not standard, but some servers send "1.5"; accept finite non-negative numbers only.
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


def classify_status(status: int) -> FailureKind:
    """The kind for a non-2xx HTTP status."""
    if status == 429:
        return FailureKind.RATE_LIMITED
    if 400 <= status < 500:
        return FailureKind.CLIENT_ERROR
    return FailureKind.SERVER_ERROR
