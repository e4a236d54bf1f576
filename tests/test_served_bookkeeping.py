"""A served request is booked as served whichever front carried it and however the front lets go of the stream.

The HTTP front stops reading at the final batch and closes the stream (aclose() at the request path's last
yield); a gRPC client may cancel its call as soon as it holds the final message. Either way the request counts
once as served (stats, /admin/members, GatewayAdmin.GetStatus), its attempt is reported OK and never CANCELLED,
its record and metrics say ok, and its tenant's slot and tokens are settled. In-process: the composition root's
stack (llmgw.gateway.app) over real simulated replicas, with one API key so the tenancy path is on.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from inprocess import ComposedStack, run_with, wait_for
from llmgw._proto import llmgateway_pb2 as pb
from llmgw._proto import llmgateway_pb2_grpc as pb_grpc
from llmgw.gateway import GatewayConfig
from llmgw.gateway.events import AttemptOutcome, RequestListener, RequestOutcome, RequestRecord
from llmgw.gateway.tenancy_gate import TenancyGate
from llmgw.tenancy.keys import hash_key

ADMIN = "admin-token-for-served-tests"
KEY = "sk-llmgw-test-served-key-0001"
TENANT = "served"
PROMPT = "count me once"
MAX_TOKENS = 5


class Seen(RequestListener):
    def __init__(self) -> None:
        self.attempts: list[AttemptOutcome] = []
        self.records: list[RequestRecord] = []

    def attempt_event(self, replica_id, outcome, ttft_s):
        self.attempts.append(outcome)

    def request_finished(self, record):
        self.records.append(record)


class Stack(ComposedStack):
    def __init__(self) -> None:
        super().__init__()
        self.seen = Seen()

    async def start(self, keys_path: Path) -> None:
        gate = TenancyGate.from_key_file("gateway-1", str(keys_path))
        self.build(GatewayConfig(port=0, gossip_port=None), tenancy=gate)
        self.server.gateway.add_listener(self.seen)
        await self.start_fronts(admin_token=ADMIN)

    async def http_complete(self, *, stream: bool) -> str:
        body = {"model": "m", "prompt": PROMPT, "max_tokens": MAX_TOKENS, "stream": stream}
        async with self.session.post("/v1/completions", json=body,
                                     headers={"Authorization": f"Bearer {KEY}"}) as resp:
            text = await resp.text()
            assert resp.status == 200, text
            return text

    def grpc_infer(self):
        return pb_grpc.InferenceGatewayStub(self.channel).Infer(
            pb.InferRequest(prompt=PROMPT, max_tokens=MAX_TOKENS), timeout=10.0,
            metadata=(("authorization", f"Bearer {KEY}"),))


def test_every_front_books_a_served_request_once_however_it_lets_go(tmp_path: Path):
    keys_path = tmp_path / "keys.toml"
    keys_path.write_text(f'[[key]]\nsha256 = "{hash_key(KEY)}"\ntenant = "{TENANT}"\n')

    async def scenario(s: Stack):
        await s.add_replica("r1", token_delay_ms=1)
        await s.start(keys_path)
        gateway = s.server.gateway
        served = 0

        async def served_now() -> None:
            # Booked before the final token left the gateway: visible as soon as the client holds it.
            nonlocal served
            served += 1
            assert gateway.stats.served_total == served

        text = await s.http_complete(stream=False)
        assert json.loads(text)["choices"][0]["finish_reason"] == "length"
        await served_now()
        text = await s.http_complete(stream=True)  # the front closes the stream at the final batch
        assert text.rstrip().endswith("data: [DONE]")
        await served_now()
        messages = [msg async for msg in s.grpc_infer()]
        assert len(messages) == MAX_TOKENS and messages[-1].is_final
        await served_now()
        call = s.grpc_infer()  # a client that hangs up as soon as it holds the final message
        async for msg in call:
            if msg.is_final:
                call.cancel()
                break
        await served_now()

        await wait_for(lambda: len(s.seen.records) == served, what="every request's record")
        assert [r.outcome for r in s.seen.records] == [RequestOutcome.OK] * served
        assert all(r.complete and r.tokens == MAX_TOKENS and r.tenant == TENANT for r in s.seen.records)
        assert s.seen.attempts.count(AttemptOutcome.OK) == served
        assert AttemptOutcome.CANCELLED not in s.seen.attempts
        assert gateway.stats.served_total == served and gateway.stats.failed_total == 0
        assert gateway.in_flight == {}

        headers = {"Authorization": f"Bearer {ADMIN}"}
        async with s.session.get("/admin/members", headers=headers) as resp:
            assert resp.status == 200 and (await resp.json())["served_total"] == served
        status = await pb_grpc.GatewayAdminStub(s.channel).GetStatus(pb.GatewayStatusRequest(), timeout=5.0)
        assert status.served_total == served and status.failed_total == 0
        async with s.session.get("/metrics") as resp:
            metrics = await resp.text()
        assert f'llmgw_gateway_requests_total{{outcome="ok"}} {served}.0' in metrics
        assert 'llmgw_gateway_requests_total{outcome="cancelled"} 0.0' in metrics
        # The tenant's slot was freed and its usage counted every request: prompt words + tokens streamed.
        usage = s.server.gateway.tenancy.usage(asyncio.get_running_loop().time())["tenants"][TENANT]["local"]
        assert usage["in_flight"] == 0 and usage["requests"] == served
        assert usage["tokens"] == served * (len(PROMPT.split()) + MAX_TOKENS)

    run_with(Stack, scenario, 60.0)
