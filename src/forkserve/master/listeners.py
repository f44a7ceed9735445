"""Listening sockets: bind, describe, close. Runs in the master only.

Rules: ``SO_REUSEADDR`` so a restart is not refused while old connections sit in TIME_WAIT
(but never ``SO_REUSEPORT``: a second server must fail loudly, and closing one of several
reuseport sockets drops its queue); IPv6 listeners are v6-only so ``[::]`` and ``0.0.0.0`` can
coexist; listeners are non-blocking (the master only accepts when the selector says so).
A unix socket file is unlinked on close only if it is still the one we created.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from dataclasses import dataclass

from ..config import Address
from ..errors import ListenError
from ..protocol.address import format_address

_REASONS = {
    errno.EADDRINUSE: "address already in use",
    errno.EACCES: "permission denied",
    errno.EADDRNOTAVAIL: "address not available on this machine",
}


@dataclass
class Listener:
    """One bound, listening socket. ``name`` is the real address (port 0 resolved)."""

    address: Address
    sock: socket.socket
    name: str
    unix_inode: int | None = None

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        """Close the socket and remove our unix socket file. Idempotent."""
        if self.sock.fileno() >= 0:
            self.sock.close()
        if self.unix_inode is not None:
            path, self.unix_inode, inode = self.address.path, None, self.unix_inode
            with contextlib.suppress(OSError):
                if os.stat(path).st_ino == inode:
                    os.unlink(path)


def _fail(address: Address, exc: OSError) -> ListenError:
    reason = _REASONS.get(exc.errno or 0) or (exc.strerror or str(exc)).lower()
    return ListenError(f"cannot listen on {address}: {reason}")


def _bind_tcp(address: Address, backlog: int) -> Listener:
    try:
        infos = socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ListenError(f"cannot listen on {address}: unknown host ({exc.strerror})") from None
    family, kind, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise _fail(address, exc) from None
    return Listener(address, sock, format_address(sock.getsockname(), family))


def _clear_stale_unix(address: Address) -> None:
    """Remove a socket file that no server answers on; refuse to touch anything else."""
    try:
        _clear_stale_unix_file(address)
    except ListenError:
        raise
    except OSError as exc:
        raise _fail(address, exc) from None


def _clear_stale_unix_file(address: Address) -> None:
    try:
        st = os.lstat(address.path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ListenError(f"cannot listen on {address}: the path exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(address.path)
    except ConnectionRefusedError:
        os.unlink(address.path)  # stale: left by a server that died
        return
    except OSError as exc:
        raise _fail(address, exc) from None
    finally:
        probe.close()
    raise ListenError(f"cannot listen on {address}: address already in use")


def _bind_unix(address: Address, backlog: int) -> Listener:
    _clear_stale_unix(address)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(address.path)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise _fail(address, exc) from None
    return Listener(address, sock, str(address), os.stat(address.path).st_ino)


def bind_all(addresses: tuple[Address, ...], backlog: int) -> list[Listener]:
    """Bind every address, or none: on the first failure, close what was bound and raise."""
    bound: list[Listener] = []
    try:
        for address in addresses:
            bind = _bind_unix if address.kind == "unix" else _bind_tcp
            bound.append(bind(address, backlog))
    except BaseException:
        for listener in bound:
            listener.close()
        raise
    return bound
