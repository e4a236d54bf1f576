"""OpenAI-upstream benchmark (issue 12 item 7): the gateway streaming straight from an OpenAI-compatible server,
measured the way public gateway benchmarks measure it -- one deterministic mock server, the same load sent to it
directly and through the gateway in the same run, overhead = via gateway - direct.

    python -m llmgw bench openai               # or: python benchmarks/run_openai.py [--quick] [--json out.json]
    python benchmarks/run_openai.py --soak      # 10 minutes at c=64 through the gateway (--soak-seconds)

Processes: the mock (llmgw.testing.mock_openai, on uvloop), the gateway under test (`gateway_command`, the one place
that knows its command line) and, where installed, a peer proxy (LiteLLM's, a benchmark-only extra: see
`litellm_command`), each a subprocess; every measured run is its own load-generator process
(benchmarks/openai_load.py: on uvloop, one keep-alive connection per concurrent request; `--client aiohttp` uses
aiohttp's client instead), so no server shares a Python interpreter with the client. At each concurrency the paths
run in alternating order for `--rounds` rounds and every figure is the median over the rounds; overheads and ratios
are medians of the per-round differences (gateway round k against direct round k), so a noisy stretch of a shared
machine hits both sides of a pair. CPU is read from /proc (utime + stime of the process and its children) around
each run.

Until the gateway has `--upstream`, its half is reported as not available and the direct half still runs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import secrets
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.openai_load import CLIENTS  # noqa: E402 - after the sys.path set-up, as in openai_load.py
from llmgw.cluster import MemberProcess, free_port  # noqa: E402

LOADGEN = ROOT / "benchmarks" / "openai_load.py"
MODEL = "mock-model"
CONCURRENCIES = (1, 16, 64, 256)
Runs = dict[int, dict[str, list[dict[str, Any]]]]  # concurrency -> path name -> one load result per round
LITELLM_ENV = "LLMGW_BENCH_LITELLM"  # path of a `litellm` executable (e.g. in a venv of its own)
DEFAULT_API_KEY = "sk-llmgw-bench"  # the bearer token sent where no other is needed


# ---- the commands (adjust here) ----------------------------------------------------------------------------
def gateway_command(upstream_url: str, *, grpc_port: int, gossip_port: int, http_port: int,
                    extra: Sequence[str] = ()) -> list[str]:
    """The gateway under test, streaming from `upstream_url` and serving the OpenAI API on `http_port`.

    gRPC and gossip get free ports of their own (a gossip port of 0 would mean grpc port + 10000, which can
    collide or overflow when the gRPC port is ephemeral); `local` gossip timing, no seeds: a gateway alone."""
    return [sys.executable, "-m", "llmgw", "gateway", "--id", "gateway-bench", "--host", "127.0.0.1",
            "--port", str(grpc_port), "--gossip-port", str(gossip_port), "--gossip-config", "local",
            "--http-port", str(http_port), "--queue-size", "4096", "--log-level", "WARNING",
            "--upstream", upstream_url, *extra]


def mock_command(token_delay_s: float, first_token_delay_s: float) -> list[str]:
    """The mock on uvloop (its own `main` runs asyncio.run, which takes the loop from the policy), not recording
    request bodies: a long run would otherwise keep them all."""
    boot = ("import asyncio, sys\n"
            "try:\n    import uvloop\n    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())\n"
            "except ImportError:\n    pass\n"
            "from llmgw.testing.mock_openai import main\nmain(sys.argv[1:])\n")
    return [sys.executable, "-c", boot, "--port", "0", "--model", MODEL, "--no-record",
            "--token-delay", repr(token_delay_s), "--first-token-delay", repr(first_token_delay_s)]


def litellm_config(mock_url: str) -> str:
    """LiteLLM proxy config: one model routed to the mock as an OpenAI-compatible server, nothing else on."""
    return (f"model_list:\n  - model_name: {MODEL}\n    litellm_params:\n      model: openai/{MODEL}\n"
            f"      api_base: {mock_url}/v1\n      api_key: sk-llmgw-bench\n"
            "litellm_settings:\n  telemetry: false\n  drop_params: false\n")


def litellm_command(executable: str, config_path: Path, port: int) -> list[str]:
    return [executable, "--config", str(config_path), "--host", "127.0.0.1", "--port", str(port),
            "--num_workers", "1"]


def find_litellm() -> str | None:
    """A `litellm` executable: $LLMGW_BENCH_LITELLM, else next to this Python, else on PATH."""
    candidates = [os.environ.get(LITELLM_ENV, ""), str(Path(sys.executable).parent / "litellm"),
                  shutil.which("litellm") or ""]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


# ---- processes ---------------------------------------------------------------------------------------------
class PathUnavailable(Exception):
    """A path (gateway, peer proxy) could not be started; the message says why, for the report."""


class ServerProcess:
    """A server subprocess (llmgw.cluster.MemberProcess: its own process group, output to a log file, no pipe to
    fill); stopped by `stop()`."""

    def __init__(self, name: str, argv: list[str], workdir: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.process = MemberProcess(argv, workdir / f"{name}.log", name=name, env=env, cwd=ROOT)
        self.log_path = self.process.log_path
        self.proc = self.process.popen
        self.pid = self.process.pid

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        """The first match of `pattern` in the log; PathUnavailable if the process exits or `timeout` passes."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while True:
            found = regex.search(self.log_text())
            if found:
                return found
            if self.proc.poll() is not None:
                raise PathUnavailable(f"{self.name} exited with status {self.proc.returncode}: "
                                      f"{_tail(self.log_text())}")
            if time.monotonic() > deadline:
                raise PathUnavailable(f"{self.name} printed no {pattern!r} within {timeout:g} s: "
                                      f"{_tail(self.log_text())}")
            time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM to the process group, up to `timeout` s, then SIGKILL of the group."""
        self.process.stop(timeout)


def _tail(text: str, lines: int = 6) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])[:800]


def free_tcp_port() -> int:
    return free_port("127.0.0.1")


def free_udp_port() -> int:
    return free_port("127.0.0.1", socket.SOCK_DGRAM)


def wait_http_ok(url: str, timeout: float, check: Callable[[bytes], bool] = lambda body: True) -> None:
    """Poll GET `url` until it answers 200 with a body `check` accepts; PathUnavailable after `timeout`."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2.0) as response:  # a loopback URL built here
                body = response.read()
                if response.status == 200 and check(body):
                    return
                last = f"HTTP {response.status}: {body[:200]!r}"
        except (urllib.error.URLError, OSError) as exc:
            last = str(exc)
        time.sleep(0.1)
    raise PathUnavailable(f"GET {url} not ready within {timeout:g} s (last: {last})")


def lists_model(body: bytes) -> bool:
    try:
        return any(m.get("id") == MODEL for m in json.loads(body).get("data", []))
    except (ValueError, AttributeError):
        return False


# /proc readings (Linux): CPU of a process and its children, resident memory, open descriptors.
def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            out += [int(c) for c in task.read_text().split()]
    return out


def process_tree(pid: int) -> list[int]:
    tree, frontier = [pid], [pid]
    while frontier:
        frontier = [c for p in frontier for c in _children(p)]
        tree += frontier
    return tree


def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` and its live descendants (0 for a process that is gone)."""
    total = 0
    for p in process_tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def _per_process(pid: int, read: Callable[[int], int]) -> int:
    """`read` summed over `pid` (OSError if it is gone) and its descendants (one that just exited counts 0)."""
    total = read(pid)
    for child in process_tree(pid)[1:]:
        with contextlib.suppress(OSError):
            total += read(child)
    return total


def _vm_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise OSError(f"no VmRSS for pid {pid}")


def rss_bytes(pid: int) -> int:
    """Resident memory of `pid` and its descendants (a gateway's --workers are its children)."""
    return _per_process(pid, _vm_rss)


def open_fds(pid: int) -> int:
    """Open file descriptors of `pid` and its descendants."""
    return _per_process(pid, lambda p: len(os.listdir(f"/proc/{p}/fd")))


QUIET_CPU_SHARE = 0.05  # of one core, the servers together: below this they are idle (timers, health checks)
QUIET_WINDOW_S = 0.5
SETTLE_TIMEOUT_S = 60.0


def settle(pids: Sequence[int], *, quiet_share: float = QUIET_CPU_SHARE, window_s: float = QUIET_WINDOW_S,
           timeout_s: float = SETTLE_TIMEOUT_S, clock: Callable[[], float] = time.monotonic,
           sleep: Callable[[float], None] = time.sleep, cpu: Callable[[int], float] | None = None) -> float:
    """Wait until the servers `pids` (with their descendants) together use less than `quiet_share` of a core over
    `window_s`, at most `timeout_s`; returns the seconds waited. A run must not start while a server is still
    busy from the one before (a proxy that fell seconds behind at c=256 working through its backlog after its
    load generator has gone) on the cores this run needs. With the bystanders' CPU that measure() records, it
    also shows when a run was clean: on this machine every server was idle within the first window, and stayed
    under 1% of a core while the other paths ran."""
    read = cpu_seconds if cpu is None else cpu
    started = clock()
    while True:
        before = sum(read(pid) for pid in pids)
        sleep(window_s)
        used = sum(read(pid) for pid in pids) - before
        waited = clock() - started
        if used < quiet_share * window_s or waited >= timeout_s:
            return waited


# ---- paths -------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LoadPath:
    name: str  # "direct", "gateway", "litellm"
    url: str  # base URL the load generator sends to
    pid: int | None  # the process serving it (the mock's, for direct); None when this run did not start it
    api_key: str = DEFAULT_API_KEY  # sent as the bearer token


def start_mock(workdir: Path, args: argparse.Namespace) -> tuple[ServerProcess, str]:
    mock = ServerProcess("mock", mock_command(args.token_delay_ms / 1000.0, args.first_token_delay_ms / 1000.0),
                         workdir)
    try:
        url = mock.wait_for(r"(http://127\.0\.0\.1:\d+)", 30.0).group(1)
        wait_http_ok(url + "/v1/models", 10.0, lists_model)
    except PathUnavailable:
        mock.stop()
        raise
    return mock, url


def help_lists_upstream(help_text: str) -> bool:
    """Whether a --help text offers `--upstream` itself (not only longer flags such as --upstream-batch)."""
    return re.search(r"--upstream(?![\w-])", help_text) is not None


def gateway_lacks_upstream_flag() -> str | None:
    """Why the installed gateway cannot stream from an OpenAI upstream yet, or None when its --help lists
    `--upstream`. Asked before starting it because argparse takes `--upstream URL` as an abbreviation of
    `--upstream-batch` and fails with a confusing "invalid int value" instead of "unrecognized arguments"."""
    try:
        shown = subprocess.run([sys.executable, "-m", "llmgw", "gateway", "--help"], capture_output=True, text=True,
                               timeout=60, cwd=ROOT, check=False)
    except subprocess.TimeoutExpired:
        return "`python -m llmgw gateway --help` did not answer within 60 s"
    if help_lists_upstream(shown.stdout):
        return None
    return "this llmgw's gateway has no --upstream flag yet (`python -m llmgw gateway --help` lists none)"


def start_gateway(workdir: Path, mock_url: str, extra: Sequence[str], ready_timeout: float
                  ) -> tuple[ServerProcess, str]:
    lacking = gateway_lacks_upstream_flag()
    if lacking is not None:
        raise PathUnavailable(lacking)
    argv = gateway_command(mock_url, grpc_port=free_tcp_port(), gossip_port=free_udp_port(),
                           http_port=free_tcp_port(), extra=extra)
    gateway = ServerProcess("gateway", argv, workdir)
    try:
        try:
            url = gateway.wait_for(r"READY gateway .* http=(\S+)", ready_timeout).group(1)
        except PathUnavailable as exc:
            missing = re.search(r"unrecognized arguments:.*--upstream", gateway.log_text())
            if missing:
                raise PathUnavailable("this llmgw's gateway has no --upstream flag yet "
                                      f"(argparse: {missing.group(0)[:120]})") from exc
            raise
        # Ready to serve only once it knows the mock's model (an upstream given by URL learns it from /v1/models).
        wait_http_ok(url.rstrip("/") + "/v1/models", ready_timeout, lists_model)
    except PathUnavailable:
        gateway.stop()
        raise
    return gateway, url.rstrip("/")


def start_litellm(workdir: Path, mock_url: str, executable: str, ready_timeout: float
                  ) -> tuple[ServerProcess, str, str]:
    config = workdir / "litellm.yaml"
    config.write_text(litellm_config(mock_url))
    port = free_tcp_port()
    # No network at start-up (the cost map ships with the package), no telemetry, quiet logs.
    # It refuses to start without a strong master key; clients then send it as their bearer token.
    master_key = "sk-" + secrets.token_hex(32)
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_TELEMETRY": "False",
           "LITELLM_LOG": "ERROR", "LITELLM_MODE": "PRODUCTION", "LITELLM_MASTER_KEY": master_key}
    proxy = ServerProcess("litellm", litellm_command(executable, config, port), workdir, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if proxy.proc.poll() is not None:
                raise PathUnavailable(f"litellm exited with status {proxy.proc.returncode}: "
                                      f"{_tail(proxy.log_text())}")
            try:
                wait_http_ok(url + "/health/liveliness", 1.0)
                break
            except PathUnavailable:
                if time.monotonic() > deadline:
                    raise PathUnavailable(f"litellm not live within {ready_timeout:g} s: "
                                          f"{_tail(proxy.log_text())}") from None
    except PathUnavailable:
        proxy.stop()
        raise
    return proxy, url, master_key


# ---- measuring -----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RunSize:
    requests: int
    seconds: float
    max_tokens: int
    request_timeout_s: float
    client: str = "lean"  # the load generator's HTTP client (openai_load.CLIENTS)


def run_loadgen(url: str, concurrency: int, size: RunSize, workdir: Path, *, api_key: str = DEFAULT_API_KEY,
                warmup: int | None = None, on_tick: Callable[[float], None] | None = None,
                tick_s: float = 5.0) -> dict[str, Any]:
    """One load-generator process against `url`; its JSON result. `on_tick(elapsed_s)` is called about every
    `tick_s` seconds while it runs (the soak samples the gateway there)."""
    out = workdir / f"load-{time.monotonic_ns()}.json"
    argv = [sys.executable, str(LOADGEN), "--url", url, "--concurrency", str(concurrency),
            "--requests", str(size.requests), "--duration", repr(size.seconds), "--max-tokens", str(size.max_tokens),
            "--request-timeout", repr(size.request_timeout_s), "--api-key", api_key, "--client", size.client,
            "--out", str(out)]
    if warmup is not None:
        argv += ["--warmup", str(warmup)]
    # Bound: import + warm-up + the run + requests in flight at its deadline + the warm-up's worst case.
    limit = 60.0 + size.seconds + 2 * size.request_timeout_s
    started = time.monotonic()
    errors_path = out.with_suffix(".err")  # a file, not a pipe: nobody reads a pipe while the run goes on
    with open(errors_path, "wb") as errors:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=errors, cwd=ROOT)
    try:
        next_tick = tick_s
        while proc.poll() is None:
            elapsed = time.monotonic() - started
            if elapsed > limit:
                raise RuntimeError(f"load generator still running after {limit:g} s")
            if on_tick is not None and elapsed >= next_tick:
                on_tick(elapsed)
                next_tick += tick_s
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
    stderr = errors_path.read_text(errors="replace")
    errors_path.unlink()
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"load generator failed (exit {proc.returncode}): {_tail(stderr)}")
    result: dict[str, Any] = json.loads(out.read_text())
    out.unlink()
    return result


def measure(path: LoadPath, mock_pid: int | None, concurrency: int, size: RunSize, workdir: Path,
            bystanders: Sequence[int] = ()) -> dict[str, Any]:
    """One run of `path` at `concurrency`, with the CPU its process, the mock and the `bystanders` (the servers
    of the other paths, idle if the run is clean) used during it."""
    # Direct, the path's process is the mock itself: reported once, as the mock's.
    pids = {key: pid for key, pid in (("path", None if path.name == "direct" else path.pid), ("mock", mock_pid))
            if pid is not None}
    others = [pid for pid in bystanders if pid not in pids.values()]
    others_before = sum(cpu_seconds(pid) for pid in others)
    before = {key: cpu_seconds(pid) for key, pid in pids.items()}
    result = run_loadgen(path.url, concurrency, size, workdir, api_key=path.api_key)
    # CPU over the warm-up and the run (the servers idle while the load generator starts), per request of both.
    busy_s = result["wall_s"] + result["warmup_wall_s"]
    served = result["requests"] + result["warmup_requests"]
    for key, pid in pids.items():
        used = cpu_seconds(pid) - before[key]
        if used < 0:  # the process died during the run (its errors are in the result): no CPU figure
            used = float("nan")
        result[f"{key}_cpu_share"] = used / busy_s if busy_s > 0 else float("nan")
        result[f"{key}_cpu_ms_per_request"] = used * 1000.0 / served if served else float("nan")
    if others:
        used = sum(cpu_seconds(pid) for pid in others) - others_before
        result["bystander_cpu_share"] = max(0.0, used) / busy_s if busy_s > 0 else float("nan")
    return result


def rotated(paths: Sequence[LoadPath], k: int) -> list[LoadPath]:
    """Round k's order: the paths rotated by k, so no path always runs first (or right after another)."""
    k %= len(paths)
    return list(paths[k:]) + list(paths[:k])


def run_size(concurrency: int, args: argparse.Namespace) -> RunSize:
    return RunSize(requests=max(args.min_requests, concurrency * args.requests_per_connection),
                   seconds=args.run_seconds, max_tokens=args.max_tokens, request_timeout_s=args.request_timeout,
                   client=args.client)


def run_matrix(paths: Sequence[LoadPath], mock_pid: int | None, concurrencies: Sequence[int], rounds: int,
               args: argparse.Namespace, workdir: Path, log: Callable[[str], None]) -> Runs:
    """concurrency -> path name -> one result per round, the paths alternating within each round."""
    runs: Runs = {}
    # Every run starts with all servers idle (settle), and the others' CPU during it is recorded (bystander).
    servers = sorted({pid for pid in [mock_pid, *(p.pid for p in paths)] if pid is not None})
    for c in concurrencies:
        runs[c] = {p.name: [] for p in paths}
        size = run_size(c, args)
        for k in range(rounds):
            for path in rotated(paths, k):
                settled_s = settle(servers)
                result = measure(path, mock_pid, c, size, workdir, bystanders=servers)
                result["settle_s"] = settled_s
                runs[c][path.name].append(result)
                log(f"c={c} round {k + 1}/{rounds} {path.name}: {result['ok']} ok, {result['error_count']} errors, "
                    f"{result['requests_per_s']:.1f} req/s, TTFT p50 {result['ttft_ms']['p50']:.2f} ms"
                    + (f" (after {settled_s:.1f} s for the servers to go idle)" if settled_s > 2.0 else ""))
    return runs


# ---- figures -------------------------------------------------------------------------------------------------
def median(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return statistics.median(finite) if finite else float("nan")


def path_summary(rounds: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the rounds of each round's figures; errors are summed (every one counts)."""
    kinds: dict[str, int] = {}
    for r in rounds:
        for kind, n in r["errors"].items():
            kinds[kind] = kinds.get(kind, 0) + n
    out: dict[str, Any] = {
        "rounds": len(rounds),
        "ttft_p50_ms": median([r["ttft_ms"]["p50"] for r in rounds]),
        "ttft_p99_ms": median([r["ttft_ms"]["p99"] for r in rounds]),
        "inter_chunk_p99_ms": median([r["inter_chunk_ms"]["p99"] for r in rounds]),
        "requests_per_s": median([r["requests_per_s"] for r in rounds]),
        "requests": sum(r["requests"] for r in rounds),
        "errors": sum(r["error_count"] for r in rounds) + sum(sum(r["warmup_errors"].values()) for r in rounds),
        "error_kinds": kinds,
        "error_samples": [s for r in rounds for s in r["error_samples"]][:5],
        "loadgen_cpu_share": median([r["loadgen_cpu_share"] for r in rounds]),
    }
    for key in ("path_cpu_share", "path_cpu_ms_per_request", "mock_cpu_share", "bystander_cpu_share", "settle_s"):
        values = [r[key] for r in rounds if key in r]
        out[key] = median(values) if values else None
    return out


def overhead(direct: Sequence[dict[str, Any]], via: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Round k of `via` against round k of direct: medians of the per-round differences and ratios."""
    pairs = list(zip(direct, via, strict=True))
    return {
        "added_ttft_p50_ms": median([v["ttft_ms"]["p50"] - d["ttft_ms"]["p50"] for d, v in pairs]),
        "added_ttft_p99_ms": median([v["ttft_ms"]["p99"] - d["ttft_ms"]["p99"] for d, v in pairs]),
        "added_inter_chunk_p99_ms": median([v["inter_chunk_ms"]["p99"] - d["inter_chunk_ms"]["p99"] for d, v in pairs]),
        "rps_ratio": median([v["requests_per_s"] / d["requests_per_s"] if d["requests_per_s"] else float("nan")
                             for d, v in pairs]),
    }


@dataclasses.dataclass(frozen=True)
class Target:
    concurrency: int
    text: str
    check: Callable[[dict[str, float], dict[str, Any]], bool]  # (overhead, the path's summary) -> met


TARGETS = (
    Target(1, "c=1: added TTFT p50 <= 1.0 ms", lambda o, s: o["added_ttft_p50_ms"] <= 1.0),
    Target(64, "c=64: requests/s >= 0.95x direct", lambda o, s: o["rps_ratio"] >= 0.95),
    Target(64, "c=64: TTFT p99 <= direct + 20 ms", lambda o, s: o["added_ttft_p99_ms"] <= 20.0),
    Target(256, "c=256: 0 errors", lambda o, s: s["errors"] == 0),
    Target(256, "c=256: requests/s >= 0.9x direct", lambda o, s: o["rps_ratio"] >= 0.9),
)


def summarize(runs: Runs) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for c, by_path in runs.items():
        entry: dict[str, Any] = {name: path_summary(rounds) for name, rounds in by_path.items()}
        if "direct" in by_path:
            entry["overhead"] = {name: overhead(by_path["direct"], rounds)
                                 for name, rounds in by_path.items() if name != "direct"}
        summary[str(c)] = entry
    return summary


def target_verdicts(summary: dict[str, Any], path: str) -> list[tuple[str, str]]:
    """(target, verdict) for `path`: "met (...)", "NOT met (...)" or "n/a (why)"."""
    out = []
    for t in TARGETS:
        entry = summary.get(str(t.concurrency))
        if entry is None or path not in entry.get("overhead", {}):
            out.append((t.text, "n/a (not measured)"))
            continue
        o, s = entry["overhead"][path], entry[path]
        figures = (f"added p50 {o['added_ttft_p50_ms']:+.2f} ms, p99 {o['added_ttft_p99_ms']:+.2f} ms, "
                   f"{o['rps_ratio']:.3f}x req/s, {s['errors']} errors")
        out.append((t.text, f"{'met' if t.check(o, s) else 'NOT met'} ({figures})"))
    return out


# ---- soak ------------------------------------------------------------------------------------------------------
def linear_slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ys over xs (NaN for fewer than two distinct xs)."""
    if len(xs) != len(ys):
        raise ValueError("xs and ys differ in length")
    if len(set(xs)) < 2:
        return float("nan")
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return (math.fsum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
            / math.fsum((x - mx) ** 2 for x in xs))


def soak_figures(samples: Sequence[dict[str, float]], baseline_s: float) -> dict[str, Any]:
    """RSS growth and fd drift after `baseline_s` (the warm-up minute), from samples of {t, rss, fds}."""
    after = [s for s in samples if s["t"] >= baseline_s]
    if len(after) < 2:
        return {"baseline_s": baseline_s, "samples_after_baseline": len(after)}
    base, last = after[0], after[-1]
    fd_slope_per_s = linear_slope([s["t"] for s in after], [s["fds"] for s in after])
    window_s = last["t"] - base["t"]
    return {
        "baseline_s": baseline_s, "samples_after_baseline": len(after),
        "rss_at_baseline_mb": base["rss"] / 2**20, "rss_last_mb": last["rss"] / 2**20,
        "rss_max_mb": max(s["rss"] for s in after) / 2**20,
        "rss_growth_pct": (last["rss"] - base["rss"]) * 100.0 / base["rss"],
        "rss_max_growth_pct": (max(s["rss"] for s in after) - base["rss"]) * 100.0 / base["rss"],
        "fds_at_baseline": base["fds"], "fds_last": last["fds"],
        "fds_min": min(s["fds"] for s in after), "fds_max": max(s["fds"] for s in after),
        "fd_slope_per_min": fd_slope_per_s * 60.0,
        # The fitted drift over the whole window: a leak of one fd per few requests shows as hundreds.
        "fd_drift_over_window": fd_slope_per_s * window_s,
    }


SOAK_FD_TOLERANCE = 8  # descriptors: a pool opening or closing a few keep-alive connections is not a leak


def soak_verdicts(result: dict[str, Any]) -> list[tuple[str, str]]:
    f = result["figures"]
    if "rss_growth_pct" not in f:
        return [("soak", "n/a (too short to have samples after the baseline)")]
    def verdict(met: bool) -> str:
        return "met" if met else "NOT met"

    errors = f"{verdict(result['errors'] == 0)} ({result['errors']} of {result['requests']} requests)"
    rss = (f"{verdict(f['rss_growth_pct'] <= 10.0)} ({f['rss_growth_pct']:+.1f}%: {f['rss_at_baseline_mb']:.1f} -> "
           f"{f['rss_last_mb']:.1f} MB, max {f['rss_max_mb']:.1f} MB)")
    fds = (f"{verdict(abs(f['fd_drift_over_window']) <= SOAK_FD_TOLERANCE)} (slope {f['fd_slope_per_min']:+.2f}/min, "
           f"fitted drift {f['fd_drift_over_window']:+.1f} over the window, {f['fds_min']}..{f['fds_max']})")
    return [("0 errors", errors), (f"RSS growth <= 10% after the first {f['baseline_s']:.0f} s", rss),
            ("open fds flat", fds)]


def run_soak(path: LoadPath, concurrency: int, seconds: float, args: argparse.Namespace, workdir: Path,
             log: Callable[[str], None]) -> dict[str, Any]:
    """`seconds` of load at `concurrency` through `path`, sampling its process's RSS and fds every
    `--soak-sample-s` seconds."""
    if path.pid is None:
        raise PathUnavailable(f"soak through {path.name}: no process id to sample (give --gateway-pid)")
    pid = path.pid
    samples: list[dict[str, float]] = []
    started = time.monotonic()

    def sample(_elapsed: float) -> None:
        if time.monotonic() - started > seconds:
            return  # the load is winding down (in-flight requests finishing, then the pool closing): not steady
        try:
            samples.append({"t": time.monotonic() - started, "rss": rss_bytes(pid), "fds": open_fds(pid)})
        except OSError as exc:
            raise RuntimeError(f"{path.name} (pid {pid}) is gone: {exc}") from exc
        if len(samples) % 12 == 0:
            s = samples[-1]
            log(f"soak t={s['t']:.0f}s rss={s['rss'] / 2**20:.1f} MB fds={s['fds']:.0f}")

    sample(0.0)
    # Every request the machine can serve within the time: the duration is the bound that stops it.
    size = RunSize(requests=concurrency * int(seconds) * 1000 + 1, seconds=seconds, max_tokens=args.max_tokens,
                   request_timeout_s=args.request_timeout, client=args.client)
    result = run_loadgen(path.url, concurrency, size, workdir, api_key=path.api_key, on_tick=sample,
                         tick_s=args.soak_sample_s)
    baseline = min(60.0, seconds / 6.0)
    return {"path": path.name, "concurrency": concurrency, "seconds": seconds, "requests": result["requests"],
            "ok": result["ok"], "errors": result["error_count"] + sum(result["warmup_errors"].values()),
            "error_kinds": result["errors"], "error_samples": result["error_samples"],
            "requests_per_s": result["requests_per_s"], "ttft_ms": result["ttft_ms"],
            "inter_chunk_ms": result["inter_chunk_ms"], "samples": samples,
            "figures": soak_figures(samples, baseline)}


# ---- report ------------------------------------------------------------------------------------------------
def _fmt(x: float | None, nd: int = 1) -> str:
    return "n/a" if x is None or x != x else f"{x:,.{nd}f}"


def _pct(x: float | None) -> str:
    return "n/a" if x is None or x != x else f"{x * 100:.0f}%"


def report(results: dict[str, Any]) -> str:
    lines: list[str] = []
    m = results["machine"]
    w = results["workload"]
    lines.append(f"{m['cpus']} CPUs; 1-minute load average at start / end: {m['loadavg_1m_at_start']:.1f} / "
                 f"{_fmt(m.get('loadavg_1m_at_end'))}. Mock: {w['max_tokens']} tokens per answer, "
                 f"{w['token_delay_ms']:g} ms/token, first token after {w['first_token_delay_ms']:g} ms; "
                 "streamed chat; every answer's text checked.")
    if "summary" in results:
        lines.append(f"Per run: <= {w['requests_per_connection']} requests per connection (at least "
                     f"{w['min_requests']}) or {w['run_seconds']:g} s; medians of {w['rounds']} alternating rounds.")
    for name, why in results.get("unavailable", {}).items():
        lines.append(f"{name}: NOT AVAILABLE -- {why}")
    summary = results.get("summary", {})
    if summary:
        lines += ["", ("| c | path | TTFT p50 / p99 (ms) | inter-chunk p99 (ms) | requests/s | errors | "
                       "CPU: path process / mock / load generator |"), "|---|---|---|---|---|---|---|"]
        for c, entry in summary.items():
            for name, s in entry.items():
                if name == "overhead":
                    continue
                cpu = (f"{_pct(s['path_cpu_share'])} ({_fmt(s['path_cpu_ms_per_request'], 2)} ms/request)"
                       if s.get("path_cpu_share") is not None else "-")
                errors = str(s["errors"]) + (f" {s['error_kinds']}" if s["error_kinds"] else "")
                lines.append(f"| {c} | {name} | {_fmt(s['ttft_p50_ms'], 2)} / {_fmt(s['ttft_p99_ms'], 2)} | "
                             f"{_fmt(s['inter_chunk_p99_ms'], 2)} | {_fmt(s['requests_per_s'])} | {errors} | "
                             f"{cpu} / {_pct(s.get('mock_cpu_share'))} / {_pct(s['loadgen_cpu_share'])} |")
        busy = [f"c={c} {name} {_pct(s['bystander_cpu_share'])}" for c, entry in summary.items()
                for name, s in entry.items()
                if name != "overhead" and (s.get("bystander_cpu_share") or 0.0) > QUIET_CPU_SHARE]
        if busy:
            lines.append("the other paths' servers were not idle during these runs (median CPU): " + ", ".join(busy))
        samples = [smp for entry in summary.values() for name, s in entry.items() if name != "overhead"
                   for smp in s["error_samples"]]
        if samples:
            lines.append("first errors: " + " || ".join(samples[:3]))
        compared = sorted({name for entry in summary.values() for name in entry.get("overhead", {})})
        for name in compared:
            lines += ["", f"targets, {name} vs direct (same run):"]
            lines += [f"  {text}: {verdict}" for text, verdict in target_verdicts(summary, name)]
    soak = results.get("soak")
    if soak:
        lines += ["", (f"soak: {soak['seconds']:g} s at c={soak['concurrency']} through {soak['path']}: "
                       f"{soak['ok']} ok, {soak['errors']} errors, {_fmt(soak['requests_per_s'])} requests/s, "
                       f"TTFT p99 {_fmt(soak['ttft_ms']['p99'], 2)} ms; {len(soak['samples'])} samples "
                       f"(baseline after {soak['figures']['baseline_s']:.0f} s)")]
        lines += [f"  {text}: {verdict}" for text, verdict in soak_verdicts(soak)]
        if soak["error_samples"]:
            lines.append("  first errors: " + " || ".join(soak["error_samples"][:3]))
    return "\n".join(lines)


def all_targets_met(results: dict[str, Any]) -> bool:
    verdicts = target_verdicts(results["summary"], "gateway") if results.get("summary") else []
    if results.get("soak"):
        verdicts += soak_verdicts(results["soak"])
    return bool(verdicts) and all(v.startswith("met") for _, v in verdicts)


# ---- main --------------------------------------------------------------------------------------------------
def _concurrencies(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"concurrencies must be integers >= 1, got {text!r}")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench openai", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2 short rounds (smoke run, not for figures)")
    p.add_argument("--concurrency", type=_concurrencies, default=list(CONCURRENCIES), metavar="C,C,...",
                   help="concurrencies to measure (default 1,16,64,256)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per concurrency (medians reported)")
    # Runs of 10-20 s: on a shared 2-core machine a noisy spell of a few seconds moves a 4 s run's requests/s by
    # 5-10%, and a c=1 run's TTFT median needs its ~60 samples to be steady to a tenth of a millisecond.
    p.add_argument("--run-seconds", type=float, default=20.0, help="upper bound on one measured run")
    p.add_argument("--requests-per-connection", type=int, default=30,
                   help="upper bound on one run's requests: this many per connection ...")
    p.add_argument("--min-requests", type=int, default=100, help="... but at least this many")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens per answer")
    # 20 ms/token (50 tokens/s, a real model's pace): at c=256 the mock and the load generator then leave more
    # than a core to the path under test; at 5 ms they alone fill both cores of a 2-core machine.
    p.add_argument("--token-delay-ms", type=float, default=20.0, help="the mock's delay before each token")
    p.add_argument("--first-token-delay-ms", type=float, default=0.0, help="the mock's extra delay before the first")
    p.add_argument("--request-timeout", type=float, default=60.0, help="seconds for one whole answer")
    p.add_argument("--client", choices=CLIENTS, default="lean",
                   help="the load generator's HTTP client: lean (one hand-held connection per worker) or aiohttp")
    p.add_argument("--paths", default="direct,gateway,litellm",
                   help="comma-separated paths: direct, gateway, litellm (litellm only where installed)")
    p.add_argument("--mock-url", default="", help="use this running mock instead of starting one")
    p.add_argument("--gateway-url", default="",
                   help="use this running gateway (its upstream must be --mock-url) instead of starting one")
    p.add_argument("--gateway-pid", type=int, default=None, help="pid of --gateway-url's process (CPU, soak)")
    p.add_argument("--api-key", default=DEFAULT_API_KEY, help="bearer token sent to the gateway")
    p.add_argument("--gateway-args", default="", help="extra flags for the started gateway, e.g. '--workers 2'")
    p.add_argument("--litellm", default="", help=f"litellm executable (default: ${LITELLM_ENV}, then PATH)")
    p.add_argument("--ready-timeout", type=float, default=60.0, help="seconds a started server has to get ready")
    p.add_argument("--soak", action="store_true", help="run the soak (instead of the concurrency matrix)")
    p.add_argument("--soak-seconds", type=float, default=600.0)
    p.add_argument("--soak-concurrency", type=int, default=64)
    p.add_argument("--soak-path", default="gateway", choices=("gateway", "direct", "litellm"),
                   help="the path soaked (direct samples the mock: a check of the soak itself)")
    p.add_argument("--soak-sample-s", type=float, default=5.0, help="seconds between RSS / fd samples")
    p.add_argument("--strict", action="store_true", help="exit 1 unless the gateway ran and met every target")
    p.add_argument("--json", default="", help="also write the raw results to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.run_seconds, args.requests_per_connection, args.min_requests = 2, 3.0, 4, 50
        args.soak_seconds = min(args.soak_seconds, 30.0)
    args.paths = [x.strip() for x in args.paths.split(",") if x.strip()]
    bad = [x for x in args.paths if x not in ("direct", "gateway", "litellm")]
    if bad or "direct" not in args.paths:
        p.error(f"--paths must include direct and may add gateway, litellm; got {args.paths}")
    for name in ("rounds", "requests_per_connection", "min_requests", "max_tokens", "soak_concurrency"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("run_seconds", "request_timeout", "ready_timeout", "soak_seconds", "soak_sample_s"):
        if not getattr(args, name) > 0:
            p.error(f"--{name.replace('_', '-')} must be > 0")
    if args.token_delay_ms < 0 or args.first_token_delay_ms < 0:
        p.error("delays must be >= 0")
    try:
        shlex.split(args.gateway_args)
    except ValueError as exc:
        p.error(f"--gateway-args: {exc}")
    if args.gateway_url and not args.mock_url:
        p.error("--gateway-url needs --mock-url (the mock that gateway streams from): overhead is only "
                "meaningful against the same server")
    return args


@contextlib.contextmanager
def started_paths(args: argparse.Namespace, workdir: Path, unavailable: dict[str, str],
                  wanted: Sequence[str]) -> Iterator[tuple[list[LoadPath], int | None]]:
    """Start the mock and every wanted path that can start (the others go to `unavailable` with the reason);
    stops everything it started on exit."""
    started: list[ServerProcess] = []
    try:
        if args.mock_url:
            mock_url, mock_pid = args.mock_url.rstrip("/"), None
            wait_http_ok(mock_url + "/v1/models", 10.0, lists_model)
        else:
            mock, mock_url = start_mock(workdir, args)
            started.append(mock)
            mock_pid = mock.pid
        paths = [LoadPath("direct", mock_url, mock_pid)] if "direct" in wanted else []
        if "gateway" in wanted:
            if args.gateway_url:
                paths.append(LoadPath("gateway", args.gateway_url.rstrip("/"), args.gateway_pid, args.api_key))
            else:
                try:
                    gateway, url = start_gateway(workdir, mock_url, shlex.split(args.gateway_args),
                                                 args.ready_timeout)
                    started.append(gateway)
                    paths.append(LoadPath("gateway", url, gateway.pid, args.api_key))
                except PathUnavailable as exc:
                    unavailable["gateway"] = str(exc)
        if "litellm" in wanted:
            executable = args.litellm or find_litellm()
            if executable is None:
                unavailable["litellm"] = (f"not installed (a benchmark-only extra: put a `litellm` executable on "
                                          f"PATH or name it with --litellm / ${LITELLM_ENV})")
            else:
                try:
                    proxy, url, key = start_litellm(workdir, mock_url, executable, max(args.ready_timeout, 120.0))
                    started.append(proxy)
                    paths.append(LoadPath("litellm", url, proxy.pid, key))
                except PathUnavailable as exc:
                    unavailable["litellm"] = str(exc)
        yield paths, mock_pid
    finally:
        for process in reversed(started):
            process.stop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def log(text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "loadavg_1m_at_start": os.getloadavg()[0]},
        "workload": {"client": args.client, "max_tokens": args.max_tokens, "token_delay_ms": args.token_delay_ms,
                     "first_token_delay_ms": args.first_token_delay_ms, "rounds": args.rounds,
                     "run_seconds": args.run_seconds, "requests_per_connection": args.requests_per_connection,
                     "min_requests": args.min_requests},
        "unavailable": {},
    }
    with tempfile.TemporaryDirectory(prefix="llmgw-bench-openai-") as tmp:
        workdir = Path(tmp)
        wanted = ["direct", args.soak_path] if args.soak else args.paths
        try:
            with started_paths(args, workdir, results["unavailable"], wanted) as (paths, mock_pid):
                if args.soak:
                    soaked = next((p for p in paths if p.name == args.soak_path), None)
                    if soaked is not None:
                        log(f"soak: {args.soak_seconds:g} s at c={args.soak_concurrency} through {soaked.name}")
                        results["soak"] = run_soak(soaked, args.soak_concurrency, args.soak_seconds, args, workdir,
                                                   log)
                else:
                    runs = run_matrix(paths, mock_pid, args.concurrency, args.rounds, args, workdir, log)
                    results["runs"] = {str(c): v for c, v in runs.items()}
                    results["summary"] = summarize(runs)
        except PathUnavailable as exc:  # the mock itself did not start: nothing can be measured
            print(f"bench openai: {exc}", file=sys.stderr)
            return 2
        except RuntimeError as exc:  # a load generator failed or hung, or the soaked process died
            print(f"bench openai: {exc}", file=sys.stderr)
            return 1
    results["machine"]["loadavg_1m_at_end"] = os.getloadavg()[0]
    print(report(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    if args.strict:
        return 0 if all_targets_met(results) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
