"""Subcommands of `python -m llmgw`; see llmgw/__main__.py for the contract each module follows."""
