"""Listening sockets: bind, describe, close. Runs in the master only.

Rules: ``SO_REUSEADDR`` so a restart is not refused while old connections sit in TIME_WAIT
(but never ``SO_REUSEPORT``: a second server must fail loudly, and closing one of several
reuseport sockets drops its queue); IPv6 listeners are v6-only so ``[::]`` and ``0.0.0.0`` can
coexist; listeners are non-blocking (the master only accepts when the selector says so).
A unix socket file is unlinked on close only if it is still the one we created.

A stop closes a listener for good, and the kernel resets the clients still queued on it at
its last close. So a stop first refuses new clients (``refuse_new``: a socket filter that
drops every SYN, so a connecting client retries and is refused once the socket is closed;
for a unix socket, its file goes), then the model takes what is queued (the handshakes in
flight still complete and join the queue), then the socket closes with nothing left in it.
Only a socket nobody else holds is sealed so: systemd keeps its sockets, and their queues,
for the next start, and the filter would stay on them.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import socket
import stat
import struct
from dataclasses import dataclass

from ..config import Address
from ..errors import ListenError
from ..protocol.address import format_address

log = logging.getLogger("forkserve")

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
    #: Nobody but this master (and its workers) holds the socket: it bound it, or took it
    #: over from the master an upgrade replaced. False for systemd's sockets.
    ours: bool = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        """Close the socket and remove our unix socket file. Idempotent."""
        if self.sock.fileno() >= 0:
            self.sock.close()
        self._unlink()

    def refuse_new(self) -> None:
        """Refuse new clients from now on, for good, where the socket is ``ours``; those
        queued or in their handshake can still be accepted. Once, at a stop, before the last
        drain; the close that follows ends it."""
        if not self.ours or self.sock.fileno() < 0:
            return
        if self.address.kind == "unix":
            self._unlink()
            return
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, _drop_syn_program()[0])
        except OSError as exc:  # (a kernel without socket filters: a close resets, as before)
            log.debug("%s: cannot refuse new clients before the close: %s", self.name,
                      exc.strerror)

    def _unlink(self) -> None:
        path, self.unix_inode, inode = self.address.path, None, self.unix_inode
        if inode is None:
            return
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == inode:
                os.unlink(path)


#: setsockopt(2): attach a classic BPF program to a socket (``linux/filter.h``).
SO_ATTACH_FILTER = 26


@functools.cache
def _drop_syn_program() -> tuple[bytes, object]:
    """A ``struct sock_fprog`` that drops every TCP segment with SYN set and lets the rest
    through, and the buffer it points to (kept alive: the kernel copies the code from it at
    each attach). A listener's filter sees a segment from its TCP header (byte 13: flags)."""
    import ctypes  # noqa: PLC0415  (only a stop needs it)

    ld_byte, jset, ret = 0x00 | 0x10 | 0x20, 0x05 | 0x40, 0x06
    program = [(ld_byte, 0, 0, 13),           # A = flags
               (jset, 1, 0, 0x02),            # SYN? to "drop"
               (ret, 0, 0, 0xFFFF_FFFF),      # keep the whole segment
               (ret, 0, 0, 0)]                # drop
    code = b"".join(struct.pack("HBBI", *op) for op in program)
    buffer = ctypes.create_string_buffer(code, len(code))
    return struct.pack("HL", len(program), ctypes.addressof(buffer)), buffer


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
    return Listener(address, sock, format_address(sock.getsockname(), family), ours=True)


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
    return Listener(address, sock, str(address), os.stat(address.path).st_ino, ours=True)


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
