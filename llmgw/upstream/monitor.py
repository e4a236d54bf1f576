"""Keeps one server's Backend current: its health, its models (when it was given by URL alone) and its load.

One `BackendMonitor` per server, shared by every source that needs one (the static list, each DNS address, the
agent). A probe round is: health (probe.py), then -- for a server that learns its models -- `/v1/models` when due,
then the load where the server reports it. After each round the monitor hands the new Backend to `on_change` if
anything about it changed.

Pacing: a round every `interval_s` once the server's models are known. Until a server given by URL alone has told
its models, rounds back off (interval, doubling, up to `models_retry_max_s`): the server is not routable yet, and a
server still loading its weights need not be asked every second. Learnt models are read again every
`models_refresh_s`; a failed refresh keeps the last list (an unreachable server is the health check's business).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from llmgw.upstream.backends import Backend, HealthState
from llmgw.upstream.client import UpstreamClient
from llmgw.upstream.errors import UpstreamError
from llmgw.upstream.probe import HealthTracker, Prober, ProbeSettings

log = logging.getLogger("llmgw.upstream.monitor")


class BackendMonitor:
    def __init__(self, backend: Backend, client: UpstreamClient, settings: ProbeSettings,
                 on_change: Callable[[Backend], None]) -> None:
        self.settings = settings
        self._backend = backend
        self._on_change = on_change
        self._prober = Prober(client, backend.base_url, backend.kind, settings)
        self.tracker = HealthTracker(settings.unhealthy_after)
        self._learns_models = not backend.models_configured
        self._models_known = backend.models_configured
        self._models_due = 0.0  # loop time of the next /v1/models read (learning servers)
        self._backoff = settings.interval_s

    @property
    def backend(self) -> Backend:
        return self._backend

    @property
    def models_known(self) -> bool:
        """The server's models are known (configured or learnt): it can be routed to."""
        return self._models_known

    async def run(self) -> None:
        """Probe rounds until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            try:
                await self.probe_once()
            except Exception:  # a defect here must not silently stop watching the server
                log.exception("probing %s failed unexpectedly", self._backend.id)
            await asyncio.sleep(max(0.0, self.next_delay() - (loop.time() - started)))

    def next_delay(self) -> float:
        return self.settings.interval_s if self._models_known else self._backoff

    async def probe_once(self) -> Backend:
        """One round; returns the Backend as it now stands (and reports it to on_change if it changed)."""
        loop = asyncio.get_running_loop()
        result = await self._prober.health()
        learnt = False
        updated = self._backend
        if result.ok:
            updated = updated.with_health(self.tracker.success())
        else:
            state = self.tracker.failure(result.detail)
            if state is not self._backend.health:
                log.info("%s is %s: %s", self._backend.id, state.value, result.detail)
            updated = updated.with_health(state)
        if self._learns_models:
            models = result.models
            if models is None and result.ok and loop.time() >= self._models_due:
                try:
                    models = await self._prober.models()
                except UpstreamError as exc:
                    log.debug("%s: cannot read /v1/models: %s", self._backend.id, exc)
                    # /health says yes, /v1/models no: ask again later, not every round.
                    self._models_due = loop.time() + min(self._backoff * 2, self.settings.models_retry_max_s)
            if models is not None:
                learnt = True
                self._backoff = self.settings.interval_s
                self._models_due = loop.time() + self.settings.models_refresh_s
                if models != updated.models:
                    updated = updated.with_models(models)
            elif not self._models_known:
                self._backoff = min(self._backoff * 2, self.settings.models_retry_max_s)
        if updated.health is HealthState.UNHEALTHY:
            updated = updated.with_load(None)  # a server that does not answer has no known load
        elif result.ok and self._prober.metrics_path is not None:
            measured = await self._prober.load()
            updated = updated.with_load(None if measured is None else measured.total)
        # Known models and the Backend carrying them change together (after the last await of the round), so a
        # reader never sees "models known" beside a Backend without them.
        if learnt:
            self._models_known = True
        if updated != self._backend:
            self._backend = updated
            self._on_change(updated)
        return updated

