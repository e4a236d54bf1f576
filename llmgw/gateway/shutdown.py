"""Graceful shutdown of a gateway: stop taking requests, let open streams finish, end the rest retryably.

On SIGTERM (llmgw.gateway.app.stop_gateway) the gateway, in this order:

1. reports not ready at once -- gRPC health NOT_SERVING (GatewayServer.drain) and HTTP /readyz 503 -- so load
   balancers and Kubernetes endpoints stop sending it clients;
2. refuses every new request with UNAVAILABLE "gateway shutting down" (HTTP: 503 in OpenAI's error shape), which
   clients retry on another gateway; requests already in progress keep going, failovers included;
3. waits up to the shutdown grace (``--shutdown-grace-s``) for those to finish;
4. ends whatever is still open when the grace runs out with UNAVAILABLE (on HTTP streams: one SSE error event,
   without ``data: [DONE]``), never with a silent truncation: it closes the admission queue and the replica
   connections, and the request path, seeing :attr:`RequestPath.closing`, fails each request instead of failing
   it over;
5. then closes its fronts and leaves gossip (GatewayServer.stop).

The request path pays one attribute read per admission for this; nothing per token.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any

log = logging.getLogger("llmgw.gateway.shutdown")

SHUTTING_DOWN = "gateway shutting down"
# Kubernetes: terminationGracePeriodSeconds (60 s in deploy/kubernetes) minus the preStop sleep (10 s), less a
# margin for closing the fronts and leaving gossip.
DEFAULT_SHUTDOWN_GRACE_S = 45.0
# After the grace: how long the cut requests get to report their error to their clients.
CUT_WAIT_S = 2.0
POLL_S = 0.02


@dataclasses.dataclass(frozen=True)
class DrainReport:
    """How a drain went: requests open when it began, those still open when the grace ran out (`cut`: each ended
    with UNAVAILABLE), those that did not even end after that (`left`, 0 unless a transport ignores closing)."""

    open_at_start: int
    cut: int
    left: int
    seconds: float


def begin_drain(gateway: Any) -> None:
    """Refuse new requests from now on (requests in progress continue). Idempotent."""
    path = gateway.path
    if path.refusing is None:
        path.refusing = SHUTTING_DOWN


async def _until_idle(path: Any, deadline: float) -> bool:
    loop = asyncio.get_running_loop()
    while path.open_requests > 0:
        remaining = deadline - loop.time()
        if remaining <= 0:
            return False
        await asyncio.sleep(min(POLL_S, remaining))
    return True


async def drain(gateway: Any, grace_s: float, *, cut_wait_s: float = CUT_WAIT_S) -> DrainReport:
    """Refuse new requests, wait up to `grace_s` for the open ones to finish, then end the rest with UNAVAILABLE
    (waiting up to `cut_wait_s` for them to tell their clients)."""
    if not grace_s >= 0:
        raise ValueError(f"the shutdown grace must be >= 0 seconds, got {grace_s!r}")
    loop = asyncio.get_running_loop()
    started = loop.time()
    path = gateway.path
    begin_drain(gateway)
    open_at_start = path.open_requests
    if open_at_start:
        log.info("shutting down: waiting up to %g s for %d open request(s)", grace_s, open_at_start)
    if await _until_idle(path, started + grace_s):
        return DrainReport(open_at_start, 0, 0, loop.time() - started)
    cut = path.open_requests
    log.warning("shutdown grace of %g s ran out: ending %d open request(s) with UNAVAILABLE", grace_s, cut)
    path.closing = (f"{SHUTTING_DOWN}: the request did not finish within the {grace_s:g} s shutdown grace; "
                    "retry it")
    gateway.admission.close()  # queued requests: refused (Unavailable, see RequestPath._admit)
    await gateway.transport.close()  # replica streams end; the request path fails them instead of over
    left = 0 if await _until_idle(path, loop.time() + cut_wait_s) else path.open_requests
    if left:
        log.warning("%d request(s) still open %g s after the shutdown grace", left, cut_wait_s)
    return DrainReport(open_at_start, cut, left, loop.time() - started)
