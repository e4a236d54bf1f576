"""Tenancy cores: API keys, per-tenant limits shared over gossip, fair admission across tenants.

Every module here is sans-IO: no sockets, no clock reads (time is an argument), no asyncio. The gateway's fronts,
its admission shell and the gossip node call into them (docs/tenancy.md lists the calls).

| module | job |
|---|---|
| `keys` | the key file (TOML) and `KeyRing`: bearer key -> tenant, constant-time check, hostile headers refused |
| `window` | a bucketed sliding-window counter |
| `limits` | `UsageLimiter`: requests/min, tokens/min, concurrent streams, summed over the gateways |
| `digest` | the wire encoding of one gateway's usage (a protobuf message, bounded in bytes per datagram) |
| `fair` | `FairQueue`: deficit round robin across tenants, FIFO within one, same interface as AdmissionQueue |
| `bench` | gossip bandwidth of usage digests with many tenants |
"""
