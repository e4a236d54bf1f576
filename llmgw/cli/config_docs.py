"""`python -m llmgw.cli.config_docs [--check] DOC`: regenerate (or check) the option tables in DOC
(docs/configuration.md) from the subcommands' parsers."""

from __future__ import annotations

import argparse
import sys

from llmgw import config
from llmgw.cli import subcommand_parsers


def main(argv: list[str] | None = None) -> int:
    cli = argparse.ArgumentParser(prog="python -m llmgw.cli.config_docs", description=__doc__.splitlines()[0])
    cli.add_argument("doc", help="Markdown file with <!-- llmgw:options SECTION --> blocks")
    cli.add_argument("--check", action="store_true", help="exit 1 if the file is not up to date, change nothing")
    ns = cli.parse_args(argv)
    try:
        with open(ns.doc, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        cli.error(f"cannot read {ns.doc}: {exc.strerror or exc}")
    sections = config.doc_sections(text)
    parsers = subcommand_parsers(sections)
    missing = [s for s in sections if s not in parsers]
    if missing:
        print(f"{ns.doc}: no `llmgw` command for block(s): {', '.join(missing)}", file=sys.stderr)
    if ns.check:
        problems = config.check_docs(text, parsers)
        for problem in problems:
            print(f"{ns.doc}: {problem}", file=sys.stderr)
        return 1 if problems or missing else 0
    new_text = config.update_docs(text, parsers)
    if new_text != text:
        with open(ns.doc, "w", encoding="utf-8") as fh:
            fh.write(new_text)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
