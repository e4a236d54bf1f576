"""`python -m llmgw <command>`: one module per subcommand under llmgw/cli/.

Each llmgw/cli/<name>.py defines HELP (one line), add_arguments(parser) and run(args) -> int. They import
their heavy dependencies inside run(), so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Order is the order `--help` lists them.
COMMANDS = (
    "gateway",
    "replica",
    "cluster",
    "client",
    "rollout",
    "status",
    "bench",
    "simulate",
    "demo",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m llmgw",
        description="llmgw: distributed LLM inference gateway",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"llmgw.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"llmgw.cli.{name}":
                raise
            continue  # not built yet
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run, _parser=p, _command=name)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    if hasattr(args, "config"):  # commands with --config: TOML file < LLMGW_* env < flags
        from llmgw.config import ConfigError, apply_config

        try:
            apply_config(args._parser, args, section=args._command, argv=argv[argv.index(args._command) + 1 :])
        except ConfigError as exc:
            args._parser.error(str(exc))  # exits 2 with the message
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
