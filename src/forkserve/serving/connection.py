"""``Connection``: one client connection, as a handler sees it.

Runs in the process that serves the connection: a per-connection child (fork model) or the
master itself (single model). Rules:

1. Every size and time a client controls is bounded: lines by ``max_line`` (see ``framing``),
   silence by ``idle_timeout``, and silence from the start by ``first_byte_timeout`` (counted
   from the connection's opening: a client that never says anything is the cheapest attack
   on a process per connection). Under stress (``Patience.stressed``, the master's word in
   the scoreboard) both shrink, for reads already waiting too: the master signals the
   serving processes, which wakes their waits (``stopsignal``), and each wait looks again.
   A client *proves* itself with its first whole line (or, for raw reads, its first bytes):
   ``on_proven`` is called once, and the early drop counts the connection no more. The
   kernel's ``SO_RCVTIMEO`` holds the same deadline as a backstop (in a process without a
   stop pipe, the single model's master, it is the only one). Writes are bounded by
   ``write_timeout`` (``SO_SNDTIMEO``): a client that stops reading cannot hold a process
   forever.
2. Client misbehaviour surfaces as a ``ClientError`` (``IdleTimeout``, ``LineTooLong``,
   ``PeerGone``); the code that runs the handler ends the connection quietly on those. Any
   ``OSError`` of the connection's own reads and writes is the client's doing.
3. ``interrupt()`` is how a graceful stop tells a handler to finish: it sets a flag and lowers
   the receive timeout to ``STOP_POLL`` (one ``setsockopt``, safe in a signal handler; a read
   blocked at that moment is retried by PEP 475 with the new timeout). From then on a read
   returns what the client has already sent, and the first read that would wait ends the
   input (``readline`` returns ``b""``). A request still incomplete is the exception: a
   connection that has received nothing yet (its client was accepted, and its first request
   may be in flight) or holds part of a line waits up to its ``grace`` (``STOP_GRACE``; none
   for an orphan, see ``stopsignal``) for the rest, then ends the same way; a connection
   that is idle between requests ends at once. Nothing received whole is dropped, no answer
   is cut, and the connection then closes with lingering, as below. A client that says
   nothing costs a stop ``STOP_GRACE``, not ``graceful_timeout``.
   In a serving process with a ``StopSignal`` (fork children, prefork workers), every read
   that may wait first polls the socket together with the process's signal wakeup pipe, so
   a stop that lands just before the read starts still ends it at once (``stopsignal``).
   (``shutdown(SHUT_RD)`` was rejected: it fakes an end-of-stream, so the close could no
   longer tell when the client was done and would reset a client still sending, destroying
   answers in flight.)
4. TLS (an ``ssl.SSLSocket`` after its handshake) keeps the same deadlines: the socket is put
   in Python's non-blocking mode while its fd stays blocking, so OpenSSL's reads and writes
   block in the kernel up to ``SO_RCVTIMEO``/``SO_SNDTIMEO`` and then report "want read/write"
   instead of looping forever, as its blocking mode would. The same report comes when a signal
   cuts a wait short (OpenSSL cannot retry it as PEP 475 would): a read or write is then
   retried unless the stop applies or its deadline has really passed.
5. ``max_time`` (``max_connection_time``) bounds a connection's whole life: each read and
   write lowers its kernel timeout to what is left of it (one more ``setsockopt`` per call,
   only when the setting is on), and the first one that would pass it raises
   ``ConnectionExpired``: its next read or write ends the connection. A process that does
   neither (a handler computing, a client trickling one TLS record a byte at a time) is
   ended by the kernel's timer a few seconds later (``child.arm_connection_timer``).
6. ``close()`` lingers when the server closes first: shut down the write side, drain what the
   client still sends for up to ``linger_timeout`` (its FIN ends it at once), then close, so
   a final answer is not destroyed by the RST that closing with unread input would send (RFC
   1122 4.2.2.13). A connection that was sent nothing is owed nothing: a reset can destroy
   no answer, so it closes at once, after reading what is already there without waiting (a
   silent client held by the idle timeout, or by a stop, costs its process no linger). A
   socketserver handler writes the socket itself, unseen: its connections always linger.
"""

from __future__ import annotations

import contextlib
import select
import socket
import sys
import time
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING

from ..errors import ConnectionExpired, FirstByteTimeout, IdleTimeout, LineTooLong, PeerGone
from ..ops.scoreboard import SlotMonitor
from ..protocol.address import format_address
from ..protocol.framing import LineFramer
from .patience import Patience
from .sockets import (
    LINGER_SECONDS,
    MAX_TIMEOUT,
    NO_WAIT,
    RECV_SIZE,
    close_notify,
    drain_queued,
    family_of,
    linger,
    set_blocking_mode,
    set_timeouts,
    timed_out,
    timeval,
)
from .stopsignal import STOP_GRACE, StopSignal, Waiter, Woke

if TYPE_CHECKING:
    from ..config import Config

__all__ = ["Connection"]

#: The receive timeout once a stop is asked for: reads return queued data, never wait
#: (except for an incomplete request: ``stopsignal.STOP_GRACE``).
STOP_POLL = NO_WAIT


class Connection:
    """A client connection with bounded line reads, writes and deadlines.

    ``peer`` and ``local`` are the addresses as text (``"127.0.0.1:53122"``). ``bytes_in`` and
    ``bytes_out`` count what crossed the socket. Not thread-safe.
    """

    __slots__ = (
        "_closed", "_eof", "_error", "_expires", "_first_byte", "_framer", "_grace",
        "_idle_timeout", "_linger_timeout", "_monitor", "_on_proven", "_opened", "_patience",
        "_pending", "_raw", "_rest", "_stop_began", "_stop_timeout", "_tls", "_waiter",
        "_write_timeout",
        "bytes_in", "bytes_out", "local", "peer", "settings", "sock",
    )

    def __init__(self, sock: socket.socket, *, max_line: int, idle_timeout: float | None,
                 write_timeout: float | None = None, peer: str | None = None,
                 local: str | None = None, monitor: SlotMonitor | None = None,
                 settings: Config | None = None, max_time: float | None = None,
                 linger_timeout: float = LINGER_SECONDS, stop: StopSignal | None = None,
                 patience: Patience | None = None) -> None:
        self.sock = sock
        self._monitor = monitor
        #: The server's settings, read-only (``None`` outside a server).
        self.settings = settings
        self._tls = set_blocking_mode(sock)
        self._idle_timeout = idle_timeout
        self._patience = patience
        self._opened = time.monotonic()
        #: Waiting for the first byte, with a deadline of its own (rule 1)?
        self._first_byte = patience is not None and patience.first_byte is not None
        self._on_proven = patience.on_proven if patience is not None else None
        self._write_timeout = write_timeout
        #: When the connection must end (``max_time``), on the monotonic clock.
        self._expires = time.monotonic() + max_time if max_time else None
        set_timeouts(sock, self._kernel_read_timeout(), write_timeout)
        self.peer = (peer if peer is not None
                     else format_address(sock.getpeername(), family_of(sock)))
        self.local = (local if local is not None
                      else format_address(sock.getsockname(), family_of(sock)))
        self.bytes_in = 0
        self.bytes_out = 0
        self._framer = LineFramer(max_line)
        self._pending: deque[bytes] = deque()
        #: Bytes read past what ``read(n)`` returned: not framed yet (raw data need not be
        #: lines, so ``max_line`` applies to them only once ``readline`` looks at them).
        self._rest = b""
        self._error: LineTooLong | None = None
        self._eof = False
        #: Once a stop is asked for: the receive timeout in force, and when the stop came.
        self._stop_timeout: float | None = None
        self._stop_began = 0.0
        self._grace = STOP_GRACE
        self._closed = False
        self._linger_timeout = linger_timeout
        #: Waits on the client that a stop ends at once (rule 3); None: the kernel timeouts only.
        self._waiter: Waiter | None = None if stop is None else stop.waiter(sock.fileno())
        #: The socket was handed to code that writes it unseen (rule 6).
        self._raw = False

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
            if self._on_proven is not None:
                self._proven()  # a raw protocol: its first bytes are its proof
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
        if self._on_proven is not None and self._pending:
            self._proven()
        return True

    def _recv(self) -> bytes | None:
        """One ``recv``: data, ``b""`` at the client's end, ``None`` once a stop ends input."""
        monitor = self._monitor
        if monitor is not None:
            monitor.waiting()
        called = time.monotonic()
        while True:
            if self._stop_timeout is not None:
                self._apply_stop()  # the request may have become complete since: never wait then
            wait = self._read_wait(self._read_deadline(called))
            began = time.monotonic() if self._tls else 0.0
            if self._waiter is not None and not (self._tls and self._tls_buffered()):
                woke = self._waiter.wait(wait)
                if woke is not Woke.READY:
                    if woke is Woke.SIGNAL:
                        continue  # a stop: look again, on its terms
                    self._raise_unless_stopping()  # the wait ran out
                    return None
            try:
                data = self.sock.recv(RECV_SIZE)
                break
            except OSError as exc:
                if not (isinstance(exc, BlockingIOError) or self._want(exc, "read")):
                    raise PeerGone(f"client went away: {exc.strerror or exc}") from None
                # SO_RCVTIMEO expired; for TLS perhaps only a signal that cut the wait short
                # (rule 4): then wait again, for what is left
                if self._tls and not timed_out(began, wait):
                    continue
                self._raise_unless_stopping()
                return None
        if monitor is not None:
            monitor.working()
        if self._first_byte and data:
            self._first_data()
        self.bytes_in += len(data)
        return data

    def _first_data(self) -> None:
        """The client's first bytes are here: from now on, ``idle_timeout`` (rule 1)."""
        self._first_byte = False
        idle = self._kernel_read_timeout()
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                                 timeval(idle if idle is not None else MAX_TIMEOUT))

    def _read_deadline(self, called: float) -> float | None:
        """When a read that started waiting at ``called`` gives up (rule 1); None: never."""
        patience = self._patience
        if patience is None:
            return None if self._idle_timeout is None else called + self._idle_timeout
        stressed = patience.stressed()
        idle = patience.idle_limit(self._idle_timeout, stressed)
        until = None if idle is None else called + idle
        if self._first_byte:
            first = self._opened + patience.first_byte_limit(stressed)
            until = first if until is None else min(until, first)
        return until

    def _kernel_read_timeout(self) -> float | None:
        """The backstop SO_RCVTIMEO (the waits of a process without a stop pipe rely on it)."""
        patience = self._patience
        if patience is None:
            return self._idle_timeout
        idle = patience.idle_limit(self._idle_timeout, False)
        if self._first_byte:
            first = patience.first_byte_limit(False)
            return first if idle is None else min(idle, first)
        return idle

    @property
    def proven(self) -> bool:
        """Has the client proven itself (rule 1)? Always, without an ``on_proven`` to tell."""
        return self._on_proven is None

    def _proven(self) -> None:
        """The client has proven itself (rule 1): tell the master's early drop, once."""
        callback, self._on_proven = self._on_proven, None
        if callback is not None:
            callback()

    def _read_wait(self, until: float | None) -> float | None:
        """How long the next read may wait (None: forever); with ``max_time``, the kernel's
        receive timeout is lowered to it too."""
        if self._stop_timeout is not None:
            wait: float | None = self._stop_timeout
        elif until is not None:
            wait = max(until - time.monotonic(), 0.0)
        else:
            wait = None
        if self._expires is not None:
            wait = self._clamp(socket.SO_RCVTIMEO, wait)
        return wait

    def _raise_unless_stopping(self) -> None:
        """A read's wait ran out: at a stop, that ends the input; else raise ``IdleTimeout``
        (or ``ConnectionExpired``)."""
        self._check_expiry()
        if self._stop_timeout is not None:
            return
        if self._first_byte:
            raise FirstByteTimeout("client sent nothing within first_byte_timeout")
        raise IdleTimeout("client sent nothing within the idle timeout")

    def _tls_buffered(self) -> bool:
        """Decrypted bytes wait inside OpenSSL (a poll of the fd cannot see them)."""
        return self._tls and bool(self.sock.pending())  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ writing

    def write(self, data: bytes) -> None:
        """Send all of ``data``. Raises ``PeerGone`` if the client is gone."""
        monitor = self._monitor
        if monitor is not None:
            monitor.waiting()
        try:
            if self._tls:
                self._send_tls(data)
            elif self._expires is not None:
                self._send_bounded(data)
            else:
                self.sock.sendall(data)
        except BlockingIOError:  # SO_SNDTIMEO expired
            self._check_expiry()
            raise PeerGone("client stopped reading (write timeout)") from None
        except OSError as exc:
            raise PeerGone(f"client went away: {exc.strerror or exc}") from None
        if monitor is not None:
            monitor.working()
        self.bytes_out += len(data)

    def _send_bounded(self, data: bytes) -> None:
        """``sendall`` under ``max_time``: each partial send waits at most what is left of it
        (``sendall`` would go on for as long as a slow reader keeps taking a little)."""
        view = memoryview(data)
        while view:
            self._clamp(socket.SO_SNDTIMEO, self._write_timeout)
            view = view[self.sock.send(view):]

    def _want(self, exc: OSError, what: str) -> bool:
        """Is ``exc`` OpenSSL's "want read" (or "want write"): the kernel timeout, for TLS?"""
        if not self._tls:
            return False
        ssl = sys.modules["ssl"]
        return isinstance(exc, ssl.SSLWantReadError if what == "read" else ssl.SSLWantWriteError)

    def _clamp(self, option: int, timeout: float | None) -> float:
        """Set ``option`` to ``timeout`` or what is left of ``max_time``, whichever is less;
        return it. Raises ``ConnectionExpired`` when nothing is left."""
        assert self._expires is not None
        left = self._expires - time.monotonic()
        if left <= 0:
            raise ConnectionExpired("the connection reached max_connection_time")
        wait = left if timeout is None else min(timeout, left)
        self.sock.setsockopt(socket.SOL_SOCKET, option, timeval(wait))
        return wait

    def _check_expiry(self) -> None:
        if self._expires is not None and time.monotonic() >= self._expires - 0.001:
            raise ConnectionExpired("the connection reached max_connection_time")

    def _send_tls(self, data: bytes) -> None:
        view = memoryview(data)
        began = time.monotonic()
        while view:
            if self._expires is not None:
                self._clamp(socket.SO_SNDTIMEO, self._write_timeout)
            try:
                sent = self.sock.send(view)
            except OSError as exc:
                if not self._want(exc, "write"):
                    raise
                # SO_SNDTIMEO expired, or a signal (rule 4)
                wait = self._write_timeout
                if self._expires is not None:
                    wait = min(wait or MAX_TIMEOUT, max(self._expires - began, 0.0))
                if timed_out(began, wait):
                    raise BlockingIOError from None
                continue
            view = view[sent:]
            began = time.monotonic()  # the deadline bounds each wait, as SO_SNDTIMEO does

    # ------------------------------------------------------------------ ending

    def interrupt(self, grace: float = STOP_GRACE) -> None:
        """Finish: answer what was received, then end the input. Safe in a signal handler.

        An incomplete request still gets ``grace`` seconds to arrive whole (rule 3). Once
        ``close()`` has begun there is nothing to interrupt: its lingering is bounded on its
        own, and cutting it short could reset a client still reading the last answer."""
        if self._closed:
            return
        if self._stop_timeout is None:
            self._stop_began = time.monotonic()
        self._grace = min(self._grace, grace)
        self._apply_stop()

    def _apply_stop(self) -> None:
        incomplete = not self.bytes_in or bool(self._framer.buffered) or bool(self._rest)
        timeout = STOP_POLL
        if incomplete:  # the grace counts from the stop, not from each read
            timeout = max(STOP_POLL, self._grace - (time.monotonic() - self._stop_began))
        self._stop_timeout = timeout
        with contextlib.suppress(OSError):  # already closed: nothing to interrupt
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval(timeout))

    def _hand_over(self) -> None:
        """The socket goes to code that reads and writes it directly (a socketserver
        handler). First the client's first byte is awaited here, within its deadline (rule
        1; from then on the handler's reads have ``idle_timeout``): raises
        ``FirstByteTimeout``. Then the watchdog is told that this connection's code waits on
        its client from now on: its reads and writes do not pass through this object, so
        the watchdog cannot tell waiting from working; they stay bounded by the idle and
        write timeouts. What it writes is unseen here, so its close always lingers (rule 6)."""
        if self._first_byte and not self._rest:
            self._await_first_byte()
        self._raw = True
        self._proven()
        if self._monitor is not None:
            self._monitor.waiting()

    def _await_first_byte(self) -> None:
        called = time.monotonic()
        while self._stop_timeout is None:  # (at a stop, the handler's reads end it)
            wait = self._read_wait(self._read_deadline(called))
            if self._waiter is not None:
                woke = self._waiter.wait(wait)
            else:
                poller = select.poll()
                poller.register(self.sock.fileno(), select.POLLIN)
                woke = Woke.READY if poller.poll(None if wait is None else wait * 1000) \
                    else Woke.TIMEOUT
            if woke is Woke.READY:
                self._first_data()
                return
            if woke is Woke.TIMEOUT:
                self._raise_unless_stopping()

    def close(self) -> None:
        """Close, lingering briefly if the client has not closed its side. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._tls:
                close_notify(self.sock, self._linger_timeout)
            if self._eof:
                pass  # the client closed first: nothing can come after
            elif self._linger_timeout and (self.bytes_out or self._raw):
                self._linger()
            else:
                drain_queued(self.sock)  # owed nothing: but a close with unread input resets
        finally:
            self.sock.close()

    def _linger(self) -> None:
        """Linger (``sockets.linger``) on the client's time, as the watchdog sees it."""
        if self._monitor is not None:
            self._monitor.waiting()  # the client's time now, not the server's
        linger(self.sock, self._linger_timeout, self._waiter)
