"""`bench openai`: the load generator against the deterministic mock (answers checked in full, every fault the mock
can inject counted as an error of its kind), the statistics and soak helpers, and the runner's direct half."""

import asyncio
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import openai_load as load
from benchmarks import run_openai as bench
from llmgw.testing.mock_openai import Fault, FaultKind, MockOpenAIServer, expected_text, render_chat

ROOT = Path(__file__).resolve().parent.parent
MAX_TOKENS = 6


def run_against_mock(*, concurrency=4, requests=40, faults=(), mock_options=None, client="lean", **spec_options):
    """The load generator against an in-process mock; returns (result, the mock's recorded requests)."""
    async def main():
        async with MockOpenAIServer(token_delay=0.002, **(mock_options or {})) as mock:
            for fault, times in faults:
                mock.inject(fault, times)
            spec = load.LoadSpec(url=mock.base_url, concurrency=concurrency, requests=requests, duration_s=20.0,
                                 max_tokens=MAX_TOKENS, client=client, **spec_options)
            result = await asyncio.wait_for(load.run_load(spec), timeout=60)
            return result, mock.generation_requests()
    return asyncio.run(main())


# ---- the load generator against the mock --------------------------------------------------------------------
@pytest.mark.parametrize("client", load.CLIENTS)
def test_every_answer_is_streamed_and_checked_at_concurrency_4(client):
    result, recorded = run_against_mock(concurrency=4, requests=40, client=client)
    assert result["errors"] == {} and result["error_count"] == 0 and result["warmup_errors"] == {}
    assert result["ok"] == result["requests"] == 40
    assert len(recorded) == 40 + 4  # one warm-up request per pooled connection, then the 40 measured
    assert all(r.body["stream"] is True and r.body["max_tokens"] == MAX_TOKENS for r in recorded)
    # Every answer's content arrived as MAX_TOKENS content events: one TTFT, MAX_TOKENS - 1 gaps each.
    assert result["chunks"] == 40 * MAX_TOKENS
    assert result["ttft_ms"]["count"] == 40 and result["inter_chunk_ms"]["count"] == 40 * (MAX_TOKENS - 1)
    assert result["total_ms"]["count"] == 40
    ttft = result["ttft_ms"]
    assert 0 < ttft["p50"] <= ttft["p90"] <= ttft["p99"] <= ttft["max"]
    assert ttft["p50"] <= result["total_ms"]["p50"]
    assert result["requests_per_s"] == pytest.approx(40 / result["wall_s"])


def test_the_expected_text_is_the_mocks_answer_to_that_request():
    messages = load.chat_messages(7)
    assert messages != load.chat_messages(8)
    answer = expected_text(render_chat(messages), MAX_TOKENS)
    assert len(answer.split()) == MAX_TOKENS
    assert answer != expected_text(render_chat(load.chat_messages(8)), MAX_TOKENS)


@pytest.mark.parametrize(("fault", "kind"), [
    (Fault(FaultKind.TRUNCATED, after_chunks=2), load.ErrorKind.WRONG_TEXT),  # [DONE] after 2 of 6 tokens
    (Fault(FaultKind.NO_DONE, after_chunks=None), load.ErrorKind.MISSING_DONE),  # whole text, no [DONE]
    (Fault(FaultKind.NO_DONE, after_chunks=3), load.ErrorKind.MISSING_DONE),
    (Fault(FaultKind.ERROR_EVENT, after_chunks=1), load.ErrorKind.ERROR_EVENT),
    (Fault(FaultKind.MALFORMED, after_chunks=1), load.ErrorKind.MALFORMED),
    (Fault(FaultKind.SERVER_ERROR, status=503), load.ErrorKind.HTTP_STATUS),
    (Fault(FaultKind.RATE_LIMIT), load.ErrorKind.HTTP_STATUS),
    (Fault(FaultKind.RESET, after_chunks=2), load.ErrorKind.CONNECTION),
])
@pytest.mark.parametrize("client", load.CLIENTS)
def test_a_faulty_answer_counts_as_an_error_of_its_kind(fault, kind, client):
    result, _ = run_against_mock(concurrency=4, requests=20, faults=[(fault, 3)], warmup=0, client=client)
    assert result["errors"] == {kind: 3}
    assert result["ok"] == 17 and result["requests"] == 20
    assert len(result["error_samples"]) == 3 and all(s.startswith(kind) for s in result["error_samples"])
    assert result["ttft_ms"]["count"] == 17  # figures only from correct answers


async def _raw_answering_server(keep_alive: bool):
    """A hand-written HTTP/1.1 server giving the mock's answer as one chunked SSE body per request, keeping the
    connection or closing it after each answer; returns (server, the list of connections it accepted)."""
    accepted = []

    async def serve(reader, writer):
        accepted.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length")))
                body = json.loads(await reader.readexactly(length))
                words = expected_text(render_chat(body["messages"]), body["max_tokens"]).split(" ")
                events = [{"choices": [{"index": 0, "delta": {"content": w if i == 0 else " " + w},
                                        "finish_reason": "stop" if i == len(words) - 1 else None}]}
                          for i, w in enumerate(words)]
                payload = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
                             + (b"" if keep_alive else b"Connection: close\r\n") + b"\r\n"
                             + b"%x\r\n" % len(payload) + payload + b"\r\n0\r\n\r\n")
                await writer.drain()
                if not keep_alive:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, accepted


@pytest.mark.parametrize("keep_alive", [True, False])
def test_the_lean_client_keeps_its_connections_and_opens_a_new_one_when_the_server_closes(keep_alive):
    async def main():
        server, accepted = await _raw_answering_server(keep_alive)
        async with server:
            port = server.sockets[0].getsockname()[1]
            spec = load.LoadSpec(url=f"http://127.0.0.1:{port}", concurrency=3, requests=12, duration_s=20.0,
                                 max_tokens=MAX_TOKENS, client="lean")
            result = await asyncio.wait_for(load.run_load(spec), timeout=30)
        return result, len(accepted)
    result, connections = asyncio.run(main())
    assert result["errors"] == {} and result["warmup_errors"] == {} and result["ok"] == 12
    assert result["chunks"] == 12 * MAX_TOKENS
    # 3 warm-up requests + 12 measured: one connection per worker when kept, one per request when closed.
    assert connections == (3 if keep_alive else 15)


@pytest.mark.parametrize("client", load.CLIENTS)
def test_a_silent_server_is_a_timeout_not_a_hang(client):
    result, _ = run_against_mock(concurrency=2, requests=4, warmup=0, request_timeout_s=0.5, client=client,
                                 faults=[(Fault(FaultKind.STALL, after_chunks=1, stall_seconds=30), 1)])
    assert result["errors"] == {load.ErrorKind.TIMEOUT: 1} and result["ok"] == 3


@pytest.mark.parametrize("client", load.CLIENTS)
def test_an_answer_that_stops_early_is_a_wrong_text(client):
    # With stop_probability 1 every answer ends at once (finish_reason "stop", no content, then [DONE]).
    result, _ = run_against_mock(concurrency=2, requests=6, warmup=0, mock_options={"stop_probability": 1.0},
                                 client=client)
    assert result["errors"] == {load.ErrorKind.WRONG_TEXT: 6} and result["ok"] == 0
    assert math.isnan(result["ttft_ms"]["p50"])


@pytest.mark.parametrize("client", load.CLIENTS)
def test_an_unknown_model_is_an_http_error(client):
    result, _ = run_against_mock(concurrency=2, requests=4, warmup=0, model="no-such-model", client=client)
    assert result["errors"] == {load.ErrorKind.HTTP_STATUS: 4}
    assert "HTTP 404" in result["error_samples"][0]


def test_the_duration_bounds_a_run_with_many_requests_left():
    async def main():
        async with MockOpenAIServer(token_delay=0.01) as mock:
            spec = load.LoadSpec(url=mock.base_url, concurrency=2, requests=100_000, duration_s=0.5,
                                 max_tokens=4, warmup=0)
            return await asyncio.wait_for(load.run_load(spec), timeout=30)
    result = asyncio.run(main())
    assert 2 <= result["requests"] < 100 and result["error_count"] == 0
    assert 0.5 <= result["wall_s"] < 2.0


@pytest.mark.parametrize(("bad", "reason"), [
    ({"concurrency": 0}, "concurrency"), ({"requests": 0}, "requests"), ({"duration_s": 0}, "duration_s"),
    ({"duration_s": math.inf}, "duration_s"), ({"url": "127.0.0.1:80"}, "url"), ({"max_tokens": 0}, "max_tokens"),
    ({"warmup": -1}, "warmup"), ({"request_timeout_s": 0}, "request_timeout_s"),
])
def test_a_bad_spec_is_refused_with_a_reason(bad, reason):
    spec = load.LoadSpec(**{"url": "http://127.0.0.1:1", "concurrency": 1, "requests": 1, "duration_s": 1.0, **bad})
    with pytest.raises(ValueError, match=reason):
        spec.validate()


def test_the_load_generator_runs_as_its_own_process():
    async def main():
        async with MockOpenAIServer(token_delay=0.001) as mock:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, str(ROOT / "benchmarks" / "openai_load.py"), "--url", mock.base_url,
                "--concurrency", "3", "--requests", "9", "--duration", "10", "--max-tokens", "5",
                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
            return proc.returncode, out, err
    code, out, err = asyncio.run(main())
    assert code == 0, err.decode()
    result = json.loads(out)
    assert result["ok"] == 9 and result["errors"] == {} and result["chunks"] == 9 * 5


# ---- statistics ---------------------------------------------------------------------------------------------
def test_percentile_interpolates_between_closest_ranks():
    values = [10.0, 20.0, 30.0, 40.0]
    assert load.percentile(values, 0) == 10.0 and load.percentile(values, 100) == 40.0
    assert load.percentile(values, 50) == 25.0  # halfway between 20 and 30
    assert load.percentile(values, 99) == pytest.approx(39.7)  # 30 + 0.97 * 10
    assert load.percentile([40.0, 10.0, 30.0, 20.0], 50) == 25.0  # order does not matter
    assert load.percentile([5.0], 99) == 5.0
    assert math.isnan(load.percentile([], 50))
    sample = [((i * 7919) % 1000) / 7.0 for i in range(1, 500)]
    cuts = statistics.quantiles(sample, n=100, method="inclusive")
    for q in (1, 50, 90, 99):
        assert load.percentile(sample, q) == pytest.approx(cuts[q - 1])
    with pytest.raises(ValueError):
        load.percentile(values, 101)


def test_summaries_are_in_milliseconds():
    s = load.summarize_ms([0.001 * i for i in range(1, 101)])  # 1..100 ms
    assert s["count"] == 100 and s["max"] == pytest.approx(100.0) and s["mean"] == pytest.approx(50.5)
    assert s["p50"] == pytest.approx(50.5) and s["p99"] == pytest.approx(99.01)
    empty = load.summarize_ms([])
    assert empty["count"] == 0 and math.isnan(empty["p50"])


def _round(p50, p99, rps, gap99=5.0, errors=None):
    errors = errors or {}
    return {"ttft_ms": {"p50": p50, "p99": p99}, "inter_chunk_ms": {"p99": gap99}, "requests_per_s": rps,
            "requests": 100, "errors": errors, "error_count": sum(errors.values()), "warmup_errors": {},
            "error_samples": [], "loadgen_cpu_share": 0.5}


def test_overheads_are_medians_of_per_round_pairs():
    direct = [_round(10.0, 20.0, 100.0), _round(12.0, 30.0, 200.0), _round(11.0, 25.0, 100.0)]
    via = [_round(10.5, 22.0, 95.0), _round(20.0, 90.0, 100.0), _round(11.25, 26.0, 99.0)]
    o = bench.overhead(direct, via)
    assert o["added_ttft_p50_ms"] == 0.5  # of 0.5, 8.0, 0.25
    assert o["added_ttft_p99_ms"] == 2.0  # of 2, 60, 1
    assert o["rps_ratio"] == 0.95  # of 0.95, 0.5, 0.99
    s = bench.path_summary(via)
    assert s["ttft_p50_ms"] == 11.25 and s["requests_per_s"] == 99.0 and s["errors"] == 0


def test_targets_are_judged_on_the_gateway_figures():
    runs = {1: {"direct": [_round(10.0, 12.0, 50.0)] * 3, "gateway": [_round(10.8, 13.0, 49.0)] * 3},
            64: {"direct": [_round(20.0, 40.0, 1000.0)] * 3, "gateway": [_round(25.0, 70.0, 960.0)] * 3},
            256: {"direct": [_round(40.0, 90.0, 2000.0)] * 3,
                  "gateway": [_round(50.0, 150.0, 1900.0, errors={"timeout": 1})] + [_round(50.0, 150.0, 1900.0)] * 2}}
    verdicts = dict(bench.target_verdicts(bench.summarize(runs), "gateway"))
    assert verdicts["c=1: added TTFT p50 <= 1.0 ms"].startswith("met")
    assert verdicts["c=64: requests/s >= 0.95x direct"].startswith("met")
    assert verdicts["c=64: TTFT p99 <= direct + 20 ms"].startswith("NOT met")  # +30 ms
    assert verdicts["c=256: 0 errors"].startswith("NOT met")  # one error in one round counts
    assert verdicts["c=256: requests/s >= 0.9x direct"].startswith("met")
    only_direct = bench.summarize({1: {"direct": [_round(10.0, 12.0, 50.0)]}})
    assert all(v.startswith("n/a") for _, v in bench.target_verdicts(only_direct, "gateway"))


def test_rounds_alternate_the_order_of_the_paths():
    paths = [bench.LoadPath(n, "http://x", None) for n in ("direct", "gateway", "litellm")]
    orders = [[p.name for p in bench.rotated(paths, k)] for k in range(3)]
    assert orders == [["direct", "gateway", "litellm"], ["gateway", "litellm", "direct"],
                      ["litellm", "direct", "gateway"]]


class _FakeServers:
    """CPU readings of servers busy for the first `busy_windows` windows (0.4 s of CPU in each), idle after."""

    def __init__(self, busy_windows: int) -> None:
        self.now = 0.0
        self.cpu_s = 0.0
        self.busy_windows = busy_windows

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        if self.busy_windows > 0:
            self.busy_windows -= 1
            self.cpu_s += 0.4
        else:
            self.cpu_s += 0.001  # a timer or a health check: idle

    def read(self, pid: int) -> float:
        return self.cpu_s / 2  # two pids, half each


def test_settle_waits_until_the_servers_are_idle():
    servers = _FakeServers(busy_windows=3)
    waited = bench.settle([1, 2], window_s=0.5, timeout_s=60, clock=lambda: servers.now, sleep=servers.sleep,
                          cpu=servers.read)
    assert waited == 2.0  # three busy windows, then the quiet one
    idle = _FakeServers(busy_windows=0)
    assert bench.settle([1, 2], window_s=0.5, clock=lambda: idle.now, sleep=idle.sleep, cpu=idle.read) == 0.5


def test_settle_gives_up_at_its_timeout():
    servers = _FakeServers(busy_windows=10**6)
    waited = bench.settle([1], window_s=0.5, timeout_s=3.0, clock=lambda: servers.now, sleep=servers.sleep,
                          cpu=servers.read)
    assert waited == 3.0


def test_settle_sees_a_real_process_work_through_a_backlog():
    spin_then_idle = "import time\nend = time.monotonic() + 1.0\nwhile time.monotonic() < end: pass\ntime.sleep(30)"
    busy = subprocess.Popen([sys.executable, "-c", spin_then_idle])
    try:
        time.sleep(0.3)  # it is spinning now
        waited = bench.settle([busy.pid], window_s=0.2, timeout_s=20.0)
        assert 0.4 <= waited < 10.0
        assert busy.poll() is None  # idle, not gone
    finally:
        busy.kill()
        busy.wait(timeout=10)


def test_soak_figures_rss_growth_and_fd_drift_after_the_baseline():
    samples = [{"t": float(t), "rss": 100 * 2**20 if t < 60 else (200 + (t - 60) // 10) * 2**20, "fds": 40 + t // 100}
               for t in range(0, 601, 5)]
    f = bench.soak_figures(samples, 60.0)
    assert f["rss_at_baseline_mb"] == 200.0 and f["rss_last_mb"] == 254.0  # the warm-up minute's growth is not counted
    assert f["rss_growth_pct"] == pytest.approx(27.0)
    assert f["fds_min"] == 40 and f["fds_max"] == 46
    assert f["fd_slope_per_min"] == pytest.approx(0.6, rel=0.05)  # one fd per 100 s
    verdicts = dict(bench.soak_verdicts({"errors": 0, "requests": 10, "figures": f}))
    assert verdicts["0 errors"].startswith("met")
    assert verdicts["RSS growth <= 10% after the first 60 s"].startswith("NOT met")
    assert verdicts["open fds flat"].startswith("met")  # a drift of ~5.4 fds is within the tolerance
    leaking = [{**s, "fds": 40 + s["t"] // 5} for s in samples]
    assert dict(bench.soak_verdicts({"errors": 0, "requests": 10, "figures": bench.soak_figures(leaking, 60.0)})
                )["open fds flat"].startswith("NOT met")


def test_linear_slope():
    assert bench.linear_slope([0, 1, 2, 3], [1, 3, 5, 7]) == pytest.approx(2.0)
    assert bench.linear_slope([0, 1, 2], [4, 4, 4]) == 0.0
    assert math.isnan(bench.linear_slope([1, 1], [2, 3]))
    with pytest.raises(ValueError):
        bench.linear_slope([1, 2], [1])


# ---- the runner ---------------------------------------------------------------------------------------------
def test_the_upstream_flag_is_told_apart_from_longer_flags():
    assert not bench.help_lists_upstream("  --upstream-batch UPSTREAM_BATCH\n  --upstreams X")
    assert bench.help_lists_upstream("  --upstream-batch N\n  --upstream URL   an OpenAI-compatible server")
    assert bench.help_lists_upstream("[--upstream URL]")


def test_the_gateway_command_streams_from_the_mock_on_free_ports():
    argv = bench.gateway_command("http://127.0.0.1:9", grpc_port=1001, gossip_port=1002, http_port=1003)
    assert argv[:4] == [sys.executable, "-m", "llmgw", "gateway"]
    flags = dict(zip(argv[4::2], argv[5::2], strict=False))
    assert flags["--upstream"] == "http://127.0.0.1:9" and flags["--http-port"] == "1003"
    assert flags["--port"] == "1001" and flags["--gossip-port"] == "1002"


@pytest.mark.parametrize("argv", [["--paths", "gateway"], ["--paths", "direct,nginx"], ["--rounds", "0"],
                                  ["--run-seconds", "0"], ["--gateway-url", "http://127.0.0.1:1"],
                                  ["--concurrency", "1,x"], ["--concurrency", "0"],
                                  ["--gateway-args", "--x 'unclosed"]])
def test_bad_runner_arguments_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(argv)
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err


def test_the_direct_half_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "results.json"
    code = bench.main(["--paths", "direct", "--concurrency", "1,4", "--rounds", "2", "--run-seconds", "1",
                       "--min-requests", "8", "--requests-per-connection", "2", "--max-tokens", "4",
                       "--token-delay-ms", "2", "--json", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "| 1 | direct |" in text and "| 4 | direct |" in text
    results = json.loads(out.read_text())
    for c in ("1", "4"):
        rounds = results["runs"][c]["direct"]
        assert len(rounds) == 2 and all(r["error_count"] == 0 and r["ok"] > 0 for r in rounds)
        summary = results["summary"][c]["direct"]
        assert summary["errors"] == 0 and summary["mock_cpu_share"] is not None
        assert summary["ttft_p50_ms"] == statistics.median(r["ttft_ms"]["p50"] for r in rounds)


# A stand-in for the gateway: a second mock that prints a gateway's READY line and serves on the given HTTP port.
STAND_IN = (
    "import asyncio, sys\n"
    "from llmgw.testing.mock_openai import MockOpenAIServer\n"
    "async def main():\n"
    "    server = MockOpenAIServer(port=int(sys.argv[1]), record=False, token_delay=0.002)\n"
    "    await server.start()\n"
    "    print(f'READY gateway stand-in grpc=127.0.0.1:1 gossip= http={server.base_url} pid=1', flush=True)\n"
    "    await asyncio.Event().wait()\n"
    "asyncio.run(main())\n"
)


def test_the_gateway_half_runs_once_the_gateway_command_works(tmp_path, capsys, monkeypatch):
    def stand_in(upstream_url, *, grpc_port, gossip_port, http_port, extra=()):
        return [sys.executable, "-c", STAND_IN, str(http_port)]

    monkeypatch.setattr(bench, "gateway_command", stand_in)
    monkeypatch.setattr(bench, "gateway_lacks_upstream_flag", lambda: None)
    out = tmp_path / "results.json"
    code = bench.main(["--paths", "direct,gateway", "--concurrency", "1,64", "--rounds", "2", "--run-seconds", "1",
                       "--min-requests", "8", "--requests-per-connection", "1", "--max-tokens", "4",
                       "--token-delay-ms", "2", "--json", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "| 1 | gateway |" in text and "targets, gateway vs direct (same run):" in text
    assert "NOT AVAILABLE" not in text
    results = json.loads(out.read_text())
    gateway = results["summary"]["64"]["gateway"]
    assert gateway["errors"] == 0 and gateway["path_cpu_share"] > 0
    assert set(results["summary"]["64"]["overhead"]) == {"gateway"}
    assert [len(results["runs"]["1"][p]) for p in ("direct", "gateway")] == [2, 2]
    # Every run started with the servers idle, and the direct runs recorded the idle gateway as a bystander.
    for c in ("1", "64"):
        for name in ("direct", "gateway"):
            assert all(0 < r["settle_s"] < bench.SETTLE_TIMEOUT_S for r in results["runs"][c][name])
        assert all(0 <= r["bystander_cpu_share"] < 0.5 for r in results["runs"][c]["direct"])


def test_a_gateway_without_the_upstream_flag_is_reported_not_crashed(tmp_path, capsys, monkeypatch):
    argparse_refusal = "import argparse; argparse.ArgumentParser(prog='gateway').parse_args(sys.argv[1:])"

    def old_gateway(upstream_url, *, grpc_port, gossip_port, http_port, extra=()):
        return [sys.executable, "-c", "import sys; " + argparse_refusal, "--upstream", upstream_url]

    monkeypatch.setattr(bench, "gateway_command", old_gateway)
    monkeypatch.setattr(bench, "gateway_lacks_upstream_flag", lambda: None)  # only the exit message tells
    code = bench.main(["--paths", "direct,gateway", "--concurrency", "2", "--rounds", "1", "--run-seconds", "1",
                       "--min-requests", "4", "--max-tokens", "3", "--token-delay-ms", "1"])
    assert code == 0
    text = capsys.readouterr().out
    assert "gateway: NOT AVAILABLE -- this llmgw's gateway has no --upstream flag yet" in text
    assert "| 2 | direct |" in text and "| 2 | gateway |" not in text
    assert bench.main(["--paths", "direct,gateway", "--concurrency", "2", "--rounds", "1", "--run-seconds", "1",
                       "--min-requests", "4", "--max-tokens", "3", "--token-delay-ms", "1", "--strict"]) == 1


def test_proc_readings_follow_the_process(tmp_path):
    pid = os.getpid()
    fds = bench.open_fds(pid)
    with open(tmp_path / "a", "w"), open(tmp_path / "b", "w"):
        assert bench.open_fds(pid) == fds + 2
    assert bench.rss_bytes(pid) > 10 * 2**20
    cpu = bench.cpu_seconds(pid)
    deadline = time.process_time() + 0.2
    while time.process_time() < deadline:
        pass
    assert bench.cpu_seconds(pid) - cpu >= 0.1
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert child.pid in bench.process_tree(pid)
    finally:
        child.kill()
        child.wait(timeout=10)
    with pytest.raises(OSError):
        bench.rss_bytes(child.pid)  # reaped: gone
