"""The agent sidecar's composition root: one gossip member speaking for one model server.

`start_agent` starts the gossip member (role "upstream", llmgw.topology) and then the `Agent` (llmgw/agent.py),
whose advertisements become the member's app_meta: every gateway on the mesh decodes it into a routable server and
streams from that server directly. `RunningAgent.stop` stops the agent, then the member (which announces its
leave, so gateways drop the server at once instead of after the failure detector's suspicion timeout); `serve` runs
one agent process until SIGTERM/SIGINT, announcing itself with one READY line. The CLI (llmgw.cli.agent) only
parses flags into an `AgentConfig`.

Until the first probe decides the server's health the member carries no advertisement, and gateways route nothing
to it; after that, what gateways see is at most one gossip dissemination behind the agent (a few protocol
periods, ~0.1-0.3 s on a LAN), on top of the agent's own detection time (llmgw/agent.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import os
from collections.abc import Callable
from urllib.parse import urlsplit

from llmgw import eventloop
from llmgw.agent import Agent
from llmgw.gossip import GossipConfig, GossipNode
from llmgw.gossip.node import parse_host_port
from llmgw.signals import serve_until_signalled
from llmgw.topology import ROLE_UPSTREAM
from llmgw.upstream.backends import Backend, canonical_id
from llmgw.upstream.capabilities import BackendKind, ChatPrefill
from llmgw.upstream.metadata import encode_backend
from llmgw.upstream.probe import ProbeSettings

log = logging.getLogger("llmgw.agent")

DEFAULT_LOAD_PUBLISH_INTERVAL_S = 2.0
_GOSSIP_STOP_TIMEOUT_S = 5.0
_ID_PREFIX = "agent-"


class AgentStartError(Exception):
    """The agent's gossip port cannot be bound; nothing is left running."""


@dataclasses.dataclass(frozen=True)
class AgentConfig:
    """What one agent process needs: the server it speaks for, how to probe it, and how to join the mesh."""

    upstream_url: str  # the server's base URL, as gateways must reach it (not localhost unless they share the host)
    kind: BackendKind | str = BackendKind.OPENAI_COMPATIBLE
    models: tuple[str, ...] = ()  # empty: learnt from the server's /v1/models
    aliases: tuple[tuple[str, str], ...] = ()  # (client-facing name, server model name)
    capacity: int = 0  # max concurrent requests gateways send it (0 = no limit)
    weight: float = 1.0
    chat_prefill: ChatPrefill | str | None = None  # None: the kind's default (docs/backends.md)
    probe_interval_s: float = 0.5
    probe_timeout_s: float = 1.0
    unhealthy_after: int = 2
    load_publish_interval_s: float = DEFAULT_LOAD_PUBLISH_INTERVAL_S
    agent_id: str = ""  # "" -> default_agent_id(upstream_url)
    host: str = "127.0.0.1"  # gossip bind address
    gossip_port: int = 0  # 0 = any free port (peers learn it from the gossip itself)
    advertise: str = ""  # host other members reach this one at (default: host)
    seeds: tuple[str, ...] = ()
    gossip_config: str = "lan"
    gossip_key: bytes | None = None

    def __post_init__(self) -> None:
        try:
            canonical_id(self.upstream_url)
        except ValueError as exc:
            raise ValueError(f"upstream: {exc}") from None
        if not self.agent_id:
            object.__setattr__(self, "agent_id", default_agent_id(self.upstream_url))
        if not 0 <= self.gossip_port <= 65535:
            raise ValueError(f"gossip port must be within 0..65535, got {self.gossip_port}")
        for seed in self.seeds:
            try:
                parse_host_port(seed)
            except ValueError as exc:
                raise ValueError(f"seeds: {exc}") from None
        GossipConfig.preset(self.gossip_config)  # an unknown preset name: ValueError naming the known ones
        # Everything the Agent would refuse, refused now (bad weight, capacity, alias, kind, probe timing, or an
        # advertisement of the configured models that cannot fit).
        ProbeSettings(interval_s=self.probe_interval_s, timeout_s=self.probe_timeout_s,
                      unhealthy_after=self.unhealthy_after)
        encode_backend(self.backend())

    def backend(self) -> Backend:
        """The server as configured (what the agent advertises before it has probed anything)."""
        return Backend(base_url=self.upstream_url, kind=BackendKind(self.kind), models=self.models,
                       aliases=self.aliases, weight=self.weight, capacity=self.capacity,
                       chat_prefill=None if self.chat_prefill is None else ChatPrefill(self.chat_prefill),
                       models_configured=bool(self.models))


def default_agent_id(upstream_url: str) -> str:
    """The member id of the agent for `upstream_url`: "agent-" and the server's host:port (and path), so two agents
    speaking for two servers never share an id and an agent restarted for the same server keeps its id."""
    return _ID_PREFIX + canonical_id(upstream_url).split("://", 1)[1]


@dataclasses.dataclass
class RunningAgent:
    config: AgentConfig
    gossip: GossipNode
    agent: Agent

    def ready_line(self) -> str:
        """One machine-readable line, so launchers learn the bound gossip address without guessing."""
        return (f"READY agent {self.config.agent_id} gossip={self.gossip.address} "
                f"upstream={self.config.upstream_url} pid={os.getpid()}")

    async def stop(self) -> None:
        """Stop probing, then leave the mesh (bounded: Agent.stop and GossipNode.stop each wait at most 5 s)."""
        try:
            await self.agent.stop()
        finally:
            try:
                await asyncio.wait_for(self.gossip.stop(leave=True), _GOSSIP_STOP_TIMEOUT_S)
            except Exception:  # a failed leave must not keep the process from exiting
                log.exception("leaving the gossip mesh failed")


async def start_agent(config: AgentConfig) -> RunningAgent:
    """Join the mesh and start probing. ValueError for settings the Agent refuses (weight, capacity, a configured
    advertisement that cannot fit); AgentStartError when the gossip port cannot be bound."""
    node = GossipNode(config.agent_id, bind=f"{config.host}:{config.gossip_port}",
                      advertise=f"{config.advertise}:{config.gossip_port}" if config.advertise else None,
                      seeds=config.seeds, role=ROLE_UPSTREAM, config=GossipConfig.preset(config.gossip_config),
                      key=config.gossip_key)
    reporter = _HealthReporter(config.agent_id)

    def publish(metadata: bytes) -> None:
        node.update_meta(app_meta=metadata)
        reporter.published(agent.backend)

    backend = config.backend()
    agent = Agent(backend.base_url, backend.kind, publish=publish, models=backend.models,
                  aliases=dict(backend.aliases), capacity=backend.capacity, weight=backend.weight,
                  chat_prefill=backend.chat_prefill, probe_interval_s=config.probe_interval_s,
                  probe_timeout_s=config.probe_timeout_s, unhealthy_after=config.unhealthy_after,
                  load_publish_interval_s=config.load_publish_interval_s)
    try:
        await node.start()
    except OSError as exc:
        await node.stop(leave=False)
        raise AgentStartError(f"cannot bind gossip on {config.host}:{config.gossip_port}: "
                              f"{exc.strerror or exc}") from None
    _warn_if_unreachable(config.upstream_url, node.address)
    await agent.start()
    log.info("agent %s speaks for %s (%s) on the mesh as %s", config.agent_id, config.upstream_url,
             backend.kind.value, node.address)
    return RunningAgent(config, node, agent)


async def serve(config: AgentConfig, *, announce: Callable[[str], None] = lambda line: print(line, flush=True)) \
        -> None:
    """One agent process: start, announce the READY line, run until SIGTERM/SIGINT, stop (bounded)."""
    running = await start_agent(config)
    announce(running.ready_line())
    await serve_until_signalled(running.stop)


def run(config: AgentConfig, *, event_loop: str | None = None) -> int:
    """Run `serve` on the chosen event loop; exit status 0 after a signal."""
    eventloop.run(serve(config), event_loop)
    return 0


class _HealthReporter:
    """Logs what an operator wants from a sidecar: the server's health and models each time they change."""

    def __init__(self, agent_id: str) -> None:
        self.agent_id = agent_id
        self._last: tuple[object, tuple[str, ...]] | None = None

    def published(self, backend: Backend) -> None:
        state = (backend.health, backend.models)
        if state == self._last:
            return
        self._last = state
        log.info("agent %s: %s is %s, serving %s", self.agent_id, backend.base_url, backend.health.value,
                 ", ".join(backend.models) or "no model yet")


def _warn_if_unreachable(upstream_url: str, gossip_address: str) -> None:
    """A loopback upstream URL advertised to a mesh that reaches this agent at another address: gateways on other
    hosts would try their own loopback. Say so (it is right when every gateway runs on this host)."""
    if _is_loopback(urlsplit(upstream_url).hostname or "") and not _is_loopback(gossip_address.rpartition(":")[0]):
        log.warning("the upstream URL %s is a loopback address: gateways on other hosts cannot reach it; give the "
                    "address they reach the server at (e.g. the pod IP)", upstream_url)


def _is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
