"""The sidecar's core: watch one model server and say what the gossip mesh should advertise about it.

`llmgw agent --upstream URL` (the CLI, wired later) runs one `Agent` next to one model server. The agent probes
the server (upstream/probe.py: health from its health endpoint or `/v1/models`, models from `/v1/models` unless
given, load from its Prometheus metrics where it has them) and calls `publish(metadata)` with the advertisement
(upstream/metadata.py, opaque bytes for the gossip layer) whenever it changes. The agent is not in the data path:
gateways decode the advertisement into a Backend and stream from the server directly.

What triggers a publish: the first probe round that knows the server's health (healthy, or unhealthy after
`unhealthy_after` failures: a server that has never answered is not advertised as routable); then any change of
health, models or settings at once; a change of load alone at most every `load_publish_interval_s` (load moves all
the time, and every publish is a gossip broadcast to the whole mesh). A publish that raises is logged and retried
after the next round.

Timing, with the defaults: a server that stops answering is advertised unhealthy after `unhealthy_after` (2)
failed probes, `probe_interval_s` (0.5 s) apart, each bounded by `probe_timeout_s` (1 s): within about 1 s of a
refused connection, within about 3 s of a server that hangs. One good probe makes it healthy again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType

from llmgw.upstream.backends import Backend, HealthState
from llmgw.upstream.capabilities import BackendKind, ChatPrefill, capabilities_for
from llmgw.upstream.client import UpstreamClient, UpstreamLimits
from llmgw.upstream.metadata import MetadataTooLarge, encode_backend
from llmgw.upstream.monitor import BackendMonitor
from llmgw.upstream.probe import ProbeSettings

log = logging.getLogger("llmgw.agent")

_STOP_TIMEOUT_S = 5.0


class Agent:
    def __init__(self, upstream_url: str, kind: BackendKind | str = BackendKind.OPENAI_COMPATIBLE, *,
                 publish: Callable[[bytes], None], models: Sequence[str] | None = None,
                 aliases: Mapping[str, str] | None = None, capacity: int = 0, weight: float = 1.0,
                 chat_prefill: ChatPrefill | str | None = None, probe_interval_s: float = 0.5,
                 probe_timeout_s: float = 1.0, unhealthy_after: int = 2, load_publish_interval_s: float = 2.0,
                 client: UpstreamClient | None = None) -> None:
        if not callable(publish):
            raise TypeError("publish must be callable")
        if not load_publish_interval_s >= 0:
            raise ValueError(f"load_publish_interval_s must be >= 0, got {load_publish_interval_s!r}")
        self.backend_settings = Backend(
            base_url=upstream_url, kind=capabilities_for(kind).kind, models=tuple(models or ()),
            aliases=tuple((aliases or {}).items()), weight=weight, capacity=capacity,
            chat_prefill=None if chat_prefill is None else ChatPrefill(chat_prefill),
            models_configured=bool(models))
        encode_backend(self.backend_settings)  # configured models that can never be advertised: fail now
        self.settings = ProbeSettings(interval_s=probe_interval_s, timeout_s=probe_timeout_s,
                                      unhealthy_after=unhealthy_after)
        self.load_publish_interval_s = load_publish_interval_s
        self._publish = publish
        self._client = client
        self._owns_client = client is None
        self._monitor: BackendMonitor | None = None
        self._task: asyncio.Task[None] | None = None
        self.published: bytes | None = None  # the last advertisement publish() accepted
        self._published_backend: Backend | None = None
        self._published_at = 0.0
        self.publishes = 0

    @property
    def backend(self) -> Backend:
        """The server as the agent last saw it."""
        return self.backend_settings if self._monitor is None else self._monitor.backend

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("the agent is already running")
        self._task = asyncio.get_running_loop().create_task(self.run(), name=f"agent {self.backend_settings.id}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        await asyncio.wait({task}, timeout=_STOP_TIMEOUT_S)

    async def __aenter__(self) -> Agent:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    async def run(self) -> None:
        """Probe and publish until cancelled."""
        if self._client is None:
            # Few connections, kept briefly: a probe must not sit on a connection the server has since dropped.
            self._client = UpstreamClient(limits=UpstreamLimits(max_connections=4, keepalive_seconds=5.0))
        self._monitor = BackendMonitor(self.backend_settings, self._client, self.settings, lambda _: None)
        loop = asyncio.get_running_loop()
        try:
            while True:
                started = loop.time()
                try:
                    await self._monitor.probe_once()
                    self._consider(self._monitor.backend, loop.time())
                except Exception:  # a defect here must not silently stop the advertisements
                    log.exception("probing %s failed unexpectedly", self.backend_settings.id)
                await asyncio.sleep(max(0.0, self._monitor.next_delay() - (loop.time() - started)))
        finally:
            if self._owns_client:
                await self._client.close()
                self._client = None

    def _consider(self, backend: Backend, now: float) -> None:
        if not self._worth_publishing(backend, now):
            return
        metadata = self._encode(backend)
        if metadata == self.published:
            self._published_backend = backend  # a change lost to rounding: nothing to tell the mesh
            return
        try:
            self._publish(metadata)
        except Exception:
            log.exception("publishing the advertisement of %s failed; retrying after the next probe", backend.id)
            return
        self.published = metadata
        self._published_backend = backend
        self._published_at = now
        self.publishes += 1

    def _worth_publishing(self, backend: Backend, now: float) -> bool:
        if backend.health is HealthState.UNKNOWN:
            return False  # gateways would route to an unknown server: wait until a probe decides
        last = self._published_backend
        if last is None or dataclasses.replace(backend, load=last.load) != last:
            return True  # the first advertisement, or health / models changed
        # Only the load may have moved: worth a broadcast if it did and the last one is not too recent.
        return backend.load != last.load and now - self._published_at >= self.load_publish_interval_s

    def _encode(self, backend: Backend) -> bytes:
        try:
            return encode_backend(backend)
        except MetadataTooLarge:
            pass
        # Learnt models that do not fit: advertise the ones that do (the server is routed for those only).
        models = list(backend.models)
        while models:
            models.pop()
            try:
                metadata = encode_backend(backend.with_models(models))
            except MetadataTooLarge:
                continue
            log.warning("%s serves %d models; only the first %d fit in an advertisement", backend.id,
                        len(backend.models), len(models))
            return metadata
        raise MetadataTooLarge(f"the advertisement of {backend.id} does not fit even without models")
