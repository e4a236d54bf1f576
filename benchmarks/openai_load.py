"""Load generator for `bench openai`: streamed chat completions against an OpenAI-compatible base URL.

    python benchmarks/openai_load.py --url http://127.0.0.1:8000 --concurrency 64 --requests 2000 --duration 20

`concurrency` workers share one aiohttp connection pool of exactly that many keep-alive connections and send
requests back to back until `requests` have been sent or `duration` seconds have passed (both bounds always
apply; a request in flight at the deadline finishes, bounded by `--request-timeout`). Before the clock starts,
`warmup` requests (default: one per connection) open the pool. Prints one JSON object (see `LoadResult`).

Per request it measures TTFT (request sent -> first event carrying content), every gap between content events
(events that arrive in one read share its timestamp: a gateway that coalesces ready chunks into one write shows
0 gaps, as a client would see them) and the total time. The answer is checked in full: the deterministic mock
(llmgw.testing.mock_openai) answers every prompt with a text known in advance, so anything other than HTTP 200,
well-formed events, that exact text, a finish_reason and exactly one final `data: [DONE]` counts as an error of
the kind named in `ErrorKind`. Runs on uvloop (llmgw.eventloop) in its own process, apart from the servers it
measures.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import sys
import time
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402 - after the sys.path set-up, so the script also runs from outside the checkout

from llmgw.testing.mock_openai import expected_text, render_chat  # noqa: E402
from llmgw.upstream.sse import DONE, SSEError, SSEParser, decode_openai_event  # noqa: E402

CHAT_PATH = "/v1/chat/completions"
ERROR_SAMPLES = 5  # error messages kept verbatim in the result (the counts cover all of them)


class ErrorKind:
    """Why a request counts as failed (the keys of LoadResult.errors)."""
    HTTP_STATUS = "http_status"  # anything but 200
    ERROR_EVENT = "error_event"  # an `{"error": ...}` or `{"object": "error"}` event inside the stream
    MALFORMED = "malformed_event"  # data that is not a JSON object, or a byte stream that is not SSE
    DATA_AFTER_DONE = "data_after_done"  # anything but the end of the stream after `data: [DONE]`
    MISSING_DONE = "missing_done"  # the stream ended without `data: [DONE]`
    WRONG_TEXT = "wrong_text"  # the assembled content differs from the mock's deterministic answer
    NO_FINISH_REASON = "no_finish_reason"  # right text, [DONE], but no choice ever carried a finish_reason
    CONNECTION = "connection"  # refused, reset, cut mid-body (aiohttp.ClientError)
    TIMEOUT = "timeout"  # no complete answer within --request-timeout


@dataclasses.dataclass(frozen=True)
class LoadSpec:
    url: str  # base URL: requests go to url + /v1/chat/completions
    concurrency: int
    requests: int  # at most this many measured requests ...
    duration_s: float  # ... and no new request after this many seconds
    max_tokens: int = 16
    model: str = "mock-model"
    prompts: int = 256  # distinct prompts, cycled (their answers are computed before the clock starts)
    warmup: int | None = None  # None = one request per pooled connection
    request_timeout_s: float = 60.0
    api_key: str = "sk-llmgw-bench"

    def validate(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https://, got {self.url!r}")
        for name in ("concurrency", "requests", "max_tokens", "prompts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if not (self.duration_s > 0 and math.isfinite(self.duration_s)):
            raise ValueError(f"duration_s must be a finite number > 0, got {self.duration_s!r}")
        if not self.request_timeout_s > 0:
            raise ValueError(f"request_timeout_s must be > 0, got {self.request_timeout_s!r}")
        if self.warmup is not None and self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup!r}")


# ---- statistics -------------------------------------------------------------------------------------------
def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between closest ranks (numpy's default, and
    statistics.quantiles(method="inclusive")); NaN for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within [0, 100], got {q!r}")
    if not values:
        return float("nan")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize_ms(seconds: Sequence[float]) -> dict[str, float]:
    """p50 / p90 / p99 / mean / max of durations given in seconds, in milliseconds (NaN when empty)."""
    if not seconds:
        nan = float("nan")
        return {"p50": nan, "p90": nan, "p99": nan, "mean": nan, "max": nan, "count": 0}
    ms = sorted(s * 1000.0 for s in seconds)
    return {"p50": percentile(ms, 50), "p90": percentile(ms, 90), "p99": percentile(ms, 99),
            "mean": math.fsum(ms) / len(ms), "max": ms[-1], "count": len(ms)}


# ---- one request ------------------------------------------------------------------------------------------
def chat_messages(index: int) -> list[dict[str, str]]:
    return [{"role": "system", "content": "You are a benchmark."},
            {"role": "user", "content": f"Request {index}: tell me something deterministic."}]


@dataclasses.dataclass
class Outcome:
    """What one request saw. `error` is None for a fully correct answer."""
    error: str | None = None
    detail: str = ""
    ttft_s: float | None = None
    total_s: float = 0.0
    gaps_s: list[float] = dataclasses.field(default_factory=list)
    chunks: int = 0


def _error_of_event(data: dict[str, Any]) -> str | None:
    if "error" in data:
        return json.dumps(data["error"])[:200]
    if data.get("object") == "error":
        return str(data.get("message", ""))[:200]
    return None


async def stream_one(session: aiohttp.ClientSession, url: str, body: dict[str, Any], expected: str,
                     timeout_s: float) -> Outcome:
    """Send one streamed chat request and check its answer against `expected` (the whole content text)."""
    outcome = Outcome()
    started = time.perf_counter()
    try:
        async with asyncio.timeout(timeout_s):
            await _read_stream(session, url, body, expected, started, outcome)
    except TimeoutError:
        outcome.error, outcome.detail = ErrorKind.TIMEOUT, f"no complete answer within {timeout_s:g} s"
    except aiohttp.ClientError as exc:
        outcome.error, outcome.detail = ErrorKind.CONNECTION, f"{type(exc).__name__}: {exc}"[:200]
    outcome.total_s = time.perf_counter() - started
    return outcome


async def _read_stream(session: aiohttp.ClientSession, url: str, body: dict[str, Any], expected: str,
                       started: float, outcome: Outcome) -> None:
    async with session.post(url, json=body) as response:
        if response.status != 200:
            text = (await response.content.read(2000)).decode("utf-8", "replace")
            outcome.error, outcome.detail = ErrorKind.HTTP_STATUS, f"HTTP {response.status}: {text[:200]}"
            return
        parser = SSEParser()
        pieces: list[str] = []
        finished = False
        done = False
        last_content_at: float | None = None
        async for raw in response.content.iter_any():
            arrived = time.perf_counter()
            try:
                events = parser.feed(raw)
            except SSEError as exc:
                outcome.error, outcome.detail = ErrorKind.MALFORMED, str(exc)[:200]
                return
            for event in events:
                if done:
                    outcome.error, outcome.detail = ErrorKind.DATA_AFTER_DONE, event.data[:200]
                    return
                if event.data == DONE:
                    done = True
                    continue
                try:
                    data = decode_openai_event(event)
                except SSEError as exc:
                    outcome.error, outcome.detail = ErrorKind.MALFORMED, str(exc)[:200]
                    return
                if data is None:
                    continue
                problem = _error_of_event(data)
                if problem is not None:
                    outcome.error, outcome.detail = ErrorKind.ERROR_EVENT, problem
                    return
                content = False
                for choice in data.get("choices") or ():
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        pieces.append(piece)
                        content = True
                    finished = finished or bool(choice.get("finish_reason"))
                if content:
                    outcome.chunks += 1
                    if last_content_at is None:
                        outcome.ttft_s = arrived - started
                    else:
                        outcome.gaps_s.append(arrived - last_content_at)
                    last_content_at = arrived
    text = "".join(pieces)
    if not done:
        outcome.error, outcome.detail = ErrorKind.MISSING_DONE, f"stream ended after {len(text)} characters"
    elif text != expected:
        outcome.error = ErrorKind.WRONG_TEXT
        outcome.detail = f"got {text[:80]!r}... ({len(text)} chars), expected {expected[:80]!r}... ({len(expected)})"
    elif not finished:
        outcome.error, outcome.detail = ErrorKind.NO_FINISH_REASON, "no choice carried a finish_reason"


# ---- the run ----------------------------------------------------------------------------------------------
class _Collector:
    def __init__(self) -> None:
        self.ttfts: list[float] = []
        self.totals: list[float] = []
        self.gaps = array("d")  # long runs (the soak) keep millions of gaps: 8 bytes each
        self.errors: dict[str, int] = {}
        self.error_samples: list[str] = []
        self.ok = 0
        self.chunks = 0

    def add(self, outcome: Outcome) -> None:
        if outcome.error is not None:
            self.errors[outcome.error] = self.errors.get(outcome.error, 0) + 1
            if len(self.error_samples) < ERROR_SAMPLES:
                self.error_samples.append(f"{outcome.error}: {outcome.detail}")
            return
        self.ok += 1
        self.chunks += outcome.chunks
        if outcome.ttft_s is not None:
            self.ttfts.append(outcome.ttft_s)
        self.totals.append(outcome.total_s)
        self.gaps.extend(outcome.gaps_s)


async def run_load(spec: LoadSpec) -> dict[str, Any]:
    """Run the load described by `spec` on the running loop; returns the result as a JSON-ready dict."""
    spec.validate()
    url = spec.url.rstrip("/") + CHAT_PATH
    distinct = min(spec.prompts, spec.requests)
    bodies = []
    answers = []
    for i in range(distinct):
        messages = chat_messages(i)
        bodies.append({"model": spec.model, "messages": messages, "max_tokens": spec.max_tokens, "stream": True})
        answers.append(expected_text(render_chat(messages), spec.max_tokens))
    connector = aiohttp.TCPConnector(limit=spec.concurrency, limit_per_host=spec.concurrency,
                                     keepalive_timeout=60.0)
    headers = {"Authorization": f"Bearer {spec.api_key}"}
    # The per-request bound is stream_one's own timeout; aiohttp's is only a backstop for the connect.
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10.0)
    async with aiohttp.ClientSession(connector=connector, headers=headers, timeout=timeout) as session:
        warmup = spec.concurrency if spec.warmup is None else spec.warmup
        warm = _Collector()
        warm_started = time.perf_counter()
        await _drive(session, url, bodies, answers, spec, warm, count=warmup, deadline=None)
        warmup_wall = time.perf_counter() - warm_started
        measured = _Collector()
        cpu0 = time.process_time()
        started = time.perf_counter()
        await _drive(session, url, bodies, answers, spec, measured, count=spec.requests,
                     deadline=started + spec.duration_s)
        wall = time.perf_counter() - started
        cpu = time.process_time() - cpu0
    done = measured.ok + sum(measured.errors.values())
    return {
        "url": spec.url, "concurrency": spec.concurrency, "max_tokens": spec.max_tokens,
        "requests": done, "ok": measured.ok, "errors": measured.errors,
        "error_count": sum(measured.errors.values()), "error_samples": measured.error_samples,
        "warmup_requests": warmup, "warmup_errors": warm.errors, "warmup_wall_s": warmup_wall,
        "wall_s": wall, "requests_per_s": measured.ok / wall if wall > 0 else 0.0,
        "chunks": measured.chunks, "ttft_ms": summarize_ms(measured.ttfts),
        "inter_chunk_ms": summarize_ms(measured.gaps), "total_ms": summarize_ms(measured.totals),
        "loadgen_cpu_share": cpu / wall if wall > 0 else 0.0,
    }


async def _drive(session: aiohttp.ClientSession, url: str, bodies: list[dict[str, Any]], answers: list[str],
                 spec: LoadSpec, into: _Collector, *, count: int, deadline: float | None) -> None:
    if count == 0:
        return
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < count and (deadline is None or time.perf_counter() < deadline):
            k = next_index % len(bodies)
            next_index += 1
            into.add(await stream_one(session, url, bodies[k], answers[k], spec.request_timeout_s))

    await asyncio.gather(*(worker() for _ in range(min(spec.concurrency, count))))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/openai_load.py", description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="base URL of the server (…/v1/chat/completions is appended)")
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--requests", type=int, required=True, help="upper bound on measured requests")
    parser.add_argument("--duration", type=float, required=True, help="upper bound on measured seconds")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--model", default="mock-model")
    parser.add_argument("--prompts", type=int, default=256, help="distinct prompts, cycled")
    parser.add_argument("--warmup", type=int, default=None, help="requests before the clock (default: concurrency)")
    parser.add_argument("--request-timeout", type=float, default=60.0)
    parser.add_argument("--api-key", default=LoadSpec.api_key, help="sent as the bearer token")
    parser.add_argument("--event-loop", choices=("auto", "uvloop", "asyncio"), default="auto")
    parser.add_argument("--out", default="", help="write the JSON here instead of stdout")
    args = parser.parse_args(argv)
    spec = LoadSpec(url=args.url, concurrency=args.concurrency, requests=args.requests, duration_s=args.duration,
                    max_tokens=args.max_tokens, model=args.model, prompts=args.prompts, warmup=args.warmup,
                    request_timeout_s=args.request_timeout, api_key=args.api_key)
    try:
        spec.validate()
    except ValueError as exc:
        parser.error(str(exc))
    from llmgw import eventloop

    result = eventloop.run(run_load(spec), args.event_loop)
    result["pid"] = os.getpid()
    text = json.dumps(result)
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
