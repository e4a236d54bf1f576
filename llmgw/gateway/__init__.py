"""The inference gateway: the Gateway (service.py) and its request path (request_path.py), admission, capacity,
membership view, replica streams and their gRPC transport, the gRPC front (server.py); app.py composes them."""

from llmgw.gateway.api import (
                               DeadlineExceeded,
                               ErrorKind,
                               GatewayConfig,
                               GatewayError,
                               InferenceRequest,
                               InvalidArgument,
                               ResourceExhausted,
                               TokenEvent,
                               Unavailable,
)
from llmgw.gateway.service import Gateway

__all__ = ["DeadlineExceeded", "ErrorKind", "Gateway", "GatewayConfig", "GatewayError", "InferenceRequest",
           "InvalidArgument", "ResourceExhausted", "TokenEvent", "Unavailable"]
