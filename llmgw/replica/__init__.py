"""Simulated LLM replica (see server.py for the gRPC shell, model.py for the simulated model)."""

from llmgw.replica.model import Faults, Limits, PrefixCache, token_for
from llmgw.replica.server import Replica, ReplicaConfig

__all__ = ["Faults", "Limits", "PrefixCache", "Replica", "ReplicaConfig", "token_for"]
