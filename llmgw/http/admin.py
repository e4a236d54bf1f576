"""Health, metrics and the admin API of the gateway's HTTP front.

    GET  /healthz                        200 while the process serves HTTP
    GET  /readyz                         200 iff at least one replica is routable, else 503
    GET  /metrics                        Prometheus exposition of the gateway's registry
    GET  /admin/members                  member table + this gateway's view (load, drained, breaker)
    POST /admin/replicas/{id}/drain      stop routing new requests to a replica (in-flight streams finish)
    POST /admin/replicas/{id}/undrain    route to it again
    POST /admin/rollout                  start a rolling update {"version": "v2", ...}
    GET  /admin/rollout                  progress of the current (or last) rolling update
    DELETE /admin/rollout                abort it (routing is restored)
    GET  /admin/usage                    tenant usage: this gateway's, each peer gateway's, cluster-wide
    POST /admin/keys/reload              read the key file again (a bad file keeps the keys in use: 422)

/admin/* needs `Authorization: Bearer <token>`. With no token configured, admin is refused (403) unless the HTTP
server is bound to a loopback address, where only local processes can reach it.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
from typing import Any

from aiohttp import web

from llmgw.gateway.operations import ROLLOUT_STOP_TIMEOUT_S, RolloutController, RolloutRefused
from llmgw.http.openai_api import ApiError, bad_request, compact_json, decode_json_body
from llmgw.metrics import aiohttp_handler
from llmgw.topology import is_replica
from llmgw.workers import RolloutElsewhere

log = logging.getLogger("llmgw.http.admin")

ADMIN_TOKEN_ENV = "LLMGW_ADMIN_TOKEN"
# HTTP answers to a refused rolling update (llmgw.gateway.operations.RolloutRefused.reason).
ROLLOUT_REFUSALS = {"no_restart_hook": (501, "server_error"), "running": (409, "invalid_request_error"),
                    "invalid": (400, "invalid_request_error")}
ROLLOUT_REFUSAL_CODES = {"no_restart_hook": "no_restart_hook", "running": "rollout_running", "invalid": None}


def is_loopback_host(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.json_response(obj, status=status, dumps=compact_json)


# Rollout options a POST may set, with their type check; they map to llmgw.rollout.Rollout's keyword arguments.
_ROLLOUT_SECONDS = ("drain_timeout_s", "rejoin_timeout_s", "restart_timeout_s", "routing_timeout_s", "poll_s")
_ROLLOUT_FLAGS = ("skip_up_to_date", "require_another_alive")


class AdminApi:
    """`rollouts` is the gateway's RolloutController (its drain set is the gateway's own `drains`)."""

    def __init__(self, gateway, *, bound_host: str, admin_token: str | None, metrics,
                 rollouts: RolloutController, breakers=None, worker_rollouts=None) -> None:
        self.gateway = gateway
        self.token = admin_token or None
        self.bound_to_loopback = is_loopback_host(bound_host)
        self.metrics = metrics
        self.breakers = breakers
        self.rollouts = rollouts
        # In a worker of `gateway --workers N`: the group-wide rollouts (llmgw.workers.WorkerRollouts), and the
        # drain set is the group's (SharedDrains, drain_everywhere); None / the gateway's own set otherwise.
        self.worker_rollouts = worker_rollouts
        self.drains = rollouts.drains

    @property
    def rollout(self):
        """The current or last llmgw.rollout.Rollout, whichever front started it."""
        return self.rollouts.rollout

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        if self.metrics is not None:
            app.router.add_get("/metrics", aiohttp_handler(self.metrics))
        app.router.add_get("/admin/members", self._admin(self.members))
        app.router.add_post("/admin/replicas/{replica_id}/drain", self._admin(self.drain))
        app.router.add_post("/admin/replicas/{replica_id}/undrain", self._admin(self.undrain))
        app.router.add_post("/admin/rollout", self._admin(self.start_rollout))
        app.router.add_get("/admin/rollout", self._admin(self.rollout_status))
        app.router.add_delete("/admin/rollout", self._admin(self.cancel_rollout))
        app.router.add_get("/admin/usage", self._admin(self.usage))
        app.router.add_post("/admin/keys/reload", self._admin(self.reload_keys))

    # ---- auth ---------------------------------------------------------------------------------------------
    def _admin(self, handler):
        async def guarded(request: web.Request) -> web.StreamResponse:
            try:
                self._authorize(request)
                return await handler(request)
            except ApiError as err:
                return err.response()

        return guarded

    def _authorize(self, request: web.Request) -> None:
        if self.token is None:
            if self.bound_to_loopback:
                return
            raise ApiError(403, f"the admin API is disabled: set an admin token ({ADMIN_TOKEN_ENV}) or bind the "
                                "HTTP server to loopback", type="permission_error", code="admin_disabled")
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
            raise ApiError(401, "missing or wrong bearer token", type="authentication_error",
                           code="invalid_token", headers={"WWW-Authenticate": 'Bearer realm="llmgw-admin"'})

    # ---- health -------------------------------------------------------------------------------------------
    def routable(self) -> set[str]:
        return self.gateway.routable()

    async def healthz(self, request: web.Request) -> web.Response:
        return _json({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        routable = sorted(self.routable())
        if getattr(self.gateway, "draining", False):  # shutting down: no new clients (llmgw.gateway.shutdown)
            return _json({"ready": False, "shutting_down": True, "routable_replicas": routable}, 503)
        return _json({"ready": bool(routable), "routable_replicas": routable}, 200 if routable else 503)

    # ---- members and drains -------------------------------------------------------------------------------
    async def members(self, request: web.Request) -> web.Response:
        gw = self.gateway
        routable = self.routable()
        breakers = self.breakers.snapshot().get("replicas", {}) if self.breakers is not None else None
        rows = []
        for m in sorted(gw.members(), key=lambda m: (m.role != "replica", m.member_id)):
            row = {"member_id": m.member_id, "role": m.role, "state": str(m.state).lower(),
                   "incarnation": int(m.incarnation), "address": getattr(m, "address", ""),
                   "grpc_address": m.grpc_address, "model_version": m.model_version,
                   "load": int(m.active_requests), "capacity": int(m.max_capacity), "weight": float(m.weight),
                   "draining": bool(m.draining)}
            if is_replica(m):
                row.update(in_flight=gw.in_flight.get(m.member_id, 0),
                           drained_in_routing=m.member_id in self.drains.drained,
                           routable=m.member_id in routable, breaker=None if breakers is None
                           else breakers.get(m.member_id, {"state": "closed"}))
            rows.append(row)
        stats = gw.stats
        return _json({"gateway_id": gw.config.gateway_id, "queued": gw.queued,
                      "in_flight": sum(gw.in_flight.values()), "served_total": stats.served_total,
                      "failovers_total": stats.failovers_total, "rejected_total": stats.rejected_total,
                      "failed_total": stats.failed_total, "members": rows})

    def _known_replica(self, request: web.Request) -> str:
        replica_id = request.match_info["replica_id"]
        if not any(m.member_id == replica_id and is_replica(m) for m in self.gateway.members()):
            raise ApiError(404, f"no replica {replica_id!r} in the member table", param="replica_id",
                           code="unknown_replica")
        return replica_id

    async def drain(self, request: web.Request) -> web.Response:
        replica_id = self._known_replica(request)
        answer = {"replica_id": replica_id, "drained_in_routing": True}
        everywhere = getattr(self.drains, "drain_everywhere", None)
        if everywhere is not None:  # every worker of the group, and which of them applied it
            answer["workers"] = (await everywhere(replica_id)).to_dict()
        else:
            self.drains.drain(replica_id)
        answer["in_flight"] = self.gateway.in_flight.get(replica_id, 0)
        return _json(answer)

    async def undrain(self, request: web.Request) -> web.Response:
        replica_id = self._known_replica(request)
        answer: dict[str, Any] = {"replica_id": replica_id, "drained_in_routing": False}
        everywhere = getattr(self.drains, "undrain_everywhere", None)
        if everywhere is not None:
            answer["workers"] = (await everywhere(replica_id)).to_dict()
        else:
            self.drains.undrain(replica_id)
        return _json(answer)

    # ---- rolling update -----------------------------------------------------------------------------------
    async def start_rollout(self, request: web.Request) -> web.Response:
        body = decode_json_body(await request.read())
        if not isinstance(body, dict):
            raise bad_request("the request body must be a JSON object")
        version = body.get("version")
        if not isinstance(version, str) or not version.strip():
            raise bad_request("'version' must be a non-empty string", "version")
        options: dict[str, Any] = {}
        for name in _ROLLOUT_SECONDS:
            value = body.get(name)
            if value is not None:
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 86400:
                    raise bad_request(f"'{name}' must be a number of seconds in (0, 86400)", name)
                options[name] = float(value)
        for name in _ROLLOUT_FLAGS:
            value = body.get(name)
            if value is not None:
                if not isinstance(value, bool):
                    raise bad_request(f"'{name}' must be a boolean", name)
                options[name] = value
        order = body.get("replicas")
        if order is not None and (not isinstance(order, list) or not order
                                  or not all(isinstance(r, str) and r for r in order)):
            raise bad_request("'replicas' must be a non-empty list of replica ids", "replicas")
        try:
            starter = self.worker_rollouts if self.worker_rollouts is not None else self.rollouts
            rollout = starter.start(version, replicas=order, **options)
        except RolloutElsewhere as exc:
            raise ApiError(409, exc.message, code="rollout_running") from None
        except RolloutRefused as exc:
            status, kind = ROLLOUT_REFUSALS[exc.reason]
            param = "replicas" if exc.reason == "invalid" and order is not None else None
            raise ApiError(status, exc.message, type=kind, code=ROLLOUT_REFUSAL_CODES[exc.reason],
                           param=param) from None
        # Let run() mark itself running before we describe it.
        await asyncio.sleep(0)
        return _json(rollout.status.to_dict(), 202)

    async def rollout_status(self, request: web.Request) -> web.Response:
        if self.worker_rollouts is not None:  # wherever in the group it runs (or ran last)
            status = await self.worker_rollouts.status()
            if status is None:
                raise ApiError(404, "no rolling update has been started", code="no_rollout")
            return _json(status)
        if self.rollout is None:
            raise ApiError(404, "no rolling update has been started", code="no_rollout")
        return _json(self.rollout.status.to_dict())

    async def cancel_rollout(self, request: web.Request) -> web.Response:
        if self.worker_rollouts is not None:
            try:
                status = await self.worker_rollouts.abort()
            except TimeoutError:
                raise ApiError(504, f"the rolling update did not stop within {ROLLOUT_STOP_TIMEOUT_S:g} s",
                               type="timeout") from None
            if status is None:  # none runs: like a single gateway, answer with the last one's status
                status = await self.worker_rollouts.status()
            if status is None:
                raise ApiError(404, "no rolling update has been started", code="no_rollout")
            return _json(status)
        if self.rollout is None:
            raise ApiError(404, "no rolling update has been started", code="no_rollout")
        try:
            await self.rollouts.abort()
        except TimeoutError:
            raise ApiError(504, f"the rolling update did not stop within {ROLLOUT_STOP_TIMEOUT_S:g} s",
                           type="timeout") from None
        return _json(self.rollout.status.to_dict())

    # ---- tenancy (docs/tenancy.md) ------------------------------------------------------------------------
    def _tenancy(self):
        gate = getattr(self.gateway, "tenancy", None)
        if gate is None:
            raise ApiError(404, "this gateway has no tenancy", code="no_tenancy")
        return gate

    async def usage(self, request: web.Request) -> web.Response:
        return _json(self._tenancy().usage(asyncio.get_running_loop().time()))

    async def reload_keys(self, request: web.Request) -> web.Response:
        gate = self._tenancy()
        if not gate.enabled:
            raise ApiError(409, "no key file configured (start the gateway with --keys PATH)",
                           code="no_key_file")
        result = gate.reload()
        if not result.reloaded:
            raise ApiError(422, f"key file not reloaded, still using the {result.keys} keys loaded before: "
                                f"{result.error}", code="key_file_invalid")
        return _json(result.to_dict())
