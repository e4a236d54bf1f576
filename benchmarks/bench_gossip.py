"""SWIM core micro-benchmarks (asv layout): per-datagram cost of the sans-IO state machine, and simulator speed.

asv runs the time_* methods; `python -m llmgw bench core --filter gossip` runs them without asv.
"""

from __future__ import annotations

from llmgw._core.codec import ACK, ALIVE, PING, SYNC_ACK, Message, Update, encode, encode_limited
from llmgw._core.swim import Swim
from llmgw.gossip.config import GossipConfig

INC = 1_700_000_000_000


def _member(i: int) -> Update:
    return Update(f"replica-{i:04d}", f"10.0.{i // 250}.{i % 250 + 1}:17946", ALIVE, INC + i, "v1", i % 4, 4, "",
                  1, 1.0, False, "")


def _node_with(n_members: int) -> Swim:
    node = Swim("bench", "10.9.9.9:17946", GossipConfig.lan(), 1, 0.0, INC)
    members = [_member(i) for i in range(n_members)]
    pos = 0
    while pos < len(members):
        data, k = encode_limited(Message(SYNC_ACK, "seed", "", 1, None, "", "", 0), members[pos:], 1400)
        node.handle_datagram(data, "", 0.0)
        pos += k
    node.drain_outgoing()
    node.drain_events()
    return node


class SwimCore:
    params = [10, 1000]
    param_names = ["members"]
    ops_per_call = 1000

    def setup(self, members):
        self.node = _node_with(members)
        self.ping = encode(Message(PING, "replica-0001", "bench", 7, [], "10.0.0.2:17946", "", 0))
        self.gossip = encode(Message(ACK, "replica-0002", "bench", 0, [_member(3), _member(4)], "", "", 0))

    def time_handle_ping_and_answer(self, members):
        node = self.node
        for _ in range(1000):
            node.handle_datagram(self.ping, "10.0.0.2:17946", 1.0)
            node.drain_outgoing()

    def time_handle_gossip(self, members):
        node = self.node
        for _ in range(1000):
            node.handle_datagram(self.gossip, "10.0.0.3:17946", 1.0)

    def time_tick(self, members):
        node = self.node
        t = 1.0
        for _ in range(1000):
            t += 0.01
            node.tick(t)
            node.drain_outgoing()


class SimulatorSpeed:
    timeout = 120

    def time_64_nodes_60_simulated_seconds(self):
        from llmgw.gossip.simulator import Simulator

        sim = Simulator(64, seed=1)
        sim.run_until(60.0)
