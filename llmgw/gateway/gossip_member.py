"""The gateway's own gossip member: started once its gRPC address is known, so peers learn where to reach it."""

from __future__ import annotations

from llmgw.gateway.api import GatewayConfig
from llmgw.topology import ROLE_GATEWAY, gossip_port_for


async def start_gossip_member(config: GatewayConfig, grpc_address: str):
    """Start a threaded GossipNode for this gateway and return it (its gossip port: the configured one, else the
    convention's for the gRPC port in `grpc_address`)."""
    from llmgw.gossip import GossipConfig, GossipNode

    port = config.gossip_port
    if not port:
        port = gossip_port_for(int(grpc_address.rsplit(":", 1)[1]))
    advertise = f"{config.advertise}:{port}" if config.advertise else None
    node = GossipNode(config.gateway_id, bind=f"{config.host}:{port}", advertise=advertise, seeds=tuple(config.seeds),
                      role=ROLE_GATEWAY, grpc_address=grpc_address,
                      config=GossipConfig.preset(config.gossip_config), key=config.gossip_key, threaded=True)
    await node.start()
    return node
