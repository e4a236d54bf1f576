"""Shared-key datagram authentication: HMAC-SHA256 tag plus replay protection.

Datagram = payload + 32-byte HMAC-SHA256(key, payload). The payload's signed ``timestamp_ms`` must lie within
``window`` seconds of the receiver's clock, and each tag is accepted once: a bounded cache remembers tags seen
inside the window. When the cache overflows, the oldest entry's timestamp becomes a watermark and anything signed
at or before it is refused too, so evicting an entry never re-opens the door to replaying it.

The sans-IO core calls ``open``/``seal``/``accept_fresh``; it never sees the key.
"""

from __future__ import annotations

import hashlib
import hmac
from collections import OrderedDict

TAG_SIZE = 32
MIN_KEY_SIZE = 16


class Authenticator:
    overhead = TAG_SIZE

    def __init__(self, key: bytes, *, window: float = 30.0, cache_size: int = 65536) -> None:
        if not isinstance(key, (bytes, bytearray)):
            raise TypeError("gossip key must be bytes")
        if len(key) < MIN_KEY_SIZE:
            raise ValueError(f"gossip key must be at least {MIN_KEY_SIZE} bytes, got {len(key)}")
        if window <= 0 or cache_size < 1:
            raise ValueError("window must be > 0 and cache_size >= 1")
        self._key = bytes(key)
        self._window_ms = int(window * 1000)
        self._cache_size = cache_size
        self._seen: OrderedDict[bytes, int] = OrderedDict()  # tag -> signed timestamp_ms, in arrival order
        self._watermark_ms = -1

    def seal(self, payload: bytes) -> bytes:
        return payload + hmac.digest(self._key, payload, hashlib.sha256)

    def open(self, data: bytes) -> tuple[bytes, bytes] | None:
        """(payload, tag) when the tag is genuine, else None."""
        if len(data) <= TAG_SIZE:
            return None
        data = bytes(data)
        payload, tag = data[:-TAG_SIZE], data[-TAG_SIZE:]
        if not hmac.compare_digest(hmac.digest(self._key, payload, hashlib.sha256), tag):
            return None
        return payload, tag

    def accept_fresh(self, tag: bytes, timestamp_ms: int, now_ms: int) -> bool:
        """True the first time a genuine datagram signed near now is seen; False for stale or replayed ones."""
        if abs(timestamp_ms - now_ms) > self._window_ms or timestamp_ms <= self._watermark_ms:
            return False
        if tag in self._seen:
            return False
        seen = self._seen
        horizon = now_ms - self._window_ms
        # Entries older than the window can go: their timestamps are refused by the window check anyway.
        while seen:
            oldest_ts = next(iter(seen.values()))
            if oldest_ts >= horizon:
                break
            seen.popitem(last=False)
        while len(seen) >= self._cache_size:
            _, evicted_ts = seen.popitem(last=False)
            self._watermark_ms = max(self._watermark_ms, evicted_ts)
        seen[tag] = timestamp_ms
        return True


MAX_KEY_FILE_SIZE = 64 * 1024


def read_gossip_key(path: str) -> bytes:
    """The shared gossip key in `path` (surrounding whitespace, e.g. a trailing newline, is not part of it);
    ValueError naming the file when it cannot be read or is too short to be a key."""
    try:
        with open(path, "rb") as fh:
            key = fh.read(MAX_KEY_FILE_SIZE + 1).strip()
    except OSError as exc:
        raise ValueError(f"cannot read gossip key file {path}: {exc.strerror or exc}") from None
    if len(key) > MAX_KEY_FILE_SIZE:
        raise ValueError(f"gossip key file {path} is over 64 KiB: not a key")
    if len(key) < MIN_KEY_SIZE:
        raise ValueError(f"gossip key file {path} holds {len(key)} bytes; a key needs at least {MIN_KEY_SIZE}")
    return key
