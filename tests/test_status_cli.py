"""`python -m llmgw status` against a GatewayAdmin server with a known member table, and ui.table."""

from __future__ import annotations

import json
from concurrent import futures

import grpc
import pytest

from llmgw import ui
from llmgw.__main__ import main
from llmgw._proto import llmgateway_pb2 as pb
from llmgw._proto import llmgateway_pb2_grpc as pb_grpc
from llmgw.cli import status

MEMBERS = [
    pb.MemberInfo(member_id="replica-2", address="127.0.0.1:60002", grpc_address="127.0.0.1:50002", role="replica",
                  state="suspect", incarnation=7, active_requests=3, max_capacity=4, model_version="v2", weight=0.5,
                  draining=True, breaker="half_open"),
    pb.MemberInfo(member_id="gateway-1", address="127.0.0.1:60000", grpc_address="127.0.0.1:50000", role="gateway",
                  state="alive", incarnation=12, is_self=True, weight=1.0),
    pb.MemberInfo(member_id="replica-1", address="127.0.0.1:60001", grpc_address="127.0.0.1:50001", role="replica",
                  state="alive", incarnation=5, active_requests=0, max_capacity=4, model_version="v1", weight=1.0,
                  breaker="closed"),
]


class FakeAdmin(pb_grpc.GatewayAdminServicer):
    def __init__(self, with_status: bool = True) -> None:
        self.with_status = with_status
        self.calls = 0

    def Members(self, request, context):
        self.calls += 1
        return pb.MembersResponse(self_id="gateway-1", members=MEMBERS)

    def GetStatus(self, request, context):
        if not self.with_status:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "no status here")
        return pb.GatewayStatus(gateway_id="gateway-1", pid=42, in_flight=3, queued=1, served_total=10,
                                failovers_total=2, rejected_total=0, failed_total=1, grpc_address="127.0.0.1:50000")


@pytest.fixture
def admin_server():
    servers = []

    def start(servicer) -> str:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        pb_grpc.add_GatewayAdminServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in servers:
        server.stop(0).wait(5)


def test_table_prints_the_member_table_sorted_gateway_first(admin_server, capsys):
    target = admin_server(FakeAdmin())
    assert main(["status", "--target", target]) == 0
    out = capsys.readouterr().out
    assert out == (
        f"gateway gateway-1 at {target}: 3 members, 1/2 replicas alive\n"
        "in flight 3, queued 1, served 10, failovers 2, rejected 0, failed 1\n"
        "\n"
        "ID           ROLE     STATE    INC  LOAD  VERSION  WEIGHT  DRAINING  BREAKER    GRPC\n"
        "gateway-1 *  gateway  ALIVE     12  -     -             -  -         -          127.0.0.1:50000\n"
        "replica-1    replica  ALIVE      5  0/4   v1            1  no        closed     127.0.0.1:50001\n"
        "replica-2    replica  SUSPECT    7  3/4   v2          0.5  yes       half_open  127.0.0.1:50002\n"
    )


def test_json_output_and_gateway_without_getstatus(admin_server, capsys):
    target = admin_server(FakeAdmin(with_status=False))
    assert main(["status", "--target", target, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["self_id"] == "gateway-1" and doc["gateway"] is None
    assert [m["member_id"] for m in doc["members"]] == ["gateway-1", "replica-1", "replica-2"]
    replica2 = doc["members"][2]
    assert replica2 == {"member_id": "replica-2", "role": "replica", "state": "suspect", "incarnation": 7,
                        "active_requests": 3, "max_capacity": 4, "model_version": "v2", "weight": 0.5,
                        "draining": True, "grpc_address": "127.0.0.1:50002", "gossip_address": "127.0.0.1:60002",
                        "is_self": False, "breaker": "half_open"}
    assert doc["members"][0]["breaker"] == ""  # a gateway has no breaker


def test_watch_refreshes_count_times(admin_server, capsys):
    servicer = FakeAdmin()
    target = admin_server(servicer)
    assert main(["status", "--target", target, "--watch", "0.1", "--count", "3", "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and servicer.calls == 3
    assert all(json.loads(line)["self_id"] == "gateway-1" for line in lines)


def test_unreachable_gateway_is_a_clear_error(capsys):
    from tests.harness import free_tcp_port

    target = f"127.0.0.1:{free_tcp_port()}"  # nothing listens there
    assert main(["status", "--target", target, "--timeout-s", "2"]) == 1
    err = capsys.readouterr().err
    assert f"status: cannot reach gateway at {target}: UNAVAILABLE" in err


@pytest.mark.parametrize("argv, message", [
    (["--watch", "0"], "--watch SECS must be within"),
    (["--count", "0"], "--count must be >= 1"),
    (["--timeout-s", "-1"], "--timeout-s must be within"),
    (["--target", "nohostport"], "--target must be host:port"),
])
def test_bad_arguments(argv, message, capsys):
    assert main(["status", *argv]) == 2
    assert message in capsys.readouterr().err


def test_breaker_column_shows_each_replicas_breaker_and_nothing_for_gateways():
    row = {"role": "replica", "state": "alive", "incarnation": 1, "active_requests": 1, "max_capacity": 2,
           "model_version": "v1", "weight": 1.0, "draining": False, "gossip_address": "a:2", "is_self": False}
    snapshot = {"self_id": "g", "gateway": None, "members": [
        {**row, "member_id": "g", "role": "gateway", "grpc_address": "g:1", "breaker": "", "is_self": True},
        {**row, "member_id": "r1", "grpc_address": "a:1", "breaker": "open"},
        {**row, "member_id": "r2", "grpc_address": "b:1", "breaker": ""}]}
    lines = status.render(snapshot, "g:1").splitlines()
    assert lines[2].split() == ["ID", "ROLE", "STATE", "INC", "LOAD", "VERSION", "WEIGHT", "DRAINING", "BREAKER",
                                "GRPC"]
    assert lines[3].split() == ["g", "*", "gateway", "ALIVE", "1", "-", "v1", "-", "-", "-", "g:1"]
    assert lines[4].split() == ["r1", "replica", "ALIVE", "1", "1/2", "v1", "1", "no", "open", "a:1"]
    assert lines[5].split() == ["r2", "replica", "ALIVE", "1", "1/2", "v1", "1", "no", "-", "b:1"]


# ---- ui.table ------------------------------------------------------------------------------------------------
def test_table_alignment_and_cells():
    text = ui.table(["name", "n", "ok"], [["a", 1, True], ["bbb", 22, None], ["c", None, False]])
    assert text.splitlines() == [
        "NAME   N  OK",
        "a      1  yes",
        "bbb   22  -",
        "c      -  no",
    ]


def test_table_rejects_ragged_rows():
    with pytest.raises(ValueError, match="row 1 has 1 cells, the table has 2 columns"):
        ui.table(["a", "b"], [[1, 2], [3]])
