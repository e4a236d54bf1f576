"""Where upstreams come from: a static list, a DNS name, or the gossip mesh -- each a source of Backend events.

Every source keeps the set of servers it knows, by Backend id, and reports changes as a list of `UpstreamEvent`s
(ADDED, UPDATED, REMOVED) to the listener given to `run()`. `run()` works until cancelled. `UpstreamRegistry`
merges several sources into the one set the gateway routes over.

- `StaticSource`: the `--upstream` / `[[upstream]]` servers. A server with configured models is in the set at
  once; a server given by URL alone joins when its `/v1/models` first answers (monitor.py retries with backoff).
- `DnsSource`: a name re-resolved every `refresh_s` (a Kubernetes headless Service lists one address per ready
  pod). Each address+port is one server, monitored like a static one; an address that disappears from a
  successful answer is removed. A lookup that fails keeps the last set: a DNS outage must not empty the cluster
  (servers that are really gone fail their health probes).
- `GossipSource`: the servers agents advertise (metadata.py); the gossip layer calls `member_changed()`. Health and
  load come from the agent; nothing is probed from here.

Listeners are called on the event loop thread, synchronously: keep them short (update a table, no I/O).
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import socket
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Protocol

from llmgw.upstream.backends import Backend, DnsUpstream
from llmgw.upstream.client import UpstreamClient
from llmgw.upstream.metadata import MetadataError, decode_backend
from llmgw.upstream.monitor import BackendMonitor
from llmgw.upstream.probe import ProbeSettings

log = logging.getLogger("llmgw.upstream.discovery")

DNS_LOOKUP_TIMEOUT_S = 5.0
_STOP_TIMEOUT_S = 5.0


class Change(enum.Enum):
    ADDED = "added"
    UPDATED = "updated"
    REMOVED = "removed"


@dataclasses.dataclass(frozen=True)
class UpstreamEvent:
    change: Change
    backend: Backend  # for REMOVED: the server as it was last known


Listener = Callable[[list[UpstreamEvent]], None]
Resolver = Callable[[str, int], Awaitable[list[tuple[str, int]]]]


class UpstreamSource(Protocol):
    def snapshot(self) -> dict[str, Backend]: ...

    async def run(self, listener: Listener) -> None: ...


def diff(old: Mapping[str, Backend], new: Mapping[str, Backend]) -> list[UpstreamEvent]:
    """The events that turn `old` into `new` (removals first, then additions and updates, each by id)."""
    events = [UpstreamEvent(Change.REMOVED, old[key]) for key in sorted(old.keys() - new.keys())]
    for key in sorted(new):
        if key not in old:
            events.append(UpstreamEvent(Change.ADDED, new[key]))
        elif new[key] != old[key]:
            events.append(UpstreamEvent(Change.UPDATED, new[key]))
    return events


class MonitoredBackends:
    """A set of servers, each watched by its own BackendMonitor task; the part StaticSource and DnsSource share.
    A server is in `snapshot()` once its models are known."""

    def __init__(self, client: UpstreamClient, settings: ProbeSettings, listener: Listener) -> None:
        self._client = client
        self._settings = settings
        self._listener = listener
        self._monitors: dict[str, BackendMonitor] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._stopping: set[asyncio.Task[None]] = set()  # cancelled, not finished yet: close() waits for them
        self._published: dict[str, Backend] = {}

    def snapshot(self) -> dict[str, Backend]:
        return dict(self._published)

    def set_targets(self, backends: Iterable[Backend]) -> None:
        """Watch exactly these servers (by id): new ones start, missing ones stop and are removed."""
        wanted = {backend.id: backend for backend in backends}
        for key in list(self._monitors.keys() - wanted.keys()):
            self._monitors.pop(key)
            task = self._tasks.pop(key)
            task.cancel()
            self._stopping.add(task)
            task.add_done_callback(self._stopping.discard)
        for key, backend in wanted.items():
            if key in self._monitors:
                continue
            monitor = BackendMonitor(backend, self._client, self._settings, self._changed)
            self._monitors[key] = monitor
            self._tasks[key] = asyncio.get_running_loop().create_task(monitor.run(), name=f"upstream-probe {key}")
        self._publish()

    def _changed(self, backend: Backend) -> None:
        if backend.id in self._monitors:
            self._publish()

    def _publish(self) -> None:
        current = {key: monitor.backend for key, monitor in self._monitors.items() if monitor.models_known}
        events = diff(self._published, current)
        self._published = current
        if events:
            self._listener(events)

    async def close(self) -> None:
        tasks = [*self._tasks.values(), *self._stopping]
        self._monitors.clear()
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=_STOP_TIMEOUT_S)


class StaticSource:
    def __init__(self, backends: Iterable[Backend], client: UpstreamClient,
                 settings: ProbeSettings | None = None) -> None:
        self.backends = tuple(backends)
        self._client = client
        self._settings = settings or ProbeSettings()
        self._set: MonitoredBackends | None = None

    def snapshot(self) -> dict[str, Backend]:
        return {} if self._set is None else self._set.snapshot()

    async def run(self, listener: Listener) -> None:
        self._set = MonitoredBackends(self._client, self._settings, listener)
        try:
            self._set.set_targets(self.backends)
            await asyncio.Event().wait()  # the monitors do the work until cancelled
        finally:
            await self._set.close()


async def resolve_with_loop(name: str, port: int) -> list[tuple[str, int]]:
    """The addresses `name` resolves to (IPv4 and IPv6, TCP), through the event loop's getaddrinfo."""
    infos = await asyncio.get_running_loop().getaddrinfo(name, port, type=socket.SOCK_STREAM)
    return [(str(sockaddr[0]), int(sockaddr[1])) for _, _, _, _, sockaddr in infos]


class DnsSource:
    def __init__(self, target: DnsUpstream, client: UpstreamClient, settings: ProbeSettings | None = None, *,
                 resolver: Resolver = resolve_with_loop) -> None:
        self.target = target
        self._client = client
        self._settings = settings or ProbeSettings()
        self._resolver = resolver
        self._set: MonitoredBackends | None = None
        self.lookups = 0
        self.failed_lookups = 0
        self.addresses: tuple[tuple[str, int], ...] = ()  # from the last successful lookup

    def snapshot(self) -> dict[str, Backend]:
        return {} if self._set is None else self._set.snapshot()

    async def run(self, listener: Listener) -> None:
        self._set = MonitoredBackends(self._client, self._settings, listener)
        try:
            while True:
                await self.refresh()
                await asyncio.sleep(self.target.refresh_s)
        finally:
            await self._set.close()

    async def refresh(self) -> None:
        """One lookup; the watched set follows a successful answer."""
        assert self._set is not None, "refresh() runs inside run()"
        self.lookups += 1
        try:
            async with asyncio.timeout(min(DNS_LOOKUP_TIMEOUT_S, self.target.refresh_s * 2)):
                answer = await self._resolver(self.target.name, self.target.port)
        except (OSError, TimeoutError, ValueError) as exc:  # ValueError: a name IDNA cannot encode
            self.failed_lookups += 1
            log.warning("%s: lookup failed (keeping %d servers): %s", self.target.label, len(self.addresses),
                        exc or "timed out")
            return
        addresses = tuple(sorted(set(answer)))
        if addresses != self.addresses:
            log.info("%s resolves to %s", self.target.label,
                     ", ".join(f"{host}:{port}" for host, port in addresses) or "nothing")
        self.addresses = addresses
        self._set.set_targets(self.target.backend_at(host, port) for host, port in addresses)


class GossipSource:
    """Servers advertised by agents. The gossip layer calls `member_changed(member_id, metadata)` on the event loop
    thread for every member that joins, updates its metadata, or leaves / dies (metadata None)."""

    def __init__(self) -> None:
        self._by_member: dict[str, Backend] = {}
        self._published: dict[str, Backend] = {}
        self._listener: Listener | None = None
        self.rejected = 0  # advertisements that could not be read

    def snapshot(self) -> dict[str, Backend]:
        return dict(self._published)

    async def run(self, listener: Listener) -> None:
        self._listener = listener
        try:
            self._publish()
            await asyncio.Event().wait()
        finally:
            self._listener = None
            self._published = {}

    def member_changed(self, member_id: str, metadata: bytes | None) -> None:
        if metadata is None or not metadata:
            self._by_member.pop(member_id, None)  # gone, or a member that advertises no server (a gateway)
        else:
            try:
                self._by_member[member_id] = decode_backend(metadata)
            except MetadataError as exc:
                self.rejected += 1
                log.warning("member %s advertises an unreadable server: %s", member_id, exc)
                self._by_member.pop(member_id, None)
        self._publish()

    def _publish(self) -> None:
        if self._listener is None:
            return  # not running: run() reports everything known so far when it starts
        current: dict[str, Backend] = {}
        # Two agents for one server (a misconfiguration) give one Backend: the lowest member id wins, stably.
        for member_id in sorted(self._by_member):
            backend = self._by_member[member_id]
            current.setdefault(backend.id, backend)
        events = diff(self._published, current)
        self._published = current
        if events:
            self._listener(events)


def sources_for(specs: Iterable[Backend | DnsUpstream], client: UpstreamClient,
                settings: ProbeSettings | None = None) -> list[UpstreamSource]:
    """The sources for what `--upstream` / `[[upstream]]` listed: one StaticSource for the servers named by URL
    (if any), then one DnsSource per DNS name, in the order given."""
    specs = list(specs)
    static = [spec for spec in specs if isinstance(spec, Backend)]
    sources: list[UpstreamSource] = [StaticSource(static, client, settings)] if static else []
    sources.extend(DnsSource(spec, client, settings) for spec in specs if isinstance(spec, DnsUpstream))
    return sources


class UpstreamRegistry:
    """The merged set of servers from several sources, reported to one listener. When two sources know the same
    server (same id), the source added first is the one whose Backend counts (the static config before DNS before
    gossip, in the order the gateway adds them); the other's view is kept and takes over if the first forgets it."""

    def __init__(self, listener: Listener | None = None) -> None:
        self._listener = listener
        self._sources: list[UpstreamSource] = []
        self._views: list[dict[str, Backend]] = []
        self._merged: dict[str, Backend] = {}
        self._tasks: list[asyncio.Task[None]] = []

    def add(self, source: UpstreamSource) -> None:
        if self._tasks:
            raise RuntimeError("add sources before start()")
        self._sources.append(source)
        self._views.append({})

    def backends(self) -> dict[str, Backend]:
        return dict(self._merged)

    def serving(self, model: str) -> list[Backend]:
        """The routable servers that serve `model` (an alias or a server model name), by id."""
        return [backend for _, backend in sorted(self._merged.items())
                if backend.health.routable and backend.server_model(model) is not None]

    def models(self) -> list[str]:
        """Every model name a client can ask for, across the routable servers."""
        return sorted({name for backend in self._merged.values() if backend.health.routable
                       for name in backend.client_models()})

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for index, source in enumerate(self._sources):
            self._tasks.append(loop.create_task(self._run_source(index, source), name=f"upstream-source {index}"))

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=_STOP_TIMEOUT_S)

    async def __aenter__(self) -> UpstreamRegistry:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _run_source(self, index: int, source: UpstreamSource) -> None:
        def on_events(events: list[UpstreamEvent]) -> None:
            view = self._views[index]
            for event in events:
                if event.change is Change.REMOVED:
                    view.pop(event.backend.id, None)
                else:
                    view[event.backend.id] = event.backend
            self._merge()

        try:
            await source.run(on_events)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("upstream source %d (%s) stopped", index, type(source).__name__)
        finally:
            self._views[index].clear()  # a stopped source no longer vouches for its servers
            self._merge()

    def _merge(self) -> None:
        merged: dict[str, Backend] = {}
        for view in self._views:
            for key, backend in view.items():
                merged.setdefault(key, backend)
        events = diff(self._merged, merged)
        self._merged = merged
        if events and self._listener is not None:
            self._listener(events)
