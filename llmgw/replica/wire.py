"""Dissolved: its parts now live in modules named for what they hold. This re-export stays only until the files
that still import it are switched (llmgw/gateway/server.py, llmgw/gateway/app.py, llmgw/cli/gateway.py,
llmgw/client.py); new code imports the homes below.

- llmgw.rpc: tolerant decoding, handler builders, health + reflection, binding a port, RpcServer, member_info
- llmgw.tls: gRPC credentials and HTTP ssl contexts
- llmgw.gossip.auth: read_gossip_key
- llmgw.signals: serve_until_signalled
"""

from llmgw.gossip.auth import read_gossip_key
from llmgw.rpc import (
                       UndecodableRequest,
                       add_health_and_reflection,
                       add_port,
                       member_info,
                       service_name,
                       set_serving,
                       stream_stream,
                       tolerant_deserializer,
                       unary_stream,
                       unary_unary,
)
from llmgw.signals import serve_until_signalled
from llmgw.tls import TlsConfigError, channel_credentials, read_pem, server_credentials

__all__ = ["TlsConfigError", "UndecodableRequest", "add_health_and_reflection", "add_port", "channel_credentials",
           "member_info", "read_gossip_key", "read_pem", "serve_until_signalled", "server_credentials",
           "service_name", "set_serving", "stream_stream", "tolerant_deserializer", "unary_stream", "unary_unary"]
