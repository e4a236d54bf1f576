"""What an agent advertises about its model server, as the bytes the gossip layer carries opaquely.

Encoding: UTF-8 JSON, compact, keys sorted, one object with short keys (version 1):

| key | meaning | |
|---|---|---|
| `v` | format version (1) | required |
| `u` | the server's base URL (gateways stream from it directly) | required |
| `k` | kind: vllm, sglang, llamacpp, tgi, ollama, openai | required |
| `m` | the server's model names, in its order | required (may be empty while unknown) |
| `a` | aliases: [[client name, server model name], ...] | omitted when none |
| `w` | weight (> 0) | omitted when 1 |
| `c` | capacity, max concurrent requests (0 = no limit) | omitted when 0 |
| `p` | chat prefill override (capabilities.ChatPrefill value) | omitted when the kind's default |
| `h` | health: "h" healthy, "u" unhealthy, "?" not probed yet | required |
| `l` | load: [running, waiting, kv usage 0..1 or null] | omitted when unknown |

A typical advertisement (one model, load known) is 120-200 bytes; the limit is `MAX_METADATA_BYTES` (512, as
memberlist's node metadata): encoding refuses anything larger, decoding refuses it too. KV usage is rounded to two
decimals so a reading that moves by noise alone does not make a new advertisement.

Versioning: a decoder accepts its own version and ignores keys it does not know (a later version 1 writer may add
optional keys); a higher `v` is a format it cannot read, refused with UnsupportedVersion so the gateway skips that
member instead of misreading it.
"""

from __future__ import annotations

import json
import math
from typing import Any, Final

from llmgw.upstream.backends import Backend, HealthState, ServerLoad
from llmgw.upstream.capabilities import BackendKind, ChatPrefill

FORMAT_VERSION: Final = 1
MAX_METADATA_BYTES: Final = 512

_HEALTH_CODES = {HealthState.HEALTHY: "h", HealthState.UNHEALTHY: "u", HealthState.UNKNOWN: "?"}
_HEALTH_BY_CODE = {code: state for state, code in _HEALTH_CODES.items()}


class MetadataError(ValueError):
    """Bytes that are not a readable advertisement (the message says which field is wrong)."""


class UnsupportedVersion(MetadataError):
    def __init__(self, version: object) -> None:
        super().__init__(f"advertisement format version {version!r} is not supported (this build reads "
                         f"version {FORMAT_VERSION})")
        self.version = version


class MetadataTooLarge(MetadataError):
    pass


def encode_backend(backend: Backend) -> bytes:
    """The advertisement for `backend`. Raises MetadataTooLarge past MAX_METADATA_BYTES (too many or too long
    model names: configure aliases on the gateways instead, or fewer models per agent)."""
    record: dict[str, Any] = {"v": FORMAT_VERSION, "u": backend.base_url, "k": backend.kind.value,
                              "m": list(backend.models), "h": _HEALTH_CODES[backend.health]}
    if backend.aliases:
        record["a"] = [list(pair) for pair in backend.aliases]
    if backend.weight != 1.0:
        record["w"] = int(backend.weight) if backend.weight.is_integer() else backend.weight
    if backend.capacity:
        record["c"] = backend.capacity
    if backend.chat_prefill is not None:
        record["p"] = backend.chat_prefill.value
    if backend.load is not None:
        usage = backend.load.kv_cache_usage
        record["l"] = [backend.load.running, backend.load.waiting, None if usage is None else round(usage, 2)]
    data = json.dumps(record, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode("utf-8")
    if len(data) > MAX_METADATA_BYTES:
        raise MetadataTooLarge(f"the advertisement of {backend.id} is {len(data)} bytes, more than "
                               f"{MAX_METADATA_BYTES} ({len(backend.models)} models, {len(backend.aliases)} aliases)")
    return data


def decode_backend(data: bytes) -> Backend:
    """The Backend an advertisement describes (its id derived from the URL). Raises MetadataError."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MetadataError(f"an advertisement is bytes, got {type(data).__name__}")
    if len(data) > MAX_METADATA_BYTES:
        raise MetadataTooLarge(f"an advertisement of {len(data)} bytes is more than {MAX_METADATA_BYTES}")
    try:
        record = json.loads(bytes(data).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise MetadataError(f"not a JSON advertisement: {exc}") from None
    if not isinstance(record, dict):
        raise MetadataError("an advertisement is a JSON object")
    version = record.get("v")
    if version != FORMAT_VERSION or isinstance(version, bool):  # true == 1 in Python, not in the format
        if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
            raise UnsupportedVersion(version)
        raise MetadataError(f"`v` must be the format version {FORMAT_VERSION}, got {version!r}")
    try:
        kind = BackendKind(_field(record, "k", str))
        health = _HEALTH_BY_CODE.get(_field(record, "h", str))
        if health is None:
            raise MetadataError(f"`h` must be one of {sorted(_HEALTH_BY_CODE)}, got {record['h']!r}")
        models = _field(record, "m", list)
        aliases = record.get("a", [])
        if not isinstance(aliases, list):
            raise MetadataError("`a` must be a list of [client name, server name] pairs")
        prefill = record.get("p")
        return Backend(base_url=_field(record, "u", str), kind=kind, models=tuple(models),
                       aliases=tuple(tuple(pair) if isinstance(pair, list) else pair for pair in aliases),
                       weight=record.get("w", 1.0), capacity=record.get("c", 0),
                       chat_prefill=None if prefill is None else ChatPrefill(prefill),
                       models_configured=False, health=health, load=_load(record.get("l")))
    except MetadataError:
        raise
    except (ValueError, TypeError) as exc:
        raise MetadataError(f"invalid advertisement: {exc}") from None


def _field(record: dict[str, Any], key: str, kind: type) -> Any:
    if key not in record:
        raise MetadataError(f"`{key}` is missing")
    value = record[key]
    if not isinstance(value, kind):
        raise MetadataError(f"`{key}` must be a {kind.__name__}, got {value!r}")
    return value


def _load(value: object) -> ServerLoad | None:
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != 3:
        raise MetadataError(f"`l` must be [running, waiting, kv usage or null], got {value!r}")
    running, waiting, usage = value
    if isinstance(usage, float) and not math.isfinite(usage):
        raise MetadataError("`l` kv usage must be finite")
    try:
        return ServerLoad(running=running, waiting=waiting,
                          kv_cache_usage=float(usage) if isinstance(usage, (int, float)) and
                          not isinstance(usage, bool) else usage)
    except ValueError as exc:
        raise MetadataError(f"`l`: {exc}") from None
