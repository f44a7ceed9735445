"""TLS: the server context, made in the master; the handshake, done where the client is served.

Theory of operation
-------------------
- ``make_context`` builds one ``ssl.SSLContext`` in the master, before privileges are dropped
  (a private key is often readable by root only), from ``certfile``, ``keyfile``, ``ca_certs``
  and ``client_cert``; TLS 1.2 is the minimum, renegotiation is off. Every problem (a missing
  or unreadable file, a key that does not match, client certificates asked for without a CA)
  is a ``ConfigError`` before anything is bound. A reload (SIGHUP) builds a new context, so a
  renewed certificate is served to new connections; if that fails the running one stays.
- ``handshake`` runs in the process that serves the connection (a fork child, a worker, or
  the single model's master), never in the fork model's master, so a client that never sends
  its ClientHello, or sends plaintext, costs its own process and ``handshake_timeout``, and
  nothing else. Its failures are ``ClientError``: that connection ends, the handler never runs.
- After the handshake the ``Connection`` works as on plain TCP: its idle and write deadlines
  are the kernel's (``SO_RCVTIMEO``/``SO_SNDTIMEO`` on the same fd), which OpenSSL reports as
  "want read/write"; ``Connection`` maps those to its timeouts.
"""

from __future__ import annotations

import contextlib
import select
import socket
import time
from typing import TYPE_CHECKING

from ..config import Config
from ..errors import ClientError, ConfigError
from .sockets import LINGER_MAX_BYTES, RECV_SIZE
from .stopsignal import StopSignal, ready_by

if TYPE_CHECKING:
    import ssl

# ``ssl`` is imported only when TLS is on: loading it (libssl, libcrypto) grows a master by
# about 6 MB, which every fork of the fork model then pays for.

#: After a refused handshake, how long the client may take to read the alert and close its
#: side: closing with its data unread would send a reset, which can overtake the alert (a
#: TLS 1.3 client refused for its certificate has sent its first data already).
REFUSAL_LINGER_SECONDS = 1.0


class HandshakeFailed(ClientError):
    """The client did not complete a TLS handshake (in time, or at all)."""


class HandshakeTimeout(HandshakeFailed):
    """The client's PROXY header or TLS handshake was not complete by its deadline."""


def make_context(config: Config) -> ssl.SSLContext | None:
    """The server's TLS context, or None without ``certfile``. Raises ``ConfigError``."""
    if config.certfile is None:
        for name in ("keyfile", "ca_certs"):
            if getattr(config, name) is not None:
                raise ConfigError(name, "needs certfile (TLS is on only with a certificate)")
        if config.client_cert != "none":
            raise ConfigError("client_cert", "needs certfile and ca_certs")
        return None
    import ssl  # noqa: PLC0415  (see above)

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_RENEGOTIATION
    try:
        context.load_cert_chain(config.certfile, config.keyfile)
    except OSError as exc:
        setting = "keyfile" if config.keyfile and exc.filename == config.keyfile else "certfile"
        raise ConfigError(setting, f"cannot load the certificate chain: {_reason(exc)}") from None
    if config.ca_certs is not None:
        try:
            context.load_verify_locations(cafile=config.ca_certs)
        except OSError as exc:
            raise ConfigError("ca_certs", f"cannot load {config.ca_certs}: "
                                          f"{_reason(exc)}") from None
    elif config.client_cert != "none":
        raise ConfigError("client_cert", f"{config.client_cert} needs ca_certs, the CAs "
                                         "that client certificates must come from")
    context.verify_mode = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL,
                           "required": ssl.CERT_REQUIRED}[config.client_cert]
    return context


def _reason(exc: OSError) -> str:
    reason = getattr(exc, "reason", None)  # an ssl.SSLError's
    return str(reason or exc.strerror or exc)


def handshake(context: ssl.SSLContext, sock: socket.socket, deadline: float, *,
              budget: float, stop: StopSignal | None = None) -> ssl.SSLSocket:
    """Wrap ``sock`` and complete the server handshake by ``deadline`` (monotonic; ``budget``
    is the setting an error message names), or sooner once a ``stop`` has come (its grace).

    Raises ``HandshakeFailed``; ``sock`` then belongs to the caller no more (it is closed).
    """
    import ssl  # noqa: PLC0415  (loaded already: the context exists)

    sock.setblocking(False)  # each wait is a poll that a stop ends (see stopsignal)
    tls = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
    try:
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                events = select.POLLIN
            except ssl.SSLWantWriteError:
                events = select.POLLOUT
            if not ready_by(tls.fileno(), deadline, stop, events=events):
                why = "the server is stopping" if stop is not None and stop.requested else ""
                raise HandshakeTimeout(f"no TLS handshake within {budget:g} s"
                                       + (f" ({why})" if why else ""))
    except HandshakeFailed:
        tls.close()
        raise
    except ssl.SSLError as exc:
        _close_after_alert(tls, stop)
        raise HandshakeFailed(f"TLS handshake failed: {exc.reason or exc}") from None
    except OSError as exc:
        tls.close()
        raise HandshakeFailed(f"client went away during the TLS handshake: "
                              f"{exc.strerror or exc}") from None
    tls.settimeout(None)
    return tls


def _close_after_alert(tls: ssl.SSLSocket, stop: StopSignal | None) -> None:
    """Close a connection whose handshake failed so that the client reads the alert OpenSSL
    has sent: shut the write side, drop what the client sends until it closes its side (at
    most ``REFUSAL_LINGER_SECONDS`` and ``LINGER_MAX_BYTES``, or a stop's grace), then close."""
    raw = socket.socket(fileno=tls.detach())
    deadline = time.monotonic() + REFUSAL_LINGER_SECONDS
    drained = 0
    with raw, contextlib.suppress(OSError):  # a reset or a shut socket: nothing more is owed
        raw.shutdown(socket.SHUT_WR)
        while drained < LINGER_MAX_BYTES and ready_by(raw.fileno(), deadline, stop):
            chunk = raw.recv(RECV_SIZE, socket.MSG_DONTWAIT)
            if not chunk:
                return
            drained += len(chunk)
