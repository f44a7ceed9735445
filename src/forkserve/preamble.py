"""From an accepted socket to the handler's ``Connection``: one path for every model.

Theory of operation
-------------------
Whatever comes before the handler runs here, in the process that serves the connection (never
in the fork model's master), in a fixed order, all of it within one ``handshake_timeout``
counted from the accept:

1. PROXY protocol (``proxy_protocol``): the peer must be one of ``trusted_proxy`` (a unix
   socket peer is trusted: the socket file's permissions decide who connects), then its
   header is read with ``proxyproto.ProxyParser``, never a byte past it (``wanted``), so the
   TLS handshake or the handler gets the stream exactly as the client sent it. A ``PROXY``
   header for TCP over IPv4 or IPv6 replaces the peer and local addresses; ``LOCAL`` (the
   proxy's own health check) and ``UNKNOWN`` keep the socket's.
2. TLS (``tls``): the server handshake.
3. The ``Connection`` with its deadlines and the addresses of step 1.

A client that fails a step gets no handler: the step raises ``ClientError`` and the caller ends
the connection quietly (one log line). Keeping this in one function is what makes every model
treat a client the same (STYLE rule 2).
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import ssl
import time

from .config import Config
from .connection import Connection, format_address
from .errors import ClientError, PeerGone
from .proxyproto import ProxyParser
from .scoreboard import SlotMonitor
from .tls import HandshakeFailed, handshake

#: The family a PROXY header's addresses belong to.
_FAMILY = {"TCP4": socket.AF_INET, "TCP6": socket.AF_INET6}


class UntrustedProxy(ClientError):
    """A peer outside ``trusted_proxy`` connected to a PROXY protocol listener."""


def proxy_addresses(sock: socket.socket, addr: object, config: Config,
                    deadline: float) -> tuple[object, object | None, int]:
    """Read the PROXY header: (client address, local address or None, their family).

    Raises ``ClientError``: an untrusted peer, a bad, late or missing header."""
    if sock.family != socket.AF_UNIX:
        assert isinstance(addr, tuple)
        ip = ipaddress.ip_address(addr[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if not any(ip in network for network in config.trusted_proxy):
            raise UntrustedProxy(f"{ip} is not a trusted proxy (trusted_proxy)")
    parser = ProxyParser()
    header = None
    try:
        while header is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            sock.settimeout(left)
            data = sock.recv(parser.wanted)
            if not data:
                raise PeerGone("closed before its PROXY header was complete")
            header = parser.feed(data)
    except TimeoutError:
        raise HandshakeFailed(f"no whole PROXY header within {config.handshake_timeout:g} "
                              "s") from None
    except ConnectionError as exc:
        raise PeerGone(f"went away during its PROXY header: {exc}") from None
    finally:
        sock.settimeout(None)
    if header.replaces_peer:
        return header.source, header.destination, _FAMILY[header.family]
    return addr, None, sock.family


def _left(limit: float, since: float) -> float | None:
    """What is left of ``limit`` seconds counted from ``since`` (None: no limit)."""
    return max(limit - (time.monotonic() - since), 0.001) if limit else None


def open_connection(sock: socket.socket, addr: object, config: Config,
                    tls: ssl.SSLContext | None, *,
                    monitor: SlotMonitor | None = None) -> Connection:
    """The ``Connection`` for ``sock``. Raises ``ClientError`` or ``OSError``; on either,
    ``sock`` is closed."""
    accepted = time.monotonic()
    deadline = accepted + config.handshake_timeout
    with contextlib.suppress(OSError):
        if sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        if monitor is not None and (config.proxy_protocol or tls is not None):
            monitor.waiting()  # the client's time: bounded by handshake_timeout
        local = None
        family: int = sock.family
        if config.proxy_protocol:
            addr, local, family = proxy_addresses(sock, addr, config, deadline)
        if tls is not None:
            sock = handshake(tls, sock, max(deadline - time.monotonic(), 0.001),
                             budget=config.handshake_timeout)
        return Connection(sock, max_line=config.max_line, idle_timeout=config.idle_timeout,
                          write_timeout=config.write_timeout,
                          peer=format_address(addr, family),
                          local=None if local is None else format_address(local, family),
                          monitor=monitor, settings=config,
                          max_time=_left(config.max_connection_time, accepted))
    except BaseException:
        sock.close()
        raise
