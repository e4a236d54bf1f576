"""Load generator for `bench openai`: streamed chat completions against an OpenAI-compatible base URL.

    python benchmarks/openai_load.py --url http://127.0.0.1:8000 --concurrency 64 --requests 2000 --duration 20

`concurrency` workers send requests back to back, each on its own keep-alive connection (`--client lean`, the
default: an asyncio Protocol fed by httptools, so the client spends little of the CPU the servers it measures share;
`--client aiohttp` shares one aiohttp pool of exactly `concurrency` connections instead), until `requests` have been
sent or `duration` seconds have passed (both bounds always apply; a request in flight at the deadline finishes,
bounded by `--request-timeout`). Before the clock starts, `warmup` requests (default: one per connection) open the
pool. Prints one JSON object (see `LoadResult`).

Per request it measures TTFT (request sent -> first event carrying content), every gap between content events
(events that arrive in one read share its timestamp: a gateway that coalesces ready chunks into one write shows 0
gaps, as a client would see them) and the total time. The answer is checked in full: the deterministic mock
(llmgw.testing.mock_openai) answers every prompt with a text known in advance, so anything other than HTTP 200,
well-formed events, that exact text, a finish_reason and exactly one final `data: [DONE]` counts as an error of the
kind named in `ErrorKind`. Runs on uvloop (llmgw.eventloop) in its own process, apart from the servers it measures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import ssl
import sys
import time
from array import array
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402 - after the sys.path set-up, so the script also runs from outside the checkout
import httptools  # noqa: E402

from llmgw.testing.mock_openai import expected_text, render_chat  # noqa: E402
from llmgw.upstream.sse import DONE_BYTES, SSEError, SSEParser, decode_openai_data  # noqa: E402

CHAT_PATH = "/v1/chat/completions"
# "lean": one hand-held HTTP/1.1 connection per worker (LeanConnection); "aiohttp": aiohttp's client, as before.
CLIENTS = ("lean", "aiohttp")
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
    client: str = "lean"  # one of CLIENTS

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
        if self.client not in CLIENTS:
            raise ValueError(f"client must be one of {', '.join(CLIENTS)}, got {self.client!r}")
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


class AnswerCheck:
    """One streamed answer, checked as its bytes arrive: well-formed events, no error event, the content assembled
    in order, exactly one final `data: [DONE]`; timings into `outcome`. Both clients feed it."""

    __slots__ = ("done", "expected", "finished", "last_content_at", "outcome", "parser", "pieces", "started")

    def __init__(self, outcome: Outcome, started: float, expected: str) -> None:
        self.outcome = outcome
        self.started = started
        self.expected = expected
        self.parser = SSEParser()
        self.pieces: list[str] = []
        self.finished = False
        self.done = False
        self.last_content_at: float | None = None

    def feed(self, raw: bytes, arrived: float) -> bool:
        """The body bytes of one read, which arrived at `arrived`; False once the answer is found wrong (the error
        is in the outcome, and nothing more need be read)."""
        outcome = self.outcome
        try:
            datas = self.parser.feed_data(raw)
        except SSEError as exc:
            outcome.error, outcome.detail = ErrorKind.MALFORMED, str(exc)[:200]
            return False
        for data in datas:
            if self.done:
                outcome.error = ErrorKind.DATA_AFTER_DONE
                outcome.detail = data[:200].decode("utf-8", "replace")
                return False
            if data == DONE_BYTES:
                self.done = True
                continue
            try:
                event = decode_openai_data(data)
            except SSEError as exc:
                outcome.error, outcome.detail = ErrorKind.MALFORMED, str(exc)[:200]
                return False
            if event is None:
                continue
            problem = _error_of_event(event)
            if problem is not None:
                outcome.error, outcome.detail = ErrorKind.ERROR_EVENT, problem
                return False
            content = False
            for choice in event.get("choices") or ():
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    self.pieces.append(piece)
                    content = True
                self.finished = self.finished or bool(choice.get("finish_reason"))
            if content:
                outcome.chunks += 1
                if self.last_content_at is None:
                    outcome.ttft_s = arrived - self.started
                else:
                    outcome.gaps_s.append(arrived - self.last_content_at)
                self.last_content_at = arrived
        return True

    def finish(self) -> None:
        """The body ended: judge the whole answer."""
        outcome = self.outcome
        text = "".join(self.pieces)
        if not self.done:
            outcome.error, outcome.detail = ErrorKind.MISSING_DONE, f"stream ended after {len(text)} characters"
        elif text != self.expected:
            outcome.error = ErrorKind.WRONG_TEXT
            outcome.detail = (f"got {text[:80]!r}... ({len(text)} chars), "
                              f"expected {self.expected[:80]!r}... ({len(self.expected)})")
        elif not self.finished:
            outcome.error, outcome.detail = ErrorKind.NO_FINISH_REASON, "no choice carried a finish_reason"


# ---- the clients --------------------------------------------------------------------------------------------
class LeanConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection of the lean client, one request at a time. Each read goes from
    `data_received` through httptools (llhttp) straight into the request's AnswerCheck: no stream buffer, no
    wake-up of the waiting request per read, only at the end of the answer. Not llmgw.upstream.http1, which
    does the same for the gateway: the instrument shares no HTTP code with the path it measures, so a framing
    fault there cannot cancel out in the measurement."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.reusable = False  # the last answer ended cleanly on a connection the server keeps open
        self._check: AnswerCheck | None = None
        self._ended: asyncio.Future[None] | None = None
        self._status = 0
        self._refusal = bytearray()  # the body of a non-200 answer, for the error's detail
        self._arrived = 0.0

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.reusable = False
        self._end(ConnectionResetError(f"the server closed the connection mid-answer ({exc or 'EOF'})"))

    def data_received(self, data: bytes) -> None:
        self._arrived = time.perf_counter()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._end(ConnectionError(f"not an HTTP answer: {exc}"))
            self.close()

    # httptools callbacks
    def on_headers_complete(self) -> None:
        self._status = self._parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        check = self._check
        if check is None:
            return
        if self._status != 200:
            self._refusal += body[:2000 - len(self._refusal)]
        elif not check.feed(body, self._arrived):
            self._end(None)  # wrong already: the rest of this answer is not read
            self.close()

    def on_message_complete(self) -> None:
        self.reusable = self._parser.should_keep_alive()
        self._end(None)

    # one request
    async def exchange(self, request: bytes, check: AnswerCheck) -> None:
        """Send `request` and feed its answer to `check`; ConnectionError when the connection fails first."""
        assert self.transport is not None and self._ended is None
        self._check, self._status, self.reusable = check, 0, False
        self._refusal.clear()
        self._ended = ended = self._loop.create_future()
        self.transport.write(request)
        try:
            await ended
        finally:
            self._ended = self._check = None
        outcome = check.outcome
        if self._status != 200 and outcome.error is None:
            outcome.error = ErrorKind.HTTP_STATUS
            outcome.detail = f"HTTP {self._status}: {self._refusal.decode('utf-8', 'replace')[:200]}"
        elif outcome.error is None:
            check.finish()

    def _end(self, error: Exception | None) -> None:
        ended = self._ended
        if ended is not None and not ended.done():
            if error is None:
                ended.set_result(None)
            else:
                ended.set_exception(error)

    def close(self) -> None:
        self.reusable = False
        if self.transport is not None:
            self.transport.close()


class LeanClient:
    """One worker's connection to the server (opened when needed, reused while the server keeps it)."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl = ssl.create_default_context() if parts.scheme == "https" else None
        self.connection: LeanConnection | None = None

    async def stream_one(self, request: bytes, expected: str, timeout_s: float) -> Outcome:
        outcome = Outcome()
        started = time.perf_counter()
        try:
            async with asyncio.timeout(timeout_s):
                connection = self.connection
                if connection is None or not connection.reusable:
                    if connection is not None:
                        connection.close()
                    self.connection = None
                    loop = asyncio.get_running_loop()
                    _, connection = await loop.create_connection(lambda: LeanConnection(loop), self.host, self.port,
                                                                 ssl=self.ssl)
                    connection.reusable = True
                    self.connection = connection
                await connection.exchange(request, AnswerCheck(outcome, started, expected))
        except TimeoutError:
            outcome.error, outcome.detail = ErrorKind.TIMEOUT, f"no complete answer within {timeout_s:g} s"
        except OSError as exc:  # refused, reset, cut mid-body (ConnectionError is an OSError)
            outcome.error, outcome.detail = ErrorKind.CONNECTION, f"{type(exc).__name__}: {exc}"[:200]
        if outcome.error is not None and self.connection is not None:
            self.connection.close()  # an answer cut short leaves the connection mid-message
        outcome.total_s = time.perf_counter() - started
        return outcome

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None


def lean_request(url: str, body: dict[str, Any], api_key: str) -> bytes:
    """The whole HTTP/1.1 request for one body, built before the clock starts."""
    parts = urlsplit(url)
    payload = json.dumps(body, separators=(",", ":")).encode()
    return (f"POST {parts.path or '/'} HTTP/1.1\r\nHost: {parts.netloc}\r\nAuthorization: Bearer {api_key}\r\n"
            f"Content-Type: application/json\r\nAccept: text/event-stream\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n").encode("latin-1") + payload


async def stream_one(session: aiohttp.ClientSession, url: str, body: dict[str, Any], expected: str,
                     timeout_s: float) -> Outcome:
    """Send one streamed chat request through aiohttp and check its answer against `expected`."""
    outcome = Outcome()
    started = time.perf_counter()
    try:
        async with asyncio.timeout(timeout_s):
            async with session.post(url, json=body) as response:
                if response.status != 200:
                    text = (await response.content.read(2000)).decode("utf-8", "replace")
                    outcome.error, outcome.detail = ErrorKind.HTTP_STATUS, f"HTTP {response.status}: {text[:200]}"
                else:
                    check = AnswerCheck(outcome, started, expected)
                    async for raw in response.content.iter_any():
                        if not check.feed(raw, time.perf_counter()):
                            break
                    else:
                        check.finish()
    except TimeoutError:
        outcome.error, outcome.detail = ErrorKind.TIMEOUT, f"no complete answer within {timeout_s:g} s"
    except aiohttp.ClientError as exc:
        outcome.error, outcome.detail = ErrorKind.CONNECTION, f"{type(exc).__name__}: {exc}"[:200]
    outcome.total_s = time.perf_counter() - started
    return outcome


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
    async with _senders(spec, url, bodies, answers) as senders:
        warmup = spec.concurrency if spec.warmup is None else spec.warmup
        warm = _Collector()
        warm_started = time.perf_counter()
        await _drive(senders, len(bodies), warm, count=warmup, deadline=None)
        warmup_wall = time.perf_counter() - warm_started
        measured = _Collector()
        cpu0 = time.process_time()
        started = time.perf_counter()
        await _drive(senders, len(bodies), measured, count=spec.requests, deadline=started + spec.duration_s)
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
        "loadgen_cpu_share": cpu / wall if wall > 0 else 0.0, "client": spec.client,
    }


Sender = Callable[[int], Awaitable[Outcome]]  # sends prompt k and checks its answer


@contextlib.asynccontextmanager
async def _senders(spec: LoadSpec, url: str, bodies: list[dict[str, Any]],
                   answers: list[str]) -> AsyncIterator[list[Sender]]:
    """One sender per worker: the lean client gives each worker its own connection (kept from the warm-up to the
    measured run); aiohttp's workers share one pool of exactly `concurrency` connections."""
    timeout_s = spec.request_timeout_s
    if spec.client == "lean":
        requests = [lean_request(url, body, spec.api_key) for body in bodies]
        clients = [LeanClient(url) for _ in range(spec.concurrency)]

        def lean_sender(client: LeanClient) -> Sender:
            return lambda k: client.stream_one(requests[k], answers[k], timeout_s)
        try:
            yield [lean_sender(client) for client in clients]
        finally:
            for client in clients:
                client.close()
        return
    connector = aiohttp.TCPConnector(limit=spec.concurrency, limit_per_host=spec.concurrency,
                                     keepalive_timeout=60.0)
    headers = {"Authorization": f"Bearer {spec.api_key}"}
    # The per-request bound is stream_one's own timeout; aiohttp's is only a backstop for the connect.
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10.0)
    async with aiohttp.ClientSession(connector=connector, headers=headers, timeout=timeout) as session:
        def sender(k: int) -> Awaitable[Outcome]:
            return stream_one(session, url, bodies[k], answers[k], timeout_s)
        yield [sender] * spec.concurrency


async def _drive(senders: list[Sender], prompts: int, into: _Collector, *, count: int,
                 deadline: float | None) -> None:
    if count == 0:
        return
    next_index = 0

    async def worker(send: Sender) -> None:
        nonlocal next_index
        while next_index < count and (deadline is None or time.perf_counter() < deadline):
            k = next_index % prompts
            next_index += 1
            into.add(await send(k))

    await asyncio.gather(*(worker(send) for send in senders[:count]))


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
    parser.add_argument("--client", choices=CLIENTS, default=LoadSpec.client,
                        help="lean: one hand-held HTTP/1.1 connection per worker; aiohttp: aiohttp's client")
    parser.add_argument("--event-loop", choices=("auto", "uvloop", "asyncio"), default="auto")
    parser.add_argument("--out", default="", help="write the JSON here instead of stdout")
    args = parser.parse_args(argv)
    spec = LoadSpec(url=args.url, concurrency=args.concurrency, requests=args.requests, duration_s=args.duration,
                    max_tokens=args.max_tokens, model=args.model, prompts=args.prompts, warmup=args.warmup,
                    request_timeout_s=args.request_timeout, api_key=args.api_key, client=args.client)
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
