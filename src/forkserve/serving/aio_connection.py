"""``AsyncConnection``: one client connection, as an async handler of the hybrid model sees it.

Runs in a hybrid worker, on its event loop (``aio_worker``). The rules of ``Connection`` hold
here too, enforced with the loop's timers instead of the kernel's socket timeouts:

1. Every size and time a client controls is bounded: a line by ``max_line`` (``LineTooLong``
   the moment a partial line is longer: the buffer never holds more than ``max_line`` plus
   one read), silence by ``idle_timeout`` and, before its first byte, by
   ``first_byte_timeout`` (``FirstByteTimeout``); a write that the client does not drain
   within ``write_timeout`` raises ``PeerGone``; ``max_connection_time`` ends the connection
   at its next read or write (``ConnectionExpired``), and a handler that neither reads nor
   writes by then is cancelled ``EXPIRY_GRACE`` later (``aio_worker``).
2. A wait costs nothing while nothing happens: one future and one ``call_at`` timer, made
   only when the buffer cannot answer (no task, no ``wait_for``: the common read finds its
   line already buffered).
3. Reading is paused (``pause_reading``) while more than ``max_line`` plus ``READ_AHEAD`` is
   buffered: a client that sends faster than the handler reads fills its own socket buffer,
   not the worker's memory.
4. ``interrupt`` (a graceful stop, a retiring worker) answers what was received whole and then
   ends the input: a read that would wait returns ``b""`` at once, unless a request is
   incomplete (nothing received yet, or part of a line), which gets ``grace`` to arrive.
5. ``close`` lingers as ``Connection.close`` does: the write side is shut (``write_eof``),
   what the client still sends is dropped until it closes or ``linger_timeout`` passes; a
   connection that was sent nothing closes at once. A transport that cannot flush its last
   bytes within ``write_timeout`` is aborted: no fd outlives its bounds.

Client misbehaviour surfaces as a ``ClientError``, as for ``Connection``; the worker ends the
connection quietly on those.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, cast

from ..errors import ConnectionExpired, FirstByteTimeout, IdleTimeout, LineTooLong, PeerGone
from ..protocol.address import format_address

if TYPE_CHECKING:
    from ..config import Config
    from .patience import Patience

#: Bytes a connection buffers past ``max_line`` before it stops reading the socket.
READ_AHEAD = 65536
#: The transport's write buffer above which ``write`` waits for the client to drain it.
WRITE_HIGH_WATER = 65536
#: SO_LINGER on, 0 seconds: close() resets the connection.
_RESET = struct.pack("ii", 1, 0)
#: A stop's grace for an incomplete request (as ``stopsignal.STOP_GRACE``).
STOP_GRACE = 1.0


class _Ended(Exception):
    """Internal: a wait ended by a stop (the input ends, quietly)."""


class AsyncConnection(asyncio.Protocol):
    """A client connection with bounded async line reads, writes and deadlines.

    ``peer`` and ``local`` are the addresses as text; ``settings`` the server's ``Config``;
    ``bytes_in`` and ``bytes_out`` count what crossed the connection. One per connection,
    used from its own task only. (It is the transport's protocol too: the callbacks below
    are the loop's, not the handler's.)
    """

    def __init__(self, *, max_line: int, idle_timeout: float | None,
                 write_timeout: float | None, first_byte_timeout: float | None = None,
                 max_time: float | None = None, linger_timeout: float = 2.0,
                 settings: Config | None = None, peer: str = "", local: str | None = "",
                 on_proven: Callable[[], None] | None = None,
                 stress: Patience | None = None) -> None:
        self.peer = peer
        #: None: the socket's own address, looked up when first asked (``local``).
        self._local = local
        #: The server's settings, read-only.
        self.settings = settings
        self.bytes_in = 0
        self.bytes_out = 0
        self._max_line = max_line
        self._idle = idle_timeout
        self._write_timeout = write_timeout
        self._first_byte = first_byte_timeout
        self._linger_timeout = linger_timeout
        self._opened = time.monotonic()
        self._expires = self._opened + max_time if max_time else None
        self._on_proven = on_proven
        #: The shorter deadlines under stress (``stress_idle``, ``stress_first_byte``) and
        #: the master's word; the worker calls ``look_again`` when that word changes.
        self._stress = stress
        self._buf = bytearray()
        self._scanned = 0  # bytes of _buf known to hold no b"\n"
        self._eof = False
        self._lost = False
        self._reset: Exception | None = None
        self._paused_reading = False
        self._paused_writing = False
        self._waiter: asyncio.Future[None] | None = None
        #: The waiting read's deadline, and the one timer that watches it (``_arm``).
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._drainer: asyncio.Future[None] | None = None
        self._stop_began: float | None = None
        self._grace = STOP_GRACE
        self._closing = False
        self._discard = False
        self.transport: asyncio.Transport | None = None
        #: Set when the transport is gone (the worker awaits it before it counts the end).
        self.gone: asyncio.Future[None] | None = None

    # ------------------------------------------------------------------ the loop's side

    @property
    def local(self) -> str:
        """The server's address of this connection, as text (the proxy's view behind one)."""
        if self._local is None:
            transport = self.transport
            name = None if transport is None else transport.get_extra_info("sockname")
            if name is None:
                return ""
            family = (socket.AF_UNIX if not isinstance(name, tuple)
                      else socket.AF_INET6 if len(name) == 4 else socket.AF_INET)
            self._local = format_address(name, family)
        return self._local

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports are not asyncio.Transport instances, but have its methods)
        self.transport = transport = cast("asyncio.Transport", transport)
        self.gone = asyncio.get_running_loop().create_future()
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)

    def data_received(self, data: bytes) -> None:
        if self._discard:
            return  # lingering: what the client still sends is dropped
        self._buf += data
        self.bytes_in += len(data)
        if self._first_byte is not None:
            self._first_byte = None
        if len(self._buf) > self._max_line + READ_AHEAD and self.transport is not None:
            self.transport.pause_reading()
            self._paused_reading = True
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        if self._discard:
            return False  # lingering, and the client closed too: the transport may go
        # keep the write side open (a half-closed client still wants its answers); TLS
        # transports cannot, and say so if asked
        return self.transport is not None and self.transport.get_extra_info("sslcontext") is None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._lost = True
        self._eof = True
        self._reset = exc
        self._wake()
        if self._drainer is not None and not self._drainer.done():
            self._drainer.set_result(None)
        if self.gone is not None and not self.gone.done():
            self.gone.set_result(None)

    def pause_writing(self) -> None:
        self._paused_writing = True

    def resume_writing(self) -> None:
        self._paused_writing = False
        if self._drainer is not None and not self._drainer.done():
            self._drainer.set_result(None)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # ------------------------------------------------------------------ reading

    def lines(self) -> AsyncIterator[bytes]:
        """Yield each line (with its ``b"\\n"``) until the client closes its side."""
        return _Lines(self)

    async def readline(self) -> bytes:
        """The next line with its ``b"\\n"``; the last one may lack it; ``b""`` at the end.
        Raises ``LineTooLong``, ``IdleTimeout``, ``ConnectionExpired``, ``PeerGone``."""
        while True:
            buf = self._buf
            nl = buf.find(b"\n", self._scanned)
            if nl >= 0:
                if nl > self._max_line:
                    raise LineTooLong(self._max_line)
                line = bytes(buf[: nl + 1])
                del buf[: nl + 1]
                self._consumed()
                return line
            if len(buf) > self._max_line:
                raise LineTooLong(self._max_line)
            self._scanned = len(buf)
            if self._eof:
                return self._take(len(buf))
            if not await self._wait():
                return b""

    async def read(self, n: int = 65536) -> bytes:
        """Up to ``n`` bytes, as soon as any are there; ``b""`` at the end."""
        while not self._buf:
            if self._eof or not await self._wait():
                return b""
        return self._take(n)

    async def readexactly(self, n: int) -> bytes:
        """Exactly ``n`` bytes; raises ``PeerGone`` if the client ends before that."""
        while len(self._buf) < n:
            if self._eof or not await self._wait():
                raise PeerGone(f"client ended after {len(self._buf)} of {n} bytes")
        return self._take(n)

    def _take(self, n: int) -> bytes:
        out = bytes(self._buf[:n])
        del self._buf[:n]
        self._consumed()
        return out

    def _consumed(self) -> None:
        self._scanned = 0
        if self._on_proven is not None:
            callback, self._on_proven = self._on_proven, None
            callback()
        if self._paused_reading and len(self._buf) <= self._max_line and self.transport:
            self._paused_reading = False
            self.transport.resume_reading()

    async def _wait(self) -> bool:
        """Wait for data (or the end); False if a stop ended the input. Raises on a deadline."""
        if self._reset is not None and not self._buf:
            raise PeerGone(f"client went away: {self._reset}")
        loop = asyncio.get_running_loop()
        called = time.monotonic()
        until, why = self._read_deadline(called)
        if until is not None and until <= called:
            return self._expired(why)
        waiter = self._waiter = loop.create_future()
        if until is not None:
            self._arm(loop, until)
        try:
            await waiter
        finally:
            self._waiter = None
        if self._buf or self._eof:
            return True
        until, why = self._read_deadline(called)
        if until is not None and until <= time.monotonic():
            return self._expired(why)
        return True  # woken for another reason (a stop that leaves this read its grace)

    def _arm(self, loop: asyncio.AbstractEventLoop, until: float) -> None:
        """Wake the waiting read at ``until`` (rule 2): one timer per connection, re-armed
        lazily. A busy connection moves its deadline at every read; the timer is not moved
        with it: when it fires early, it is armed again for what is left."""
        self._deadline = until
        if self._timer is not None:
            if self._timer_at <= until:
                return  # fires first, then re-arms for the rest
            self._timer.cancel()
        self._timer_at = until
        # (call_later: the loop's clock need not be time.monotonic())
        self._timer = loop.call_later(until - time.monotonic(), self._on_timer, loop)

    def _on_timer(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        if self._waiter is None or self._waiter.done():
            return  # no read waits: the next one arms its own
        if time.monotonic() >= self._deadline:
            self._wake()
        else:
            self._arm(loop, self._deadline)

    def _read_deadline(self, called: float) -> tuple[float | None, str]:
        """When a wait for more input that began at ``called`` gives up, and why: ``idle``,
        ``first``, ``expired``, ``stop``."""
        idle, first = self._idle, self._first_byte
        stress = self._stress
        if stress is not None and stress.stressed():
            idle = stress.idle_limit(idle, True)
            if not self.bytes_in and stress.stress_first_byte:
                first = stress.stress_first_byte if first is None else \
                    min(first, stress.stress_first_byte)
        if first is None and self._expires is None and self._stop_began is None:
            return (None, "") if idle is None else (called + idle, "idle")
        options: list[tuple[float, str]] = []
        if idle is not None:
            options.append((called + idle, "idle"))
        if first is not None:
            options.append((self._opened + first, "first"))
        if self._expires is not None:
            options.append((self._expires, "expired"))
        if self._stop_began is not None:
            incomplete = not self.bytes_in or bool(self._buf)
            options.append((self._stop_began + (self._grace if incomplete else 0.0), "stop"))
        if not options:
            return None, ""
        return min(options)

    def _expired(self, why: str) -> bool:
        if why == "stop":
            return False
        if why == "expired":
            raise ConnectionExpired("max_connection_time reached")
        if why == "first":
            raise FirstByteTimeout("client sent nothing within first_byte_timeout")
        raise IdleTimeout("client sent nothing within the idle timeout")

    @property
    def proven(self) -> bool:
        """Has the client sent its first bytes?"""
        return self.bytes_in > 0

    # ------------------------------------------------------------------ writing

    async def write(self, data: bytes) -> None:
        """Send ``data``; waits while the client has not drained what was sent before, up
        to ``write_timeout``. Raises ``PeerGone`` (gone, or not reading) and
        ``ConnectionExpired``."""
        transport = self.transport
        if self._lost or transport is None or transport.is_closing():
            raise PeerGone("client went away")
        if self._expires is not None and time.monotonic() >= self._expires:
            raise ConnectionExpired("max_connection_time reached")
        transport.write(data)
        self.bytes_out += len(data)
        if self._paused_writing:
            await self._drain()

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = None if self._write_timeout is None else loop.time() + self._write_timeout
        if self._expires is not None:
            left = self._expires - time.monotonic()
            deadline = loop.time() + left if deadline is None else min(deadline, loop.time()
                                                                        + left)
        drainer = self._drainer = loop.create_future()
        timer = None if deadline is None else loop.call_at(deadline, _settle, drainer)
        try:
            await drainer
        finally:
            self._drainer = None
            if timer is not None:
                timer.cancel()
        if self._lost:
            raise PeerGone("client went away")
        if self._paused_writing:
            if self._expires is not None and time.monotonic() >= self._expires:
                raise ConnectionExpired("max_connection_time reached")
            raise PeerGone("client stopped reading (write timeout)")

    # ------------------------------------------------------------------ ending

    def interrupt(self, grace: float = STOP_GRACE) -> None:
        """Finish: answer what was received whole, then end the input (rule 4)."""
        if self._closing:
            return
        if self._stop_began is None:
            self._stop_began = time.monotonic()
        self._grace = min(self._grace, grace)
        self._wake()

    def look_again(self) -> None:
        """The stress word changed: a waiting read looks at its deadline again."""
        self._wake()

    @property
    def stopping(self) -> bool:
        return self._stop_began is not None

    async def close(self) -> None:
        """Close, lingering briefly if the client has not closed its side (rule 5).
        Idempotent; raises nothing."""
        transport = self.transport
        if self._closing or transport is None:
            return
        self._closing = True
        self._buf.clear()
        if self._paused_reading:
            self._paused_reading = False
            with contextlib.suppress(Exception):
                transport.resume_reading()
        linger = (not self._eof and self.bytes_out > 0 and self._linger_timeout > 0
                  and transport.can_write_eof())
        if linger:
            self._discard = True
            with contextlib.suppress(Exception):
                transport.write_eof()
            await self._until_gone_or(self._linger_timeout)
        transport.close()
        await self._until_gone_or(self._write_timeout or 0.0)
        if not self._lost:
            # could not flush within write_timeout: give up its bytes, with a reset (a plain
            # close would leave them, and the fd's kernel memory, waiting on a zero window)
            with contextlib.suppress(Exception):
                sock = transport.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
            transport.abort()

    async def _until_gone_or(self, seconds: float) -> None:
        """Until the transport is gone, or ``seconds`` (one future and one timer; no task)."""
        gone = self.gone
        if gone is None or gone.done() or seconds <= 0:
            return
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        timer = loop.call_later(seconds, _settle, waiter)
        gone.add_done_callback(lambda _: _settle(waiter))
        try:
            await waiter
        finally:
            timer.cancel()


class _Lines:
    """``conn.lines()``: ``readline`` until ``b""`` (a class: cheaper per line than an async
    generator)."""

    __slots__ = ("_conn",)

    def __init__(self, conn: AsyncConnection) -> None:
        self._conn = conn

    def __aiter__(self) -> _Lines:
        return self

    async def __anext__(self) -> bytes:
        line = await self._conn.readline()
        if not line:
            raise StopAsyncIteration
        return line


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
