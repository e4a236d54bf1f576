"""llmgw: a distributed LLM inference gateway (prefix affinity, SWIM gossip, token-exact failover)."""

import os

__version__ = "0.1.0"

# grpcio's wheels install gRPC's fork handlers (pthread_atfork) by default. They serve a child that goes on using
# gRPC without exec; llmgw's processes only fork to exec (restart commands -- a fork() under uvloop --, workers,
# cluster members). With streams in flight the handlers give up half-way ("Other threads are currently calling
# into gRPC, skipping fork() handlers") and the child can die of SIGSEGV before its exec. grpcio's documented
# remedy for fork-then-exec programs is GRPC_ENABLE_FORK_SUPPORT=false (doc/fork_support.md); grpc reads it when
# first imported, so it is set here, before any llmgw module imports grpc. An explicit setting is left alone.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
