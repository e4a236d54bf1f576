"""The `llmgw` command line: one module per subcommand, and the parser that gathers them.

Each llmgw/cli/<name>.py defines HELP (one line), add_arguments(parser) and run(args) -> int. They import their
heavy dependencies inside run(), so `--help` stays fast. The CLI parses flags and calls the library (e.g.
llmgw.replica.app, llmgw.gateway.app); nothing in the library imports it.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Iterable

from llmgw import config

# Order is the order `--help` lists them.
COMMANDS = (
    "gateway",
    "replica",
    "agent",
    "cluster",
    "client",
    "rollout",
    "status",
    "bench",
    "simulate",
    "demo",
    "keys",
)


def build_parser(prog: str = "llmgw", version: str = "") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="llmgw: distributed LLM inference gateway")
    if version:
        parser.add_argument("--version", action="version", version=f"llmgw {version}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"llmgw.cli.{name}")
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run, _parser=p, _command=name)
    return parser


def subcommand_parsers(names: Iterable[str] | None = None) -> dict[str, argparse.ArgumentParser]:
    """The parsers of the named subcommands (all of them by default)."""
    wanted = set(COMMANDS if names is None else names)
    found: dict[str, argparse.ArgumentParser] = {}
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            found.update({n: p for n, p in action.choices.items() if n in wanted})
    return found


def shared_keys_for(command: str) -> set[str]:
    """Config keys of every other subcommand: a top-level key of the shared file may belong to one of them."""
    keys: set[str] = set()
    for name, parser in subcommand_parsers().items():
        if name != command:
            keys |= config.option_keys(parser)
    return keys


def apply_config(args: argparse.Namespace, argv: list[str]) -> None:
    """Fill a parsed subcommand's `args` from its config file and LLMGW_* environment (flags win); a bad value
    exits with status 2 and the message, as a bad flag would."""
    command = args._command
    try:
        config.apply_config(args._parser, args, section=command, argv=argv[argv.index(command) + 1:],
                            sections=COMMANDS, shared_keys=shared_keys_for(command))
    except config.ConfigError as exc:
        args._parser.error(str(exc))  # exits 2 with the message
