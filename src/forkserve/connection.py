"""``Connection``: one client connection, as a handler sees it.

Runs in the process that serves the connection: a per-connection child (fork model) or the
master itself (single model). Rules:

1. Every size and time a client controls is bounded: lines by ``max_line`` (see ``framing``),
   silence by ``idle_timeout``. The idle deadline is the kernel's ``SO_RCVTIMEO``, so a read
   costs one ``recv`` system call and no ``poll`` (a socket timeout in Python would add a
   ``poll`` before every ``recv``).
   Writes are bounded by ``write_timeout`` the same way (``SO_SNDTIMEO``): a client that stops
   reading cannot hold a process forever.
2. Client misbehaviour surfaces as a ``ClientError`` (``IdleTimeout``, ``LineTooLong``,
   ``PeerGone``); the code that runs the handler ends the connection quietly on those. Any
   ``OSError`` of the connection's own reads and writes is the client's doing.
3. ``interrupt()`` is how a graceful stop tells a handler to finish: it sets a flag and lowers
   the receive timeout to ``STOP_POLL`` (one ``setsockopt``, safe in a signal handler; a read
   blocked at that moment is retried by PEP 475 with the new timeout). From then on a read
   returns what the client has already sent, and the first read that would wait ends the
   input (``readline`` returns ``b""``). A connection that has received nothing yet is the
   exception: it was accepted, so its client is owed an answer to its first request, which
   may still be in flight; its first read waits as usual (bounded by the idle timeout and
   the stop's deadline), and the stop applies from the read after it. Nothing received is
   dropped, no answer is cut, and the connection then closes with lingering, as below.
   (``shutdown(SHUT_RD)`` was rejected: it fakes an end-of-stream, so the close could no
   longer tell when the client was done and would reset a client still sending, destroying
   answers in flight.)
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
from typing import TYPE_CHECKING

from .errors import IdleTimeout, LineTooLong, PeerGone
from .framing import LineFramer
from .scoreboard import SlotMonitor

if TYPE_CHECKING:
    from .config import Config

#: Bytes asked of the kernel per read: large enough for many pipelined lines at once.
RECV_SIZE = 65536
#: How long ``close()`` drains a client that has not closed its side yet (nginx: 5 s).
LINGER_SECONDS = 2.0
#: ...and how much it reads at most while doing so, so lingering is bounded in bytes too.
LINGER_MAX_BYTES = 1 << 20
#: The receive timeout once a stop is asked for: reads return queued data, never wait.
STOP_POLL = 0.000_001
#: Longest timeout the kernel's timeval takes without overflow that we will ever set.
MAX_TIMEOUT = 1e6


def _timeval(seconds: float) -> bytes:
    """A ``struct timeval``; never all-zero, which the kernel reads as "no timeout"."""
    seconds = min(max(seconds, STOP_POLL), MAX_TIMEOUT)
    whole = int(seconds)
    return struct.pack("@ll", whole, max(int((seconds - whole) * 1_000_000), 0 if whole else 1))


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
        "_closed", "_eof", "_error", "_framer", "_monitor", "_pending", "_rest", "_stop_applied",
        "_stopping",
        "bytes_in", "bytes_out", "local", "peer", "settings", "sock",
    )

    def __init__(self, sock: socket.socket, *, max_line: int, idle_timeout: float | None,
                 write_timeout: float | None = None, peer: str | None = None,
                 local: str | None = None, monitor: SlotMonitor | None = None,
                 settings: Config | None = None) -> None:
        self.sock = sock
        self._monitor = monitor
        #: The server's settings, read-only (``None`` outside a server).
        self.settings = settings
        sock.settimeout(None)
        if idle_timeout is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(idle_timeout))
        if write_timeout is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(write_timeout))
        self.peer = peer if peer is not None else format_address(sock.getpeername(), sock.family)
        self.local = (local if local is not None
                      else format_address(sock.getsockname(), sock.family))
        self.bytes_in = 0
        self.bytes_out = 0
        self._framer = LineFramer(max_line)
        self._pending: deque[bytes] = deque()
        #: Bytes read past what ``read(n)`` returned: not framed yet (raw data need not be
        #: lines, so ``max_line`` applies to them only once ``readline`` looks at them).
        self._rest = b""
        self._error: LineTooLong | None = None
        self._eof = False
        self._stopping = False
        self._stop_applied = False
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
            if self._eof or self._fill() is None:
                return b""
        return pending.popleft()

    def read(self, n: int = RECV_SIZE) -> bytes:
        """Up to ``n`` bytes (at least one), what is buffered first; ``b""`` at the end.

        Raises ``IdleTimeout`` or ``PeerGone``. ``max_line`` does not limit raw reads, except
        for bytes that arrived together with lines that ``readline`` has already framed.
        """
        if n < 1:
            raise ValueError("read(n) needs n >= 1")
        if self._pending:
            line = self._pending.popleft()
            if len(line) > n:
                self._pending.appendleft(line[n:])
                return line[:n]
            return line
        if partial := self._framer.take(n):
            return partial
        if not self._rest:
            if self._error is not None:
                raise self._error
            if self._eof:
                return b""
            data = self._recv()
            if not data:
                self._eof = data is not None
                return b""
            self._rest = data
        out, self._rest = self._rest[:n], self._rest[n:]
        return out

    def readexactly(self, n: int) -> bytes:
        """Exactly ``n`` bytes; raises ``PeerGone`` if the client ends before that."""
        chunks: list[bytes] = []
        got = 0
        while got < n:
            chunk = self.read(n - got)
            if not chunk:
                raise PeerGone(f"client ended after {got} of {n} bytes")
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def _fill(self) -> bool | None:
        """Read once into the line queue; ``None`` when the input ended (stop or EOF)."""
        if self._error is not None:
            raise self._error
        if self._rest:
            data: bytes | None
            data, self._rest = self._rest, b""
        else:
            data = self._recv()
        if data is None:
            return None
        if not data:
            self._eof = True
            last = self._framer.end()
            if last is not None:
                self._pending.append(last)
            return True
        try:
            self._pending.extend(self._framer.feed(data))
        except LineTooLong as exc:
            self._pending.extend(exc.complete)
            exc.complete = []
            self._error = exc
        return True

    def _recv(self) -> bytes | None:
        """One ``recv``: data, ``b""`` at the client's end, ``None`` once a stop ends input."""
        monitor = self._monitor
        if monitor is not None:
            monitor.waiting()
        if self._stopping and self.bytes_in and not self._stop_applied:
            self._apply_stop()  # interrupted before the first request came: it has now
        try:
            data = self.sock.recv(RECV_SIZE)
        except BlockingIOError:  # SO_RCVTIMEO expired
            if self._stop_applied:
                return None
            raise IdleTimeout("client sent nothing within the idle timeout") from None
        except OSError as exc:
            raise PeerGone(f"client went away: {exc.strerror or exc}") from None
        if monitor is not None:
            monitor.working()
        self.bytes_in += len(data)
        return data

    # ------------------------------------------------------------------ writing

    def write(self, data: bytes) -> None:
        """Send all of ``data``. Raises ``PeerGone`` if the client is gone."""
        monitor = self._monitor
        if monitor is not None:
            monitor.waiting()
        try:
            self.sock.sendall(data)
        except BlockingIOError:  # SO_SNDTIMEO expired
            raise PeerGone("client stopped reading (write timeout)") from None
        except OSError as exc:
            raise PeerGone(f"client went away: {exc.strerror or exc}") from None
        if monitor is not None:
            monitor.working()
        self.bytes_out += len(data)

    # ------------------------------------------------------------------ ending

    def interrupt(self) -> None:
        """Finish: answer what was received, then end the input. Safe in a signal handler.

        Before anything was received, the first request is still waited for (rule 3)."""
        self._stopping = True
        if self.bytes_in:
            self._apply_stop()

    def _apply_stop(self) -> None:
        self._stop_applied = True
        with contextlib.suppress(OSError):  # already closed: nothing to interrupt
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(STOP_POLL))

    def _mark_waiting(self) -> None:
        """Tell the watchdog that this connection's code waits on its client from now on.

        For handlers that use the socket directly (socketserver ones): their reads and writes
        do not pass through this object, so the watchdog cannot tell waiting from working;
        their waits stay bounded by the idle and write timeouts."""
        if self._monitor is not None:
            self._monitor.waiting()

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
        if self._monitor is not None:
            self._monitor.waiting()  # the client's time now, not the server's
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
