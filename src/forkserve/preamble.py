"""From an accepted socket to the handler's ``Connection``: one path for every model.

Theory of operation
-------------------
Whatever comes before the handler runs here, in the process that serves the connection, in a
fixed order: the TLS handshake (``tls``), bounded by ``handshake_timeout``; then the
``Connection`` with its deadlines. A client that fails a step gets no handler: the step raises
``ClientError`` and the caller ends the connection quietly. Keeping this in one function is
what makes every model treat a client the same (STYLE rule 2).
"""

from __future__ import annotations

import contextlib
import socket
import ssl

from .config import Config
from .connection import Connection, format_address
from .scoreboard import SlotMonitor
from .tls import handshake


def open_connection(sock: socket.socket, addr: object, config: Config,
                    tls: ssl.SSLContext | None, *,
                    monitor: SlotMonitor | None = None) -> Connection:
    """The ``Connection`` for ``sock``. Raises ``ClientError`` or ``OSError``; on either,
    ``sock`` is closed."""
    peer = format_address(addr, sock.family)
    with contextlib.suppress(OSError):
        if sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        if tls is not None:
            if monitor is not None:
                monitor.waiting()  # the client's time: bounded by handshake_timeout
            sock = handshake(tls, sock, config.handshake_timeout)
        return Connection(sock, max_line=config.max_line, idle_timeout=config.idle_timeout,
                          write_timeout=config.write_timeout, peer=peer, monitor=monitor,
                          settings=config)
    except BaseException:
        sock.close()
        raise
