"""From an accepted socket to the handler's ``Connection``: one path for every model.

Theory of operation
-------------------
Whatever comes before the handler runs here, in the process that serves the connection (never
in the fork model's master), in a fixed order, all of it within one ``handshake_timeout``
counted from the accept:

1. PROXY protocol (``proxy_protocol``): the peer must be one of ``trusted_proxy`` (a unix
   socket peer is trusted: the socket file's permissions decide who connects), then its
   header is read with ``proxyproto.ProxyParser``, never a byte past it (``wanted``), so the
   TLS handshake or the handler gets the stream exactly as the client sent it. The fork
   model's master reads it itself, without waiting, before admission and the fork, and
   hands the result over (``Proxied``); the single model and prefork workers read it before
   admission too, so rules and limits count the real client. A ``PROXY``
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
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..config import Config
from ..errors import ClientError, PeerGone
from ..ops.scoreboard import SlotMonitor
from ..protocol.address import format_address
from ..protocol.proxyproto import ProxyHeader, ProxyParser
from .connection import Connection
from .patience import Patience
from .sockets import family_of
from .stopsignal import StopSignal, ready_by
from .tls import HandshakeTimeout, handshake

if TYPE_CHECKING:
    import ssl  # only with TLS on: the module costs a forking master 6 MB

#: The family a PROXY header's addresses belong to.
_FAMILY = {"TCP4": socket.AF_INET, "TCP6": socket.AF_INET6}


class UntrustedProxy(ClientError):
    """A peer outside ``trusted_proxy`` connected to a PROXY protocol listener."""


@dataclass(frozen=True)
class Proxied:
    """What a PROXY header said: the client's address, the local one (None: the socket's),
    and their family. The fork model's master reads headers itself (without waiting, before
    admission and the fork) and hands this to the child."""

    addr: object
    local: object | None
    family: int


def check_trusted(sock: socket.socket, addr: object, config: Config) -> None:
    """Raise ``UntrustedProxy`` unless the peer may send PROXY headers."""
    if sock.family == socket.AF_UNIX:
        return  # the socket file's permissions decide who connects
    assert isinstance(addr, tuple)
    ip = ipaddress.ip_address(addr[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if not any(ip in network for network in config.trusted_proxy):
        raise UntrustedProxy(f"{ip} is not a trusted proxy (trusted_proxy)")


def proxied(header: ProxyHeader, sock: socket.socket, addr: object) -> Proxied:
    """The addresses to serve ``sock`` with, after ``header``."""
    if header.replaces_peer:
        return Proxied(header.source, header.destination, _FAMILY[header.family])
    return Proxied(addr, None, sock.family)


def proxy_addresses(sock: socket.socket, addr: object, config: Config,
                    deadline: float, stop: StopSignal | None = None,
                    ) -> tuple[object, object | None, int]:
    """Read the PROXY header, waiting up to ``deadline`` (or the end of a ``stop``'s grace):
    (client address, local address or None, their family). Raises ``ClientError``: an
    untrusted peer, a bad, late or missing header."""
    check_trusted(sock, addr, config)
    parser = ProxyParser()
    header = None
    sock.settimeout(None)  # each wait is a poll that a stop ends; a recv after it never waits
    try:
        while header is None:
            if not ready_by(sock.fileno(), deadline, stop):
                raise TimeoutError
            data = sock.recv(parser.wanted)
            if not data:
                raise PeerGone("closed before its PROXY header was complete")
            header = parser.feed(data)
    except TimeoutError:
        raise HandshakeTimeout(f"no whole PROXY header within {config.handshake_timeout:g} "
                               "s") from None
    except ConnectionError as exc:
        raise PeerGone(f"went away during its PROXY header: {exc}") from None
    named = proxied(header, sock, addr)
    return named.addr, named.local, named.family


def _left(limit: float, since: float) -> float | None:
    """What is left of ``limit`` seconds counted from ``since`` (None: no limit)."""
    return max(limit - (time.monotonic() - since), 0.001) if limit else None


def open_connection(sock: socket.socket, addr: object, config: Config,
                    tls: ssl.SSLContext | None, *,
                    monitor: SlotMonitor | None = None,
                    header: Proxied | None = None,
                    stop: StopSignal | None = None,
                    patience: Patience | None = None) -> Connection:
    """The ``Connection`` for ``sock``. Raises ``ClientError`` or ``OSError``; on either,
    ``sock`` is closed. With ``stop`` (a serving process's), a stop ends the waits for the
    PROXY header and the TLS handshake after its grace, and the connection's reads at once."""
    accepted = time.monotonic()
    deadline = accepted + config.handshake_timeout
    with contextlib.suppress(OSError):
        if family_of(sock) != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        if monitor is not None and (config.proxy_protocol or tls is not None):
            monitor.waiting()  # the client's time: bounded by handshake_timeout
        local = None
        family = family_of(sock)
        if header is not None:  # read already (by the master, or by the caller)
            addr, local, family = header.addr, header.local, header.family
        elif config.proxy_protocol:
            addr, local, family = proxy_addresses(sock, addr, config, deadline, stop)
        if tls is not None:
            sock = handshake(tls, sock, deadline, budget=config.handshake_timeout, stop=stop)
        return Connection(sock, max_line=config.max_line, idle_timeout=config.idle_timeout,
                          write_timeout=config.write_timeout,
                          peer=format_address(addr, family),
                          local=None if local is None else format_address(local, family),
                          monitor=monitor, settings=config,
                          max_time=_left(config.max_connection_time, accepted),
                          linger_timeout=config.linger_timeout, stop=stop, patience=patience)
    except BaseException:
        sock.close()
        raise
