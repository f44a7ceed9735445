"""A blocking handler in a hybrid worker: a plain function, a class or an unchanged
``socketserver`` handler, run in the worker's thread pool (``threads``) the way gunicorn's
gthread worker runs WSGI apps.

The client's first byte is awaited on the loop (a silent client holds no thread; its place
among the unproven, ``aio_admission``, gives way to a newcomer; the stress mode's shorter
deadline reaches it), then a pool thread serves the whole connection with a ``Connection``,
its limits those of the other models (its TLS handshake happens in that thread). A stop, a
newcomer's displacement and the stress mode's word reach a thread through the connection's
own wakeup pipe (``_ThreadStop``): signals are delivered to the main thread only.

The client proves itself as in the other models, with its first whole line (or, for raw
reads, its first bytes), read in its thread: until then it keeps its place among the
unproven, and a newcomer at FULL may displace it, waiting for a thread or in one (``_Seat``).

The threads are the capacity: a connection holds its thread until it ends, so ``threads``
clients that send a line and then wait would hold a worker for ``idle_timeout``. When the
last thread is taken the worker says BUSY; the master compares the connections in the pools
with ``workers x threads`` and enters the stress mode, which shortens the idle deadline of
the connections in the threads too (``models.hybrid``).
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
from .patience import Patience
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


class _Seat:
    """A connection given to the pool, from the loop's side: how a newcomer displaces it while
    it is unproven, waiting for a thread or in one."""

    __slots__ = ("conn", "gave_way", "stop")

    def __init__(self) -> None:
        self.gave_way = False
        self.conn: Connection | None = None
        self.stop: _ThreadStop | None = None

    def give_way(self) -> None:
        """On the loop: end the input (a thread not started yet closes at once)."""
        self.gave_way = True
        conn, stop = self.conn, self.stop
        if conn is not None and stop is not None and not conn.proven:
            conn.interrupt(0.0)
            stop.wake()


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
        #: Connections given to the pool: in a thread, or waiting for one.
        self.in_use = 0

    async def serve(self, sock: socket.socket, addr: object, header: Proxied | None,
                    started: float, *, place: int, release: Callable[[], None]) -> None:
        """The first byte awaited on the loop, then a thread (where the client proves
        itself, and gives its place back: ``release``)."""
        worker = self.worker
        if not await self._first_byte(sock, started, place):
            sock.close()
            limit = self.config.first_byte_timeout
            if limit and not worker.stopping and time.monotonic() - started >= limit:
                # (not a client that gave way to a newcomer: it was not late)
                worker.report.ended_badly(addr, Cause.FIRST_BYTE)
            return
        loop = asyncio.get_running_loop()
        seat = _Seat()
        worker.admission.hold(place, seat.give_way)

        def proven() -> None:  # (in the thread: the place is the loop's)
            loop.call_soon_threadsafe(release)

        self._taken(1)
        try:
            status, peer, bytes_in, bytes_out = await loop.run_in_executor(
                self.pool, self._in_thread, sock, addr, header, seat, proven)
        finally:
            self._taken(-1)
        worker.count(peer, addr, started, bytes_in=bytes_in, bytes_out=bytes_out,
                     status=status)

    def _taken(self, change: int) -> None:
        """``change`` connections more in the pool; tell the master when the last thread is
        taken (its stress judgement, see the module doc)."""
        self.in_use += change
        if change > 0 and self.in_use == self.config.threads:
            self.worker.publish()  # (before BUSY: the master reads the slot when told)
            self.worker.report.busy()
        else:
            self.worker.publish_soon()

    def look_again(self) -> None:
        """The stress mode began or ended: every wait in a thread looks at its deadline."""
        for stop in list(self.threaded.values()):
            stop.wake()

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

    def _in_thread(self, sock: socket.socket, addr: object, header: Proxied | None,
                   seat: _Seat, proven: Callable[[], None],
                   ) -> tuple[ChildExit, str, int, int]:
        """In a pool thread: the blocking handler's whole connection (``Connection``);
        ``proven`` gives its place back, at its proof."""
        worker = self.worker
        stop = seat.stop = _ThreadStop(worker.ctx.master_pid)
        try:
            if seat.gave_way:  # (displaced while it waited for this thread)
                sock.close()
                log.info("%s: closed: gave way to a newcomer", format_address(addr, sock.family))
                return ChildExit.OK, format_address(addr, sock.family), 0, 0
            sock.setblocking(True)
            stress = worker.stress
            patience = Patience(stress_idle=self.config.stress_idle_timeout or None,
                                stressed=stress.stressed if stress else _never,
                                on_proven=proven)
            try:
                conn = open_connection(sock, addr, self.config, worker.ctx.tls, header=header,
                                       stop=stop, patience=patience)
            except (ClientError, OSError) as exc:
                log.info("%s: closed before the handler: %s",
                         format_address(addr, sock.family), exc)
                return ChildExit.OK, format_address(addr, sock.family), 0, 0
            seat.conn = conn
            if seat.gave_way:  # (displaced during its handshake)
                conn.interrupt(0.0)
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


def _never() -> bool:
    return False


def _settle(future: asyncio.Future[bool], value: bool) -> None:
    if not future.done():
        future.set_result(value)
