"""A blocking handler in a hybrid worker: a plain function, a class or an unchanged
``socketserver`` handler, run in the worker's thread pool (``threads``) the way gunicorn's
gthread worker runs WSGI apps.

The client's first byte is awaited on the loop (a silent client holds no thread; its place
among the unproven, ``aio_admission``, gives way to a newcomer; the stress mode's shorter
deadline reaches it), then a pool thread serves the whole connection with a ``Connection``,
its limits those of the other models (its TLS handshake happens in that thread). A stop
reaches a thread through the connection's own wakeup pipe (``_ThreadStop``): signals are
delivered to the main thread only.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from ..errors import ChildExit, ClientError
from ..protocol.address import format_address
from ..protocol.defence import Cause
from .child import serve_one
from .connection import Connection
from .preamble import Proxied, open_connection
from .stopsignal import StopSignal

if TYPE_CHECKING:
    from .aio_worker import AioWorker

log = logging.getLogger("forkserve")


class _ThreadStop(StopSignal):
    """The stop of one connection served in a thread: the wakeup pipe that its waits poll,
    written by the loop (signals reach the main thread only)."""

    def wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._write_fd, b"\0")


class ThreadedHandlers:
    """The thread pool of one hybrid worker, and the connections it serves. Made and driven
    from the worker's loop (``serve``, ``interrupt``)."""

    def __init__(self, worker: AioWorker) -> None:
        if worker.config.threads == 0:
            raise RuntimeError("a blocking handler with threads 0")  # (checked at start)
        self.worker = worker
        self.config = worker.config
        self.pool = ThreadPoolExecutor(self.config.threads,
                                       thread_name_prefix="forkserve-handler")
        #: Connections served in threads, and the stop pipe of each.
        self.threaded: dict[Connection, _ThreadStop] = {}

    async def serve(self, sock: socket.socket, addr: object, header: Proxied | None,
                    started: float, *, place: int, release: Callable[[], None]) -> None:
        """The first byte awaited on the loop (the client's proof, here), then a thread."""
        worker = self.worker
        if not await self._first_byte(sock, started, place):
            sock.close()
            limit = self.config.first_byte_timeout
            if limit and not worker.stopping and time.monotonic() - started >= limit:
                # (not a client that gave way to a newcomer: it was not late)
                worker.report.ended_badly(addr, Cause.FIRST_BYTE)
            return
        release()
        loop = asyncio.get_running_loop()
        status, peer, bytes_in, bytes_out = await loop.run_in_executor(
            self.pool, self._in_thread, sock, addr, header)
        worker.count(peer, addr, started, bytes_in=bytes_in, bytes_out=bytes_out,
                     status=status)

    def interrupt(self, grace: float) -> None:
        """A stop: every connection in a thread finishes (an incomplete request: ``grace``)."""
        for conn, stop in list(self.threaded.items()):
            stop.record()
            conn.interrupt(grace)
            stop.wake()

    def _first_byte_limit(self) -> float:
        """How long a client may take to send its first byte, now."""
        config = self.config
        stress = self.worker.stress
        stressed = stress is not None and stress.stressed()
        if config.first_byte_timeout:
            limit = config.first_byte_timeout
            shorter = config.stress_first_byte_timeout if stressed else 0.0
        else:
            limit = config.idle_timeout
            shorter = config.stress_idle_timeout if stressed else 0.0
        return min(limit, shorter) if shorter else limit

    async def _first_byte(self, sock: socket.socket, started: float, place: int) -> bool:
        """Wait until the client sends something (or closes); False after the first-byte
        (else idle) deadline, at a stop once the grace has passed, or when the client gives
        way to a newcomer (``aio_admission``)."""
        worker = self.worker
        loop = asyncio.get_running_loop()
        readable: asyncio.Future[bool] = loop.create_future()
        fd = sock.fileno()
        loop.add_reader(fd, _settle, readable, True)
        worker.admission.hold(place, functools.partial(_settle, readable, False))
        try:
            while not readable.done():
                until = started + self._first_byte_limit()
                if worker.stopping:
                    until = min(until, worker.stop_began + worker.grace())
                if until <= time.monotonic():
                    return False
                waits: set[asyncio.Future[Any]] = {readable}
                if worker.stress_word is not None:
                    waits.add(worker.stress_word)  # (settled: the limit may have changed)
                await asyncio.wait(waits, timeout=until - time.monotonic(),
                                   return_when=asyncio.FIRST_COMPLETED)
            return readable.result()
        finally:
            loop.remove_reader(fd)

    def _in_thread(self, sock: socket.socket, addr: object,
                   header: Proxied | None) -> tuple[ChildExit, str, int, int]:
        """In a pool thread: the blocking handler's whole connection (``Connection``)."""
        worker = self.worker
        stop = _ThreadStop(worker.ctx.master_pid)
        try:
            sock.setblocking(True)
            try:
                conn = open_connection(sock, addr, self.config, worker.ctx.tls, header=header,
                                       stop=stop)
            except (ClientError, OSError) as exc:
                log.info("%s: closed before the handler: %s",
                         format_address(addr, sock.family), exc)
                return ChildExit.OK, format_address(addr, sock.family), 0, 0
            self.threaded[conn] = stop
            if worker.stopping:
                stop.record()
                conn.interrupt(worker.grace())
            try:
                status = serve_one(worker.ctx.app, conn)
            finally:
                self.threaded.pop(conn, None)
            return status, conn.peer, conn.bytes_in, conn.bytes_out
        finally:
            stop.close()


def _settle(future: asyncio.Future[bool], value: bool) -> None:
    if not future.done():
        future.set_result(value)
