"""`python -m llmgw bench [SUITE ...] [--filter X]`: run benchmark suites from the repository's benchmarks/ dir.

Suites: core (every micro-benchmark benchmarks/bench_*.py, via the plain runner), and gossip, dataplane,
resilience, reliability, tenancy, openai (whole-system suites: benchmarks/run_<suite>.py, each with
main(argv) -> int, which gets `--quick` if given plus whatever --suite-args holds). `all` runs every suite that
exists. The benchmarks are not installed with the package: run this from a source checkout.
"""

from __future__ import annotations

HELP = "run benchmark suites: core (micro-benchmarks), gossip, dataplane, resilience, reliability, tenancy, openai, all"

SUITES = ("core", "gossip", "dataplane", "resilience", "reliability", "tenancy", "openai")


def add_arguments(p) -> None:
    # Validated in run(): argparse rejects an empty list when nargs="*" is combined with choices.
    p.add_argument("suites", nargs="*", metavar="SUITE",
                   help="core (default), gossip, dataplane, resilience, reliability, tenancy, openai or all")
    p.add_argument("--filter", default=None, help="core: only benchmarks whose name contains this text")
    p.add_argument("--quick", action="store_true", help="short runs for a smoke test, not for figures (all suites)")
    p.add_argument("--suite-args", default="", metavar="ARGS",
                   help="extra arguments passed verbatim to the non-core suites, e.g. --suite-args='--only ttft'")


def _checkout_root():
    import os

    import llmgw

    root = os.path.dirname(os.path.dirname(os.path.abspath(llmgw.__file__)))
    return root if os.path.isfile(os.path.join(root, "benchmarks", "__main__.py")) else None


def _run_suite(suite: str, args, *, required: bool) -> int | None:
    """Exit status of one suite; None if a suite asked for by `all` does not exist yet."""
    import importlib

    if suite == "core":
        runner = importlib.import_module("benchmarks.__main__")
        argv = ([args.filter] if args.filter else []) + (["--quick"] if args.quick else [])
        return runner.main(argv)
    try:
        module = importlib.import_module(f"benchmarks.run_{suite}")
    except ModuleNotFoundError as exc:
        if exc.name != f"benchmarks.run_{suite}":
            raise
        print(f"suite {suite} not available (no benchmarks/run_{suite}.py)")
        return 2 if required else None
    import shlex

    argv = (["--quick"] if args.quick else []) + shlex.split(args.suite_args)
    try:
        return int(module.main(argv) or 0)
    except SystemExit as exc:  # the suite's own argparse rejected its arguments (it printed why)
        return exc.code if isinstance(exc.code, int) else 2


def run(args) -> int:
    import sys

    unknown = [s for s in args.suites if s not in SUITES + ("all",)]
    if unknown:
        print(f"unknown suite {unknown[0]!r}: choose from {', '.join(SUITES + ('all',))}", file=sys.stderr)
        return 2
    root = _checkout_root()
    if root is None:
        print("benchmarks/ not found next to the llmgw package: run from a source checkout", file=sys.stderr)
        return 2
    if root not in sys.path:
        sys.path.insert(0, root)
    requested = list(dict.fromkeys(args.suites or ["core"]))
    run_all = "all" in requested
    suites = SUITES if run_all else tuple(requested)
    status = 0
    for suite in suites:
        if len(suites) > 1:
            print(f"\n#### suite {suite}")
        result = _run_suite(suite, args, required=not run_all)
        if result is not None and result != 0:
            status = result if status == 0 else status
    return status
