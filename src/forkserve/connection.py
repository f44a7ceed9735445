"""``Connection``: one client connection, as a handler sees it.

Runs in the process that serves the connection: a per-connection child (fork model) or the
master itself (single model). Rules:

1. Every size and time a client controls is bounded: lines by ``max_line`` (see ``framing``),
   silence by ``idle_timeout``. The idle deadline is the kernel's ``SO_RCVTIMEO``, so a read
   costs one ``recv`` system call and no ``poll`` (a socket timeout in Python would add a
   ``poll`` before every ``recv``).
2. Client misbehaviour surfaces as a ``ClientError`` (``IdleTimeout``, ``LineTooLong``,
   ``PeerGone``); the code that runs the handler ends the connection quietly on those.
3. ``interrupt()`` makes the next read see end-of-stream (``shutdown(SHUT_RD)``): it is how a
   graceful stop tells a handler blocked in a read to finish, and it is one system call, safe
   to make from a signal handler. An answer being written is not cut.
4. ``close()`` lingers when the server closes first: shut down the write side, drain what the
   client still sends for a moment, then close, so a final answer is not destroyed by the RST
   that closing with unread input would send (RFC 1122 4.2.2.13).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from collections import deque
from collections.abc import Iterator

from .errors import IdleTimeout, LineTooLong, PeerGone
from .framing import LineFramer

#: Bytes asked of the kernel per read: large enough for many pipelined lines at once.
RECV_SIZE = 65536
#: How long ``close()`` drains a client that has not closed its side yet (nginx: 5 s).
LINGER_SECONDS = 2.0
#: ...and how much it reads at most while doing so, so lingering is bounded in bytes too.
LINGER_MAX_BYTES = 1 << 20
#: errnos that mean the peer is gone (as opposed to a bug of ours).
_GONE = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError, TimeoutError)


def _timeval(seconds: float) -> bytes:
    whole = int(seconds)
    return struct.pack("@ll", whole, int((seconds - whole) * 1_000_000))


def format_address(addr: object, family: int) -> str:
    """``ip:port``, ``[ip6]:port`` or ``unix:path`` (``unix`` for an unnamed peer)."""
    if family == socket.AF_UNIX:
        return f"unix:{addr}" if addr else "unix"
    if isinstance(addr, tuple):
        host, port = addr[0], addr[1]
        return f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
    return str(addr)


class Connection:
    """A client connection with bounded line reads, writes and deadlines.

    ``peer`` and ``local`` are the addresses as text (``"127.0.0.1:53122"``). ``bytes_in`` and
    ``bytes_out`` count what crossed the socket. Not thread-safe.
    """

    __slots__ = (
        "_closed", "_eof", "_error", "_framer", "_pending", "bytes_in", "bytes_out",
        "local", "peer", "sock",
    )

    def __init__(self, sock: socket.socket, *, max_line: int, idle_timeout: float | None,
                 peer: str | None = None, local: str | None = None) -> None:
        self.sock = sock
        sock.settimeout(None)
        if idle_timeout is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(idle_timeout))
        self.peer = peer if peer is not None else format_address(sock.getpeername(), sock.family)
        self.local = (local if local is not None
                      else format_address(sock.getsockname(), sock.family))
        self.bytes_in = 0
        self.bytes_out = 0
        self._framer = LineFramer(max_line)
        self._pending: deque[bytes] = deque()
        self._error: LineTooLong | None = None
        self._eof = False
        self._closed = False

    # ------------------------------------------------------------------ reading

    def lines(self) -> Iterator[bytes]:
        """Yield each line (with its ``b"\\n"``) until the client closes its side."""
        while line := self.readline():
            yield line

    def readline(self) -> bytes:
        """The next line with its ``b"\\n"``; the last one may lack it; ``b""`` at the end.

        Raises ``LineTooLong``, ``IdleTimeout`` or ``PeerGone``.
        """
        pending = self._pending
        while not pending:
            if self._eof:
                return b""
            self._fill()
        return pending.popleft()

    def _fill(self) -> None:
        if self._error is not None:
            raise self._error
        data = self._recv()
        if not data:
            self._eof = True
            last = self._framer.end()
            if last is not None:
                self._pending.append(last)
            return
        try:
            self._pending.extend(self._framer.feed(data))
        except LineTooLong as exc:
            self._pending.extend(exc.complete)
            exc.complete = []
            self._error = exc

    def _recv(self) -> bytes:
        try:
            data = self.sock.recv(RECV_SIZE)
        except BlockingIOError:  # SO_RCVTIMEO expired
            raise IdleTimeout("client sent nothing within the idle timeout") from None
        except _GONE as exc:
            raise PeerGone(f"client went away: {exc.strerror or exc}") from None
        self.bytes_in += len(data)
        return data

    # ------------------------------------------------------------------ writing

    def write(self, data: bytes) -> None:
        """Send all of ``data``. Raises ``PeerGone`` if the client is gone."""
        try:
            self.sock.sendall(data)
        except _GONE as exc:
            raise PeerGone(f"client went away: {exc.strerror or exc}") from None
        self.bytes_out += len(data)

    # ------------------------------------------------------------------ ending

    def interrupt(self) -> None:
        """Make the next read return end-of-stream. Safe to call from a signal handler."""
        with contextlib.suppress(OSError):  # already closed: nothing to interrupt
            self.sock.shutdown(socket.SHUT_RD)

    def close(self) -> None:
        """Close, lingering briefly if the client has not closed its side. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if not self._eof:
                self._linger()
        finally:
            self.sock.close()

    def _linger(self) -> None:
        sock = self.sock
        try:
            sock.shutdown(socket.SHUT_WR)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(LINGER_SECONDS))
            drained = 0
            deadline = time.monotonic() + LINGER_SECONDS
            while drained < LINGER_MAX_BYTES and time.monotonic() < deadline:
                chunk = sock.recv(RECV_SIZE)
                if not chunk:
                    break
                drained += len(chunk)
        except OSError:
            pass  # reset, timeout or already shut: the client had its chance
