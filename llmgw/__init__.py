"""llmgw: a distributed LLM inference gateway (prefix affinity, SWIM gossip, token-exact failover)."""

__version__ = "0.1.0"
