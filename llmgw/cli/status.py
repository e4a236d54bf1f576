"""`llmgw status`: the member table as a gateway sees it (GatewayAdmin.Members over gRPC)."""

from __future__ import annotations

from llmgw.topology import DEFAULT_PORTS, ROLE_GATEWAY, ROLE_REPLICA

HELP = "print the member table as a gateway sees it (--watch refreshes it like top)"

# Columns of the table, in order; gateways have no load, version, weight, draining or breaker of their own.
COLUMNS = ("id", "role", "state", "inc", "load", "version", "weight", "draining", "breaker", "grpc")


def add_arguments(p) -> None:
    from llmgw.config import add_config_argument

    add_config_argument(p)  # [section] of the TOML file and LLMGW_* variables, flags winning
    p.add_argument("--target", default=f"127.0.0.1:{DEFAULT_PORTS['gateway']['grpc']}", help="gateway host:port")
    p.add_argument("--watch", nargs="?", type=float, const=2.0, default=None, metavar="SECS",
                   help="refresh every SECS seconds (default 2) until Ctrl-C")
    p.add_argument("--count", type=int, default=None, help="with --watch: stop after N refreshes")
    p.add_argument("--json", action="store_true", help="machine-readable output (one JSON document per refresh)")
    p.add_argument("--timeout-s", type=float, default=5.0, help="deadline of each RPC")


def member_dict(member) -> dict:
    """A MemberInfo as a plain dict. "breaker" is the gateway's circuit breaker for a replica ("closed", "open",
    "half_open"; "" for gateways); "draining" is true when the replica drains or this gateway took it out of
    routing."""
    row = {
        "member_id": member.member_id,
        "role": member.role,
        "state": member.state,
        "incarnation": int(member.incarnation),
        "active_requests": int(member.active_requests),
        "max_capacity": int(member.max_capacity),
        "model_version": member.model_version,
        "weight": round(float(member.weight), 6),  # a proto float: 0.3 comes back as 0.30000001192...
        "draining": bool(member.draining),
        "grpc_address": member.grpc_address,
        "gossip_address": member.address,
        "is_self": bool(member.is_self),
        "breaker": member.breaker,
    }
    return row


def gateway_dict(status) -> dict:
    return {
        "gateway_id": status.gateway_id, "pid": int(status.pid), "in_flight": int(status.in_flight),
        "queued": int(status.queued), "served_total": int(status.served_total),
        "failovers_total": int(status.failovers_total), "rejected_total": int(status.rejected_total),
        "failed_total": int(status.failed_total), "grpc_address": status.grpc_address,
        # Adaptive stall deadlines (docs/resilience.md): per replica, seconds; empty when they are off.
        "stall_deadlines": {rid: {"inter_token_s": round(status.inter_token_deadline_by_replica[rid], 6),
                                  "first_token_s": round(status.first_token_deadline_by_replica.get(rid, 0.0), 6)}
                            for rid in sorted(status.inter_token_deadline_by_replica)},
        "stall_suspicions": int(status.stall_suspicions), "stall_failovers": int(status.stall_failovers),
    }


async def fetch(channel, timeout_s: float) -> dict:
    """{"self_id", "members": [member dicts], "gateway": gateway dict or None}. Raises grpc.aio.AioRpcError."""
    import grpc

    from llmgw._proto import llmgateway_pb2 as pb
    from llmgw._proto import llmgateway_pb2_grpc as pb_grpc

    stub = pb_grpc.GatewayAdminStub(channel)
    members = await stub.Members(pb.MembersRequest(), timeout=timeout_s)
    try:
        gateway = gateway_dict(await stub.GetStatus(pb.GatewayStatusRequest(), timeout=timeout_s))
    except grpc.aio.AioRpcError as exc:  # the table is what was asked for; the counters are a bonus
        if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
            raise
        gateway = None
    rows = sorted((member_dict(m) for m in members.members), key=lambda r: (r["role"] != ROLE_GATEWAY, r["member_id"]))
    return {"self_id": members.self_id, "members": rows, "gateway": gateway}


def render(snapshot: dict, target: str) -> str:
    from llmgw import ui

    members = snapshot["members"]
    replicas = [m for m in members if m["role"] == ROLE_REPLICA]
    alive = sum(1 for m in replicas if m["state"].lower() == "alive")
    lines = [(f"gateway {snapshot['self_id'] or '?'} at {target}: {len(members)} members, "
              f"{alive}/{len(replicas)} replicas alive")]
    gw = snapshot.get("gateway")
    if gw:
        lines.append(f"in flight {gw['in_flight']}, queued {gw['queued']}, served {gw['served_total']}, "
                     f"failovers {gw['failovers_total']}, rejected {gw['rejected_total']}, "
                     f"failed {gw['failed_total']}")
    rows = []
    for m in members:
        replica = m["role"] == ROLE_REPLICA
        load = f"{m['active_requests']}/{m['max_capacity']}" if replica else None
        rows.append([m["member_id"] + (" *" if m["is_self"] else ""), m["role"], m["state"].upper(),
                     m["incarnation"], load, m["model_version"] or None, m["weight"] if replica else None,
                     m["draining"] if replica else None, (m["breaker"] or None) if replica else None,
                     m["grpc_address"] or None])
    lines += ["", ui.table(list(COLUMNS), rows)]
    deadlines = (gw or {}).get("stall_deadlines")
    if deadlines:
        assert gw is not None
        lines += ["", (f"adaptive stall deadlines (suspicions {gw['stall_suspicions']}, "
                       f"stall failovers {gw['stall_failovers']}):"),
                  ui.table(["replica", "inter-token", "first-token"],
                           [[rid, f"{d['inter_token_s'] * 1000:.0f} ms", f"{d['first_token_s']:.2f} s"]
                            for rid, d in deadlines.items()])]
    return "\n".join(lines)


def run(args) -> int:
    import asyncio
    import json
    import sys

    import grpc

    from llmgw import ui

    if args.watch is not None and not 0.1 <= args.watch <= 3600:
        print("status: --watch SECS must be within 0.1..3600", file=sys.stderr)
        return 2
    if args.count is not None and args.count < 1:
        print("status: --count must be >= 1", file=sys.stderr)
        return 2
    if not 0 < args.timeout_s <= 600:
        print("status: --timeout-s must be within (0, 600]", file=sys.stderr)
        return 2
    if ":" not in args.target:
        print(f"status: --target must be host:port, got {args.target!r}", file=sys.stderr)
        return 2
    rounds = args.count if args.count is not None else (None if args.watch is not None else 1)
    clear = args.watch is not None and not args.json and sys.stdout.isatty()

    async def main() -> int:
        ok = True
        done = 0
        async with grpc.aio.insecure_channel(args.target) as channel:
            while rounds is None or done < rounds:
                if done:
                    await asyncio.sleep(args.watch)
                done += 1
                try:
                    snapshot = await fetch(channel, args.timeout_s)
                    ok = True
                except grpc.aio.AioRpcError as exc:
                    ok = False
                    message = f"cannot reach gateway at {args.target}: {exc.code().name}: {exc.details()}"
                    if args.json:
                        print(json.dumps({"error": message}), flush=True)
                    else:
                        print(("" if not clear else ui.CLEAR_SCREEN) + f"status: {message}",
                              file=sys.stdout if args.watch is not None else sys.stderr, flush=True)
                    continue
                if args.json:
                    print(json.dumps(snapshot, sort_keys=True), flush=True)
                else:
                    stamp = f"  (every {args.watch:g} s, {__import__('time').strftime('%H:%M:%S')})" \
                        if args.watch is not None else ""
                    text = render(snapshot, args.target)
                    head, _, rest = text.partition("\n")
                    print((ui.CLEAR_SCREEN if clear else "") + head + stamp + ("\n" + rest if rest else ""),
                          flush=True)
        return 0 if ok else 1

    try:
        return asyncio.run(main())
    except KeyboardInterrupt:  # Ctrl-C ends --watch; that is how it is meant to stop
        return 0
    except BrokenPipeError:  # `status --watch | head`: the reader left; say nothing more
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at interpreter exit
        return 0
