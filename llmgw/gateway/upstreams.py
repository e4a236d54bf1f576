"""The gateway's table of OpenAI-compatible model servers: who serves which model, fed into routing.

Upstreams come from discovery (llmgw.upstream.discovery: the `--upstream` list, DNS names, and the servers
`llmgw agent` sidecars advertise on the gossip mesh) as Backend events. Each server joins the gateway's
membership view as one more replica whose id is its Backend.id and whose address is its base URL (so the
MixedTransport sends its requests over HTTP); an unhealthy one leaves routing until it is healthy again; its
own load report (running + waiting requests; a full KV cache counts as busy: Backend.routing_load) is the load the
picker sees, like a gRPC replica's gossiped one.

Routing by model (docs/backends.md):
- a request naming a model that upstreams serve (by name or alias) goes only to the upstreams serving it;
- any other request goes to the simulated gRPC replicas, which serve any model name as before -- a gateway with
  both kinds keeps them apart by model; with no gRPC replica known, the HTTP front answers an unknown model 404.

The routing key (`affinity_key`) of a chat request is the opening of its conversation -- the system (developer)
messages and the first user message -- so every turn of a conversation, and requests sharing a long system
prompt, hash to the same server and find their prefix in its cache.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from llmgw.gateway.api import InferenceRequest
from llmgw.topology import is_routable
from llmgw.upstream.backends import Backend, DnsUpstream
from llmgw.upstream.client import UpstreamClient
from llmgw.upstream.discovery import Change, GossipSource, UpstreamEvent, UpstreamRegistry, sources_for
from llmgw.upstream.probe import ProbeSettings

log = logging.getLogger("llmgw.gateway.upstreams")

ROLE_REPLICA = "replica"
# A passthrough request's max_tokens as the request path sees it: the server enforces the real limit.
UNBOUNDED_TOKENS = 2**31 - 1
# Only the first `prefix_chars` of a key are hashed; a longer key costs time for nothing.
MAX_KEY_CHARS = 4096
_OPENING_ROLES = ("system", "developer")
# InferRequest's optional sampling fields, named as the OpenAI API names them (`stop` is the repeated one).
GRPC_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty",
                        "repetition_penalty")


@dataclasses.dataclass
class UpstreamMember:
    """A model server as the membership view reads a gossip member."""

    member_id: str
    grpc_address: str  # the server's base URL: the MixedTransport's cue to use HTTP
    state: str = "alive"
    weight: float = 1.0
    max_capacity: int = 0
    active_requests: int = 0
    draining: bool = False
    role: str = ROLE_REPLICA
    model_version: str = ""


class UpstreamTable:
    """The model servers one gateway routes to. `specs` are what `--upstream` / `[[upstream]]` listed; `attach()`
    binds the table to its Gateway, `start()` runs discovery, `apply()` takes Backend events (from discovery, or
    directly from tests and embedding programs)."""

    def __init__(self, specs: Iterable[Backend | DnsUpstream] = (), *, client: UpstreamClient | None = None,
                 probe: ProbeSettings | None = None) -> None:
        self.specs = list(specs)
        self.client = client or UpstreamClient()
        self.probe = probe
        self.backends: dict[str, Backend] = {}
        self._by_model: dict[str, frozenset[str]] = {}
        self._gateway: Any = None
        self._registry: UpstreamRegistry | None = None
        # Servers advertised on the gossip mesh by `llmgw agent` sidecars (the Gateway hands their members in).
        self.gossip = GossipSource()

    @property
    def configured(self) -> bool:
        """Whether this gateway has model servers at all (listed, or added since)."""
        return bool(self.specs or self.backends)

    def attach(self, gateway: Any) -> None:
        """Drive `gateway`'s membership view (Gateway.apply_member) and filter its routing by model."""
        self._gateway = gateway
        for backend in self.backends.values():
            gateway.apply_member(_member(backend), _state(backend))

    async def start(self) -> None:
        """Run discovery: the listed servers first (they win over an agent's view of the same server), then the
        servers agents advertise."""
        if self._registry is not None:
            return
        registry = self._registry = UpstreamRegistry(self.apply)
        for source in sources_for(self.specs, self.client, self.probe):
            registry.add(source)
        registry.add(self.gossip)
        await registry.start()

    def agent_changed(self, member: Any, state: str) -> None:
        """A gossip member with the upstream role (an agent) joined, changed or left: its advertisement (app_meta)
        is the server, while the agent is alive."""
        metadata = getattr(member, "app_meta", b"") if is_routable(state) else None
        self.gossip.member_changed(member.member_id, metadata or None)

    async def stop(self) -> None:
        registry, self._registry = self._registry, None
        if registry is not None:
            await registry.stop()
        await self.client.close()

    # ---- the table ----------------------------------------------------------------------------------------------
    def apply(self, events: list[UpstreamEvent]) -> None:
        for event in events:
            backend = event.backend
            if event.change is Change.REMOVED:
                self.backends.pop(backend.id, None)
                state = "removed"
                log.info("upstream %s removed", backend.id)
            else:
                if event.change is Change.ADDED:
                    log.info("upstream %s (%s) serves %s", backend.id, backend.kind.value,
                             ", ".join(backend.client_models()) or "no model yet")
                self.backends[backend.id] = backend
                state = _state(backend)
            if self._gateway is not None:
                self._gateway.apply_member(_member(backend), state)
        self._index()

    def _index(self) -> None:
        by_model: dict[str, set[str]] = {}
        for backend in self.backends.values():
            if not backend.health.routable:
                continue
            for name in backend.client_models():
                by_model.setdefault(name, set()).add(backend.id)
        self._by_model = {name: frozenset(ids) for name, ids in by_model.items()}

    def backend(self, backend_id: str) -> Backend | None:
        return self.backends.get(backend_id)

    def serves(self, model: str) -> bool:
        return model in self._by_model

    def models(self) -> dict[str, int]:
        """Client-facing model name -> how many routable servers serve it."""
        return {name: len(ids) for name, ids in sorted(self._by_model.items())}

    def simulated_replicas(self) -> bool:
        """Whether the gateway knows any gRPC replica (they serve requests for models no upstream serves)."""
        gateway = self._gateway
        if gateway is None:
            return False
        return any(replica_id not in self.backends for replica_id in gateway.view.addresses)

    def route_grpc(self, request: InferenceRequest, message: Any) -> None:
        """Make a gRPC Infer request (`message`, an InferRequest) a model server's when its model is one they
        serve -- its `model` field, else the model named in metadata, else the only model served when there is
        exactly one: a completions body with the prompt, max_tokens and the sampling fields that are set."""
        model = message.model or request.model
        if not model:
            served = list(self._by_model)
            if len(served) == 1 and not self.simulated_replicas():
                model = served[0]
        request.model = model
        if not self.serves(model):
            return
        body: dict[str, Any] = {"model": model, "prompt": message.prompt, "max_tokens": message.max_tokens,
                                "stream": True}
        for name in GRPC_SAMPLING_FIELDS:
            if message.HasField(name):
                body[name] = getattr(message, name)
        if message.stop:
            body["stop"] = list(message.stop)
        request.body, request.api, request.stream = body, "completions", True

    def excluded_for(self, request: InferenceRequest) -> set[str]:
        """The replicas `request` must not go to: those not serving its model (the request path's route filter)."""
        if not self.backends:
            return set()
        serving = self._by_model.get(request.model) if request.model else None
        if serving is not None:
            return {rid for rid in self._gateway.view.addresses if rid not in serving} if self._gateway else set()
        if request.body is not None:  # its model is gone since the front looked: nobody may take it
            return set(self._gateway.view.addresses) | set(self.backends) if self._gateway else set(self.backends)
        return set(self.backends)


def _state(backend: Backend) -> str:
    return "alive" if backend.health.routable else "dead"


def _member(backend: Backend) -> UpstreamMember:
    # Its own report (running + waiting, a KV-full cache counting as busy: Backend.routing_load) is the load.
    return UpstreamMember(member_id=backend.id, grpc_address=backend.base_url.rstrip("/"), weight=backend.weight,
                          max_capacity=backend.capacity, active_requests=backend.routing_load)


# ---- requests -----------------------------------------------------------------------------------------------
def affinity_key(api: str, body: Mapping[str, Any]) -> str:
    """The routing key of an OpenAI request: a completion's prompt; a chat's opening (its system and developer
    messages and its first user message), which every later turn of the conversation shares."""
    if api == "chat":
        messages = body.get("messages")
        parts: list[str] = []
        if isinstance(messages, list):
            for message in messages:
                if not isinstance(message, Mapping):
                    break
                role = message.get("role")
                parts.append(f"<|{role}|>{_content_text(message.get('content'))}")
                if role not in _OPENING_ROLES:
                    break
        key = "".join(parts)
    else:
        prompt = body.get("prompt")
        key = prompt if isinstance(prompt, str) else json.dumps(prompt, separators=(",", ":"))[:MAX_KEY_CHARS]
    if not key:
        key = f"<|model|>{body.get('model')}"
    return key[:MAX_KEY_CHARS]


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content
                       if isinstance(part, Mapping) and isinstance(part.get("text"), str))
    return ""


def passthrough_request(api: str, body: dict[str, Any], *, request_id: str, hedge: bool = False,
                        client_id: str = "", front: str = "http", body_bytes: bytes | None = None) -> InferenceRequest:
    """The InferenceRequest of an OpenAI body bound for a model server (validated by the server, not here)."""
    model = body.get("model")
    return InferenceRequest(prompt=affinity_key(api, body), max_tokens=UNBOUNDED_TOKENS, hedge=hedge,
                            request_id=request_id, client_id=client_id, front=front,
                            model=model if isinstance(model, str) else "", body=body, body_bytes=body_bytes, api=api,
                            stream=body.get("stream") is True)
