"""Talking to OpenAI-compatible model servers (vLLM, SGLang, llama.cpp, TGI, Ollama) over HTTP.

`sse` frames a Server-Sent-Events byte stream (sans-IO), `errors` is the neutral failure vocabulary, `client` is the
pooled aiohttp client with connect / first-byte / idle timeouts, `fidelity` holds the body rules (what the gateway
rewrites in requests and chunks, and how a failed-over answer is continued), `capabilities` says what each kind of
server can do. `backends` describes one server as the gateway routes to it (and parses `--upstream` /
`[[upstream]]`), `probe` asks a server for its health and load, `monitor` keeps one server's description current,
`discovery` turns a static list, a DNS name or gossip advertisements (`metadata`) into add / update / remove events.
Nothing here imports the gateway's request path: an adapter there implements its replica stream on top of
`client.UpstreamStream`.
"""
