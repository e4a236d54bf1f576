"""`python -m llmgw rollout`: start, follow or abort a rolling update on a running gateway, with a progress bar.

The rolling update runs inside the gateway (llmgw.rollout.Rollout behind its admin API); this command only asks
for it and shows its progress. It talks to the gateway's HTTP admin API (POST/GET/DELETE /admin/rollout): a
gateway without it (no --http-port, or an older build) is reported as such.
"""

from __future__ import annotations

from typing import Any

HELP = "start, follow (--watch) or abort (--abort) a rolling update of the replicas, with a progress bar"

FINAL_STATES = ("succeeded", "failed", "aborted")


def add_arguments(p) -> None:
    from llmgw.config import add_config_argument
    from llmgw.topology import DEFAULT_PORTS

    add_config_argument(p)  # [section] of the TOML file and LLMGW_* variables, flags winning
    p.add_argument("--http", default=f"http://127.0.0.1:{DEFAULT_PORTS['gateway']['http']}",
                   help="the gateway's HTTP front (where /admin/rollout lives)")
    action = p.add_mutually_exclusive_group(required=True)
    action.add_argument("--to-version", metavar="VERSION", help="start a rolling update to this model version")
    action.add_argument("--watch", action="store_true", help="follow the running (or show the last) rolling update")
    action.add_argument("--abort", action="store_true", help="abort the running rolling update (routing restored)")
    p.add_argument("--replicas", default="", help="comma-separated replica ids in update order (default: all)")
    p.add_argument("--drain-timeout-s", type=float, default=None, help="per replica: in-flight streams must end")
    p.add_argument("--rejoin-timeout-s", type=float, default=None,
                   help="per replica: back ALIVE on the new version within this")
    p.add_argument("--restart-timeout-s", type=float, default=None)
    p.add_argument("--force", action="store_true", help="also restart replicas already on the new version")
    p.add_argument("--admin-token", default=None, help="bearer token (default: $LLMGW_ADMIN_TOKEN)")
    p.add_argument("--poll-s", type=float, default=0.5, help="progress refresh interval")
    p.add_argument("--timeout-s", type=float, default=3600.0, help="give up watching after this long")
    p.add_argument("--json", action="store_true", help="print the final status as JSON instead of the progress view")


class RolloutClientError(Exception):
    """The gateway refused, lacks the rollout API, or could not be reached; the message says which."""


def request_body(args) -> dict:
    """The POST /admin/rollout body for the parsed arguments (ValueError on bad values)."""
    version = (args.to_version or "").strip()
    if not version:
        raise ValueError("--to-version must not be empty")
    body: dict = {"version": version}
    for name in ("drain_timeout_s", "rejoin_timeout_s", "restart_timeout_s"):
        value = getattr(args, name)
        if value is not None:
            if not 0 < value < 86400:
                raise ValueError(f"--{name.replace('_', '-')} must be within (0, 86400) seconds")
            body[name] = value
    replicas = [r.strip() for r in args.replicas.split(",") if r.strip()]
    if replicas:
        if len(set(replicas)) != len(replicas):
            raise ValueError(f"--replicas lists a replica twice: {args.replicas}")
        body["replicas"] = replicas
    if args.force:
        body["skip_up_to_date"] = False
    return body


class AdminClient:
    """The three /admin/rollout calls over one aiohttp session, errors turned into RolloutClientError."""

    def __init__(self, base_url: str, token: str | None, timeout_s: float = 20.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s
        self._session: Any = None  # an aiohttp.ClientSession once entered (aiohttp is imported late)

    async def __aenter__(self) -> AdminClient:
        import aiohttp

        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        self._session = aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        return self

    async def __aexit__(self, *exc) -> None:
        await self._session.close()

    async def call(self, method: str, body: dict | None = None) -> dict:
        import aiohttp

        url = f"{self.base_url}/admin/rollout"
        try:
            async with self._session.request(method, url, json=body) as resp:
                text = await resp.text()
                try:
                    data = await resp.json(content_type=None)
                except ValueError:
                    data = None
                if resp.status < 300 and isinstance(data, dict):
                    return data
                raise RolloutClientError(self._explain(resp.status, data, text))
        except aiohttp.ClientConnectionError as exc:
            raise RolloutClientError(f"cannot reach the gateway's HTTP front at {self.base_url} ({exc}); is the "
                                     "gateway running with --http-port?") from None
        except TimeoutError:
            raise RolloutClientError(f"the gateway at {self.base_url} did not answer within {self.timeout_s:g} s") \
                from None

    def _explain(self, status: int, data, text: str) -> str:
        error = data.get("error") if isinstance(data, dict) else None
        message = error.get("message") if isinstance(error, dict) else None
        code = error.get("code") if isinstance(error, dict) else None
        if status == 404 and code == "no_rollout":
            return "no rolling update has been started on this gateway"
        if status == 404 or status == 405:
            return (f"the gateway at {self.base_url} has no rollout API (/admin/rollout answered {status}): it "
                    "lacks the rollout RPC; upgrade it or run the update with llmgw.rollout.Rollout in-process")
        if status == 401:
            return "the gateway refused the admin token (set --admin-token or $LLMGW_ADMIN_TOKEN)"
        if status == 403:
            return f"the gateway's admin API is disabled: {message or text}"
        if status == 409:
            return f"{message or 'a rolling update is already running'} (follow it with --watch, stop it with --abort)"
        if status == 501:
            return f"the gateway cannot restart replicas: {message or text}"
        return f"gateway answered HTTP {status}: {message or text.strip()[:500] or '(empty body)'}"


async def follow(client: AdminClient, *, poll_s: float, timeout_s: float, show, clock=None, sleep=None) -> dict:
    """Poll GET /admin/rollout until a final state (or timeout_s: RolloutClientError); `show(status)` each time."""
    import asyncio
    import time

    clock = clock or time.monotonic
    sleep = sleep or asyncio.sleep
    deadline = clock() + timeout_s
    while True:
        status = await client.call("GET")
        show(status)
        if status.get("state") in FINAL_STATES:
            return status
        if clock() >= deadline:
            raise RolloutClientError(f"gave up watching after {timeout_s:g} s; the rolling update is still "
                                     f"{status.get('state')} on the gateway")
        await sleep(poll_s)


class ProgressView:
    """Draws the rollout view: redrawn in place on a terminal, otherwise one line per change of headline."""

    def __init__(self, out, *, tty: bool, quiet: bool = False) -> None:
        self.out = out
        self.tty = tty
        self.quiet = quiet
        self._lines = 0
        self._last_head: str | None = None
        self.last: dict | None = None

    def __call__(self, status: dict) -> None:
        from llmgw import ui

        self.last = status
        if self.quiet:
            return
        text = ui.render_rollout(status)
        if self.tty:
            self.out.write(ui.rewind(self._lines) + text + "\n")
            self._lines = text.count("\n") + 1
        else:
            head = text.split("\n", 1)[0]
            if head != self._last_head or status.get("state") in FINAL_STATES:
                current = status.get("current_replica")
                step = next((r.get("step") for r in status.get("replicas") or []
                             if r.get("replica_id") == current), None)
                self.out.write(head + (f"  [{current}: {step}]" if current and step else "") + "\n")
                self._last_head = head
        self.out.flush()

    def finish(self) -> None:
        """Non-terminal output ends with the full per-replica view once."""
        from llmgw import ui

        if self.quiet or self.tty or self.last is None:
            return
        _, _, details = ui.render_rollout(self.last).partition("\n")
        if details:
            self.out.write(details + "\n")
            self.out.flush()


def run(args) -> int:
    import asyncio
    import json
    import os
    import sys

    if not 0.05 <= args.poll_s <= 60:
        print("rollout: --poll-s must be within 0.05..60", file=sys.stderr)
        return 2
    if not 0 < args.timeout_s <= 7 * 86400:
        print("rollout: --timeout-s must be within (0, 604800]", file=sys.stderr)
        return 2
    if not args.http.startswith(("http://", "https://")):
        print(f"rollout: --http must be an http(s):// URL, got {args.http!r}", file=sys.stderr)
        return 2
    body = None
    if args.to_version is not None:
        try:
            body = request_body(args)
        except ValueError as exc:
            print(f"rollout: {exc}", file=sys.stderr)
            return 2
    token = args.admin_token or os.environ.get("LLMGW_ADMIN_TOKEN") or None
    view = ProgressView(sys.stdout, tty=sys.stdout.isatty(), quiet=args.json)

    async def main() -> dict:
        async with AdminClient(args.http, token) as client:
            if args.abort:
                return await client.call("DELETE")
            if body is not None:
                view(await client.call("POST", body))
            return await follow(client, poll_s=args.poll_s, timeout_s=args.timeout_s, show=view)

    try:
        status = asyncio.run(main())
    except RolloutClientError as exc:
        print(f"rollout: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nrollout: stopped watching; the rolling update goes on in the gateway "
              "(follow: --watch, abort: --abort)", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(status, sort_keys=True))
    elif args.abort:
        from llmgw import ui

        print(ui.render_rollout(status))
    else:
        view.finish()
    return 0 if status.get("state") == "succeeded" else 1
