"""The gateway's model servers from the config file (`[[upstream]]` tables, `upstream = [...]`) and the environment
(`LLMGW_GATEWAY_UPSTREAM`, whitespace-separated), through the real parser into GatewayConfig.upstreams."""

from __future__ import annotations

import pytest

from llmgw import config
from llmgw.cli import COMMANDS, shared_keys_for, subcommand_parsers
from llmgw.cli.gateway import config_from_args
from llmgw.upstream.backends import Backend, DnsUpstream
from llmgw.upstream.capabilities import BackendKind


def _gateway_config(argv: list[str], *, env: dict[str, str] | None = None, path=None):
    parser = subcommand_parsers(["gateway"])["gateway"]
    args = parser.parse_args(argv)
    config.apply_config(parser, args, section="gateway", argv=argv, env=env or {},
                        config_path=str(path) if path else None, sections=COMMANDS,
                        shared_keys=shared_keys_for("gateway"))
    return config_from_args(args)


def _write(tmp_path, text: str):
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    return path


def test_upstream_tables_at_the_top_level_become_the_gateways_upstreams(tmp_path):
    path = _write(tmp_path, """
http-port = 8080

[[upstream]]
url = "http://10.0.0.5:8000"
kind = "vllm"
models = ["meta-llama/Llama-3.1-8B-Instruct"]
aliases = { llama3 = "meta-llama/Llama-3.1-8B-Instruct" }
weight = 2
capacity = 64
chat_prefill = "none"

[[upstream]]
url = "dns://vllm-headless.default.svc.cluster.local:8000"
kind = "sglang"
refresh = 2
scheme = "https"

[[upstream]]
url = "http://10.0.0.9:8080"
""")
    first, dns, bare = _gateway_config([], path=path).upstreams
    assert isinstance(first, Backend) and first.id == "http://10.0.0.5:8000"
    assert first.kind is BackendKind.VLLM and first.models == ("meta-llama/Llama-3.1-8B-Instruct",)
    assert first.aliases == (("llama3", "meta-llama/Llama-3.1-8B-Instruct"),)
    assert (first.weight, first.capacity, first.models_configured) == (2.0, 64, True)
    assert first.capabilities.chat_prefill.value == "none"
    assert isinstance(dns, DnsUpstream)
    assert (dns.name, dns.port, dns.scheme, dns.refresh_s) == ("vllm-headless.default.svc.cluster.local", 8000,
                                                               "https", 2)
    assert dns.template.kind is BackendKind.SGLANG
    assert bare.models == () and not bare.models_configured  # learns its models from /v1/models


def test_tables_in_the_gateway_section_and_mixed_arrays(tmp_path):
    path = _write(tmp_path, """
[[gateway.upstream]]
url = "http://a:8000"
models = ["m"]
""")
    (only,) = _gateway_config([], path=path).upstreams
    assert only.id == "http://a:8000" and only.models == ("m",)

    path = _write(tmp_path, """
[gateway]
upstream = ["http://a:8000,kind=vllm,model=x,alias=small=x", { url = "http://b:8000", models = ["y"] }]
""")
    a, b = _gateway_config([], path=path).upstreams
    assert (a.kind, a.models, a.aliases) == (BackendKind.VLLM, ("x",), (("small", "x"),))
    assert (b.id, b.models) == ("http://b:8000", ("y",))


def test_the_environment_separates_upstreams_by_whitespace_and_keeps_their_commas():
    env = {"LLMGW_GATEWAY_UPSTREAM": "http://a:8000,kind=vllm,model=m1,model=m2,weight=3  http://b:9000\n"
                                     "\tdns://vllm-headless:8000,kind=vllm,refresh=4\n"}
    a, b, dns = _gateway_config([], env=env).upstreams
    assert (a.id, a.kind, a.models, a.weight) == ("http://a:8000", BackendKind.VLLM, ("m1", "m2"), 3.0)
    assert b.id == "http://b:9000" and b.models == ()
    assert (dns.label, dns.refresh_s, dns.template.kind) == ("dns://vllm-headless:8000", 4.0, BackendKind.VLLM)
    # The shared spelling works too; the section-specific variable wins over it.
    (shared,) = _gateway_config([], env={"LLMGW_UPSTREAM": "http://c:1,model=z"}).upstreams
    assert shared.models == ("z",)
    (own,) = _gateway_config([], env={"LLMGW_UPSTREAM": "http://c:1", "LLMGW_GATEWAY_UPSTREAM": "http://d:2"}
                             ).upstreams
    assert own.id == "http://d:2"


def test_flags_replace_the_files_list(tmp_path):
    path = _write(tmp_path, '[[upstream]]\nurl = "http://a:8000"\n')
    (flagged,) = _gateway_config(["--upstream", "http://b:8000,model=m"], path=path,
                                 env={"LLMGW_GATEWAY_UPSTREAM": "http://c:8000"}).upstreams
    assert flagged.id == "http://b:8000" and flagged.models == ("m",)
    (from_env,) = _gateway_config([], path=path, env={"LLMGW_GATEWAY_UPSTREAM": "http://c:8000"}).upstreams
    assert from_env.id == "http://c:8000"


@pytest.mark.parametrize(("toml_text", "fragments"), [
    ('[[upstream]]\nurl = "http://a:8000"\n[[upstream]]\nurl = "http://b:8000"\nweight = 0\n',
     ["key 'upstream', entry 2 (url = 'http://b:8000')", "weight must be a finite number > 0"]),
    ('[[upstream]]\nurl = "http://a:8000"\nmodel = "m"\n',
     ["key 'upstream', entry 1 (url = 'http://a:8000')", "unknown key(s) ['model']"]),
    ('[[upstream]]\nkind = "vllm"\n', ["key 'upstream', entry 1", "`url` is required"]),
    ('[[upstream]]\nurl = "http://a:8000"\nrefresh = 3\n', ["entry 1", "apply to dns:// upstreams only"]),
    ('[[upstream]]\nurl = "http://a:8000"\nkind = "triton"\n', ["entry 1", "unknown backend kind 'triton'"]),
    ('[[upstream]]\nurl = "http://a:8000"\nmodels = ["m"]\naliases = { s = "other" }\n',
     ["entry 1", "alias target(s) ['other'] are not among the models"]),
    ('[gateway]\nupstream = ["http://a:8000", 7]\n', ["key 'upstream' in [gateway], entry 2",
                                                       "expected a string or a table, got int 7"]),
    ('[gateway]\nupstream = "http://a:8000"\n', ["key 'upstream' in [gateway]", "expected an array"]),
    ('[gateway]\nupstream = ["ftp://a:8000,kind=vllm"]\n',
     ["key 'upstream' in [gateway], entry 1 ('ftp://a:8000,kind=vllm')", "must start with http:// or https://"]),
])
def test_a_wrong_entry_names_the_file_the_entry_and_what_is_wrong(tmp_path, toml_text, fragments):
    path = _write(tmp_path, toml_text)
    with pytest.raises(config.ConfigError) as caught:
        _gateway_config([], path=path)
    message = str(caught.value)
    assert message.startswith(str(path))
    for fragment in fragments:
        assert fragment in message


def test_a_wrong_environment_entry_names_the_variable_and_the_entry():
    with pytest.raises(config.ConfigError) as caught:
        _gateway_config([], env={"LLMGW_GATEWAY_UPSTREAM": "http://a:8000 http://b:8000,capacity=lots"})
    message = str(caught.value)
    assert message.startswith("environment variable LLMGW_GATEWAY_UPSTREAM, entry 2 ('http://b:8000,capacity=lots')")
    assert "capacity must be an integer" in message


def test_the_same_server_from_two_entries_is_refused(tmp_path):
    path = _write(tmp_path, '[[upstream]]\nurl = "http://a:8000"\n[[upstream]]\nurl = "http://A:8000/v1"\n')
    with pytest.raises(SystemExit, match="http://a:8000 is listed twice"):
        _gateway_config([], path=path)


def test_documented_as_a_list_of_strings_or_tables():
    (upstream,) = [o for o in config.parser_options(subcommand_parsers(["gateway"])["gateway"])
                   if o.key == "upstream"]
    assert upstream.type_name == "list of string or table"
    assert "[[upstream]]" in upstream.help and "whitespace-separated" in upstream.help
