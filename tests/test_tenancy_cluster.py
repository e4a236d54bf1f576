"""Tenancy across gateways and processes: a limit held by three gateways together over their gossip mesh (and
in a partition), SIGHUP reload, the CLI's handling of key files (exit 2 naming the line) and `llmgw keys`.

Gateways and the replica are real processes (tests/harness.py) except in the partition test, which runs three
gateways in this process so a gossip filter can cut one off (llmgw.gossip.GossipFilter); everything on loopback.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest

from harness import ROOT, Cluster, free_tcp_port, wait_until
from llmgw.tenancy.keys import hash_key

sys.path.insert(0, str(ROOT))
from benchmarks.run_tenancy import _grpc_request, key_file_text, limit_load, partition_run

LIMIT = 600  # requests per minute


def _within(value: float, target: float, fraction: float) -> bool:
    return target * (1 - fraction) <= value <= target * (1 + fraction)


def test_three_gateway_processes_hold_one_limit_together_and_report_it(tmp_path: Path):
    text, keys = key_file_text({"limited": {"requests_per_minute": LIMIT}, "other": {}})
    path = tmp_path / "keys.toml"
    path.write_text(text)
    http_port = free_tcp_port()
    with Cluster(tmp_path, log_level="INFO") as c:
        rep = c.start_replica("replica-1", token_delay_ms=1, max_capacity=256)
        gws = [c.start_gateway("gateway-1", extra=["--keys", str(path), "--http-port", str(http_port),
                                                   "--http-host", "127.0.0.1", "--admin-token", "t0ken"])]
        gws += [c.start_gateway(f"gateway-{i}", extra=["--keys", str(path)]) for i in (2, 3)]
        c.wait_converged([*gws, rep])
        # 3x the limit, spread over the three gateways: after the first 2 s the cluster admits the limit.
        out = asyncio.run(limit_load([(g.name, g.grpc_address) for g in gws], keys["limited"], 3 * LIMIT / 60.0,
                                     12.0))
        assert _within(out["admitted_per_min"], LIMIT, 0.10), out
        assert set(out["codes"]) == {"ok", "resource_exhausted"}, out
        assert all(rate > 0 for rate in out["per_gateway_per_min"].values()), out

        def admin(method: str, route: str) -> tuple[int, dict]:
            req = urllib.request.Request(f"http://127.0.0.1:{http_port}{route}", method=method,
                                         headers={"Authorization": "Bearer t0ken"})
            try:
                with urllib.request.urlopen(req, timeout=5) as resp:
                    return resp.status, json.loads(resp.read())
            except urllib.error.HTTPError as err:
                return err.code, json.loads(err.read())

        status, usage = admin("GET", "/admin/usage")
        assert status == 200 and usage["gateway"] == "gateway-1"
        assert set(usage["peers"]) == {"gateway-2", "gateway-3"} and all(p["counted"] for p in usage["peers"].values())
        limited = usage["tenants"]["limited"]
        assert set(limited["peers"]) == {"gateway-2", "gateway-3"}
        assert limited["cluster"]["requests"] == limited["local"]["requests"] + sum(
            p["requests"] for p in limited["peers"].values())
        assert limited["cluster"]["requests"] <= LIMIT

        # SIGHUP reloads the key file of that process; a bad file keeps the keys in use and says so in the log.
        new_key = "sk-llmgw-cluster-new-key-000001"
        path.write_text(text + f'[[key]]\nsha256 = "{hash_key(new_key)}"\ntenant = "other"\n')
        os.kill(gws[0].pid, signal.SIGHUP)

        def code(node, key):
            async def go():
                async with grpc.aio.insecure_channel(node.grpc_address) as ch:
                    return (await _grpc_request(ch, "after reload", 2, key))[0]
            return asyncio.run(go())

        wait_until(lambda: code(gws[0], new_key) == "ok", 10.0, 0.2, "gateway-1 to take the new key")
        assert code(gws[1], new_key) == "unauthenticated"  # only the signalled process reloaded
        path.write_text(text + "[[key]]\nsha256 = 'not a hash'\ntenant = 'other'\n")
        os.kill(gws[0].pid, signal.SIGHUP)
        wait_until(lambda: b"key file not reloaded" in gws[0].log_path.read_bytes(), 10.0, 0.2, "the reload error")
        log_text = gws[0].log_path.read_text()
        assert "keys.toml:" in log_text and "still using the 3 keys" in log_text
        assert code(gws[0], new_key) == "ok"
        status, body = admin("POST", "/admin/keys/reload")
        assert status == 422 and "still using the 3 keys" in body["error"]["message"]
        for key in (*keys.values(), new_key):
            for g in gws:
                assert key not in g.log_path.read_text()


def test_a_gateway_cut_off_from_the_others_falls_back_to_its_share_and_the_others_keep_the_limit():
    out = asyncio.run(asyncio.wait_for(partition_run(per_minute=LIMIT, duration_s=12.0), 120.0))
    healthy, cut = out["healthy"], out["partitioned"]
    assert _within(healthy["admitted_per_min"], LIMIT, 0.10), healthy
    pair = cut["per_gateway_per_min"]["gateway-1"] + cut["per_gateway_per_min"]["gateway-2"]
    assert _within(pair, LIMIT, 0.10), cut
    # The isolated gateway knew 3 gateways: its share is a third of the limit, and it was offered twice that.
    assert out["share_seen_by"] == {"gateway-1": 1.0, "gateway-2": 1.0, "gateway-3": pytest.approx(1 / 3)}
    assert 0 < cut["per_gateway_per_min"]["gateway-3"] <= LIMIT / 3, cut
    assert set(cut["codes"]) == {"ok", "resource_exhausted"}, cut
    # Digests flowed while healthy: every gateway heard the two others (2 per 0.5 s round).
    assert all(d["received"] > 0 and d["bad"] == 0 for d in out["digests"].values()), out["digests"]


WORKERS = ("gateway-1-w0", "gateway-1-w1")


async def _answers_by_worker(address: str, key: str) -> dict[str, str]:
    """The answer (status code name) each worker of `address` gives an Infer call with `key`: the workers share the
    port, so each fresh connection (a subchannel pool of its own) lands on one of them; bounded tries."""
    from llmgw._proto import llmgateway_pb2 as pb
    from llmgw._proto import llmgateway_pb2_grpc as pb_grpc

    answers: dict[str, str] = {}
    for _ in range(200):
        channel = grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
        try:
            worker = (await pb_grpc.GatewayAdminStub(channel).GetStatus(pb.GatewayStatusRequest(),
                                                                        timeout=10)).gateway_id
            if worker not in answers:
                answers[worker] = (await _grpc_request(channel, "which keys", 2, key, timeout_s=10.0))[0]
        finally:
            await channel.close()
        if len(answers) == len(WORKERS):
            return answers
    raise AssertionError(f"200 connections reached only {sorted(answers)}")


def test_sighup_to_the_supervisor_of_workers_reloads_the_key_file_in_every_worker(tmp_path: Path):
    text, keys = key_file_text({"team": {}})
    path = tmp_path / "keys.toml"
    path.write_text(text)
    new_key = "sk-llmgw-workers-new-key-000001"
    with Cluster(tmp_path, log_level="INFO") as c:
        c.start_replica("replica-1", token_delay_ms=1)
        gateway = c.start_gateway("gateway-1", extra=["--workers", "2", "--keys", str(path)], wait_ready=False)
        wait_until(lambda: gateway.log_path.read_text().count("READY") == 2, 60, what="both workers ready")

        def answers(key: str) -> dict[str, str]:
            return asyncio.run(asyncio.wait_for(_answers_by_worker(gateway.grpc_address, key), 60.0))

        everyone_ok = dict.fromkeys(WORKERS, "ok")
        wait_until(lambda: answers(keys["team"]) == everyone_ok, 30.0, 0.3, "both workers to serve the key")
        path.write_text(text + f'[[key]]\nsha256 = "{hash_key(new_key)}"\ntenant = "team"\n')
        # The file alone changes nothing: each worker reads it at start and on a reload.
        assert answers(new_key) == dict.fromkeys(WORKERS, "unauthenticated")
        os.kill(gateway.pid, signal.SIGHUP)  # to the supervisor only: it forwards the signal to each worker
        wait_until(lambda: answers(new_key) == everyone_ok, 20.0, 0.3, "both workers to take the new key")
        assert answers(keys["team"]) == everyone_ok
        assert gateway.alive() and gateway.log_path.read_text().count("reloaded: 2 keys, 1 tenants") == 2
        assert new_key not in gateway.log_path.read_text()


def test_sighup_never_stops_a_gateway_without_a_key_file_even_while_its_workers_start(tmp_path: Path):
    """Found by a reviewer: without --keys the workers had no SIGHUP handler, so the forwarded signal (default
    action: terminate) killed them and the supervisor exited 1; a signal during start-up did the same."""
    with Cluster(tmp_path, log_level="INFO") as c:
        c.start_replica("replica-1", token_delay_ms=1)
        gateway = c.start_gateway("gateway-1", extra=["--workers", "2"], wait_ready=False)
        children = Path(f"/proc/{gateway.pid}/task/{gateway.pid}/children")
        # Once the supervisor has spawned its workers (its handlers are in place by then), signal it
        # again and again while the workers start.
        wait_until(lambda: len(children.read_text().split()) == 2, 30.0, 0.02, "the supervisor to start 2 workers")
        sent_during_start = 0
        while gateway.log_path.read_text().count("READY") < 2:  # bounded by the wait below
            os.kill(gateway.pid, signal.SIGHUP)
            sent_during_start += 1
            if sent_during_start > 600:
                raise AssertionError("the workers never became ready")
            time.sleep(0.05)
        os.kill(gateway.pid, signal.SIGHUP)
        open_answers = dict.fromkeys(WORKERS, "ok")
        wait_until(lambda: asyncio.run(asyncio.wait_for(_answers_by_worker(gateway.grpc_address, ""), 60.0))
                   == open_answers, 30.0, 0.3, "both workers to keep serving")
        assert gateway.alive() and sent_during_start > 0
        assert "no key file (--keys) to reload" in gateway.log_path.read_text()


# ---- the CLI -----------------------------------------------------------------------------------------------
def _llmgw(*args: str, stdin: str = "", timeout: float = 60.0) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "llmgw", *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=str(ROOT))


BAD_FILE = """[[key]]
sha256 = "{good}"
tenant = "ok"

[[key]]
sha256 = "{good2}"
tenant = "limited"
requests_per_minute = -1
"""


@pytest.mark.parametrize("workers", [1, 2])
def test_a_bad_key_file_stops_the_gateway_with_exit_2_naming_the_line(tmp_path: Path, workers: int):
    path = tmp_path / "keys.toml"
    path.write_text(BAD_FILE.format(good=hash_key("sk-llmgw-good-key-00000001"),
                                    good2=hash_key("sk-llmgw-good-key-00000002")))
    started = time.monotonic()
    result = _llmgw("gateway", "--keys", str(path), "--port", str(free_tcp_port()), "--http-port", "0",
                    "--workers", str(workers))
    assert result.returncode == 2, result
    assert f"{path}:8: entry 2: requests_per_minute must be a whole number" in result.stderr
    assert "READY" not in result.stdout and time.monotonic() - started < 30
    missing = _llmgw("gateway", "--keys", str(tmp_path / "nope.toml"), "--port", "0", "--http-port", "0")
    assert missing.returncode == 2 and "cannot read key file" in missing.stderr


def test_keys_cli_hashes_from_stdin_makes_keys_and_checks_files(tmp_path: Path):
    result = _llmgw("keys", "hash", stdin="sk-llmgw-example-search-1\n")
    assert result.returncode == 0
    assert result.stdout.strip() == "0479caeeef44d02a75886a6a017e2b4fc7f7280e1148d7fad6aa3c902d8c537c"
    short = _llmgw("keys", "hash", stdin="tiny\n")
    assert short.returncode == 2 and "at least 16" in short.stderr and "tiny" not in short.stderr
    made = _llmgw("keys", "new", "--tenant", "team-a")
    key = made.stdout.split()[1]
    assert made.returncode == 0 and key.startswith("sk-llmgw-") and hash_key(key) in made.stdout
    path = tmp_path / "keys.toml"
    path.write_text(made.stdout.split("\n", 2)[2])
    checked = _llmgw("keys", "check", str(path))
    assert checked.returncode == 0 and checked.stdout.startswith("ok: 1 keys, 1 tenants (team-a)")
    path.write_text(f'[[key]]\nsha256 = "{key}"\ntenant = "x"\n')  # the key pasted where its hash belongs
    pasted = _llmgw("keys", "check", str(path))
    assert pasted.returncode == 2 and "keys.toml:2:" in pasted.stderr and key not in pasted.stderr
