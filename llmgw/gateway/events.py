"""What the request path reports, and to whom: attempt outcomes, per-request records, listeners.

The request path hands every event to the listeners registered with `Gateway.add_listener`; it imports none of
them. Metrics and the request log are one such listener (observability.py); a policy that wants to learn from
attempts (adaptive deadlines, say) is another. A listener that raises is logged and skipped.
"""

from __future__ import annotations

import enum
import logging

from llmgw.gateway.api import ErrorKind, TokenEvent
from llmgw.gateway.replica_stream import ReportedUsage
from llmgw.tracing import NOOP_SPAN, Span

log = logging.getLogger("llmgw.gateway")


class AttemptOutcome(enum.Enum):
    """What happened to one replica attempt (or to a hedge race, on the replica it concerns)."""

    FIRST_TOKEN = "first_token"  # the first message came (with the time to first token)
    OK = "ok"  # the attempt delivered the final token
    ERROR = "error"  # failed: an error status, a broken or malformed stream, a connection gone
    STALL = "stall"  # no first / next token within its limit
    BUSY = "busy"  # refused: at capacity
    DRAINING = "draining"  # refused: draining
    CANCELLED = "cancelled"  # the client went away (or the request ended otherwise) during the attempt
    HEDGE_STARTED = "hedge_started"  # on the hedge's replica
    HEDGE_WON = "hedge_won"
    HEDGE_LOST = "hedge_lost"
    HEDGE_CANCELLED = "hedge_cancelled"
    HEDGE_DENIED = "hedge_denied"  # on the primary's replica: no free replica or no budget for a hedge


class RequestOutcome(enum.Enum):
    """How a request ended: OK, CANCELLED by the client, INTERNAL (ended without a final token), or the kind of
    the GatewayError it ended with. The value is the label of metrics and the request log."""

    OK = "ok"
    CANCELLED = "cancelled"
    INTERNAL = "internal"
    INVALID_ARGUMENT = "invalid_argument"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    UNAVAILABLE = "unavailable"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    NOT_FOUND = "not_found"
    UNAUTHENTICATED = "unauthenticated"
    PERMISSION_DENIED = "permission_denied"
    UNKNOWN = "unknown"

    @classmethod
    def of_error(cls, kind: ErrorKind) -> RequestOutcome:
        return cls(kind.value)


class RequestRecord:
    """One request as the request path saw it; complete when handed to `request_finished`.

    Times are event-loop seconds. While `tokens_delivered` runs, everything already counts the new batch except
    `last_token_at`, still the time of the previous batch, so a listener can measure the gap to the new one."""

    __slots__ = (
        "batches",
        "client_id",
        "complete",
        "finish_reason",
        "finished",
        "front",
        "hedge",
        "key_id",
        "last_token_at",
        "model",
        "outcome",
        "prompt_tokens",
        "replicas",
        "request_id",
        "started",
        "tenant",
        "tokens",
        "trace",
        "ttft_s",
        "usage",
    )

    def __init__(self, request_id: str, client_id: str, hedge: bool, started: float, tenant: str = "",
                 key_id: str = "") -> None:
        self.request_id = request_id
        self.client_id = client_id
        self.tenant = tenant  # "" without a key file
        self.key_id = key_id  # the short id of the caller's key (never the key)
        self.hedge = hedge
        self.started = started
        self.outcome = RequestOutcome.OK
        self.tokens = 0  # tokens delivered (an empty final event is not a token)
        self.batches = 0  # batches delivered (1 while the first one is being reported)
        self.ttft_s: float | None = None
        self.last_token_at = 0.0
        self.replicas: list[str] = []  # replicas that delivered tokens, in order, each run once
        self.complete = False  # the final token was delivered
        self.finished = started  # when the request ended
        self.front = "grpc"  # the front it came in on (metrics label): "grpc" | "http"
        self.model = ""  # the model the request named ("" = none)
        self.prompt_tokens = 0  # as the front counted them (llmgw counts words: it has no tokenizer)
        self.finish_reason: str | None = None  # of the final token ("stop", "length"...), once delivered
        self.trace: Span = NOOP_SPAN  # the request's span (llmgw.tracing); ended after request_finished
        # The model server's usage (prompt, completion tokens) when it reported one (replica_stream.ReportedUsage).
        self.usage: ReportedUsage | None = None

    @property
    def duration_s(self) -> float:
        return self.finished - self.started


class Listeners(list):
    """The registered RequestListeners, and the one fan-out of attempt events to them (the request path and the
    stall guard both report through it; neither calls back into the other)."""

    def attempt_event(self, replica_id: str | None, outcome: AttemptOutcome, ttft_s: float | None) -> None:
        if replica_id is None:
            return
        for listener in self:
            try:
                listener.attempt_event(replica_id, outcome, ttft_s)
            except Exception:  # a faulty policy must not break the request path
                log.exception("request listener failed")


class RequestListener:
    """Base of the request path's listeners: override what you need. Called on the event loop, synchronously, so
    keep them quick; they must not raise (an exception is logged and the request goes on)."""

    def attempt_event(self, replica_id: str, outcome: AttemptOutcome, ttft_s: float | None) -> None:
        """After every replica attempt step (ttft_s with FIRST_TOKEN)."""

    def queue_waited(self, seconds: float) -> None:
        """After each wait in the admission queue (admitted, refused or timed out)."""

    def tokens_delivered(self, record: RequestRecord, batch: list[TokenEvent], now: float) -> None:
        """Before a batch of token events goes to the caller."""

    def request_finished(self, record: RequestRecord) -> None:
        """Once per request, however it ended."""
