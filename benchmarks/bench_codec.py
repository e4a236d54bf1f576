"""Gossip wire codec: llmgw's Cython codec vs the protobuf library, on the same datagrams in the same process.

asv runs the Codec class (time_* methods, parameterised by datagram and implementation); `report()` (also
`python benchmarks/bench_codec.py`) prints a table of microseconds per operation and the speed-up.

Operations, each measured for both implementations:
- encode: build the message from plain member records, then serialize it (what a gossip sender does per datagram)
- encode_prebuilt: serialize an already-built message object
- decode: parse and validate a datagram into a message object (protobuf: GossipMessage.FromString). Both sides
  work the same way here: the whole datagram is checked (framing, varints, UTF-8) into C structures, and Python
  objects are made only when a field is read, so this is the like-for-like comparison.
- decode_and_read: decode, then read every field of every update once, as a receiver does: the cost a receiver
  actually pays, Python objects included.
"""

from __future__ import annotations

import functools
import timeit

from llmgw._core import codec
from llmgw._proto import gossip_pb2

IMPLEMENTATIONS = ("llmgw", "protobuf")
DATAGRAMS = ("ping_8_updates", "sync_full")


def member_records(count: int) -> list[tuple]:
    """Typical member metadata as a SWIM node holds it."""
    return [
        (
            f"replica-{i:03d}",  # member_id
            f"10.0.{i // 200}.{i % 200 + 1}:7946",  # address
            codec.SUSPECT if i % 7 == 0 else codec.ALIVE,  # state
            1_718_000_000_000 + i,  # incarnation (time-based, so large)
            "v1",  # model_version
            i % 5,  # active_requests
            4,  # max_capacity
            "",  # grpc_address (reference convention: gossip port - 10000)
            codec.ROLE_REPLICA,  # role
            1.0,  # weight
            False,  # draining
            "gateway-1" if i % 7 == 0 else "",  # reporter_id
        )
        for i in range(count)
    ]


HEADER = dict(sender_id="gateway-1", target_id="replica-042", sequence_num=123_456,
              sender_address="10.0.0.1:7946", timestamp_ms=1_718_000_000_123)


def _full_sync_records() -> list[tuple]:
    """As many records as fit one MAX_DATAGRAM SYNC."""
    records = member_records(100)
    _, n = codec.encode_limited(codec.Message(type=codec.SYNC, **HEADER), [codec.Update(*r) for r in records])
    return records[:n]


RECORDS = {"ping_8_updates": member_records(8), "sync_full": _full_sync_records()}
TYPES = {"ping_8_updates": codec.PING, "sync_full": codec.SYNC}


def build_llmgw(kind: str, records: list[tuple]) -> codec.Message:
    return codec.Message(TYPES[kind], HEADER["sender_id"], HEADER["target_id"], HEADER["sequence_num"],
                         [codec.Update(*r) for r in records], HEADER["sender_address"], "",
                         HEADER["timestamp_ms"])


def build_protobuf(kind: str, records: list[tuple]) -> gossip_pb2.GossipMessage:
    msg = gossip_pb2.GossipMessage(type=TYPES[kind], **HEADER)
    add = msg.updates.add
    for (member_id, address, state, incarnation, model_version, active, capacity, grpc_address, role, weight,
         draining, reporter_id) in records:
        add(member_id=member_id, address=address, state=state, incarnation=incarnation,
            model_version=model_version, active_requests=active, max_capacity=capacity, grpc_address=grpc_address,
            role=role, weight=weight, draining=draining, reporter_id=reporter_id)
    return msg


def encode_llmgw(kind, records):
    return codec.encode(build_llmgw(kind, records))


def encode_protobuf(kind, records):
    return build_protobuf(kind, records).SerializeToString()


def _read_all(msg) -> list:
    # Materialise every field once as a Python object, as a receiver does; nothing else, so the figure is the
    # codec's cost rather than the cost of arithmetic on the results.
    header = (msg.type, msg.sender_id, msg.target_id, msg.sequence_num, msg.sender_address, msg.target_address,
              msg.timestamp_ms)
    return [header] + [
        (u.member_id, u.address, u.state, u.incarnation, u.model_version, u.active_requests, u.max_capacity,
         u.grpc_address, u.role, u.weight, u.draining, u.reporter_id)
        for u in msg.updates
    ]


def decode_and_read_llmgw(data):
    return _read_all(codec.decode(data))


def decode_and_read_protobuf(data):
    return _read_all(gossip_pb2.GossipMessage.FromString(data))


class Codec:
    params = (list(DATAGRAMS), list(IMPLEMENTATIONS))
    param_names = ["datagram", "implementation"]

    def setup(self, datagram, implementation):
        self.kind = datagram
        self.records = RECORDS[datagram]
        self.prebuilt = (build_llmgw if implementation == "llmgw" else build_protobuf)(datagram, self.records)
        self.data = encode_llmgw(datagram, self.records)
        if self.data != encode_protobuf(datagram, self.records):
            raise RuntimeError("llmgw and protobuf disagree on the encoding; the comparison would be meaningless")
        ours = implementation == "llmgw"
        self.encode = encode_llmgw if ours else encode_protobuf
        self.serialize = codec.encode if ours else gossip_pb2.GossipMessage.SerializeToString
        self.decode = codec.decode if ours else gossip_pb2.GossipMessage.FromString
        self.decode_and_read = decode_and_read_llmgw if ours else decode_and_read_protobuf

    def time_encode(self, datagram, implementation):
        self.encode(self.kind, self.records)

    def time_encode_prebuilt(self, datagram, implementation):
        self.serialize(self.prebuilt)

    def time_decode(self, datagram, implementation):
        self.decode(self.data)

    def time_decode_and_read(self, datagram, implementation):
        self.decode_and_read(self.data)


OPERATIONS = ("encode", "encode_prebuilt", "decode", "decode_and_read")


def _calibrate(fn, seconds: float) -> int:
    number = 1
    while True:
        elapsed = timeit.timeit(fn, number=number)
        if elapsed >= seconds / 4:
            return max(1, int(number * seconds / elapsed))
        number *= 4


def _interleaved_best_us(fns: dict, rounds: int = 15, seconds: float = 0.02) -> dict:
    """Best time per call of each function, measured in alternating short rounds.

    The machine is shared, so a slow stretch would bias whichever implementation it happened to hit; alternating
    rounds and keeping each one's best round compares both under the same conditions.
    """
    numbers = {name: _calibrate(fn, seconds) for name, fn in fns.items()}
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            best[name] = min(best[name], timeit.timeit(fn, number=numbers[name]) / numbers[name])
    return {name: value * 1e6 for name, value in best.items()}


def measure(rounds: int = 15) -> list[dict]:
    rows = []
    for datagram in DATAGRAMS:
        benches = {impl: Codec() for impl in IMPLEMENTATIONS}
        for impl, bench in benches.items():
            bench.setup(datagram, impl)
        for op in OPERATIONS:
            fns = {impl: functools.partial(getattr(bench, f"time_{op}"), datagram, impl)
                   for impl, bench in benches.items()}
            us = _interleaved_best_us(fns, rounds)
            rows.append(dict(datagram=datagram, bytes=len(benches["llmgw"].data),
                             updates=len(RECORDS[datagram]), operation=op, llmgw_us=us["llmgw"],
                             protobuf_us=us["protobuf"], speedup=us["protobuf"] / us["llmgw"]))
    return rows


def report() -> str:
    """The comparison table (benchmarks/__main__.py prints what this returns)."""
    import google.protobuf
    from google.protobuf.internal import api_implementation

    rows = measure()
    lines = [
        (f"gossip codec: llmgw vs protobuf {google.protobuf.__version__} ({api_implementation.Type()} backend), "
         "best of 15 interleaved rounds, microseconds per operation"),
        f"{'datagram':<16} {'bytes':>5} {'upd':>4} {'operation':<16} {'llmgw':>9} {'protobuf':>9} {'speedup':>8}",
    ]
    for r in rows:
        lines.append(f"{r['datagram']:<16} {r['bytes']:>5} {r['updates']:>4} {r['operation']:<16} "
                     f"{r['llmgw_us']:>9.2f} {r['protobuf_us']:>9.2f} {r['speedup']:>7.1f}x")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
