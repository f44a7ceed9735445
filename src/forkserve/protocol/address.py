"""Addresses as text: one spelling for logs, status, listeners and the environment of exec'd
programs. Sans-I/O: used by the master (naming its listeners) and by every serving process
(naming its peer), so it lives below both.
"""

from __future__ import annotations

#: Address families by number, as Linux numbers them (its ABI, fixed): the socket module's
#: ``AF_UNIX`` and ``AF_INET6``, spelled here so that this package imports no ``socket``.
AF_UNIX = 1
AF_INET6 = 10


def format_address(addr: object, family: int) -> str:
    """``ip:port``, ``[ip6]:port`` or ``unix:path`` (``unix`` for an unnamed peer)."""
    if family == AF_UNIX:
        return f"unix:{addr}" if addr else "unix"
    if isinstance(addr, tuple):
        host, port = addr[0], addr[1]
        return f"[{host}]:{port}" if family == AF_INET6 else f"{host}:{port}"
    return str(addr)
