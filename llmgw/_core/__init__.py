"""Compiled sans-IO cores: no sockets, no clocks; time and randomness are passed in.

Importing a submodule that failed to compile raises ImportError: there is no pure-Python fallback.
"""
