"""Command-line options every cluster member shares (gateway and replica): where it binds, how others reach it,
how it joins the gossip cluster."""

from __future__ import annotations


def add_membership_arguments(p) -> None:
    p.add_argument("--seeds", default="", help="comma-separated gossip seeds host:port")
    p.add_argument("--host", "--bind", dest="host", default="127.0.0.1", help="address to bind")
    p.add_argument("--advertise", default="", help="host other nodes use to reach this one (default: --host)")
    p.add_argument("--gossip-config", default="lan", choices=("lan", "local", "wan"), help="gossip timing preset")
    p.add_argument("--gossip-key-file", default="", metavar="FILE",
                   help="shared gossip key (at least 16 bytes): sign and check every gossip datagram; members "
                        "with another key or none are ignored")


def gossip_key_from_args(args, command: str) -> bytes | None:
    """The key --gossip-key-file names (None without one); SystemExit with the reason when it is unusable."""
    if not args.gossip_key_file:
        return None
    from llmgw.gossip.auth import read_gossip_key

    try:
        return read_gossip_key(args.gossip_key_file)
    except ValueError as exc:
        raise SystemExit(f"{command}: {exc}") from None
