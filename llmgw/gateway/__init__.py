"""The inference gateway: request path (request_path.py), admission, membership view, gRPC front (server.py)."""

from llmgw.gateway.api import (DeadlineExceeded, GatewayConfig, GatewayError, InferenceRequest, InvalidArgument,
                               ResourceExhausted, TokenEvent, Unavailable)
from llmgw.gateway.request_path import Gateway

__all__ = ["DeadlineExceeded", "Gateway", "GatewayConfig", "GatewayError", "InferenceRequest", "InvalidArgument",
           "ResourceExhausted", "TokenEvent", "Unavailable"]
