"""`gateway --workers 2` as an operator sees it: one /metrics for the whole gateway, admin actions on every worker.

The two worker processes share the HTTP port (SO_REUSEPORT): each new connection lands on one of them. The test
pins a connection to find out which worker answers (/admin/members names it), and checks that whichever worker
answers, /metrics counts the requests of both, and a drain or undrain sent to either applies to both.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness import Cluster, free_tcp_port, wait_until

WORKERS = ("gateway-1-w0", "gateway-1-w1")
MAX_CONNECTIONS = 200  # fresh connections tried to reach a given worker (each lands on either, at random)


@pytest.fixture
def cluster(tmp_path):
    with Cluster(tmp_path) as c:
        yield c


@contextlib.asynccontextmanager
async def pinned(url: str) -> AsyncIterator[tuple[aiohttp.ClientSession, str]]:
    """A session on one new connection (so on one worker), and the id of the worker behind it."""
    connector = aiohttp.TCPConnector(limit=1, force_close=False)
    async with aiohttp.ClientSession(url, connector=connector, timeout=aiohttp.ClientTimeout(total=20)) as http:
        async with http.get("/admin/members") as resp:
            assert resp.status == 200, await resp.text()
            worker = (await resp.json())["gateway_id"]
        yield http, worker


async def on_worker(url: str, worker: str):
    """A pinned session whose connection landed on `worker` (bounded number of tries)."""
    for _ in range(MAX_CONNECTIONS):
        manager = pinned(url)
        http, answered = await manager.__aenter__()
        if answered == worker:
            return manager, http
        await manager.__aexit__(None, None, None)
    raise AssertionError(f"no connection reached {worker} in {MAX_CONNECTIONS} tries")


async def each_worker(url: str, call) -> dict[str, object]:
    """`await call(http)` once on a connection to each worker: {worker id: result}."""
    results = {}
    for worker in WORKERS:
        manager, http = await on_worker(url, worker)
        try:
            results[worker] = await call(http)
        finally:
            await manager.__aexit__(None, None, None)
    return results


async def complete(http: aiohttp.ClientSession, prompt: str) -> str:
    body = {"model": "v1", "prompt": prompt, "max_tokens": 3}
    async with http.post("/v1/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["choices"][0]["finish_reason"] == "length"
        return resp.headers["X-LLMGW-Replica"]


async def members(http: aiohttp.ClientSession) -> dict:
    async with http.get("/admin/members") as resp:
        assert resp.status == 200
        return await resp.json()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def total(found: dict, name: str, **labels: str) -> float:
    return sum(value for (sample, sample_labels), value in found.items()
               if sample == name and all(dict(sample_labels).get(k) == v for k, v in labels.items()))


def test_two_workers_one_metrics_endpoint_and_admin_actions_on_both(cluster):
    c = cluster
    replicas = [c.start_replica(f"replica-{i}", token_delay_ms=1) for i in range(2)]
    http_port = free_tcp_port()
    gateway = c.start_gateway("gateway-1", extra=["--workers", "2", "--http-port", str(http_port)], wait_ready=False)
    wait_until(lambda: gateway.log_path.read_text().count("READY") == 2, 60, what="both workers ready")
    url = f"http://127.0.0.1:{http_port}"

    async def scenario():
        # Both workers route to both replicas.
        async def routable(http):
            return sorted(r["member_id"] for r in (await members(http))["members"] if r.get("routable"))

        async def both_see_replicas() -> bool:
            return all(v == ["replica-0", "replica-1"] for v in (await each_worker(url, routable)).values())

        for _ in range(100):
            if await both_see_replicas():
                break
            await asyncio.sleep(0.2)
        else:
            raise AssertionError("the workers never both saw both replicas")

        # Requests through each worker (3 each on pinned connections, plus 4 on fresh ones anywhere).
        sent = 0
        for worker in WORKERS:
            manager, http = await on_worker(url, worker)
            try:
                for i in range(3):
                    await complete(http, f"{worker} request {i}")  # 3 words: llmgw's prompt token count
                    sent += 1
            finally:
                await manager.__aexit__(None, None, None)
        for i in range(4):
            async with pinned(url) as (http, _):
                await complete(http, f"from anywhere {i}")
                sent += 1
        served = await each_worker(url, lambda http: members(http))
        assert all(served[w]["served_total"] >= 3 for w in WORKERS)
        assert sum(served[w]["served_total"] for w in WORKERS) == sent

        # Whichever worker answers the scrape, /metrics is the whole gateway's.
        async def scrape(http):
            async with http.get("/metrics") as resp:
                assert resp.status == 200
                return samples(await resp.text())

        scrapes = await each_worker(url, scrape)
        for worker, found in scrapes.items():
            assert total(found, "llmgw_gateway_requests_total", outcome="ok") == sent, worker
            assert total(found, "llmgw_gateway_request_success_total", front="http", finished_reason="length") \
                == sent, worker
            assert total(found, "llmgw_gateway_e2e_request_latency_seconds_count", front="http") == sent, worker
            assert total(found, "llmgw_gateway_prompt_tokens_total", front="http") == sent * 3, worker
            assert total(found, "llmgw_gateway_generation_tokens_total", front="http") == sent * 3, worker
            # One build-info series per worker: both workers' files are in every scrape.
            ids = {dict(labels)["id"] for (name, labels), _ in found.items() if name == "llmgw_build_info"}
            assert ids == set(WORKERS), worker

        # A drain sent to worker 0 applies to both, and says so.
        manager, http = await on_worker(url, WORKERS[0])
        try:
            async with http.post("/admin/replicas/replica-0/drain") as resp:
                assert resp.status == 200, await resp.text()
                drained = await resp.json()
        finally:
            await manager.__aexit__(None, None, None)
        assert drained["drained_in_routing"] is True
        assert drained["workers"] == {"version": drained["workers"]["version"], "complete": True,
                                      "workers": {"0": "applied", "1": "applied"}}

        async def drained_and_routed(http):
            view = {r["member_id"]: r["drained_in_routing"] for r in (await members(http))["members"]
                    if r["role"] == "replica"}
            routed = {await complete(http, f"after drain {n}") for n in range(4)}
            return view, routed

        for worker, (view, routed) in (await each_worker(url, drained_and_routed)).items():
            assert view == {"replica-0": True, "replica-1": False}, worker
            assert routed == {"replica-1"}, worker

        # The undrain, sent to the other worker, applies to both too.
        manager, http = await on_worker(url, WORKERS[1])
        try:
            async with http.post("/admin/replicas/replica-0/undrain") as resp:
                assert resp.status == 200
                undrained = await resp.json()
        finally:
            await manager.__aexit__(None, None, None)
        assert undrained["workers"]["complete"] is True
        assert undrained["workers"]["version"] > drained["workers"]["version"]

        async def drained_view(http):
            return {r["member_id"]: r["drained_in_routing"] for r in (await members(http))["members"]
                    if r["role"] == "replica"}

        for worker, view in (await each_worker(url, drained_view)).items():
            assert view == {"replica-0": False, "replica-1": False}, worker

    asyncio.run(asyncio.wait_for(scenario(), 120))
    # SIGTERM to the supervisor: both workers drain and stop, the supervisor exits 0.
    assert c.stop(gateway, timeout=30) == 0
    assert not gateway.alive()
    for replica in replicas:
        assert replica.alive()
