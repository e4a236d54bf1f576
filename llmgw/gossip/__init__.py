"""SWIM gossip membership with Lifeguard, as a library.

    from llmgw.gossip import GossipNode, GossipConfig

    node = GossipNode("replica-1", bind="0.0.0.0:17946", advertise="10.0.0.5:17946", seeds=["10.0.0.2:17946"])
    await node.start()
    unsubscribe = node.subscribe(lambda event: print(event.kind, event.member.member_id))
    live = [m for m in node.members() if m.state == MemberState.ALIVE]
    node.update_meta(active_requests=3, app_meta=b"opaque to gossip")
    node.subscribe_user(lambda sender_id, payload: print(sender_id, payload))
    node.send_user("replica-2", b"hello")
    await node.stop()

See docs/gossip.md for the protocol, the knobs and measured behaviour.
"""

from llmgw.gossip.config import GossipConfig
from llmgw.gossip.lossy import GossipFilter, LossyNetwork
from llmgw.gossip.node import EVENT_KINDS, GossipNode, Member, MemberEvent, MemberEventKind, MemberState

__all__ = [
           "EVENT_KINDS",
           "GossipConfig",
           "GossipFilter",
           "GossipNode",
           "LossyNetwork",
           "Member",
           "MemberEvent",
           "MemberEventKind",
           "MemberState",
]
