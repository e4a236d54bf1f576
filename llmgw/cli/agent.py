"""`llmgw agent --upstream URL`: a sidecar that advertises one OpenAI-compatible model server on the gossip mesh.

This module only turns flags into an AgentConfig; llmgw.agent_app builds and runs the agent.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from llmgw import eventloop
from llmgw.cli.membership_args import add_membership_arguments, gossip_key_from_args

if TYPE_CHECKING:
    from llmgw.agent_app import AgentConfig

__all__ = ["HELP", "add_arguments", "config_from_args", "run"]

HELP = ("advertise one OpenAI-compatible model server (vLLM, SGLang, llama.cpp, ...) on the gossip mesh: its URL, "
        "models, health and load; gateways stream from the server directly")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from llmgw.config import add_config_argument
    from llmgw.upstream.capabilities import BackendKind, ChatPrefill

    add_config_argument(p)
    server = p.add_argument_group("the model server")
    server.add_argument("--upstream", default="", metavar="URL",
                        help="base URL of the model server, as the gateways reach it (required)")
    server.add_argument("--kind", default="openai", choices=[kind.value for kind in BackendKind],
                        help="server kind: where its health and load metrics are, how a chat continues on "
                             "failover (docs/backends.md)")
    server.add_argument("--model", dest="models", action="append", default=[], metavar="NAME",
                        help="a model the server serves (repeatable; default: learnt from its /v1/models)")
    server.add_argument("--alias", dest="aliases", action="append", default=[], metavar="CLIENT=SERVER",
                        help="a client-facing name for one of its models (repeatable)")
    server.add_argument("--capacity", type=int, default=0,
                        help="concurrent requests gateways send it at most (0 = no limit)")
    server.add_argument("--weight", type=float, default=1.0, help="share of the traffic relative to other servers")
    server.add_argument("--chat-prefill", default=None, choices=[prefill.value for prefill in ChatPrefill],
                        help="how a failed chat stream is continued on it (default: the kind's)")
    probe = p.add_argument_group("probing")
    probe.add_argument("--probe-interval", type=float, default=0.5, metavar="SECONDS",
                       help="between two health/load probes")
    probe.add_argument("--probe-timeout", type=float, default=1.0, metavar="SECONDS", help="bound on one probe")
    probe.add_argument("--unhealthy-after", type=int, default=2, metavar="N",
                       help="consecutive failed probes that make the server unhealthy (one success: healthy)")
    probe.add_argument("--load-publish-interval", type=float, default=2.0, metavar="SECONDS",
                       help="a change of load alone is gossiped at most this often (health changes at once)")
    mesh = p.add_argument_group("gossip")
    mesh.add_argument("--id", default="", help="member id (default: agent-HOST:PORT of --upstream)")
    mesh.add_argument("--gossip-port", type=int, default=0, help="gossip UDP port (0 = any free port)")
    add_membership_arguments(mesh)
    eventloop.add_argument(p)
    p.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING, ERROR)")
    p.add_argument("--log-json", action="store_true", help="log one JSON object per line")


def config_from_args(args: argparse.Namespace) -> AgentConfig:
    """The AgentConfig the flags describe; ValueError naming the flag for a value the agent cannot use."""
    from llmgw.agent_app import AgentConfig

    if not args.upstream:
        raise ValueError("--upstream URL is required (the model server's base URL)")
    aliases = []
    for text in args.aliases:
        client_name, sep, server_name = text.partition("=")
        if not sep or not client_name or not server_name:
            raise ValueError(f"--alias takes CLIENT_NAME=SERVER_NAME, got {text!r}")
        aliases.append((client_name, server_name))
    for flag, value in (("--probe-interval", args.probe_interval), ("--probe-timeout", args.probe_timeout)):
        if not value > 0:
            raise ValueError(f"{flag} must be > 0, got {value}")
    if not args.load_publish_interval >= 0:
        raise ValueError(f"--load-publish-interval must be >= 0, got {args.load_publish_interval}")
    if args.unhealthy_after < 1:
        raise ValueError(f"--unhealthy-after must be >= 1, got {args.unhealthy_after}")
    if args.capacity < 0:
        raise ValueError(f"--capacity must be >= 0 (0 = no limit), got {args.capacity}")
    if not args.weight > 0:
        raise ValueError(f"--weight must be > 0, got {args.weight}")
    return AgentConfig(
        upstream_url=args.upstream, kind=args.kind, models=tuple(args.models), aliases=tuple(aliases),
        capacity=args.capacity, weight=args.weight, chat_prefill=args.chat_prefill,
        probe_interval_s=args.probe_interval, probe_timeout_s=args.probe_timeout,
        unhealthy_after=args.unhealthy_after, load_publish_interval_s=args.load_publish_interval,
        agent_id=args.id, host=args.host, gossip_port=args.gossip_port, advertise=args.advertise,
        seeds=tuple(s.strip() for s in args.seeds.split(",") if s.strip()), gossip_config=args.gossip_config,
        gossip_key=gossip_key_from_args(args, "agent"))


def run(args: argparse.Namespace) -> int:
    import sys

    from llmgw.agent_app import AgentStartError
    from llmgw.agent_app import run as run_agent
    from llmgw.logs import setup_logging

    try:
        setup_logging(args.log_level, json=args.log_json)
    except ValueError as exc:
        args._parser.error(str(exc))
    try:
        config = config_from_args(args)
    except ValueError as exc:
        args._parser.error(str(exc))  # exits 2 with the message, as a bad flag would
    try:
        return run_agent(config, event_loop=args.event_loop)
    except AgentStartError as exc:
        print(f"agent: {exc}", file=sys.stderr, flush=True)
        return 2
    except ValueError as exc:  # a setting the Agent refuses once it sees the whole server (e.g. too many models)
        print(f"agent: {exc}", file=sys.stderr, flush=True)
        return 2
