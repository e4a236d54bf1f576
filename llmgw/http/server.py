"""The gateway's HTTP server: one aiohttp application on the gateway's own event loop (next to its gRPC server),
carrying the OpenAI API, health, metrics and admin routes."""

from __future__ import annotations

import asyncio
import logging
import os

from aiohttp import web

from llmgw.gateway.operations import RestartHook, RolloutController
from llmgw.http.admin import ADMIN_TOKEN_ENV, AdminApi
from llmgw.http.lean_front import LeanFront, LeanSite
from llmgw.http.openai_api import DEFAULT_BODY_TIMEOUT_S, DEFAULT_MAX_TOKENS, ApiError, OpenAIApi

log = logging.getLogger("llmgw.http")

# JSON escaping can double a prompt's size (e.g. "\n" -> "\\n", non-ASCII -> "\\uXXXX" is 6x, but rare), plus
# room for the other fields: a body this size always fits a prompt of the gateway's cap.
BODY_OVERHEAD = 64 * 1024

# Connections waiting to be accepted. aiohttp's default (128) refuses part of a burst of new clients -- 256 opened
# at once by a load test, or a fleet reconnecting after a restart; the kernel caps it at net.core.somaxconn.
LISTEN_BACKLOG = 1024


class HttpFront:
    """A running HTTP front; `port` is the bound port, `await close()` stops it (idempotent)."""

    def __init__(self, runner: web.AppRunner, lean: LeanFront, host: str, port: int, openai: OpenAIApi,
                 admin: AdminApi, *, tls: bool = False, owns_rollouts: bool = False,
                 shutdown_timeout_s: float = 2.0) -> None:
        self._runner: web.AppRunner | None = runner
        self._lean = lean
        self._shutdown_timeout_s = shutdown_timeout_s
        self._owns_rollouts = owns_rollouts
        self.host = host
        self.port = port
        self.openai = openai
        self.admin = admin
        self.tls = tls

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    @property
    def drains(self):
        return self.admin.drains

    async def close(self) -> None:
        runner, self._runner = self._runner, None
        if runner is None:
            return
        if self._owns_rollouts:
            await self.admin.rollouts.close()
        # A gateway stopping on a signal drained first (llmgw.gateway.shutdown: open streams finished, or ended with
        # an error event, within its shutdown grace); what is left gets a short grace, then its handler is
        # cancelled, which closes its gateway stream and frees the replica slot.
        # The two kinds of connection, aiohttp's and the lean front's, get their grace side by side.
        await asyncio.gather(runner.cleanup(), self._lean.shutdown(self._shutdown_timeout_s))
        log.info("HTTP front on %s closed", self.url)


@web.middleware
async def _errors_as_json(request: web.Request, handler):
    """aiohttp's own HTTP errors (404, 405, 413...) in OpenAI's error shape, so every client parses one format."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
        return ApiError(exc.status, exc.reason or exc.text or "error", type="invalid_request_error",
                        code=exc.reason.lower().replace(" ", "_") if exc.reason else None,
                        headers=headers).response()


async def start_http(gateway, *, host: str = "127.0.0.1", port: int = 0, admin_token: str | None = None,
                     metrics=None, breakers=None, rollouts: RolloutController | None = None,
                     restart: RestartHook | None = None,
                     client_max_size: int | None = None, default_max_tokens: int = DEFAULT_MAX_TOKENS,
                     record_requests: bool = True, reuse_port: bool = False,
                     shutdown_timeout_s: float = 2.0, ssl_context=None,
                     body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S, worker_rollouts=None) -> HttpFront:
    """Serve the OpenAI API + health + metrics + admin for `gateway` on host:port (0 = a free port).

    Must be awaited on the gateway's event loop. `admin_token` defaults to $LLMGW_ADMIN_TOKEN; `metrics` is a
    llmgw.metrics.GatewayMetrics (one is created when omitted) and gets the HTTP requests' outcomes, TTFT,
    inter-token times and tokens unless `record_requests` is false (when the gateway records them itself);
    `breakers` (a llmgw.policy.breaker.BreakerBoard) adds breaker state to /admin/members; `rollouts` is the
    gateway's llmgw.gateway.operations.RolloutController (GatewayServer.rollouts), so /admin/rollout and the gRPC
    GatewayAdmin rollout RPCs run one rolling update; without one, the front makes its own around `restart`, the
    async (replica_id, version) hook that restarts a replica on the new version (None = no rolling updates).
    Drains always go to the gateway's own drain set (Gateway.drains);
    `ssl_context` (an ssl.SSLContext for the server side, see llmgw.tls) serves HTTPS instead of HTTP.
    `body_timeout_s` bounds how long a completion request's body may take to arrive: a slower one (slowloris)
    gets 408 in OpenAI's error shape and its connection is closed.
    `worker_rollouts` (a llmgw.workers.WorkerRollouts over `rollouts`, in a worker of `gateway --workers N`) makes
    /admin/rollout group-wide: one update in the whole group, its status and abort from any worker.
    """
    if not 0 <= port <= 65535:
        raise ValueError(f"HTTP port must be within 0..65535, got {port}")
    if metrics is None:
        from llmgw.metrics import GatewayMetrics

        metrics = GatewayMetrics(gateway_id=gateway.config.gateway_id, process_metrics=False)
    if admin_token is None:
        admin_token = os.environ.get(ADMIN_TOKEN_ENV) or None
    if client_max_size is None:
        client_max_size = 2 * gateway.config.max_prompt_bytes + BODY_OVERHEAD
    app = web.Application(client_max_size=client_max_size, middlewares=[_errors_as_json])
    openai = OpenAIApi(gateway, metrics=metrics, record_requests=record_requests,
                       default_max_tokens=default_max_tokens, body_timeout_s=body_timeout_s)
    owns_rollouts = rollouts is None
    if rollouts is None:
        # A transport that can ask replicas to drain (gRPC) lets rolling updates do so.
        drain_replica = getattr(getattr(gateway, "transport", None), "drain_replica", None)
        rollouts = RolloutController(gateway, gateway.drains, restart, drain_replica=drain_replica)
    elif restart is not None:
        raise ValueError("pass either rollouts (which carries its restart hook) or restart, not both")
    admin = AdminApi(gateway, bound_host=host, admin_token=admin_token, metrics=metrics, breakers=breakers,
                     rollouts=rollouts, worker_rollouts=worker_rollouts)
    openai.add_routes(app)
    admin.add_routes(app)
    # handler_cancellation: a client that disconnects cancels its handler, which closes its Gateway.infer()
    # stream -- also while it is still queued or waiting for its first token, when no write would notice.
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=shutdown_timeout_s)
    await runner.setup()
    # Completion requests are served by the lean front's own connections; anything else is aiohttp's (runner.server,
    # set up above, makes aiohttp's protocol for a connection).
    aiohttp_protocol = runner.server
    assert aiohttp_protocol is not None
    lean = LeanFront(asyncio.get_running_loop(), {"chat": openai.chat_completions, "completions": openai.completions},
                     aiohttp_protocol, client_max_size=client_max_size)
    try:
        site = LeanSite(runner, host, port, lean, reuse_port=reuse_port or None, ssl_context=ssl_context,
                        backlog=LISTEN_BACKLOG)
        await site.start()
        bound = runner.addresses[0][1]
    except BaseException:
        await runner.cleanup()
        raise
    front = HttpFront(runner, lean, host, bound, openai, admin, tls=ssl_context is not None,
                      owns_rollouts=owns_rollouts, shutdown_timeout_s=shutdown_timeout_s)
    log.info("HTTP front serving on %s", front.url)
    return front
