"""Standalone gossip node: `python -m llmgw.gossip --id X --bind H:P --seeds a,b [--role R] [--config local]`.

Prints one JSON line per membership event to stdout ({"event": kind, "member": {...}}), and the member table
({"table": [...]}) on SIGUSR1 and every --table-interval seconds. SIGTERM/SIGINT leave gracefully. A member's
app_meta is printed as base64, as protobuf's JSON mapping prints bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import json
import logging
import os
import signal
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m llmgw.gossip", description=__doc__.splitlines()[0])
    p.add_argument("--id", required=True, help="member id (ids starting with 'gateway' default to gateways)")
    p.add_argument("--bind", default="127.0.0.1:0", help="UDP host:port to bind (default 127.0.0.1:0)")
    p.add_argument("--advertise", default=None, help="host:port peers should use (default: the bound one)")
    p.add_argument("--seeds", default="", help="comma-separated seed host:port list")
    p.add_argument("--role", choices=("replica", "gateway", "upstream"), default=None)
    p.add_argument("--grpc-address", default="")
    p.add_argument("--model-version", default="")
    p.add_argument("--max-capacity", type=int, default=0)
    p.add_argument("--config", choices=("lan", "local", "wan"), default="lan", help="gossip preset")
    p.add_argument("--key-hex", default=None, help="shared HMAC key, hex (>= 16 bytes)")
    p.add_argument("--table-interval", type=float, default=0.0, help="print the table every S seconds (0: never)")
    p.add_argument("--log-level", default="WARNING")
    return p


def _row(member) -> dict:
    row = dataclasses.asdict(member)
    row["app_meta"] = base64.b64encode(member.app_meta).decode("ascii")
    return row


async def _run(args) -> int:
    from llmgw.gossip import GossipConfig, GossipNode
    from llmgw.topology import role_of

    role = role_of(args.id, args.role or "")
    key = bytes.fromhex(args.key_hex) if args.key_hex else None
    node = GossipNode(args.id, bind=args.bind, advertise=args.advertise,
                      seeds=[s for s in args.seeds.split(",") if s], role=role, grpc_address=args.grpc_address,
                      model_version=args.model_version, max_capacity=args.max_capacity,
                      config=GossipConfig.preset(args.config), key=key)

    def emit(obj) -> None:
        sys.stdout.write(json.dumps(obj, sort_keys=True) + "\n")
        sys.stdout.flush()

    def print_table() -> None:
        emit({"table": [_row(m) for m in node.members(include_self=True)]})

    node.subscribe(lambda ev: emit({"event": ev.kind, "member": _row(ev.member)}))
    await node.start()
    emit({"started": args.id, "address": node.address, "pid": os.getpid(),
          "incarnation": node.local_member().incarnation})
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    loop.add_signal_handler(signal.SIGUSR1, print_table)
    loop.add_signal_handler(signal.SIGTERM, done.set)
    loop.add_signal_handler(signal.SIGINT, done.set)
    try:
        while not done.is_set():
            timeout = args.table_interval if args.table_interval > 0 else None
            try:
                await asyncio.wait_for(done.wait(), timeout)
            except TimeoutError:
                print_table()
    finally:
        await node.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr)
    try:
        return asyncio.run(_run(args))
    except ValueError as exc:  # bad address, key, etc.: a clear message, not a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
