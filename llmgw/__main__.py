"""`llmgw <command>` (the installed script) or `python -m llmgw <command>`; the commands live in llmgw/cli/."""

from __future__ import annotations

import os
import sys

from llmgw.cli import COMMANDS, apply_config, build_parser

__all__ = ["COMMANDS", "build_parser", "main", "version"]


def version() -> str:
    """The installed distribution's version, else the source tree's (llmgw.__version__)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("llmgw")
    except PackageNotFoundError:
        from llmgw import __version__

        return __version__


def _prog() -> str:
    # `python -m llmgw` runs this file as __main__.py; the console script runs as `llmgw`.
    return "python -m llmgw" if os.path.basename(sys.argv[0]) == "__main__.py" else "llmgw"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_prog(), version())
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    if hasattr(args, "config"):  # commands with --config: TOML file < LLMGW_* env < flags
        apply_config(args, argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
