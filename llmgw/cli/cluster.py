"""`python -m llmgw cluster`: a gateway and N simulated replicas on this machine, supervised, in one command."""

from __future__ import annotations

HELP = "run a local cluster: one gateway + N simulated replicas as supervised subprocesses"

DEMO_PROMPT = "Explain in one sentence what an inference gateway does."


def add_arguments(p) -> None:
    from llmgw.config import add_config_argument
    from llmgw.topology import GOSSIP_PORT_OFFSET

    add_config_argument(p)  # [section] of the TOML file and LLMGW_* variables, flags winning
    p.add_argument("--replicas", type=int, default=3, help="simulated replicas to start (1..64)")
    p.add_argument("--host", default="127.0.0.1", help="address every member binds and advertises")
    p.add_argument("--base-port", type=int, default=None,
                   help=f"gateway gRPC port P, replica i on P+i, gossip on gRPC+{GOSSIP_PORT_OFFSET}; 0 = free ports "
                        "(default: the well-known ports, gateway 50051 and replicas 50061...)")
    p.add_argument("--http-port", type=int, default=None,
                   help="gateway HTTP front (OpenAI API, /metrics, /admin); 0 disables "
                        "(default: 8080, or a free port with --base-port 0)")
    p.add_argument("--token-delay-ms", type=float, default=None, help="simulated time per token (replica default)")
    p.add_argument("--max-capacity", type=int, default=None, help="concurrent streams per replica")
    p.add_argument("--model-version", default=None,
                   help="model version the replicas start on (default v1); with --restart-replica: the new one")
    p.add_argument("--gossip-config", default="local", choices=("local", "lan", "wan"), help="gossip timing preset")
    p.add_argument("--no-restart", action="store_true", help="do not restart members that die")
    p.add_argument("--log-dir", default=None, help="member logs (default: a new temporary directory)")
    p.add_argument("--member-log-level", default="WARNING", help="--log-level of the members")
    p.add_argument("--ready-timeout-s", type=float, default=30.0)
    p.add_argument("--stop-timeout-s", type=float, default=10.0, help="grace after SIGTERM before SIGKILL")
    p.add_argument("--admin-token", default=None, help="gateway admin bearer token (if the gateway supports it)")
    p.add_argument("--demo", action="store_true",
                   help="stream one sample completion through the cluster (gRPC, and HTTP if enabled), then exit")
    p.add_argument("--demo-prompt", default=DEMO_PROMPT)
    p.add_argument("--demo-max-tokens", type=int, default=8)
    p.add_argument("--log-level", default="WARNING", help="the supervisor's own log level")
    p.add_argument("--no-control", action="store_true",
                   help="no control socket (<log dir>/control.sock): the gateway cannot restart replicas for a "
                        "rolling update")
    client = p.add_argument_group("restart a replica of a running cluster (what a gateway rolling update runs)")
    client.add_argument("--control", metavar="SOCKET", default=None, help="the running cluster's control socket")
    client.add_argument("--restart-replica", metavar="ID", default=None,
                        help="with --control: restart this replica (on --model-version if given) and exit")
    client.add_argument("--restart-timeout-s", type=float, default=120.0)


def run(args) -> int:
    import asyncio
    import logging
    import signal
    import sys

    from llmgw.cluster import ClusterConfig, ClusterError, LocalCluster

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.control is not None or args.restart_replica is not None:
        return _restart_through_control(args)
    if not 1 <= args.demo_max_tokens <= 4096:
        print("cluster: --demo-max-tokens must be within 1..4096", file=sys.stderr)
        return 2
    try:
        config = ClusterConfig(
            replicas=args.replicas, host=args.host, base_port=args.base_port, http_port=args.http_port,
            token_delay_ms=args.token_delay_ms, max_capacity=args.max_capacity,
            model_version=args.model_version or "v1", gossip_config=args.gossip_config,
            restart=not args.no_restart, log_dir=args.log_dir,
            log_level=args.member_log_level, ready_timeout_s=args.ready_timeout_s,
            stop_timeout_s=args.stop_timeout_s, admin_token=args.admin_token,
            control_socket=None if args.no_control else "auto",
        )
        config.validate()
    except ValueError as exc:
        print(f"cluster: {exc}", file=sys.stderr)
        return 2

    def say(text: str) -> None:
        print(text, flush=True)

    async def main() -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        signals_seen = 0
        first_signal = int(signal.SIGINT)

        def on_signal(signum: int) -> None:
            nonlocal signals_seen, first_signal
            signals_seen += 1
            if signals_seen == 1:
                first_signal = signum
                say(f"llmgw cluster: {signal.Signals(signum).name}, stopping")
                stop.set()
            else:  # impatient operator: skip the graceful part
                from llmgw.cluster import kill_leftover_members

                kill_leftover_members()

        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(sig, on_signal, sig)

        cluster = LocalCluster(config)
        cluster.on_member_event = lambda member_id, message: say(f"llmgw cluster: {member_id} {message}")
        starting = loop.create_task(cluster.start())
        stop_wait = loop.create_task(stop.wait())
        try:
            await asyncio.wait({starting, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
            if not starting.done():  # a signal arrived while starting
                starting.cancel()
                await asyncio.gather(starting, return_exceptions=True)
                return 128 + first_signal  # the shell convention for "ended by this signal"
            try:
                starting.result()
            except ClusterError as exc:
                print(f"llmgw cluster: {exc}", file=sys.stderr)
                return 1
            say(f"gateway gRPC: {cluster.grpc_address}")
            say(f"gateway HTTP: {cluster.http_url or 'off'}")
            for rid, member in cluster.replicas.items():
                say(f"{rid}: grpc={args.host}:{member.grpc_port} gossip={args.host}:{member.gossip_port} "
                    f"version={member.model_version} pid={member.pid}")
            say(f"logs: {cluster.log_dir}")
            if cluster.control_path is not None:
                say(f"control: {cluster.control_path}")
            say(f"llmgw cluster ready: grpc={cluster.grpc_address} http={cluster.http_url or 'off'} "
                f"replicas={len(cluster.replicas)}")
            if args.demo:
                demo = loop.create_task(run_demo(cluster, args.demo_prompt, args.demo_max_tokens, say))
                await asyncio.wait({demo, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
                if not demo.done():
                    demo.cancel()
                    await asyncio.gather(demo, return_exceptions=True)
                    return 128 + first_signal
                return 0 if demo.result() else 1
            await stop_wait
            return 0
        finally:
            stop_wait.cancel()
            await cluster.stop()
            say("llmgw cluster stopped")

    return asyncio.run(main())


def _restart_through_control(args) -> int:
    import asyncio
    import sys

    from llmgw.cluster import ClusterError, request_restart

    if args.control is None or args.restart_replica is None:
        print("cluster: --control and --restart-replica go together", file=sys.stderr)
        return 2
    if not 0 < args.restart_timeout_s <= 3600:
        print("cluster: --restart-timeout-s must be within (0, 3600]", file=sys.stderr)
        return 2
    try:
        pid = asyncio.run(request_restart(args.control, args.restart_replica, args.model_version,
                                          args.restart_timeout_s))
    except ClusterError as exc:
        print(f"cluster: {exc}", file=sys.stderr)
        return 1
    print(f"{args.restart_replica} restarted (pid {pid})")
    return 0


async def run_demo(cluster, prompt: str, max_tokens: int, say) -> bool:
    """Stream one completion over gRPC, and over HTTP with the openai SDK when the gateway serves HTTP."""
    import grpc

    from llmgw import client

    ok = True
    say(f"demo (gRPC {cluster.grpc_address}): {prompt!r}")
    async with grpc.aio.insecure_channel(cluster.grpc_address) as channel:
        result = await client.collect(client.stream_infer(channel, prompt, max_tokens, client_id="cluster-demo",
                                                           timeout_s=60.0))
    if result.ok:
        served = ", ".join(sorted(result.replicas)) or "?"
        say(f"  {' '.join(result.texts)}")
        ttft = f"{result.ttft_s * 1000:.1f} ms" if result.ttft_s is not None else "-"
        say(f"  {len(result.texts)} tokens from {served}, TTFT {ttft}, "
            f"total {result.total_s * 1000:.1f} ms")
    else:
        say(f"  gRPC request failed: {result.code.name}: {result.details}")
        ok = False
    if cluster.http_url:
        ok = await _demo_http(cluster.http_url, prompt, max_tokens, say) and ok
    return ok


async def _demo_http(url: str, prompt: str, max_tokens: int, say) -> bool:
    try:
        import openai
    except ImportError:
        say("  (openai SDK not installed: skipping the HTTP demo; pip install openai)")
        return True
    say(f"demo (HTTP {url}/v1, openai SDK): {prompt!r}")
    sdk = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="llmgw-local", timeout=60.0, max_retries=0)
    try:
        models = await sdk.models.list()
        model = models.data[0].id if models.data else "default"
        stream = await sdk.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, stream=True)
        pieces = []
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                pieces.append(chunk.choices[0].text)
        say(f"  {''.join(pieces).strip()}")
        say(f"  {len(pieces)} chunks via model {model!r}")
        return True
    except openai.OpenAIError as exc:
        say(f"  HTTP request failed: {type(exc).__name__}: {exc}")
        return False
    finally:
        await sdk.close()
