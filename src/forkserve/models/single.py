"""The single model: the master serves one connection at a time (the tutorial's previous article).

It exists to show what the fork model fixes: while one client holds the connection, every other
client waits in the kernel backlog. It has the same apps, limits and lifecycle as the others.

A stop while a connection is being served: the master's signal handler calls
``interrupt``, which tells the connection to finish (``Connection.interrupt``: answer what was
received, then end the input) and arms a timer of ``graceful_timeout``. If the handler is still
running when it fires, SIGALRM raises ``StopDeadline`` out of the handler (the only way to end
Python code running in this same process), the connection is closed and the master exits 1,
as the fork model does when it has to kill a child. A handler that swallows even that (a bare
``except:``) is given ``FINAL_GRACE`` more seconds, then the process exits at once. Its signal
table is ``serving.signals.SINGLE`` (the master's table applies to the rest).

A stop that arrives between accept() and the start of the handler is not lost: ``interrupt``
records it even with no connection in service, and ``_run_handler`` looks at that record
after it has published the connection.

Clients that queued while it served (a graceful stop is acted on once that connection ends)
are served at the stop (``drain``), one after the other, each told at once that the server
stops (so a silent one costs ``STOP_GRACE`` at most); the listener's socket filter lets no
one new in meanwhile. One deadline covers them all: ``graceful_timeout`` from the signal (a
fast stop: ``FAST_STOP_SECONDS``). What is still queued at the deadline is reset by the
close (counted in the log and in the stop's last line), and the master exits 1.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
from collections.abc import Collection
from types import FrameType

from ..config import Config
from ..errors import ChildExit, ClientError, ExitCode
from ..kernel import Exited, Kernel
from ..master.gate import Gate
from ..master.listeners import Listener
from ..ops.logs import AccessRecord
from ..protocol.address import format_address
from ..protocol.admission import ClientKey
from ..protocol.defence import Cause
from ..serving.accept import accept_queue
from ..serving.child import PENALISED_EXITS, serve_one
from ..serving.connection import Connection
from ..serving.patience import Patience
from ..serving.preamble import Proxied, open_connection, proxy_addresses
from ..serving.signals import SINGLE, Step, install, restore
from ..serving.tls import HandshakeTimeout
from .host import Host, ModelStatus, Serving, WithoutPool

log = logging.getLogger("forkserve")

#: On a fast stop, how long a handler may take to notice that its socket is shut.
FAST_STOP_SECONDS = 1.0
#: After StopDeadline was raised, how long a handler that swallowed it may still run.
FINAL_GRACE = 1.0


class StopDeadline(BaseException):
    """A handler outlived the stop deadline (raised by SIGALRM, single model only)."""


class SingleModel(WithoutPool):
    name = "single"
    accepts = True
    remind_stop = True
    #: Never full: while it serves, it does not look at the listeners at all.
    full = False

    def __init__(self, serving: Serving, *, host: Host, kernel: Kernel, gate: Gate) -> None:
        self.serving = serving
        self.host = host
        self.kernel = kernel
        self.gate = gate
        self._serving: Connection | None = None
        self._served = 0
        self._errors = 0
        self._fast_stop = False
        #: Set by ``interrupt`` (in the signal handler), with or without a connection.
        self._stop_asked = False
        #: When the stop's time is up (``kernel.monotonic``): set by the first ``interrupt``,
        #: only ever brought forward (a fast stop), so the clients a stop serves share it.
        self._stop_due: float | None = None
        self._deadline_hit = False
        #: The handlers the model's table replaced (``serving.signals.SINGLE``).
        self._previous: dict[int, object] = {}

    @property
    def config(self) -> Config:
        return self.serving.config

    def start(self) -> None:
        self._previous = install(SINGLE, {Step.DEADLINE: self._deadline})

    def _deadline(self, signum: int, frame: FrameType | None) -> None:
        conn = self._serving
        if conn is None:
            return
        if self._deadline_hit:  # the handler swallowed StopDeadline: end the process
            os._exit(ExitCode.KILLED)
        self._deadline_hit = True
        with contextlib.suppress(OSError):  # cut it, as SIGKILL would: no lingering close
            conn.sock.shutdown(socket.SHUT_RDWR)
        signal.setitimer(signal.ITIMER_REAL, FINAL_GRACE)
        raise StopDeadline

    def on_readable(self, listener: Listener) -> None:
        self._take(listener)

    def drain(self, listener: Listener) -> bool:
        """A graceful stop is about to close ``listener``: serve, one after the other, the
        clients queued on it, until they are served, a fast stop comes or the stop's time is
        up (see the module doc). A TCP listener says how many wait: no more than those are
        taken (on a socket that lets new clients in, systemd's, they would keep the stop
        going); elsewhere (unix) ``backlog`` at most."""
        queued = accept_queue(listener.sock)
        for _ in range(self.config.backlog if queued is None else queued):
            if (self._fast_stop or self._deadline_hit or not self._take(listener)
                    or (self._stop_due is not None
                        and self.kernel.monotonic() >= self._stop_due)):
                break
        left = accept_queue(listener.sock) if listener.ours and not self._fast_stop else 0
        if left:  # (what the close resets: a socket not ours keeps its queue)
            self.host.note_killed(f"the stop's deadline: {left} queued client(s) not served",
                                  cut=left)
        return False

    def _take(self, listener: Listener) -> bool:
        """Accept one client and serve it (or refuse it); False if none was waiting."""
        try:
            sock, addr = listener.sock.accept()
        except BlockingIOError:
            return False
        except OSError as exc:
            self.host.accept_failed(exc)
            return False
        header = None
        if self.config.proxy_protocol:  # first: admission must see the real client
            deadline = self.kernel.monotonic() + self.config.handshake_timeout
            try:
                header = Proxied(*proxy_addresses(sock, addr, self.config, deadline))
            except (ClientError, OSError) as exc:
                self.gate.refuse(sock, "proxy", f"{format_address(addr, sock.family)}: "
                                                    f"{exc}")
                return True
            addr = header.addr
        admitted, key = self.gate.admit(sock, addr)
        if admitted:
            try:
                self._serve(sock, addr, header, key)
            finally:
                self.gate.release(key)
        return True

    def _serve(self, sock: socket.socket, addr: object, header: Proxied | None,
               key: ClientKey | None) -> None:
        config, kernel = self.config, self.kernel
        started = kernel.monotonic()
        peer = format_address(addr, sock.family if header is None else header.family)
        try:
            conn = open_connection(sock, addr, config, self.serving.tls, header=header,
                                   patience=Patience(first_byte=config.first_byte_timeout or None))
        except (ClientError, OSError) as exc:  # reset, or a failed TLS handshake
            log.info("%s: closed before the handler: %s", peer, exc)
            if isinstance(exc, HandshakeTimeout):
                self.gate.penalise(key, Cause.HANDSHAKE)
            return
        self._served += 1
        try:
            status = self._run_handler(conn)
        except StopDeadline:  # raised after the handler returned, before the timer was off
            status = self._killed(conn)
        self._errors += status == str(int(ChildExit.HANDLER_ERROR))
        cause = PENALISED_EXITS.get(int(status)) if status.isdigit() else None
        if cause is not None:
            self.gate.penalise(key, cause)
        if self.serving.access_log is not None:
            self.serving.access_log.write(AccessRecord(
                peer=conn.peer, pid=self.host.pid,
                duration_s=round(kernel.monotonic() - started, 6),
                bytes_in=conn.bytes_in, bytes_out=conn.bytes_out, status=status,
            ))

    def _run_handler(self, conn: Connection) -> str:
        self._serving = conn
        try:
            if self._stop_asked:  # the stop came before the connection was published
                self.interrupt(self._fast_stop)
            return str(int(serve_one(self.serving.app, conn)))
        except StopDeadline:
            return self._killed(conn)
        finally:
            self._serving = None
            signal.setitimer(signal.ITIMER_REAL, 0)

    def _killed(self, conn: Connection) -> str:
        signal.setitimer(signal.ITIMER_REAL, 0)
        self._serving = None
        if not self._fast_stop:  # a fast stop kills by design; only a graceful one fails
            self.host.note_killed(f"the connection from {conn.peer} outlived the stop deadline",
                                  cut=1)
        with contextlib.suppress(OSError):
            conn.sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            conn.close()
        return "killed"

    def reconfigure(self, serving: Serving) -> str:
        self.serving = serving  # each connection takes the config and app when it starts
        return "the next connection uses it"

    def on_exit(self, exited: Exited) -> bool:
        return False  # this model forks nothing

    def interrupt(self, fast: bool) -> None:
        """From the signal handler (or for a connection a stop serves): tell the connection
        in service to finish; arm the stop's deadline.

        Two system calls (a ``setsockopt`` or ``shutdown``, and ``setitimer``), no locks.
        """
        conn = self._serving
        self._fast_stop = self._fast_stop or fast
        self._stop_asked = True
        now = self.kernel.monotonic()
        due = now + (FAST_STOP_SECONDS if fast else self.config.graceful_timeout)
        if self._stop_due is not None:
            due = min(due, self._stop_due)
        self._stop_due = due
        if conn is None:
            return
        if fast:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)
        else:
            conn.interrupt()
        signal.setitimer(signal.ITIMER_REAL, max(due - now, 0.001))

    def pids(self) -> Collection[int]:
        return ()

    def status(self) -> ModelStatus:
        # (the master is busy serving whenever it could answer this, so busy is 0 here)
        return ModelStatus(capacity=1, busy=0, idle=None, connections_total=self._served,
                           handler_errors=self._errors)

    def close(self) -> None:
        restore(self._previous)
