"""Configuration: TOML file + ``LLMGW_*`` environment variables + command-line flags, over any argparse parser.

Precedence, highest first: a flag given on the command line > ``LLMGW_<SECTION>_<KEY>`` > ``LLMGW_<KEY>`` >
``[section]`` of the file > top-level keys of the file > the parser's defaults.

The parser stays the single source of truth: every config key is an argparse option (its long flag without the
dashes, or its dest; ``-`` and ``_`` are interchangeable), converted with the option's own ``type`` and checked
against its ``choices``. Unknown keys and wrong types are a :class:`ConfigError` that names where the value came
from, the key and the type expected; the CLI prints it and exits with status 2.

Also here: the generator/checker that keeps ``docs/configuration.md`` in step with the parsers (run it as
``python -m llmgw.cli.config_docs --check docs/configuration.md``). This module knows parsers, not llmgw's
commands: the CLI (llmgw.__main__) tells apply_config which sections and shared keys exist. The default ports are
re-exported from llmgw.topology, their one home.
"""

from __future__ import annotations

import argparse
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from llmgw.topology import DEFAULT_PORTS, GOSSIP_PORT_OFFSET

__all__ = [
    "CONFIG_ENV_VAR",
    "DEFAULT_PORTS",
    "GOSSIP_PORT_OFFSET",
    "HEALTH_PATH",
    "METRICS_PATH",
    "READY_PATH",
    "ConfigError",
    "OptionDoc",
    "add_config_argument",
    "apply_config",
    "check_docs",
    "doc_sections",
    "env_var_name",
    "explicit_dests",
    "option_keys",
    "parser_options",
    "render_options_markdown",
    "structured_list",
    "update_docs",
]

# HTTP paths served by the gateway's HTTP front.
HEALTH_PATH = "/healthz"  # alive: the process answers
READY_PATH = "/readyz"  # ready: at least one routable replica
METRICS_PATH = "/metrics"

# Names the config file when no --config flag is given.
CONFIG_ENV_VAR = "LLMGW_CONFIG"
ENV_PREFIX = "LLMGW_"

_TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
_FALSE_WORDS = frozenset({"0", "false", "no", "off"})
# Actions that are not settings: nothing to configure.
_NOT_SETTINGS = (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type, or the file cannot be read."""


# --------------------------------------------------------------------------------------------------------------
# Repeatable options whose items are more than a word

ItemParser = Callable[[Any, str], Any]


@dataclass(frozen=True)
class _StructuredList:
    parse_item: ItemParser


_STRUCTURED_ATTR = "_llmgw_structured_list"


def structured_list(action: argparse.Action, parse_item: ItemParser) -> argparse.Action:
    """Declare that the items of a repeatable option are structured (an item holds commas of its own):

    - in the file, its array may hold TOML tables as well as strings (``[[key]]``, ``[[section.key]]`` or inline
      ``{...}``), and
    - in an environment variable, items are separated by whitespace (spaces, tabs or newlines), not by commas.

    ``parse_item(value, where)`` turns one item (a string, or a dict for a table) into the value the command reads,
    raising ValueError with a message that starts with ``where`` (e.g. ``"cfg.toml: key 'x', entry 2"``). Items
    given as flags are left to the command, as argparse parsed them. Returns ``action``."""
    setattr(action, _STRUCTURED_ATTR, _StructuredList(parse_item))
    return action


def _structured(action: argparse.Action) -> _StructuredList | None:
    return getattr(action, _STRUCTURED_ATTR, None)


# --------------------------------------------------------------------------------------------------------------
# Options of a parser


def _norm(name: str) -> str:
    return name.strip().lstrip("-").replace("-", "_").lower()


@dataclass(frozen=True)
class OptionDoc:
    """One configurable option of a parser, as documented."""

    key: str  # config-file key (long flag, dashes kept)
    flag: str  # the long command-line flag
    dest: str
    default: Any
    type_name: str
    choices: tuple | None
    help: str


def _settings(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions
            if not isinstance(a, _NOT_SETTINGS) and a.dest != argparse.SUPPRESS and a.dest != "config"]


def _help_text(action: argparse.Action, prog: str) -> str:
    """The help string with argparse's %(default)s-style placeholders expanded, on one line."""
    text = " ".join((action.help or "").split())
    if "%" in text:
        params = dict(vars(action), prog=prog)
        if params.get("choices") is not None:
            params["choices"] = ", ".join(str(c) for c in params["choices"])
        try:
            text = text % params
        except (KeyError, TypeError, ValueError):
            pass  # a literal % in the help: show it as written
    return text


def _long_flag(action: argparse.Action) -> str:
    longs = [s for s in action.option_strings if s.startswith("--")]
    if longs:
        return longs[0]
    return action.option_strings[0] if action.option_strings else action.dest


def _key_of(action: argparse.Action) -> str:
    return _long_flag(action).lstrip("-")


def _kind(action: argparse.Action) -> str:
    """What a config value for this action must look like: bool, count, list or scalar."""
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction,
                           argparse._StoreConstAction, argparse.BooleanOptionalAction)):
        return "bool"
    if isinstance(action, argparse._CountAction):
        return "count"
    if isinstance(action, (argparse._AppendAction, argparse._ExtendAction)) or action.nargs in ("*", "+") \
            or isinstance(action.nargs, int):
        return "list"
    if isinstance(action, argparse._AppendConstAction):
        return "unsupported"
    return "scalar"


def _type_name(action: argparse.Action) -> str:
    kind = _kind(action)
    if kind == "bool":
        return "boolean"
    if kind == "count":
        return "integer"
    names: dict[object, str] = {None: "string", str: "string", int: "integer", float: "number"}
    base = names.get(action.type) or str(getattr(action.type, "__name__", "value"))
    if kind == "list" and _structured(action) is not None:
        return f"list of {base} or table"
    return f"list of {base}" if kind == "list" else base


def parser_options(parser: argparse.ArgumentParser) -> list[OptionDoc]:
    """Every configurable option of ``parser`` (help, version and --config excluded), in declaration order."""
    out = []
    for action in _settings(parser):
        if action.help == argparse.SUPPRESS:
            continue  # hidden on purpose: configurable, but not advertised
        default = None if action.default is argparse.SUPPRESS else action.default
        out.append(OptionDoc(
            key=_key_of(action), flag=_long_flag(action), dest=action.dest, default=default,
            type_name=_type_name(action), choices=tuple(action.choices) if action.choices else None,
            help=_help_text(action, parser.prog)))
    return out


def _lookup(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Normalised key -> action, for every spelling a user may write (each long flag and the dest)."""
    table: dict[str, argparse.Action] = {}
    for action in _settings(parser):
        longs = [s for s in action.option_strings if s.startswith("--")]
        if isinstance(action, argparse.BooleanOptionalAction):
            names = [s for s in longs if not s.startswith("--no-")]  # `no-x = true` would read as x = true
        elif _kind(action) == "bool" and longs:
            # `true` means "as if the flag were given": for --no-color (dest color), `color = true` would
            # silently mean the opposite of what it says, so only the flag's own name is a key.
            names = longs
        else:
            names = [action.dest, *longs]
        for name in names:
            table.setdefault(_norm(name), action)
    return table


def env_var_name(section: str | None, key: str) -> str:
    """``LLMGW_<SECTION>_<KEY>`` for a section-specific variable, ``LLMGW_<KEY>`` for a shared one."""
    parts = [ENV_PREFIX.rstrip("_")] + ([section] if section else []) + [key]
    return "_".join(_norm(p).upper() for p in parts)


# --------------------------------------------------------------------------------------------------------------
# Which flags were given explicitly


def explicit_dests(parser: argparse.ArgumentParser, argv: Iterable[str]) -> set[str]:
    """Dests that ``argv`` sets explicitly, found by re-parsing with every default suppressed.

    With no defaults, only what the command line supplied lands in the namespace. ``parser`` must be the parser
    that owns the options (for a subcommand, its subparser and the arguments after the command name)."""
    saved = [(a, a.default) for a in parser._actions]
    saved_required = [(a, a.required) for a in parser._actions]
    saved_parser_defaults = dict(parser._defaults)
    try:
        for action in parser._actions:
            action.default = argparse.SUPPRESS
            # Required options were satisfied by the first parse; do not let their absence abort this one.
            action.required = False
        parser._defaults.clear()
        namespace, _ = parser.parse_known_args(list(argv), argparse.Namespace())
    finally:
        for action, default in saved:
            action.default = default
        for action, required in saved_required:
            action.required = required
        parser._defaults.update(saved_parser_defaults)
    return set(vars(namespace))


# --------------------------------------------------------------------------------------------------------------
# Conversion


def _convert_scalar(action: argparse.Action, value: Any, where: str, *, from_text: bool) -> Any:
    expected = _type_name(action).removeprefix("list of ")
    target: Any = action.type
    converted: Any
    if isinstance(value, bool) and target is not bool:
        # TOML booleans are Python ints; `port = true` must not become port 1.
        raise ConfigError(f"{where}: expected {expected}, got boolean {value!r}")
    if target is None or target is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected string, got {type(value).__name__} {value!r}")
        converted = value
    elif target in (int, float) and not from_text:
        if target is int and not isinstance(value, int):
            raise ConfigError(f"{where}: expected integer, got {type(value).__name__} {value!r}")
        if target is float and not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected number, got {type(value).__name__} {value!r}")
        converted = target(value)
    elif not isinstance(value, str):
        # A custom type parses the flag's text; a TOML value of its own type is fine, anything else is not.
        if not (isinstance(target, type) and isinstance(value, target)):
            raise ConfigError(f"{where}: expected {expected} written as a string, got "
                              f"{type(value).__name__} {value!r}")
        converted = value
    else:
        # What argparse itself would do with this text: call the option's type on it.
        try:
            converted = target(value)
        except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
            detail = f" ({exc})" if str(exc) and target not in (int, float) else ""
            raise ConfigError(f"{where}: expected {expected}, got {value!r}{detail}") from None
    if action.choices is not None and converted not in action.choices:
        allowed = ", ".join(repr(c) for c in action.choices)
        raise ConfigError(f"{where}: {converted!r} is not one of {allowed}")
    return converted


def _parse_bool_text(text: str, where: str) -> bool:
    word = text.strip().lower()
    if word in _TRUE_WORDS:
        return True
    if word in _FALSE_WORDS:
        return False
    raise ConfigError(f"{where}: expected boolean (true/false, 1/0, yes/no, on/off), got {text!r}")


def _convert(action: argparse.Action, value: Any, where: str, *, from_text: bool) -> Any:
    kind = _kind(action)
    if kind == "unsupported":
        raise ConfigError(f"{where}: this option can only be given on the command line")
    if kind == "bool":
        if from_text:
            value = _parse_bool_text(value, where)
        elif not isinstance(value, bool):
            raise ConfigError(f"{where}: expected boolean, got {type(value).__name__} {value!r}")
        if isinstance(action, argparse.BooleanOptionalAction):
            return value
        if isinstance(action, argparse._StoreConstAction) and not isinstance(
                action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return action.const if value else action.default
        # store_true stores const=True when given; store_false stores False. "true" means "as if the flag were given".
        return action.const if value else (not action.const)
    if kind == "count":
        if from_text:
            try:
                value = int(value)
            except ValueError:
                raise ConfigError(f"{where}: expected integer, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{where}: expected non-negative integer, got {value!r}")
        return value
    if kind == "list":
        structured = _structured(action)
        if structured is not None:
            return _convert_structured(structured, value, where, from_text=from_text)
        if from_text:
            items = [part.strip() for part in value.split(",") if part.strip()]
        elif isinstance(value, list):
            items = value
        else:
            raise ConfigError(f"{where}: expected {_type_name(action)} (a TOML array), got "
                              f"{type(value).__name__} {value!r}")
        converted = [_convert_scalar(action, item, f"{where}, item {i}", from_text=from_text)
                     for i, item in enumerate(items)]
        if action.nargs == "+" and not converted:
            raise ConfigError(f"{where}: expected at least one value")
        if isinstance(action.nargs, int) and len(converted) != action.nargs:
            raise ConfigError(f"{where}: expected exactly {action.nargs} values, got {len(converted)}")
        return converted
    return _convert_scalar(action, value, where, from_text=from_text)


def _convert_structured(structured: _StructuredList, value: Any, where: str, *, from_text: bool) -> list[Any]:
    if from_text:
        items: list[Any] = value.split()  # whitespace: an item's own commas stay inside it
    elif isinstance(value, list):
        items = value
    else:
        raise ConfigError(f"{where}: expected an array of strings or tables, got {type(value).__name__} {value!r}")
    converted = []
    for number, item in enumerate(items, 1):
        item_where = f"{where}, entry {number}"
        if isinstance(item, bool) or not isinstance(item, (str, dict)):
            raise ConfigError(f"{item_where}: expected a string or a table, got {type(item).__name__} {item!r}")
        try:
            converted.append(structured.parse_item(item, item_where))
        except ValueError as exc:
            message = str(exc)
            raise ConfigError(message if message.startswith(item_where) else f"{item_where}: {message}") from None
    return converted


# --------------------------------------------------------------------------------------------------------------
# Sources


def _read_toml(path: str) -> dict:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None


def option_keys(parser: argparse.ArgumentParser) -> set[str]:
    """Every normalised key a config file may use for `parser` (what `shared_keys` lists for another command)."""
    return set(_lookup(parser))


def apply_config(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    *,
    section: str,
    argv: Iterable[str],
    env: Mapping[str, str] = os.environ,
    config_path: str | None = None,
    sections: Iterable[str] | None = None,
    shared_keys: Iterable[str] = (),
) -> dict[str, str]:
    """Fill ``args`` (already parsed from ``argv`` by ``parser``) from the config file and the environment.

    ``section`` names the file's table (``[gateway]``, ``[replica]``, ...) and the environment prefix
    (``LLMGW_GATEWAY_*``). ``sections`` lists every table a file may hold (the other commands'; None = tables
    are not checked). Top-level keys of the file and ``LLMGW_<KEY>`` variables are shared by every command; a
    shared key this parser lacks is accepted if it is in ``shared_keys`` (the other commands' keys, see
    :func:`option_keys`) and otherwise rejected as unknown. The file is ``config_path``, else ``args.config``
    (see :func:`add_config_argument`), else ``$LLMGW_CONFIG``; no file is fine.

    Returns ``{dest: source}`` for every value not left at its default, where source is ``"flag"``,
    ``"env LLMGW_..."`` or ``"file PATH [section]"`` — handy for a debug log of the effective configuration.
    Raises :class:`ConfigError` on anything it cannot apply, leaving ``args`` unchanged.
    """
    section = _norm(section)
    table = _lookup(parser)
    explicit = explicit_dests(parser, argv)
    updates: dict[str, tuple[Any, str]] = {}  # dest -> (value, source); later sources overwrite earlier ones

    path = config_path or getattr(args, "config", None) or env.get(CONFIG_ENV_VAR) or None
    if path:
        data = _read_toml(path)
        known_sections = None if sections is None else {_norm(name) for name in sections} | {section}
        top_level = {k: v for k, v in data.items() if not isinstance(v, dict)}
        tables = {k: v for k, v in data.items() if isinstance(v, dict)}
        for name in tables:
            if known_sections is not None and name not in known_sections:
                raise ConfigError(f"{path}: unknown section [{name}]; known sections: "
                                  f"{', '.join(sorted(known_sections))}")
        foreign = {_norm(k) for k in shared_keys}
        for key, value in top_level.items():
            action = table.get(_norm(key))
            if action is None:
                if _norm(key) in foreign:
                    continue  # a shared setting for another command
                raise ConfigError(f"{path}: unknown key {key!r} (top level); {_did_you_mean(key, table)}")
            where = f"{path}: key {key!r}"
            updates[action.dest] = (_convert(action, value, where, from_text=False), f"file {path}")
        for key, value in tables.get(section, {}).items():
            action = table.get(_norm(key))
            if action is None:
                if isinstance(value, dict):
                    raise ConfigError(f"{path}: unexpected table [{section}.{key}]")
                raise ConfigError(f"{path}: unknown key {key!r} in [{section}]; {_did_you_mean(key, table)}")
            where = f"{path}: key {key!r} in [{section}]"
            updates[action.dest] = (_convert(action, value, where, from_text=False), f"file {path} [{section}]")

    section_prefix = env_var_name(section, "")  # e.g. "LLMGW_GATEWAY_"
    by_env_name = {env_var_name(section, _key_of(a)): a for a in table.values()}
    for name in env:
        if name.startswith(section_prefix) and name not in by_env_name:
            raise ConfigError(f"environment variable {name}: unknown option for `{section}`; "
                              f"{_did_you_mean(name[len(section_prefix):], table)}{_service_link_hint(name, env)}")
    for action in {id(a): a for a in table.values()}.values():
        for name in (env_var_name(None, _key_of(action)), env_var_name(section, _key_of(action))):
            if name in env:  # the section-specific name is applied second so it wins
                where = f"environment variable {name}"
                try:
                    converted = _convert(action, env[name], where, from_text=True)
                except ConfigError as exc:
                    raise ConfigError(f"{exc}{_service_link_hint(name, env)}") from None
                updates[action.dest] = (converted, f"env {name}")

    sources: dict[str, str] = dict.fromkeys(explicit, "flag")
    for dest, (value, source) in updates.items():
        if dest in explicit:
            continue
        setattr(args, dest, value)
        sources[dest] = source
    return sources


def _service_link_hint(name: str, env: Mapping[str, str]) -> str:
    # Kubernetes injects LLMGW_GATEWAY_PORT=tcp://... and LLMGW_GATEWAY_SERVICE_HOST for a Service named
    # llmgw-gateway: our own naming scheme, with foreign values. Say so instead of leaving the user puzzled.
    value = env.get(name, "")
    if re.match(r"^(tcp|udp|sctp)://", value) or re.search(r"_SERVICE_(HOST|PORT)|_PORT_\d+_", name):
        return " (this looks like a Kubernetes service link variable: set `enableServiceLinks: false` in the pod spec)"
    return ""


def _did_you_mean(key: str, table: Mapping[str, argparse.Action]) -> str:
    import difflib

    close = difflib.get_close_matches(_norm(key), list(table), n=1)
    if close:
        return f"did you mean {_key_of(table[close[0]])!r}?"
    return "see docs/configuration.md for the options"


def add_config_argument(parser: argparse.ArgumentParser) -> argparse.Action:
    """Add ``--config FILE`` (dest ``config``); without it, ``$LLMGW_CONFIG`` names the file, if set."""
    return parser.add_argument(
        "--config", metavar="FILE", default=None,
        help=f"TOML config file (default: ${CONFIG_ENV_VAR} if set); flags > LLMGW_* env vars > file > defaults")


# --------------------------------------------------------------------------------------------------------------
# docs/configuration.md: generated option tables between markers, and a checker

_BLOCK_RE = re.compile(r"<!-- llmgw:options (?P<section>[a-z0-9_-]+) -->\n(?P<body>.*?)<!-- /llmgw:options -->",
                       re.DOTALL)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _fmt_default(option: OptionDoc) -> str:
    if option.default is None or option.default == "":
        return ""
    if isinstance(option.default, bool):
        return "true" if option.default else "false"
    return f"`{option.default}`"


def render_options_markdown(parser: argparse.ArgumentParser, section: str) -> str:
    """A Markdown table of ``parser``'s options: file key, flag, environment variable, type, default, help."""
    lines = ["| key | flag | environment | type | default | description |",
             "|---|---|---|---|---|---|"]
    for opt in parser_options(parser):
        type_name = opt.type_name
        if opt.choices:
            type_name += " (" + ", ".join(str(c) for c in opt.choices) + ")"
        lines.append("| " + " | ".join([
            f"`{opt.key}`", f"`{opt.flag}`", f"`{env_var_name(section, opt.key)}`", _md_cell(type_name),
            _md_cell(_fmt_default(opt)), _md_cell(opt.help)]) + " |")
    return "\n".join(lines) + "\n"


def update_docs(text: str, parsers: Mapping[str, argparse.ArgumentParser]) -> str:
    """Regenerate every ``<!-- llmgw:options SECTION -->`` block of ``text`` whose section is in ``parsers``."""

    def replace(match: re.Match) -> str:
        name = match.group("section")
        if name not in parsers:
            return match.group(0)
        return (f"<!-- llmgw:options {name} -->\n{render_options_markdown(parsers[name], name)}"
                f"<!-- /llmgw:options -->")

    return _BLOCK_RE.sub(replace, text)


def doc_sections(text: str) -> list[str]:
    """The sections DOC has option blocks for, in order."""
    return [m.group("section") for m in _BLOCK_RE.finditer(text)]


def check_docs(text: str, parsers: Mapping[str, argparse.ArgumentParser]) -> list[str]:
    """Problems that keep ``text`` from documenting every option of every parser; empty when all is well.

    Each section needs its marked block, and every option of the parser must appear in that block as its
    config key in backticks. A block that is complete but stale (a default or help text changed) is reported too,
    so ``--check`` in CI catches drift; ``update_docs`` fixes both."""
    blocks = {m.group("section"): m.group("body") for m in _BLOCK_RE.finditer(text)}
    problems = []
    for name, parser in parsers.items():
        body = blocks.get(name)
        if body is None:
            problems.append(f"no '<!-- llmgw:options {name} -->' block")
            continue
        options = parser_options(parser)
        listed = set(re.findall(r"^\| `([^`]+)`", body, re.MULTILINE))
        section_problems = [f"[{name}] option {o.key!r} ({o.flag}) is not documented"
                            for o in options if o.key not in listed]
        section_problems += [f"[{name}] documents {key!r}, which the parser does not have"
                             for key in sorted(listed - {o.key for o in options})]
        if not section_problems and body != render_options_markdown(parser, name):
            section_problems.append(f"[{name}] table is out of date (defaults or help changed)")
        problems += section_problems
    return problems
