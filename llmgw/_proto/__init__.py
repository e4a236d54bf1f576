"""Protobuf and gRPC modules generated from proto/*.proto at build time (never committed, never hand-edited)."""
