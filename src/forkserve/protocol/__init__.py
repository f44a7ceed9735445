"""Sans-I/O rules: line framing, PROXY v1/v2, admission and defences, the pool pipe's messages.

Pure functions and small state machines over bytes and an injected clock; no sockets.
"""
