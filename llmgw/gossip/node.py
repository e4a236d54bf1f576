"""Asyncio UDP shell around the sans-IO SWIM core (llmgw._core.swim.Swim).

All protocol logic lives in the core; this module only moves datagrams between a UDP socket and the core, keeps
one timer armed at ``core.next_deadline()``, and hands membership events and user messages to subscribers.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from llmgw._core.swim import MAX_APP_META, MEMBER_FIELDS, Swim  # compiled core; ImportError: the build is missing
from llmgw.gossip.auth import Authenticator
from llmgw.gossip.config import GossipConfig
from llmgw.gossip.lossy import GossipFilter, LossyNetwork
from llmgw.topology import (
    SEED_PLACEHOLDER_PREFIX,
    grpc_address_for,
    is_routable,
    role_from_wire,
    role_number,
    understands_user_messages,
)

log = logging.getLogger("llmgw.gossip")

START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
_ADDRESS = MEMBER_FIELDS.index("address")
_ROLE = MEMBER_FIELDS.index("role")


class MemberState(StrEnum):
    """A member's SWIM state (a str: compares equal to "alive", "suspect", ...)."""

    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"
    LEFT = "left"


class MemberEventKind(StrEnum):
    """What happened to a member (a str: compares equal to "joined", "updated", ...)."""

    JOINED = "joined"
    UPDATED = "updated"  # metadata changed (load, capacity, version, weight, draining, addresses, app_meta)
    SUSPECT = "suspect"
    ALIVE = "alive"  # a suspicion was refuted
    DEAD = "dead"
    LEFT = "left"
    REMOVED = "removed"  # garbage-collected after DEAD/LEFT


EVENT_KINDS = tuple(MemberEventKind)


@dataclass(frozen=True)
class Member:
    member_id: str
    address: str  # gossip host:port
    grpc_address: str  # advertised, else derived by the reference convention (llmgw.topology); "" if neither
    role: str  # "replica" | "gateway" | "upstream" (llmgw.topology.ROLES)
    state: MemberState
    incarnation: int
    model_version: str
    active_requests: int
    max_capacity: int
    weight: float
    draining: bool
    app_meta: bytes = b""  # the application's opaque metadata (memberlist's Node.Meta), at most MAX_APP_META bytes

    @property
    def is_live(self) -> bool:
        return is_routable(self.state)

    @classmethod
    def from_core(cls, row: tuple) -> Member:
        """A Member from one of the core's member tuples (fields named by MEMBER_FIELDS, as gossiped): the
        application's readings -- gRPC address and role name -- are derived here, by llmgw.topology."""
        fields: dict[str, Any] = dict(zip(MEMBER_FIELDS, row, strict=True))
        fields["grpc_address"] = grpc_address_for(fields["address"], fields["grpc_address"])
        fields["role"] = role_from_wire(fields["member_id"], fields["role"])
        fields["state"] = MemberState(fields["state"])
        return cls(**fields)


@dataclass(frozen=True)
class MemberEvent:
    kind: MemberEventKind
    member: Member


def parse_host_port(text: str) -> tuple[str, int]:
    """"host:port" or "[v6]:port" -> (host, port); ValueError on anything else."""
    if not isinstance(text, str):
        raise ValueError(f"address must be a 'host:port' string, got {text!r}")
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"address must be 'host:port', got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def format_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _is_unspecified(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def _default_advertise_host() -> str:
    """An address peers can reach when we bind a wildcard: the one the OS would route outward from."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: nothing is sent, it only picks a source address
            return s.getsockname()[0]
    except OSError:
        return socket.gethostbyname(socket.gethostname())


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, node: GossipNode) -> None:
        self._node = node

    def datagram_received(self, data: bytes, addr) -> None:
        self._node._on_datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("gossip socket error: %s", exc)


UserCallback = Callable[[str, bytes], None]


class GossipNode:
    """One cluster member speaking SWIM over UDP.

    With ``threaded=True`` the socket and timers run on a dedicated thread with its own event loop, so probes are
    never delayed by a busy caller loop; subscriber callbacks (member events and user messages) then run on that
    thread. ``members()``, ``member()``, ``update_meta()``, ``send_user()`` and ``stats()`` are thread-safe in
    both modes.

    ``filter`` (a GossipFilter, settable at any time) drops datagrams to and from chosen peers: tests use it to
    partition a node off without network namespaces.
    """

    def __init__(self, member_id: str, *, bind: str = "127.0.0.1:0", advertise: str | None = None,
                 seeds: Sequence[str] = (), role: str = "replica", grpc_address: str = "",
                 model_version: str = "", max_capacity: int = 0, weight: float = 1.0,
                 config: GossipConfig | None = None, key: bytes | None = None, threaded: bool = False,
                 network: LossyNetwork | None = None, incarnation: int | None = None,
                 seed: int | None = None, app_meta: bytes = b"", filter: GossipFilter | None = None) -> None:
        if not isinstance(member_id, str) or not member_id:
            raise ValueError("member_id must be a non-empty string")
        self._role = role_number(role)
        self._bind = parse_host_port(bind)
        if advertise is not None:
            parse_host_port(advertise)
        self._advertise = advertise
        if isinstance(seeds, str):
            seeds = [s for s in seeds.split(",") if s]
        for s in seeds:
            parse_host_port(s)
        self._seeds = list(seeds)
        if max_capacity < 0 or weight < 0:
            raise ValueError("max_capacity and weight must be >= 0")
        self.member_id = member_id
        self._grpc_address = grpc_address
        self._model_version = model_version
        self._max_capacity = int(max_capacity)
        self._weight = float(weight)
        if not isinstance(app_meta, bytes | bytearray | memoryview):
            raise TypeError(f"app_meta must be bytes, not {type(app_meta).__name__}")
        if len(app_meta) > MAX_APP_META:
            raise ValueError(f"app_meta is {len(app_meta)} bytes, over the limit of {MAX_APP_META}")
        self._app_meta = bytes(app_meta)
        self.filter = filter
        self.filtered_in = 0
        self.filtered_out = 0
        self._user_refused_reference = 0
        self.config = config or GossipConfig.lan()
        self._auth = Authenticator(key, window=self.config.replay_window) if key is not None else None
        self._threaded = threaded
        self._network = network
        self._incarnation = incarnation
        self._rng_seed = seed
        self._lock = threading.RLock()
        self._core: Swim | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._transport: asyncio.DatagramTransport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when = float("inf")
        self._subscribers: list[Callable[[MemberEvent], None]] = []
        self._user_subscribers: list[UserCallback] = []
        self._resolved: dict[str, tuple] = {}
        self._address: str | None = None
        self._started = False
        self._stopped = False
        self.callback_errors = 0

    # -- lifecycle -------------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind the UDP socket and start joining the seeds (retried in the background until someone answers)."""
        if self._started:
            raise RuntimeError("GossipNode.start() called twice")
        self._started = True
        if not self._threaded:
            await self._start_on_loop()
            return
        ready = threading.Event()
        loop_box: list[asyncio.AbstractEventLoop] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            loop_box.append(loop)
            asyncio.set_event_loop(loop)
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name=f"gossip-{self.member_id}", daemon=True)
        self._thread.start()
        if not await asyncio.to_thread(ready.wait, START_TIMEOUT):
            raise RuntimeError("gossip thread did not start")
        future = asyncio.run_coroutine_threadsafe(self._start_on_loop(), loop_box[0])
        try:
            await asyncio.wait_for(asyncio.wrap_future(future), START_TIMEOUT)
        except BaseException:
            loop_box[0].call_soon_threadsafe(loop_box[0].stop)
            raise

    async def _start_on_loop(self) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        host, port = self._bind
        transport, _ = await loop.create_datagram_endpoint(lambda: _Protocol(self), local_addr=(host, port))
        self._transport = transport
        bound_port = transport.get_extra_info("sockname")[1]
        if self._advertise:
            adv_host, adv_port = parse_host_port(self._advertise)
            self._address = format_host_port(adv_host, adv_port or bound_port)
        else:
            adv_host = _default_advertise_host() if _is_unspecified(host) else host
            self._address = format_host_port(adv_host, bound_port)
        now = loop.time()
        # Time-based incarnation: a restarted node outranks every rumour about its previous life.
        incarnation = self._incarnation if self._incarnation is not None else time.time_ns() // 1_000_000
        with self._lock:
            self._core = Swim(self.member_id, self._address, self.config,
                              self._rng_seed if self._rng_seed is not None else random.getrandbits(64), now,
                              incarnation, role=self._role, wall_offset=time.time() - now, auth=self._auth,
                              placeholder_prefix=SEED_PLACEHOLDER_PREFIX, grpc_address=self._grpc_address,
                              model_version=self._model_version, max_capacity=self._max_capacity,
                              weight=self._weight, app_meta=self._app_meta)
            if self._seeds:
                self._core.join(self._seeds, now)
        self._pump()
        log.info("gossip node %s listening on %s (advertised %s)", self.member_id,
                 format_host_port(host, bound_port), self._address)

    async def stop(self, *, leave: bool = True) -> None:
        """Broadcast LEFT (unless leave=False) and close the socket. Idempotent."""
        if self._stopped or not self._started:
            self._stopped = True
            return
        self._stopped = True
        loop = self._loop
        if loop is None:
            return
        if loop.is_closed():  # the loop we ran on is gone (e.g. asyncio.run ended): nothing left to send on
            self._transport = None
            return
        if self._threaded:
            future = asyncio.run_coroutine_threadsafe(self._stop_on_loop(leave), loop)
            try:
                await asyncio.wait_for(asyncio.wrap_future(future), STOP_TIMEOUT)
            finally:
                loop.call_soon_threadsafe(loop.stop)
                if self._thread is not None:
                    await asyncio.to_thread(self._thread.join, STOP_TIMEOUT)
        else:
            await self._stop_on_loop(leave)

    async def _stop_on_loop(self, leave: bool) -> None:
        if leave and self._core is not None:
            with self._lock:
                self._core.leave(self._require_loop().time())
            self._flush()
            if self._network is not None:
                # Let delayed sends of the LEFT announcement go out before the socket closes.
                await asyncio.sleep(min(0.2, self._network.delay * 3 + 0.05))
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    # -- public API ------------------------------------------------------------------------------------------------

    @property
    def address(self) -> str:
        if self._address is None:
            raise RuntimeError("GossipNode.address is known only after start()")
        return self._address

    def local_member(self) -> Member:
        with self._lock:
            return Member.from_core(self._require_core().local_member())

    def members(self, *, include_self: bool = False) -> list[Member]:
        with self._lock:
            rows = self._require_core().members(include_self)
        return [Member.from_core(r) for r in rows]

    def member(self, member_id: str) -> Member | None:
        with self._lock:
            row = self._require_core().member(member_id)
        return None if row is None else Member.from_core(row)

    def update_meta(self, *, active_requests=None, max_capacity=None, model_version=None, weight=None,
                    draining=None, grpc_address=None, app_meta: bytes | None = None) -> None:
        """Change what this member advertises; every other member sees it within a few protocol periods
        (`app_meta`: opaque bytes, at most MAX_APP_META; ValueError when larger or when the member's update would
        no longer fit one datagram)."""
        core = self._require_core()
        loop = self._require_loop()
        with self._lock:
            core.set_meta(loop.time(), active_requests=active_requests, max_capacity=max_capacity,
                          model_version=model_version, weight=weight, draining=draining,
                          grpc_address=grpc_address, app_meta=app_meta)
        self._wake()

    def send_user(self, member_id: str, payload: bytes) -> bool:
        """Send `payload` to member `member_id` in one gossip datagram (signed with the gossip key), best effort:
        it may be lost, duplicated or reordered like any UDP datagram, and is never retried.

        Returns False, sending nothing, when the member is not live (ALIVE or SUSPECT), is a reference peer (it
        gossips no role and would not understand the message), the payload is larger than
        max_user_payload(member_id), or the node is stopped. Thread-safe."""
        if not isinstance(member_id, str):
            raise TypeError(f"member_id must be str, not {type(member_id).__name__}")
        if not isinstance(payload, bytes | bytearray | memoryview):
            raise TypeError(f"payload must be bytes, not {type(payload).__name__}")
        core = self._require_core()
        loop = self._require_loop()
        if self._stopped:
            return False
        with self._lock:
            row = core.member(member_id)
            if row is not None and not understands_user_messages(int(row[_ROLE])):
                self._user_refused_reference += 1
                return False
            sent = core.user_message(member_id, payload, loop.time())
        if sent:
            self._wake()
        return sent

    def max_user_payload(self, member_id: str) -> int:
        """The largest payload send_user() accepts for `member_id` (one datagram minus header and signature)."""
        with self._lock:
            return self._require_core().max_user_payload(member_id)

    def subscribe_user(self, callback: UserCallback) -> Callable[[], None]:
        """Call callback(sender_id, payload) for every user message from a live member; returns a function that
        unsubscribes. Runs where member events run (the gossip thread when threaded)."""
        return self._add_subscriber(self._user_subscribers, callback)

    def subscribe(self, callback: Callable[[MemberEvent], None]) -> Callable[[], None]:
        """Call callback(MemberEvent) on every membership change; returns a function that unsubscribes."""
        return self._add_subscriber(self._subscribers, callback)

    def _add_subscriber(self, subscribers: list[Any], callback: Any) -> Callable[[], None]:
        """Append `callback` to `subscribers` under the lock; the returned function removes it (once, idempotent)."""
        if not callable(callback):
            raise TypeError("callback must be callable")
        with self._lock:
            subscribers.append(callback)

        def unsubscribe() -> None:
            with self._lock:
                if callback in subscribers:
                    subscribers.remove(callback)

        return unsubscribe

    def stats(self) -> dict[str, int]:
        with self._lock:
            out = dict(self._require_core().stats) if self._core is not None else {}
        out["callback_errors"] = self.callback_errors
        out["user_refused"] = out.get("user_refused", 0) + self._user_refused_reference
        out["filtered_in"] = self.filtered_in
        out["filtered_out"] = self.filtered_out
        return out

    # -- internals -------------------------------------------------------------------------------------------------

    def _require_core(self) -> Swim:
        if self._core is None:
            raise RuntimeError("GossipNode is not started")
        return self._core

    def _require_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("GossipNode is not started")
        return self._loop

    def _wake(self) -> None:
        """Send what a call from the application queued in the core, from the loop's thread."""
        if self._stopped:
            return
        if self._on_loop_thread():
            self._pump()
        else:
            try:
                self._require_loop().call_soon_threadsafe(self._pump)
            except RuntimeError:  # loop already closed during shutdown
                pass

    def _filtered(self, address: str) -> bool:
        """Whether the filter (if any) drops datagrams between us and `address`."""
        f = self.filter
        if f is None:
            return False
        core = self._core
        with self._lock:  # the core is read here from the loop thread, and written under the lock elsewhere
            return f.drops(self.member_id, address, lambda member_id: _address_of(core, member_id))

    def _on_loop_thread(self) -> bool:
        try:
            return asyncio.get_running_loop() is self._loop
        except RuntimeError:
            return False

    def _on_datagram(self, data: bytes, addr: tuple[Any, ...]) -> None:
        core, loop = self._core, self._loop
        if core is None or loop is None:
            return
        source = format_host_port(addr[0], addr[1])
        if self.filter is not None and self._filtered(source):
            self.filtered_in += 1
            return
        try:
            with self._lock:
                core.handle_datagram(data, source, loop.time())
        except Exception:  # the core counts bad input itself; anything else is a bug we log, not a crash
            log.exception("gossip core failed on a datagram from %s", source)
        self._pump()

    def _on_timer(self) -> None:
        due = self._timer_when
        self._timer = None
        self._timer_when = float("inf")
        core, loop = self._core, self._loop
        if core is None or loop is None or self._transport is None:
            return
        try:
            with self._lock:
                # asyncio may run a call_at callback a clock-resolution early; never tick before the deadline
                # it was armed for, or the timer would re-arm for the same instant and spin.
                core.tick(max(loop.time(), due))
        except Exception:
            log.exception("gossip core failed in tick")
        self._pump()

    def _flush(self) -> tuple[list[tuple[str, tuple[Any, ...]]], list[tuple[str, bytes]]]:
        core, loop = self._require_core(), self._require_loop()
        with self._lock:
            out = core.drain_outgoing()
            events = core.drain_events()
            user_messages = core.drain_user_messages()
        transport = self._transport
        if transport is not None:
            for address, data in out:
                if self.filter is not None and self._filtered(address):
                    self.filtered_out += 1
                    continue
                if self._network is not None:
                    self._network.send(self._sendto, address, data, loop)
                else:
                    self._sendto(data, address)
        return events, user_messages

    def _sendto(self, data: bytes, address: str) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        target = self._resolved.get(address)
        if target is None:
            try:
                host, port = parse_host_port(address)
                target = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0][4]
            except (ValueError, OSError) as exc:
                log.debug("cannot resolve gossip peer %r: %s", address, exc)
                return
            if len(self._resolved) > 4096:
                self._resolved.clear()
            self._resolved[address] = target
        try:
            transport.sendto(data, target)
        except OSError as exc:  # e.g. address family mismatch; the protocol tolerates loss
            log.debug("gossip send to %s failed: %s", address, exc)

    def _pump(self) -> None:
        """Send what the core produced, deliver its events and user messages, and re-arm the timer for its next
        deadline."""
        core, loop = self._core, self._loop
        if core is None or loop is None or self._transport is None:
            return
        events, user_messages = self._flush()
        if user_messages:
            self._deliver_user(user_messages)
        if events:
            with self._lock:
                subscribers = list(self._subscribers)
            for kind, row in events:
                event = MemberEvent(MemberEventKind(kind), Member.from_core(row))
                for cb in subscribers:
                    try:
                        cb(event)
                    except Exception:
                        self.callback_errors += 1
                        log.exception("gossip subscriber raised on %s", kind)
        with self._lock:
            deadline = core.next_deadline()
        if deadline < self._timer_when - 1e-4:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_when = deadline
            self._timer = loop.call_at(deadline, self._on_timer)

    def _deliver_user(self, messages: list[tuple[str, bytes]]) -> None:
        with self._lock:
            subscribers = list(self._user_subscribers)
        for sender_id, payload in messages:
            for cb in subscribers:
                try:
                    cb(sender_id, payload)
                except Exception:
                    self.callback_errors += 1
                    log.exception("gossip user-message subscriber raised on a message from %s", sender_id)


def _address_of(core: Swim | None, member_id: str) -> str | None:
    row = core.member(member_id) if core is not None else None
    return None if row is None else str(row[_ADDRESS])
