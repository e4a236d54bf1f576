"""Restart commands started from a process busy with gRPC streams exit normally.

A rolling update runs its restart command (llmgw.rollout.CommandTemplateRestart) from the gateway while grpc.aio
streams are in flight. Under uvloop the command is started with fork(), which runs gRPC's fork handlers; with
other threads inside gRPC they give up half-way ("Other threads are currently calling into gRPC, skipping
fork() handlers") and the child could die of SIGSEGV before its exec. llmgw turns those handlers off (grpcio's
GRPC_ENABLE_FORK_SUPPORT=false) in llmgw/__init__.py, before grpc is first imported.

Each scenario runs in a fresh interpreter, as an llmgw process starts: llmgw imported before grpc, the
environment free of any GRPC_ENABLE_FORK_SUPPORT of the test's own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SKIPPED_HANDLERS = "skipping fork() handlers"
SPAWNS = 40
STREAMS = 16

# A replica (grpc.aio server) streaming to STREAMS concurrent grpc.aio clients, and SPAWNS restart commands run one
# after another meanwhile, on the event loop llmgw's processes use (llmgw.eventloop: uvloop when installed).
BUSY_PROCESS = f"""
import asyncio, json, time
from llmgw import eventloop
from llmgw.replica import Replica, ReplicaConfig
from llmgw.rollout import CommandTemplateRestart, RestartCommandError
from llmgw._proto import llmgateway_pb2 as pb, llmgateway_pb2_grpc as pb_grpc
import grpc

async def main():
    replica = Replica(ReplicaConfig(replica_id="r1", port=0, gossip_port=None, max_capacity={STREAMS * 2},
                                    token_delay_ms=1))
    await replica.start()
    channel = grpc.aio.insecure_channel(replica.grpc_address)
    stub = pb_grpc.LLMReplicaStub(channel)
    streamed = 0
    stopping = False

    async def stream(i):
        nonlocal streamed
        n = 0
        while not stopping:
            n += 1
            async for _ in stub.Generate(pb.GenerateRequest(request_id=f"s{{i}}-{{n}}", prompt="p", max_tokens=50),
                                         timeout=10.0):
                streamed += 1

    streams = [asyncio.create_task(stream(i)) for i in range({STREAMS})]
    try:
        async with asyncio.timeout(10.0):
            while streamed < 200:  # every stream under way before the first spawn
                await asyncio.sleep(0.01)
        restart = CommandTemplateRestart("true", timeout_s=10.0)
        before = streamed
        failures = []
        for _ in range({SPAWNS}):
            try:
                await restart("r1", "v2")
            except RestartCommandError as exc:
                failures.append(str(exc))
        during = streamed - before
        broken = [t for t in streams if t.done()]
    finally:
        stopping = True
        for task in streams:
            task.cancel()
        await asyncio.gather(*streams, return_exceptions=True)
        await channel.close()
        await replica.stop(0.1)
    print(json.dumps({{"failures": failures, "streamed_during_spawns": during, "streams_ended": len(broken),
                      "loop": type(asyncio.get_running_loop()).__module__}}))

eventloop.run(main())
"""


def run_python(code: str, env: dict[str, str], timeout: float = 120.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("GRPC_ENABLE_FORK_SUPPORT", "LLMGW_EVENT_LOOP")}
    env["PYTHONPATH"] = str(ROOT)
    env["GRPC_VERBOSITY"] = "INFO"  # gRPC logs its skipped fork handlers at INFO: make sure it would be seen
    env.update(extra)
    return env


def test_restart_commands_from_a_process_streaming_grpc_all_exit_0():
    result = run_python(BUSY_PROCESS, clean_env())
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["failures"] == [], report["failures"][:5]
    assert report["loop"].startswith("uvloop")  # llmgw's default loop, which starts commands with fork()
    # The streams really were running while the commands started, and none of them broke.
    assert report["streamed_during_spawns"] >= SPAWNS and report["streams_ended"] == 0
    assert SKIPPED_HANDLERS not in result.stderr, result.stderr[-3000:]


def test_importing_llmgw_turns_grpc_fork_handlers_off_unless_set():
    show = "import llmgw, os; print(os.environ['GRPC_ENABLE_FORK_SUPPORT'])"
    assert run_python(show, clean_env(), timeout=60.0).stdout.strip() == "false"
    # An operator's explicit setting is theirs.
    explicit = run_python(show, clean_env(GRPC_ENABLE_FORK_SUPPORT="true"), timeout=60.0)
    assert explicit.stdout.strip() == "true"
