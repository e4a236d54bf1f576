"""llmgw.config: file + env + flags precedence over a sample parser, errors, and the docs checker."""

from __future__ import annotations

import argparse
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import examples
from hypothesis import given, settings
from hypothesis import strategies as st

from llmgw import config
from llmgw.config import ConfigError, add_config_argument, apply_config

ROOT = Path(__file__).resolve().parent.parent


def sample_parser() -> argparse.ArgumentParser:
    """Shaped like the gateway's: reference flags, a bool, a float, choices, an alias, a list."""
    p = argparse.ArgumentParser(prog="sample")
    add_config_argument(p)
    p.add_argument("--id", default="gateway-1", help="member id")
    p.add_argument("--port", type=int, default=50051, help="gRPC port (default %(default)s)")
    p.add_argument("--queue-timeout-s", type=float, default=30.0, help="queue wait limit")
    p.add_argument("--reject-all", action="store_true", help="refuse every request")
    p.add_argument("--gossip-config", default="lan", choices=("lan", "local"), help="gossip | timing preset")
    p.add_argument("--host", "--bind", dest="host", default="127.0.0.1", help="address to bind")
    p.add_argument("--tag", action="append", default=[], help="repeatable tag")
    p.add_argument("--seeds", default="", help="comma-separated host:port")
    return p


def configure(tmp_path, toml_text=None, argv=(), env=None, section="gateway", shared_keys=()):
    parser = sample_parser()
    argv = list(argv)
    path = None
    if toml_text is not None:
        path = tmp_path / "llmgw.toml"
        path.write_text(textwrap.dedent(toml_text))
        argv = ["--config", str(path), *argv]
    args = parser.parse_args(argv)
    sources = apply_config(parser, args, section=section, argv=argv, env=env or {}, shared_keys=shared_keys)
    return args, sources, path


def test_defaults_untouched_without_file_or_env(tmp_path):
    args, sources, _ = configure(tmp_path)
    assert (args.id, args.port, args.queue_timeout_s, args.reject_all) == ("gateway-1", 50051, 30.0, False)
    assert sources == {}


def test_file_section_and_top_level_keys_apply_with_section_winning(tmp_path):
    args, sources, path = configure(tmp_path, """
        seeds = "10.0.0.1:60061"
        port = 1111
        [gateway]
        port = 2222
        queue-timeout-s = 5
        reject_all = true
        gossip-config = "local"
        bind = "0.0.0.0"
        tag = ["a", "b"]
        [replica]
        port = 3333
    """)
    assert args.port == 2222
    assert args.seeds == "10.0.0.1:60061"
    assert args.queue_timeout_s == 5.0 and isinstance(args.queue_timeout_s, float)
    assert args.reject_all is True
    assert args.gossip_config == "local"
    assert args.host == "0.0.0.0"
    assert args.tag == ["a", "b"]
    assert sources["port"] == f"file {path} [gateway]"
    assert sources["seeds"] == f"file {path}"


def test_precedence_flag_over_section_env_over_shared_env_over_file(tmp_path):
    toml = """
        [gateway]
        port = 1000
        id = "from-file"
        queue_timeout_s = 1.5
        seeds = "file:1"
    """
    env = {"LLMGW_PORT": "2000", "LLMGW_GATEWAY_PORT": "3000", "LLMGW_ID": "from-shared-env",
           "LLMGW_QUEUE_TIMEOUT_S": "2.5"}
    args, sources, _ = configure(tmp_path, toml, argv=["--port", "4000"], env=env)
    assert args.port == 4000 and sources["port"] == "flag"
    assert args.id == "from-shared-env" and sources["id"] == "env LLMGW_ID"
    assert args.queue_timeout_s == 2.5
    assert args.seeds == "file:1"

    args, sources, _ = configure(tmp_path, toml, env=env)
    assert args.port == 3000 and sources["port"] == "env LLMGW_GATEWAY_PORT"


def test_flag_equal_to_its_default_still_wins_over_file(tmp_path):
    # Explicitness is detected from argv, not by comparing with the default.
    args, sources, _ = configure(tmp_path, "[gateway]\nport = 1234\n", argv=["--port", "50051"])
    assert args.port == 50051 and sources["port"] == "flag"


def test_explicit_flag_given_through_alias_and_equals_form(tmp_path):
    args, _, _ = configure(tmp_path, "[gateway]\nhost = '10.1.1.1'\nport = 9\n", argv=["--bind=::1", "--port=7"])
    assert (args.host, args.port) == ("::1", 7)


def test_env_bool_and_list_parsing(tmp_path):
    args, _, _ = configure(tmp_path, env={"LLMGW_GATEWAY_REJECT_ALL": "Yes", "LLMGW_GATEWAY_TAG": "x, y,,z"})
    assert args.reject_all is True and args.tag == ["x", "y", "z"]
    args, _, _ = configure(tmp_path, "[gateway]\nreject-all = true\n", env={"LLMGW_GATEWAY_REJECT_ALL": "off"})
    assert args.reject_all is False


def test_config_file_from_environment_variable(tmp_path):
    path = tmp_path / "env.toml"
    path.write_text("[gateway]\nport = 4321\n")
    parser = sample_parser()
    args = parser.parse_args([])
    apply_config(parser, args, section="gateway", argv=[], env={"LLMGW_CONFIG": str(path)})
    assert args.port == 4321


@pytest.mark.parametrize("toml_text, fragments", [
    ("[gateway]\nport = \"50051\"\n", ["key 'port' in [gateway]", "expected integer", "str"]),
    ("[gateway]\nport = true\n", ["key 'port'", "expected integer", "boolean"]),
    ("[gateway]\nqueue-timeout-s = \"soon\"\n", ["queue-timeout-s", "expected number"]),
    ("[gateway]\nreject-all = 1\n", ["reject-all", "expected boolean"]),
    ("[gateway]\nid = 7\n", ["key 'id'", "expected string"]),
    ("[gateway]\ntag = \"a\"\n", ["key 'tag'", "expected list of string"]),
    ("[gateway]\ngossip-config = \"wan\"\n", ["gossip-config", "'wan' is not one of 'lan', 'local'"]),
    ("[gateway]\nprot = 1\n", ["unknown key 'prot' in [gateway]", "did you mean 'port'"]),
    ("nonsense = 1\n", ["unknown key 'nonsense' (top level)"]),
    ("[gatway]\nport = 1\n", ["unknown section [gatway]"]),
    ("[gateway\nport = 1\n", ["invalid TOML"]),
])
def test_bad_file_values_name_file_key_and_expected_type(tmp_path, toml_text, fragments):
    parser = sample_parser()
    path = tmp_path / "bad.toml"
    path.write_text(toml_text)
    args = parser.parse_args([])
    before = vars(args).copy()
    with pytest.raises(ConfigError) as info:
        apply_config(parser, args, section="gateway", argv=[], env={}, config_path=str(path),
                     sections=("gateway", "replica"), shared_keys=())
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message
    assert vars(args) == before  # nothing half-applied


@pytest.mark.parametrize("env, fragments", [
    ({"LLMGW_GATEWAY_PORT": "fifty"}, ["LLMGW_GATEWAY_PORT", "expected integer", "'fifty'"]),
    ({"LLMGW_REJECT_ALL": "maybe"}, ["LLMGW_REJECT_ALL", "expected boolean"]),
    ({"LLMGW_GATEWAY_PROT": "1"}, ["LLMGW_GATEWAY_PROT", "unknown option", "did you mean 'port'"]),
])
def test_bad_environment_values(tmp_path, env, fragments):
    with pytest.raises(ConfigError) as info:
        configure(tmp_path, env=env)
    for fragment in fragments:
        assert fragment in str(info.value)


@pytest.mark.parametrize("env", [{"LLMGW_GATEWAY_PORT": "tcp://10.96.0.7:50051"},
                                 {"LLMGW_GATEWAY_SERVICE_HOST": "10.96.0.7"}])
def test_kubernetes_service_links_get_a_hint(tmp_path, env):
    with pytest.raises(ConfigError, match="enableServiceLinks: false"):
        configure(tmp_path, env=env)


def test_missing_file_is_a_clear_error(tmp_path):
    parser = sample_parser()
    args = parser.parse_args([])
    with pytest.raises(ConfigError, match=r"cannot read config file .*nope\.toml"):
        apply_config(parser, args, section="gateway", argv=[], env={}, config_path=str(tmp_path / "nope.toml"))


def test_other_sections_and_foreign_shared_keys_are_ignored(tmp_path):
    # `max-capacity` is a replica option: fine at top level for the gateway when a replica command declares it.
    args, _, _ = configure(tmp_path, "max-capacity = 8\n[replica]\nnot-checked-here = 1\n",
                           shared_keys=["max_capacity"])
    assert not hasattr(args, "max_capacity")
    # Other sections' env vars belong to other commands.
    args, _, _ = configure(tmp_path, env={"LLMGW_REPLICA_PORT": "1", "LLMGW_SOMETHING_ELSE": "x"})
    assert args.port == 50051


def test_required_option_with_explicit_value(tmp_path):
    p = argparse.ArgumentParser()
    p.add_argument("--target", required=True)
    p.add_argument("--max-tokens", type=int, default=16)
    argv = ["--target", "h:1"]
    args = p.parse_args(argv)
    apply_config(p, args, section="client", argv=argv, env={"LLMGW_CLIENT_TARGET": "x:2",
                                                            "LLMGW_CLIENT_MAX_TOKENS": "3"})
    assert (args.target, args.max_tokens) == ("h:1", 3)
    assert p._actions[1].required is True  # the parser is restored after the explicitness re-parse


def test_explicit_dests_restores_parser_defaults():
    p = sample_parser()
    p.set_defaults(_run="x")
    assert config.explicit_dests(p, ["--port", "1", "--reject-all"]) == {"port", "reject_all"}
    assert p.parse_args([]).port == 50051 and p.parse_args([])._run == "x"


def test_env_var_names():
    assert config.env_var_name("gateway", "queue-timeout-s") == "LLMGW_GATEWAY_QUEUE_TIMEOUT_S"
    assert config.env_var_name(None, "seeds") == "LLMGW_SEEDS"


@settings(max_examples=examples(60), deadline=None)
@given(flag=st.one_of(st.none(), st.integers(1, 65535)), section_env=st.one_of(st.none(), st.integers(1, 65535)),
       shared_env=st.one_of(st.none(), st.integers(1, 65535)), section_file=st.one_of(st.none(), st.integers(1, 65535)),
       top_file=st.one_of(st.none(), st.integers(1, 65535)))
def test_precedence_property(tmp_path_factory, flag, section_env, shared_env, section_file, top_file):
    """The effective port is the first value present in precedence order, else the default."""
    path = tmp_path_factory.mktemp("cfg") / "c.toml"
    lines = [f"port = {top_file}"] if top_file is not None else []
    lines += ["[gateway]"] + ([f"port = {section_file}"] if section_file is not None else [])
    path.write_text("\n".join(lines) + "\n")
    env = {}
    if section_env is not None:
        env["LLMGW_GATEWAY_PORT"] = str(section_env)
    if shared_env is not None:
        env["LLMGW_PORT"] = str(shared_env)
    argv = ["--port", str(flag)] if flag is not None else []
    parser = sample_parser()
    args = parser.parse_args(argv)
    apply_config(parser, args, section="gateway", argv=argv, env=env, config_path=str(path))
    expected = next((v for v in (flag, section_env, shared_env, section_file, top_file) if v is not None), 50051)
    assert args.port == expected


# ---- docs generator / checker -------------------------------------------------------------------------------


def test_parser_options_lists_every_setting_but_not_help_or_config():
    keys = [o.key for o in config.parser_options(sample_parser())]
    assert keys == ["id", "port", "queue-timeout-s", "reject-all", "gossip-config", "host", "tag", "seeds"]
    port = config.parser_options(sample_parser())[1]
    assert (port.type_name, port.default, port.help) == ("integer", 50051, "gRPC port (default 50051)")


def test_docs_generated_block_passes_check_and_detects_drift():
    parsers = {"gateway": sample_parser()}
    doc = "# Config\n\n<!-- llmgw:options gateway -->\nTODO\n<!-- /llmgw:options -->\n"
    problems = config.check_docs(doc, parsers)
    assert any("'port'" in p and "not documented" in p for p in problems)

    generated = config.update_docs(doc, parsers)
    assert config.check_docs(generated, parsers) == []
    assert "`LLMGW_GATEWAY_QUEUE_TIMEOUT_S`" in generated
    assert "gossip \\| timing preset" in generated  # a | in help must not break the table

    without_port = "\n".join(line for line in generated.splitlines() if not line.startswith("| `port`")) + "\n"
    assert config.check_docs(without_port, parsers) == ["[gateway] option 'port' (--port) is not documented"]

    parser = sample_parser()
    parser.add_argument("--new-knob", type=int, default=1)
    assert "[gateway] option 'new-knob' (--new-knob) is not documented" in config.check_docs(
        generated, {"gateway": parser})

    stale = generated.replace("`50051`", "`1`")
    assert config.check_docs(stale, parsers) == ["[gateway] table is out of date (defaults or help changed)"]

    assert config.check_docs("no blocks", parsers) == ["no '<!-- llmgw:options gateway -->' block"]


def test_configuration_md_has_blocks_for_gateway_and_replica():
    text = (ROOT / "docs" / "configuration.md").read_text()
    for section in ("gateway", "replica"):
        assert f"<!-- llmgw:options {section} -->" in text


def test_config_module_cli_check_reports_missing_command(tmp_path):
    doc = tmp_path / "c.md"
    doc.write_text("<!-- llmgw:options no-such-command -->\n<!-- /llmgw:options -->\n")
    proc = subprocess.run([sys.executable, "-m", "llmgw.cli.config_docs", "--check", str(doc)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "no `llmgw` command for block(s): no-such-command" in proc.stderr


def test_default_ports_follow_the_gossip_offset_convention():
    for role, ports in config.DEFAULT_PORTS.items():
        assert ports["gossip"] == ports["grpc"] + config.GOSSIP_PORT_OFFSET, role
    with pytest.raises(TypeError):
        config.DEFAULT_PORTS["gateway"]["grpc"] = 1  # type: ignore[index]


def test_top_level_key_of_another_real_command_is_shared_not_unknown(tmp_path):
    # The CLI's shared_keys: the options of the other `llmgw` commands. --max-capacity is a replica flag.
    from llmgw.cli import shared_keys_for

    path = tmp_path / "shared.toml"
    path.write_text("max-capacity = 8\nport = 1234\n")
    parser = sample_parser()
    args = parser.parse_args([])
    shared = shared_keys_for("gateway")
    apply_config(parser, args, section="gateway", argv=[], env={}, config_path=str(path), shared_keys=shared)
    assert args.port == 1234 and not hasattr(args, "max_capacity")
    path.write_text("max-capacityy = 8\n")
    with pytest.raises(ConfigError, match="unknown key 'max-capacityy' \\(top level\\)"):
        apply_config(parser, args, section="gateway", argv=[], env={}, config_path=str(path), shared_keys=shared)


def test_wiring_through_subcommands_like_llmgw_main(tmp_path):
    """The shape __main__.py uses: a top-level parser with one subparser per command, the subparser stored in
    the namespace, and the arguments after the command name as argv."""
    top = argparse.ArgumentParser(prog="python -m llmgw")
    sub = top.add_subparsers(dest="command")
    for name in ("gateway", "replica"):
        p = sub.add_parser(name)
        add_config_argument(p)
        p.add_argument("--port", type=int, default=1)
        p.add_argument("--seeds", default="")
        p.set_defaults(_parser=p, _command=name)
    path = tmp_path / "c.toml"
    path.write_text('seeds = "s:1"\n[gateway]\nport = 10\n[replica]\nport = 20\n')
    argv = ["replica", "--config", str(path)]
    args = top.parse_args(argv)
    sources = apply_config(args._parser, args, section=args._command, argv=argv[1:], env={"LLMGW_GATEWAY_PORT": "5"})
    assert (args.port, args.seeds) == (20, "s:1")
    assert sources == {"config": "flag", "port": f"file {path} [replica]", "seeds": f"file {path}"}
    assert top.parse_args(["gateway"])._parser is not None  # set_defaults survived the re-parse


def test_negative_flags_keep_their_meaning(tmp_path):
    p = argparse.ArgumentParser()
    p.add_argument("--no-color", dest="color", action="store_false")
    p.add_argument("--hedge", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--sizes", type=int, nargs="+", default=[1])
    path = tmp_path / "n.toml"

    def load(text, env=None):
        path.write_text("[client]\n" + text)
        args = p.parse_args([])
        apply_config(p, args, section="client", argv=[], env=env or {}, config_path=str(path))
        return args

    assert load("no-color = true\nhedge = true\n").color is False
    assert load("no-color = false\n").color is True
    assert load("", env={"LLMGW_CLIENT_HEDGE": "1"}).hedge is True
    # The dest (`color`) and the negative spelling (`no-hedge`) would read backwards: not accepted as keys.
    with pytest.raises(ConfigError, match=r"unknown key 'color'.*did you mean 'no-color'"):
        load("color = false\n")
    with pytest.raises(ConfigError, match="unknown key 'no-hedge'"):
        load("no-hedge = true\n")
    assert load("sizes = [3, 4]\n").sizes == [3, 4]
    with pytest.raises(ConfigError, match="key 'sizes' in \\[client\\], item 1: expected integer"):
        load("sizes = [3, 'x']\n")
    with pytest.raises(ConfigError, match="expected at least one value"):
        load("sizes = []\n")


# ---- the real commands ----------------------------------------------------------------------------------------
CONFIGURABLE_COMMANDS = ("gateway", "replica", "cluster", "client", "status", "rollout")


def test_every_configurable_command_takes_config_and_is_documented_in_configuration_md():
    """A new flag without a row in docs/configuration.md fails here (regenerate with
    python -m llmgw.cli.config_docs docs/configuration.md)."""
    from llmgw.cli import subcommand_parsers

    parsers = subcommand_parsers(CONFIGURABLE_COMMANDS)
    assert set(parsers) == set(CONFIGURABLE_COMMANDS)
    for name, parser in parsers.items():
        assert "--config" in parser._option_string_actions, f"`{name}` has no --config"
    text = (ROOT / "docs" / "configuration.md").read_text()
    assert config.check_docs(text, parsers) == []


@pytest.mark.parametrize("command, toml_text, fragment", [
    ("gateway", "[gateway]\nhttp-prot = 8080\n", "unknown key 'http-prot' in [gateway]; did you mean 'http-port'?"),
    ("gateway", "[gateway]\nhttp-port = \"8080\"\n", "key 'http-port' in [gateway]: expected integer, got str"),
    ("gateway", "[gateway]\nrouting = \"fastest\"\n", "'fastest' is not one of 'affinity'"),
    ("client", "[client]\ntls-ca = 5\n", "key 'tls-ca' in [client]: expected string, got int"),
    ("gateway", "[gateway\n", "invalid TOML"),
])
def test_bad_config_is_a_clear_error_with_exit_status_2(tmp_path, command, toml_text, fragment):
    path = tmp_path / "bad.toml"
    path.write_text(toml_text)
    proc = subprocess.run([sys.executable, "-m", "llmgw", command, "--config", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert fragment in proc.stderr and "Traceback" not in proc.stderr


def test_admin_token_from_the_shared_environment_variable_reaches_the_gateway_flag(tmp_path):
    from llmgw.__main__ import build_parser

    args = build_parser().parse_args(["gateway"])
    apply_config(args._parser, args, section="gateway", argv=[], env={"LLMGW_ADMIN_TOKEN": "from-env"})
    assert args.admin_token == "from-env"
    args = build_parser().parse_args(["gateway", "--admin-token", "from-flag"])
    apply_config(args._parser, args, section="gateway", argv=["--admin-token", "from-flag"],
                 env={"LLMGW_ADMIN_TOKEN": "from-env"})
    assert args.admin_token == "from-flag"
