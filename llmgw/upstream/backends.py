"""One upstream model server as the gateway routes to it, and the two ways people write one down.

A `Backend` is a value: where the server is (`base_url`, and `id`, the canonical form of that URL unless given),
what kind it is (`capabilities.BackendKind`), which models it serves and under which client-facing names
(`models`, `aliases`), how much of the traffic it should get (`weight`, `capacity`), and what was last learnt about
it (`health`, `load`). Discovery sources produce Backends; the gateway's routing table consumes them. Two Backends
with the same `id` are the same server, whichever source found them.

Written down, an upstream is either a `--upstream` string or a `[[upstream]]` table in the config file:

    --upstream http://10.0.0.5:8000
    --upstream http://10.0.0.5:8000,kind=vllm,model=meta-llama/Llama-3.1-8B-Instruct,alias=llama3=meta-llama/Llama-3.1-8B-Instruct,weight=2,capacity=64
    --upstream dns://vllm-headless.default.svc.cluster.local:8000,kind=vllm,refresh=5

    [[upstream]]
    url = "http://10.0.0.5:8000"
    kind = "vllm"
    models = ["meta-llama/Llama-3.1-8B-Instruct"]
    aliases = { llama3 = "meta-llama/Llama-3.1-8B-Instruct" }
    weight = 2
    capacity = 64

The string form is the URL, then comma-separated `key=value` options: `kind`, `model` (repeatable), `alias`
(repeatable, `CLIENT_NAME=SERVER_NAME`, split at the first `=`), `weight`, `capacity`, `id`, `chat_prefill`, and for
`dns://` targets `scheme` (http or https) and `refresh` (seconds). A model name containing a comma cannot be written
in the string form: use the config file. An upstream with no models learns them from its `/v1/models`. The config
file may also mix both forms in one array (`upstream = ["URL,...", { url = ... }]`), and `LLMGW_GATEWAY_UPSTREAM`
holds string forms separated by whitespace (llmgw.config.structured_list; parse_upstream_item reads one entry).

Load: `Backend.routing_load` is what the gateway's picker sees -- the server's running + waiting requests, and a
KV-full server (usage >= KV_CACHE_FULL) made to look as busy as it can while still taking requests.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import math
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

from llmgw.upstream.capabilities import BackendKind, Capabilities, ChatPrefill, capabilities_for

DEFAULT_WEIGHT = 1.0
NO_CAPACITY_LIMIT = 0  # capacity 0: the gateway sets no per-server concurrency cap (the picker's convention)
DEFAULT_DNS_REFRESH_S = 5.0
DNS_SCHEME = "dns"
MAX_MODEL_NAME_CHARS = 256
# Server-reported KV cache usage at or above this is "KV-full": one more request would wait in the server's queue or
# preempt a running one (vLLM and SGLang run with their caches well used, so only the last few percent count).
KV_CACHE_FULL = 0.95
# What a KV-full server without a capacity adds to its load: more requests than any one server runs at once
# (vLLM's max_num_seqs defaults to 256 or 1024), so the picker takes it only when every other server is KV-full too.
KV_FULL_EXTRA_LOAD = 1024


class UpstreamConfigError(ValueError):
    """An upstream written down wrongly; the message names the entry and the field."""


class HealthState(enum.Enum):
    UNKNOWN = "unknown"  # not probed yet: routable (a request is the first probe)
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"  # K consecutive failed probes (probe.py): not routed to

    @property
    def routable(self) -> bool:
        return self is not HealthState.UNHEALTHY


@dataclasses.dataclass(frozen=True, slots=True)
class ServerLoad:
    """What the server itself reports about its queue, summed over its engines (probe.py reads it)."""
    running: int  # requests being generated
    waiting: int  # requests queued inside the server
    kv_cache_usage: float | None = None  # 0..1, the fullest KV cache pool; None where the server does not say

    def __post_init__(self) -> None:
        for name in ("running", "waiting"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"ServerLoad.{name} must be an integer >= 0, got {value!r}")
        usage = self.kv_cache_usage
        if usage is not None and (isinstance(usage, bool) or not isinstance(usage, (int, float))
                                  or not 0.0 <= usage <= 1.0):
            raise ValueError(f"ServerLoad.kv_cache_usage must be within [0, 1], got {usage!r}")


@dataclasses.dataclass(frozen=True)
class Backend:
    base_url: str
    kind: BackendKind = BackendKind.OPENAI_COMPATIBLE
    # The server's own model names. Empty: not known yet (learnt from /v1/models unless `models_configured`).
    models: tuple[str, ...] = ()
    # (client-facing name, server model name), sorted by client name.
    aliases: tuple[tuple[str, str], ...] = ()
    weight: float = DEFAULT_WEIGHT
    capacity: int = NO_CAPACITY_LIMIT
    chat_prefill: ChatPrefill | None = None  # None: the kind's default (capabilities.py)
    id: str = ""  # "" -> canonical_id(base_url)
    models_configured: bool = False  # models were written down, not learnt
    health: HealthState = HealthState.UNKNOWN
    load: ServerLoad | None = None

    def __post_init__(self) -> None:
        canonical = canonical_id(self.base_url)  # validates the URL
        if not self.id:
            object.__setattr__(self, "id", canonical)
        if not isinstance(self.kind, BackendKind):
            object.__setattr__(self, "kind", BackendKind(self.kind))
        object.__setattr__(self, "models", _model_names(self.models, "models"))
        object.__setattr__(self, "aliases", _alias_pairs(self.aliases))
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) \
                or not math.isfinite(self.weight) or self.weight <= 0:
            raise ValueError(f"weight must be a finite number > 0, got {self.weight!r}")
        object.__setattr__(self, "weight", float(self.weight))
        if isinstance(self.capacity, bool) or not isinstance(self.capacity, int) or self.capacity < 0:
            raise ValueError(f"capacity must be an integer >= 0 (0: no limit), got {self.capacity!r}")
        if self.models_configured:
            served = set(self.models)
            missing = sorted({target for _, target in self.aliases} - served)
            if missing:
                raise ValueError(f"alias target(s) {missing} are not among the models {list(self.models)}")

    @property
    def capabilities(self) -> Capabilities:
        table = capabilities_for(self.kind)
        return table if self.chat_prefill is None else table.with_chat_prefill(self.chat_prefill)

    def server_model(self, requested: str) -> str | None:
        """The server's name for a model a client asked for (an alias or the server's own name), or None when this
        server does not serve it."""
        for alias, target in self.aliases:
            if alias == requested:
                return target if target in self.models else None
        return requested if requested in self.models else None

    def client_models(self) -> tuple[str, ...]:
        """Every name a client can use for this server: its models and the aliases of models it serves."""
        names = set(self.models)
        names.update(alias for alias, target in self.aliases if target in self.models)
        return tuple(sorted(names))

    def with_models(self, models: Iterable[str]) -> Backend:
        return dataclasses.replace(self, models=tuple(models))

    def with_health(self, health: HealthState) -> Backend:
        return dataclasses.replace(self, health=health)

    def with_load(self, load: ServerLoad | None) -> Backend:
        return dataclasses.replace(self, load=load)

    @property
    def routing_load(self) -> int:
        """The load the gateway's picker sees for this server (docs/backends.md, "Load"): its reported running +
        waiting requests; when its KV cache is full (usage >= KV_CACHE_FULL), as loaded as it can be while still
        taking requests -- capacity - 1 when it has a capacity (the gateway then sends it at most one more request
        until the next report shows room), else KV_FULL_EXTRA_LOAD more. The bounded-load ring walk and least
        connections thus pass it by while another server has room, and take it again once it reports below the
        threshold. 0 when the server reports no load."""
        load = self.load
        if load is None:
            return 0
        queued = load.running + load.waiting
        if load.kv_cache_usage is None or load.kv_cache_usage < KV_CACHE_FULL:
            return queued
        if self.capacity > 0:
            return max(queued, self.capacity - 1)
        return queued + KV_FULL_EXTRA_LOAD


def canonical_id(base_url: str) -> str:
    """The stable id of a server: its URL with the scheme and host lowercased, the port explicit, and the path
    without a trailing "/" or "/v1" (the client treats both forms alike). Raises ValueError for a URL the gateway
    cannot use as a base (no host, a query or fragment, credentials, a scheme other than http/https)."""
    if not isinstance(base_url, str):
        raise ValueError(f"an upstream URL must be a string, got {base_url!r}")
    try:
        parts = urlsplit(base_url.strip())
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"not a usable upstream URL {base_url!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ValueError(f"an upstream URL must start with http:// or https://, got {base_url!r}")
    if not parts.hostname:
        raise ValueError(f"an upstream URL needs a host, got {base_url!r}")
    if port == 0:
        raise ValueError(f"an upstream URL needs a port within 1..65535, got {base_url!r}")
    if parts.query or parts.fragment or parts.username is not None or parts.password is not None:
        raise ValueError(f"an upstream URL is a base URL: no credentials, query or fragment, got {base_url!r}")
    host = _url_host(parts.hostname)
    if port is None:
        port = 443 if scheme == "https" else 80
    path = parts.path.rstrip("/")
    if path.endswith("/v1"):
        path = path[:-3]
    return f"{scheme}://{host}:{port}{path}"


def url_for_address(scheme: str, address: str, port: int) -> str:
    """The base URL of a server at a resolved address (IPv6 in brackets)."""
    return f"{scheme}://{_url_host(address)}:{port}"


def _url_host(host: str) -> str:
    host = host.lower()
    try:
        if ipaddress.ip_address(host).version == 6:
            return f"[{host}]"
    except ValueError:
        pass
    return host


def _model_names(values: object, what: str) -> tuple[str, ...]:
    if isinstance(values, str) or not isinstance(values, Iterable):
        raise ValueError(f"{what} must be a list of model names, got {values!r}")
    names: list[str] = []
    for value in values:
        _check_model_name(value, what)
        if value not in names:
            names.append(value)
    return tuple(names)


def _check_model_name(value: object, what: str) -> None:
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_MODEL_NAME_CHARS \
            or not value.isprintable():
        raise ValueError(f"{what}: a model name is a non-empty printable string of at most "
                         f"{MAX_MODEL_NAME_CHARS} characters, got {value!r}")


def _alias_pairs(values: object) -> tuple[tuple[str, str], ...]:
    pairs: dict[str, str] = {}
    items: Iterable[Any]
    if isinstance(values, Mapping):
        items = values.items()
    elif isinstance(values, Iterable) and not isinstance(values, str):
        items = values
    else:
        raise ValueError(f"aliases must map client names to server model names, got {values!r}")
    for item in items:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise ValueError(f"an alias is a (client name, server model name) pair, got {item!r}")
        alias, target = item
        _check_model_name(alias, "aliases")
        _check_model_name(target, "aliases")
        if pairs.get(alias, target) != target:
            raise ValueError(f"alias {alias!r} points at both {pairs[alias]!r} and {target!r}")
        pairs[alias] = target
    return tuple(sorted(pairs.items()))


# --- DNS targets ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DnsUpstream:
    """A DNS name whose addresses are each one upstream (a Kubernetes headless Service): discovery.DnsSource
    re-resolves it every `refresh_s` seconds. `template` holds the settings every resolved server gets; its
    base_url is a placeholder replaced by each address."""
    name: str
    port: int
    template: Backend
    scheme: str = "http"
    refresh_s: float = DEFAULT_DNS_REFRESH_S

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or any(c in self.name for c in "/?#@ ,"):
            raise ValueError(f"a DNS upstream needs a host name, got {self.name!r}")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 < self.port < 65536:
            raise ValueError(f"a DNS upstream needs a port within 1..65535, got {self.port!r}")
        if self.scheme not in ("http", "https"):
            raise ValueError(f"scheme must be http or https, got {self.scheme!r}")
        if isinstance(self.refresh_s, bool) or not isinstance(self.refresh_s, (int, float)) \
                or not math.isfinite(self.refresh_s) or self.refresh_s <= 0:
            raise ValueError(f"refresh must be a number of seconds > 0, got {self.refresh_s!r}")

    @property
    def label(self) -> str:
        return f"{DNS_SCHEME}://{self.name}:{self.port}"

    def backend_at(self, address: str, port: int) -> Backend:
        url = url_for_address(self.scheme, address, port)
        return dataclasses.replace(self.template, base_url=url, id=canonical_id(url))


UpstreamSpec = Backend | DnsUpstream

# --- the two written forms ------------------------------------------------------------------------------------

_TABLE_KEYS = frozenset({"url", "kind", "models", "aliases", "weight", "capacity", "id", "chat_prefill", "scheme",
                         "refresh"})
_DNS_ONLY_KEYS = frozenset({"scheme", "refresh"})


def parse_upstream_arg(text: str, where: str = "") -> UpstreamSpec:
    """One `--upstream` value: `URL[,key=value...]` (see the module docstring). `where` names its source in error
    messages (default: the flag)."""
    if not isinstance(text, str) or not text.strip():
        raise UpstreamConfigError(f"{where}: an upstream needs a URL, got an empty value" if where
                                  else "--upstream needs a URL, got an empty value")
    url, *options = [part.strip() for part in text.strip().split(",")]
    table: dict[str, Any] = {"url": url}
    models: list[str] = []
    aliases: list[tuple[str, str]] = []
    where = f"{where} ({text!r})" if where else f"--upstream {text!r}"
    for option in options:
        key, sep, value = option.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise UpstreamConfigError(f"{where}: option {option!r} is not key=value")
        if key == "model":
            models.append(value)
        elif key == "alias":
            alias, sep, target = value.partition("=")
            if not sep:
                raise UpstreamConfigError(f"{where}: alias {value!r} is not CLIENT_NAME=SERVER_NAME")
            aliases.append((alias, target))
        elif key in ("weight", "refresh"):
            table[key] = _number(value, key, where)
        elif key == "capacity":
            table[key] = _integer(value, key, where)
        elif key in _TABLE_KEYS - {"url", "models", "aliases"}:
            if key in table:
                raise UpstreamConfigError(f"{where}: option {key!r} given twice")
            table[key] = value
        else:
            raise UpstreamConfigError(f"{where}: unknown option {key!r} (known: model, alias, "
                                      + ", ".join(sorted(_TABLE_KEYS - {'url', 'models', 'aliases'})) + ")")
    if models:
        table["models"] = models
    if aliases:
        table["aliases"] = aliases
    return _spec_from_table(table, where)


def parse_upstream_tables(tables: object) -> list[UpstreamSpec]:
    """The config file's `[[upstream]]` array (as tomllib parsed it)."""
    if not isinstance(tables, list):
        raise UpstreamConfigError(f"[[upstream]] must be an array of tables, got {type(tables).__name__}")
    specs: list[UpstreamSpec] = []
    for number, table in enumerate(tables, 1):
        where = f"[[upstream]] entry {number}"
        if not isinstance(table, dict):
            raise UpstreamConfigError(f"{where}: must be a table, got {type(table).__name__}")
        specs.append(parse_upstream_table(table, where))
    _check_unique_ids(specs)
    return specs


def parse_upstream_table(table: Mapping[str, Any], where: str) -> UpstreamSpec:
    """One `[[upstream]]` table; `where` names it in error messages (its url is added when it has one)."""
    if isinstance(table.get("url"), str):
        where += f" (url = {table['url']!r})"
    unknown = sorted(set(table) - _TABLE_KEYS)
    if unknown:
        raise UpstreamConfigError(f"{where}: unknown key(s) {unknown} (known: {sorted(_TABLE_KEYS)})")
    return _spec_from_table(table, where)


def parse_upstream_item(value: object, where: str) -> UpstreamSpec:
    """One item of the config file's `upstream` array or of `LLMGW_GATEWAY_UPSTREAM`: a `--upstream` string or an
    `[[upstream]]` table (llmgw.config hands them over with `where` naming the file or variable and the entry)."""
    if isinstance(value, str):
        return parse_upstream_arg(value, where)
    if isinstance(value, Mapping):
        return parse_upstream_table(value, where)
    raise UpstreamConfigError(f"{where}: an upstream is a URL string or a table, got {type(value).__name__}")


def parse_upstream_args(values: Iterable[str | UpstreamSpec | Mapping[str, Any]]) -> list[UpstreamSpec]:
    """The gateway's whole list: `--upstream` strings, and what the config file or the environment gave (already
    parsed by parse_upstream_item, or tables); the same server listed twice is an error."""
    specs: list[UpstreamSpec] = []
    for number, value in enumerate(values, 1):
        if isinstance(value, (Backend, DnsUpstream)):
            specs.append(value)
        elif isinstance(value, Mapping):
            specs.append(parse_upstream_table(value, f"upstream entry {number}"))
        else:
            specs.append(parse_upstream_arg(value))
    _check_unique_ids(specs)
    return specs


def _check_unique_ids(specs: list[UpstreamSpec]) -> None:
    seen: set[str] = set()
    for spec in specs:
        key = spec.id if isinstance(spec, Backend) else spec.label
        if key in seen:
            raise UpstreamConfigError(f"upstream {key} is listed twice")
        seen.add(key)


def _spec_from_table(table: Mapping[str, Any], where: str) -> UpstreamSpec:
    url = table.get("url")
    if not isinstance(url, str) or not url:
        raise UpstreamConfigError(f"{where}: `url` is required (http://, https:// or dns://)")
    is_dns = url.lower().startswith(DNS_SCHEME + "://")
    if not is_dns:
        misplaced = sorted(_DNS_ONLY_KEYS & set(table))
        if misplaced:
            raise UpstreamConfigError(f"{where}: {misplaced} apply to dns:// upstreams only")
    fields: dict[str, Any] = {}
    try:
        if "kind" in table:
            fields["kind"] = capabilities_for(table["kind"]).kind
        if "models" in table:
            fields["models"] = _model_names(table["models"], "models")
            fields["models_configured"] = bool(fields["models"])
            if not fields["models"]:
                raise ValueError("models is empty: leave it out to learn the models from /v1/models")
        if "aliases" in table:
            fields["aliases"] = table["aliases"]
        for key in ("weight", "capacity"):
            if key in table:
                fields[key] = table[key]
        if "chat_prefill" in table:
            fields["chat_prefill"] = ChatPrefill(table["chat_prefill"])
        if "id" in table:
            if not isinstance(table["id"], str) or not table["id"].strip():
                raise ValueError(f"id must be a non-empty string, got {table['id']!r}")
            if is_dns:
                raise ValueError("a dns:// upstream cannot take an id: each resolved address gets its own")
            fields["id"] = table["id"]
        if not is_dns:
            return Backend(base_url=url, **fields)
        name, port = _dns_target(url)
        template = Backend(base_url="http://dns-template.invalid", **fields)
        dns_fields: dict[str, Any] = {}
        if "scheme" in table:
            dns_fields["scheme"] = table["scheme"]
        if "refresh" in table:
            dns_fields["refresh_s"] = table["refresh"]
        return DnsUpstream(name=name, port=port, template=template, **dns_fields)
    except ValueError as exc:
        raise UpstreamConfigError(f"{where}: {exc}") from None


def _dns_target(url: str) -> tuple[str, int]:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"not a usable dns:// target {url!r}: {exc}") from None
    if not parts.hostname or parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"a dns:// upstream is dns://NAME:PORT, got {url!r}")
    if port is None:
        raise ValueError(f"a dns:// upstream needs a port (dns://NAME:PORT), got {url!r}")
    return parts.hostname, port


def _number(value: str, key: str, where: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise UpstreamConfigError(f"{where}: {key} must be a number, got {value!r}") from None


def _integer(value: str, key: str, where: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise UpstreamConfigError(f"{where}: {key} must be an integer, got {value!r}") from None
