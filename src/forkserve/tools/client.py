"""The tutorial's client as a small command-line tool: send lines, print the answers.

Two modes. Scripted (``--message TEXT --count N``): send the line N times, one at a time, and
print each answer line; exit 1 if the server closes or goes silent before all N answers came.
A malformed address or option is a usage error: exit 2.
Interactive (the default): every line typed is sent, everything the server sends is printed;
at end of input the client half-closes and prints what is still coming until the server closes.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import sys
from typing import BinaryIO

from ..config import Address
from ..errors import ConfigError, ForkserveError

#: Bytes read from the server at a time (interactive mode).
CHUNK = 65536


class ClientFailed(ForkserveError):
    """The client could not do what was asked; the message says why, in one line."""


def connect(address: str, timeout: float) -> socket.socket:
    """Connect to ``HOST:PORT``, ``[IPV6]:PORT`` or ``unix:/path``; raise ``ClientFailed``."""
    try:
        addr = Address.parse(address)
    except ValueError as exc:  # a usage error (exit 2), not a failure to connect (exit 1)
        raise ConfigError("ADDR", f"bad address {exc}") from None
    try:
        if addr.kind == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(addr.path)
            except OSError:
                sock.close()
                raise
            return sock
        return socket.create_connection((addr.host, addr.port), timeout=timeout)
    except OSError as exc:
        reason = (exc.strerror or str(exc) or type(exc).__name__).lower()
        raise ClientFailed(f"cannot connect to {addr}: {reason}") from None


def scripted(sock: socket.socket, message: str, count: int, out: BinaryIO) -> None:
    """Send ``message`` ``count`` times, each after the previous answer; print the answers."""
    line = message.encode() + b"\n"
    reader = sock.makefile("rb")
    for n in range(count):
        try:
            sock.sendall(line)
            answer = reader.readline()
        except TimeoutError:
            raise ClientFailed(f"no answer within the timeout after {n} of {count}") from None
        except OSError as exc:
            raise ClientFailed(f"connection lost after {n} of {count} answers: "
                               f"{exc.strerror or exc}") from None
        if not answer:
            raise ClientFailed(f"the server closed the connection after {n} of {count} answers")
        out.write(answer)
        out.flush()


def interactive(sock: socket.socket, stdin: BinaryIO, out: BinaryIO) -> None:
    """Relay stdin lines to the server and the server's bytes to ``out`` until it closes."""
    sock.settimeout(None)
    # poll(2), not epoll: epoll refuses regular files and /dev/null as stdin (EPERM), while
    # poll reports them readable, which is what they are.
    sel = selectors.PollSelector()
    sel.register(sock, selectors.EVENT_READ)
    sel.register(stdin, selectors.EVENT_READ)
    input_open = True
    try:
        while True:
            for key, _ in sel.select():
                if key.fileobj is sock:
                    try:
                        data = sock.recv(CHUNK)
                    except OSError as exc:
                        raise ClientFailed(f"connection lost: {exc.strerror or exc}") from None
                    if not data:
                        if input_open:
                            raise ClientFailed("the server closed the connection")
                        return
                    out.write(data)
                    out.flush()
                else:
                    line = stdin.readline()
                    if line:
                        _send(sock, line)
                        continue
                    input_open = False
                    sel.unregister(stdin)
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_WR)
    finally:
        sel.close()


def _send(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError as exc:
        raise ClientFailed(f"connection lost: {exc.strerror or exc}") from None


def run(address: str, *, message: str | None, count: int, timeout: float) -> int:
    """The ``forkserve client`` command. Raises ``ClientFailed`` with a one-line reason."""
    sock = connect(address, timeout)
    with sock:
        if message is not None:
            scripted(sock, message, count, sys.stdout.buffer)
        else:
            interactive(sock, sys.stdin.buffer, sys.stdout.buffer)
    return 0
