"""The single model: the master serves one connection at a time (the tutorial's previous article).

It exists to show what the fork model fixes: while one client holds the connection, every other
client waits in the kernel backlog. It has the same apps, limits and lifecycle as the others.

A stop while a connection is being served: the supervisor's signal handler calls
``interrupt``, which makes the handler's next read see end-of-stream and arms a timer of
``graceful_timeout``; if the handler is still running when it fires, SIGALRM raises
``StopDeadline`` out of the handler (the only way to end Python code running in this same
process), the connection is closed and the master exits 1, as the fork model does when it has
to kill a child.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
from collections.abc import Collection
from typing import TYPE_CHECKING

from ..child import serve_one
from ..connection import Connection, format_address
from ..kernel import Exited
from ..listeners import Listener
from ..logs import AccessRecord

if TYPE_CHECKING:
    from ..supervisor import Supervisor

log = logging.getLogger("forkserve")

#: On a fast stop, how long a handler may take to notice that its socket is shut.
FAST_STOP_SECONDS = 1.0


class StopDeadline(BaseException):
    """A handler outlived the stop deadline (raised by SIGALRM, single model only)."""


class SingleModel:
    name = "single"

    #: Never full: while it serves, it does not look at the listeners at all.
    full = False

    def __init__(self, supervisor: Supervisor) -> None:
        self.sup = supervisor
        self._serving: Connection | None = None
        self._fast_stop = False

    def start(self) -> None:
        signal.signal(signal.SIGALRM, self._deadline)

    def _deadline(self, signum: int, frame: object) -> None:
        if self._serving is not None:
            raise StopDeadline

    def on_readable(self, listener: Listener) -> None:
        try:
            sock, addr = listener.sock.accept()
        except BlockingIOError:
            return
        except OSError as exc:
            self.sup.accept_failed(exc)
            return
        self._serve(sock, addr)

    def _serve(self, sock: socket.socket, addr: object) -> None:
        config, kernel = self.sup.config, self.sup.kernel
        started = kernel.monotonic()
        peer = format_address(addr, sock.family)
        try:
            conn = Connection(sock, max_line=config.max_line, idle_timeout=config.idle_timeout,
                              peer=peer)
        except OSError as exc:  # the client reset before we looked at it
            log.debug("%s: closed before it was served: %s", peer, exc)
            sock.close()
            return
        status = "0"
        self._serving = conn
        try:
            status = str(int(serve_one(self.sup.app, conn)))
        except StopDeadline:
            status = "killed"
            if not self._fast_stop:  # a fast stop kills by design; only a graceful one fails
                self.sup.note_killed(f"the connection from {peer} outlived the stop deadline")
            with contextlib.suppress(OSError):
                conn.close()
        finally:
            self._serving = None
            signal.setitimer(signal.ITIMER_REAL, 0)
        self.sup.write_access(AccessRecord(
            peer=peer, pid=self.sup.pid, duration_s=round(kernel.monotonic() - started, 6),
            bytes_in=conn.bytes_in, bytes_out=conn.bytes_out, status=status,
        ))

    def on_exit(self, exited: Exited) -> bool:
        return False  # this model forks nothing

    def interrupt(self, fast: bool) -> None:
        """Called from the signal handler: stop the connection in service, arm its deadline."""
        conn = self._serving
        if conn is None:
            return
        self._fast_stop = self._fast_stop or fast
        if fast:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)
        else:
            conn.interrupt()
        limit = FAST_STOP_SECONDS if fast else self.sup.config.graceful_timeout
        signal.setitimer(signal.ITIMER_REAL, max(limit, 0.001))

    def pids(self) -> Collection[int]:
        return ()

    def close(self) -> None:
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
