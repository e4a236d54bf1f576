"""API keys: the key file (TOML), and `KeyRing`, which turns a presented bearer key into a tenant.

The file holds the sha256 of each key, never the key itself, so a leaked key file grants nothing. One entry per
key; several keys may name the same tenant (rotation: add the new key, hand it out, remove the old one):

    [[key]]
    sha256 = "5f2b...64 hex digits..."     # `hash_key(key)`, later `llmgw keys hash`
    tenant = "team-search"                 # [A-Za-z0-9._-], at most 64: it becomes a metrics label
    models = ["llama-3-8b", "qwen-2-7b"]   # or ["*"] (the default): every model
    requests_per_minute = 600              # each limit is optional: absent means unlimited
    tokens_per_minute = 200000
    max_concurrent = 16
    weight = 2                             # share under overload (default 1)
    label = "search ci bot"                # optional, for operators and logs

Limits and weight belong to the tenant: entries of one tenant must agree on them. Anything wrong is a
`KeyFileError` whose message starts with ``<file>:<line>:`` (the CLI prints it and exits 2). Unknown fields are
errors too: a misspelt ``request_per_minute`` must not silently mean "unlimited".

A reload builds a new `KeyRing` and the caller swaps it in; a tenant is identified by its name, so limits and
fairness state (kept by name elsewhere) carry over.

Hostile input: the Authorization value is size-checked before anything else is done with it; nothing here ever
puts a presented key into an exception message, a log line or a repr. The digest of a presented key is looked up
by its first 8 bytes and then compared in full with `hmac.compare_digest`; the lookup's timing depends only on
the sha256 of what the caller sent, which tells them nothing about the stored keys.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import math
import re
import secrets
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

__all__ = [
    "MAX_AUTHORIZATION_BYTES",
    "MIN_KEY_LENGTH",
    "AuthFailure",
    "Forbidden",
    "KeyEntry",
    "KeyFileError",
    "KeyRing",
    "Tenant",
    "TenantLimits",
    "Unauthenticated",
    "authorization_value",
    "bearer_key",
    "hash_key",
    "load_key_file",
    "new_key",
    "parse_key_file",
]

# Larger Authorization values are refused before they are parsed or hashed. Real bearer keys are < 200 bytes.
MAX_AUTHORIZATION_BYTES = 4096
# `hash_key` refuses shorter keys: a guessable key defeats the point of keys.
MIN_KEY_LENGTH = 16

_TENANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")
# RFC 6750 b64token is narrower; any visible ASCII is accepted so that keys minted elsewhere still work.
_KEY_CHARS = re.compile(r"[\x21-\x7e]+")
_ENTRY_HEADER = re.compile(r"\s*\[\[\s*key\s*\]\]\s*(#.*)?")
_TOML_LINE = re.compile(r"at line (\d+)")
_LIMIT_FIELDS = ("requests_per_minute", "tokens_per_minute", "max_concurrent")
_ENTRY_FIELDS = frozenset({"sha256", "tenant", "models", "weight", "label", *_LIMIT_FIELDS})
_MAX_LIMIT = 10**12
_MIN_WEIGHT, _MAX_WEIGHT = 0.01, 1000.0
_MAX_MODEL_NAME = 256
_PREFIX = 8  # bytes of the digest used as the lookup index


# --------------------------------------------------------------------------------------------------------------
# What a key grants


@dataclass(frozen=True)
class TenantLimits:
    """A tenant's limits; None means unlimited."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_concurrent: int | None = None

    @property
    def unlimited(self) -> bool:
        return self.requests_per_minute is None and self.tokens_per_minute is None and self.max_concurrent is None


@dataclass(frozen=True)
class Tenant:
    name: str
    limits: TenantLimits = TenantLimits()
    weight: float = 1.0


@dataclass(frozen=True)
class KeyEntry:
    """One key: its digest, its tenant and the models it may use (None: every model)."""

    digest: bytes
    tenant: Tenant
    models: frozenset[str] | None = None
    label: str = ""

    @property
    def key_id(self) -> str:
        """A short name for logs: the first 12 hex digits of the key's sha256 (the key is never logged)."""
        return self.digest.hex()[:12]

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models


# --------------------------------------------------------------------------------------------------------------
# Errors


class KeyFileError(ValueError):
    """The key file cannot be read or has a bad entry; the message names the file and line."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message)
        self.line = line


class AuthFailure(enum.Enum):
    MISSING = "missing"  # no Authorization at all
    MALFORMED = "malformed"  # not "Bearer <key>", repeated, or bad characters
    TOO_LARGE = "too_large"
    UNKNOWN = "unknown"  # well formed, but no such key


_FAILURE_MESSAGES = {
    AuthFailure.MISSING: "missing API key: send 'Authorization: Bearer <key>'",
    AuthFailure.MALFORMED: "malformed Authorization: expected a single 'Bearer <key>' in visible ASCII",
    AuthFailure.TOO_LARGE: f"Authorization too large: at most {MAX_AUTHORIZATION_BYTES} bytes",
    AuthFailure.UNKNOWN: "invalid API key",
}


class Unauthenticated(Exception):
    """HTTP 401 / gRPC UNAUTHENTICATED. The message never contains the key; `reason` is a metrics label."""

    def __init__(self, reason: AuthFailure) -> None:
        super().__init__(_FAILURE_MESSAGES[reason])
        self.reason = reason


class Forbidden(Exception):
    """HTTP 403 / gRPC PERMISSION_DENIED: the key is valid but may not use this model."""

    def __init__(self, tenant: str, model: str) -> None:
        shown = model if len(model) <= 100 else model[:100] + "..."
        super().__init__(f"tenant {tenant!r} may not use model {shown!r}")
        self.tenant = tenant


# --------------------------------------------------------------------------------------------------------------
# Operators' helpers


def hash_key(key: str) -> str:
    """The sha256 hex digest to put in the key file for `key` (what `llmgw keys hash` prints)."""
    if not isinstance(key, str):
        raise TypeError("key must be a str")
    if not _KEY_CHARS.fullmatch(key):
        raise ValueError("a key must be visible ASCII with no spaces (it travels in an HTTP header)")
    if len(key) < MIN_KEY_LENGTH:
        raise ValueError(f"a key must have at least {MIN_KEY_LENGTH} characters, this one has {len(key)}")
    if len(key) + len("Bearer ") > MAX_AUTHORIZATION_BYTES:
        raise ValueError(f"a key must fit in a {MAX_AUTHORIZATION_BYTES}-byte Authorization header")
    return hashlib.sha256(key.encode("ascii")).hexdigest()


def new_key() -> str:
    """A fresh random key (256 bits), in the OpenAI "sk-" style."""
    return "sk-llmgw-" + secrets.token_urlsafe(32)


# --------------------------------------------------------------------------------------------------------------
# Authorization values


def authorization_value(headers: Iterable[tuple[str | bytes, str | bytes]]) -> str | bytes | None:
    """The Authorization value among HTTP headers or gRPC metadata pairs (names compared case-insensitively).

    None when absent. Sent twice is refused as malformed: two keys would leave it unclear who is calling."""
    found: str | bytes | None = None
    for name, value in headers:
        lowered = name.lower()
        if lowered == "authorization" or lowered == b"authorization":
            if found is not None:
                raise Unauthenticated(AuthFailure.MALFORMED)
            found = value
    return found


def bearer_key(value: str | bytes | None) -> str:
    """The key in an ``Authorization: Bearer <key>`` value; `Unauthenticated` for anything else."""
    if value is None:
        raise Unauthenticated(AuthFailure.MISSING)
    if len(value) > MAX_AUTHORIZATION_BYTES:  # first: nothing below runs on a huge value
        raise Unauthenticated(AuthFailure.TOO_LARGE)
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("ascii")
        except UnicodeDecodeError:
            raise Unauthenticated(AuthFailure.MALFORMED) from None
    elif not value.isascii():
        raise Unauthenticated(AuthFailure.MALFORMED)
    scheme, _, rest = value.strip(" \t").partition(" ")
    key = rest.lstrip(" ")
    if not value.strip(" \t"):
        raise Unauthenticated(AuthFailure.MISSING)
    if scheme.lower() != "bearer" or not _KEY_CHARS.fullmatch(key):
        raise Unauthenticated(AuthFailure.MALFORMED)
    return key


# --------------------------------------------------------------------------------------------------------------
# The ring


class KeyRing:
    """Immutable set of keys. Build a new one to reload; the caller swaps the reference."""

    def __init__(self, entries: Iterable[KeyEntry] = ()) -> None:
        by_prefix: dict[bytes, list[KeyEntry]] = {}
        tenants: dict[str, Tenant] = {}
        count = 0
        for entry in entries:
            if len(entry.digest) != 32:
                raise ValueError("a key digest must be 32 bytes (sha256)")
            bucket = by_prefix.setdefault(entry.digest[:_PREFIX], [])
            if any(e.digest == entry.digest for e in bucket):
                raise ValueError(f"key {entry.key_id} is listed twice")
            known = tenants.setdefault(entry.tenant.name, entry.tenant)
            if known != entry.tenant:
                raise ValueError(f"tenant {entry.tenant.name!r} has two different settings")
            bucket.append(entry)
            count += 1
        self._by_prefix = {p: tuple(b) for p, b in by_prefix.items()}
        self._tenants: Mapping[str, Tenant] = MappingProxyType(tenants)
        self._count = count

    def __len__(self) -> int:
        return self._count

    def __repr__(self) -> str:
        return f"<KeyRing {self._count} keys, {len(self._tenants)} tenants>"

    @property
    def tenants(self) -> Mapping[str, Tenant]:
        """Every configured tenant by name (the bounded label set for metrics)."""
        return self._tenants

    def authenticate(self, key: str) -> KeyEntry:
        """The entry for a presented key, or `Unauthenticated(UNKNOWN)`."""
        if len(key) > MAX_AUTHORIZATION_BYTES:
            raise Unauthenticated(AuthFailure.TOO_LARGE)
        if not _KEY_CHARS.fullmatch(key):
            raise Unauthenticated(AuthFailure.MALFORMED)
        digest = hashlib.sha256(key.encode("ascii")).digest()
        match: KeyEntry | None = None
        for entry in self._by_prefix.get(digest[:_PREFIX], ()):
            if hmac.compare_digest(entry.digest, digest):
                match = entry
        if match is None:
            raise Unauthenticated(AuthFailure.UNKNOWN)
        return match

    def authenticate_header(self, value: str | bytes | None) -> KeyEntry:
        """`bearer_key` then `authenticate`: what a front calls with the Authorization value (or None)."""
        return self.authenticate(bearer_key(value))

    @staticmethod
    def authorize(entry: KeyEntry, model: str) -> None:
        """`Forbidden` unless the key may use `model`."""
        if not entry.allows(model):
            raise Forbidden(entry.tenant.name, model)


# --------------------------------------------------------------------------------------------------------------
# The key file


def load_key_file(path: str) -> KeyRing:
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise KeyFileError(f"{path}:{line}: not UTF-8", line) from None
    return parse_key_file(text, source=path)


def parse_key_file(text: str, *, source: str = "<keys>") -> KeyRing:
    """A `KeyRing` from the text of a key file; `KeyFileError` naming ``source:line`` for the first problem."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        found = _TOML_LINE.search(str(exc))
        line: int | None = int(found.group(1)) if found else None
        if line is None and "end of document" in str(exc):
            # The file ends inside a value: the last line with content is the one left open.
            line = max((n for n, t in enumerate(text.splitlines(), 1) if t.strip()), default=1)
        where = f"{source}:{line}" if line else source
        raise KeyFileError(f"{where}: invalid TOML: {exc}", line) from None
    lines = text.splitlines()
    locator = _Locator(source, lines)
    for name in doc:
        if name != "key":
            raise locator.error(locator.top_level_line(name), f"unknown top-level entry {name!r} "
                                                              "(keys are [[key]] tables)")
    raw_entries = doc.get("key", [])
    if not isinstance(raw_entries, list) or not all(isinstance(e, dict) for e in raw_entries):
        raise locator.error(locator.top_level_line("key"), "'key' must be an array of tables: [[key]]")
    locator.find_entries(len(raw_entries))
    entries: list[KeyEntry] = []
    seen_digests: dict[bytes, int] = {}
    tenant_first: dict[str, tuple[Tenant, int]] = {}
    for index, raw in enumerate(raw_entries):
        entry = _parse_entry(raw, index, locator)
        line = locator.entry_line(index)
        if entry.digest in seen_digests:
            raise locator.error(locator.field_line(index, "sha256"),
                                f"key {entry.key_id} is already listed in entry {seen_digests[entry.digest] + 1}")
        seen_digests[entry.digest] = index
        first = tenant_first.setdefault(entry.tenant.name, (entry.tenant, index))
        if first[0] != entry.tenant:
            other = locator.entry_line(first[1])
            at = f"line {other}" if other else f"entry {first[1] + 1}"
            raise locator.error(line, f"tenant {entry.tenant.name!r}: limits and weight differ from its entry at "
                                      f"{at}; a tenant's entries must agree")
        entries.append(entry)
    return KeyRing(entries)


class _Locator:
    """Maps entries and fields back to lines of the file (tomllib keeps no positions)."""

    def __init__(self, source: str, lines: list[str]) -> None:
        self.source = source
        self.lines = lines
        self.starts: list[int] | None = None  # 1-based line of each [[key]] header

    def find_entries(self, count: int) -> None:
        starts = [i + 1 for i, text in enumerate(self.lines) if _ENTRY_HEADER.fullmatch(text)]
        # A header-like line inside a multi-line string would shift the count: then only entry numbers are given.
        self.starts = starts if len(starts) == count else None

    def entry_line(self, index: int) -> int | None:
        return self.starts[index] if self.starts is not None else None

    def field_line(self, index: int, name: str) -> int | None:
        start = self.entry_line(index)
        if start is None or self.starts is None:
            return None
        end = self.starts[index + 1] if index + 1 < len(self.starts) else len(self.lines) + 1
        pattern = re.compile(rf"\s*[\"']?{re.escape(name)}[\"']?\s*=")
        for number in range(start + 1, end):
            if pattern.match(self.lines[number - 1]):
                return number
        return start

    def top_level_line(self, name: str) -> int | None:
        pattern = re.compile(rf"\s*(\[+\s*)?[\"']?{re.escape(name)}[\"']?\s*(=|\])")
        for number, text in enumerate(self.lines, 1):
            if pattern.match(text):
                return number
        return None

    def error(self, line: int | None, message: str, index: int | None = None) -> KeyFileError:
        where = f"{self.source}:{line}" if line else self.source
        entry = f" entry {index + 1}:" if index is not None else ""
        return KeyFileError(f"{where}:{entry} {message}", line)


def _parse_entry(raw: dict, index: int, locator: _Locator) -> KeyEntry:
    def fail(name: str | None, message: str) -> KeyFileError:
        line = locator.field_line(index, name) if name else locator.entry_line(index)
        return locator.error(line, message, index)

    for name in raw:
        if name not in _ENTRY_FIELDS:
            raise fail(name, f"unknown field {name!r} (expected one of: {', '.join(sorted(_ENTRY_FIELDS))})")
    for required in ("sha256", "tenant"):
        if required not in raw:
            raise fail(None, f"missing field {required!r}")

    digest_hex = raw["sha256"]
    if not isinstance(digest_hex, str) or not _SHA256_HEX.fullmatch(digest_hex):
        raise fail("sha256", "sha256 must be 64 hex digits: the hash of the key (`llmgw keys hash`), "
                             "never the key itself")
    tenant_name = raw["tenant"]
    if not isinstance(tenant_name, str) or not _TENANT_NAME.fullmatch(tenant_name):
        raise fail("tenant", "tenant must be 1-64 characters of A-Z a-z 0-9 . _ - (starting with a letter or digit)")

    models: frozenset[str] | None = None
    raw_models = raw.get("models", ["*"])
    if not isinstance(raw_models, list) or not raw_models or not all(isinstance(m, str) for m in raw_models):
        raise fail("models", 'models must be a non-empty list of model names, or ["*"] for every model')
    if "*" in raw_models:
        if len(raw_models) != 1:
            raise fail("models", '"*" means every model and must be alone in the list')
    else:
        for model in raw_models:
            if not model or len(model) > _MAX_MODEL_NAME:
                raise fail("models", f"model names must be 1-{_MAX_MODEL_NAME} characters")
        models = frozenset(raw_models)

    limits: dict[str, int | None] = {}
    for name in _LIMIT_FIELDS:
        value = raw.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or not 1 <= value <= _MAX_LIMIT):
            raise fail(name, f"{name} must be a whole number from 1 to {_MAX_LIMIT} (leave it out for no limit), "
                             f"got {value!r}")
        limits[name] = value

    weight = raw.get("weight", 1)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) \
            or not _MIN_WEIGHT <= weight <= _MAX_WEIGHT:
        raise fail("weight", f"weight must be a number from {_MIN_WEIGHT:g} to {_MAX_WEIGHT:g}, got {weight!r}")
    label = raw.get("label", "")
    if not isinstance(label, str) or len(label) > 200:
        raise fail("label", "label must be a string of at most 200 characters")

    tenant = Tenant(tenant_name, TenantLimits(**limits), float(weight))
    return KeyEntry(bytes.fromhex(digest_hex), tenant, models, label)
