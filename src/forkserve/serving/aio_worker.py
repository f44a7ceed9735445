"""A hybrid worker: one event loop over many connections, pre-forked like a prefork worker.

Theory of operation
-------------------
nginx's worker, gunicorn's gthread and uvicorn's worker, under forkserve's master: the master
forks and supervises the workers exactly as for prefork (``models.hybrid`` reuses the pool:
spawn, respawn, generations, TTIN/TTOU, retirement, the pool pipe, the watchdog). What
differs is the body, here:

1. It never returns into the master's code: ``run_aio_worker`` ends in ``os._exit``.
2. One loop (``asyncio``, or ``uvloop`` with ``loop`` auto/uvloop) serves the connections;
   a thread waits for new ones in a private epoll set with ``EPOLLEXCLUSIVE`` and hands them
   to the loop (``aio_accept``, which says why a thread): one new connection wakes one
   worker, and a busy worker is offered fewer.
3. Each accepted connection is a task: the PROXY header (trusted sources only, within
   ``handshake_timeout``), the admission rules and the sources the master publishes as
   penalised, the per-source cap of unproven connections and the early drop, counted across
   the whole server on the places board (``aio_guard``, which says why that shape), the TLS
   handshake on the loop (the rest of ``handshake_timeout``), then the handler. An async
   handler runs on the loop with an ``AsyncConnection`` (its limits are the loop's timers);
   a blocking handler (a function, a class, a socketserver handler) waits on the loop for its
   client's first byte (a silent client holds no thread), then runs in the worker's thread
   pool (``threads``) with a ``Connection``, its limits those of the other models (its TLS
   handshake then happens in that thread).
4. At ``worker_connections`` open connections it stops watching the listeners: the kernel
   backlog (and the other workers) hold the rest, as ``max_children`` does for fork.
5. Stop (SIGTERM/SIGINT; a retirement; ``max_requests``/``max_worker_memory``): stop
   accepting (at a stop of the whole server, announced by the master on the scoreboard, each
   worker first takes what is queued on the listeners, so queued clients are answered, not
   reset), close the listeners, tell every connection to finish (idle ones end
   at once, a request in flight is answered, an incomplete one gets ``STOP_GRACE``), wait for
   them up to ``graceful_timeout``, then cancel what is left and exit 0. SIGQUIT exits at once.
6. The scoreboard slot says IDLE with no connection, WRITING with some, the number open as
   its peer text (``aio_slots``: with a blocking handler, those in its thread pool too), and
   the served count; a timer stamps the
   heartbeat every ``timeout / 2``, so the master's watchdog (prefork's) fires when the
   *loop* is blocked for ``timeout``: a handler that never awaits gets its worker's stacks
   dumped (SIGABRT, ``faulthandler``) and the worker replaced.

Worst case per connection: one task, one ``AsyncConnection`` and its buffer (at most
``max_line`` + ``READ_AHEAD`` bytes before reading pauses), one timer while it waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import functools
import logging
import os
import random
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

from .. import hooks
from ..errors import ChildExit, ClientError, LineTooLong, WorkerExit
from ..hooks import Process
from ..ops.logs import AccessRecord
from ..ops.scoreboard import SlotState
from ..protocol.address import format_address
from ..protocol.defence import Cause
from .accept import ACCEPT_PAUSE_SECONDS, skip
from .aio_accept import ListenerWaiter
from .aio_admission import LoopAdmission, Places
from .aio_connection import STOP_GRACE, AsyncConnection
from .aio_loop import async_form, new_loop
from .aio_slots import slot_text
from .aio_threads import ThreadedHandlers
from .child import (
    CHILD_GRACE_MARGIN,
    PENALISED_EXITS,
    client_ended,
    set_parent_death_signal,
    set_title,
)
from .handlers import AsyncApp
from .limits import apply_limits
from .patience import Patience
from .poolreport import PoolReport
from .preamble import Proxied
from .signals import HYBRID, Step, install_on_loop
from .sockets import family_of
from .worker import BootAborted, WorkerContext, quit_now, resident_mb, worker_body

if TYPE_CHECKING:
    pass

log = logging.getLogger("forkserve")

#: Connections accepted per wake-up of the loop, at most (the rest wait for the next turn, so
#: one burst cannot starve the connections already open). One worker wakes for a connection
#: (``aio_accept``); while it takes its batch, the kernel offers the next ones to the others,
#: so the smaller the batch, the more evenly they share a burst: at 10,000 clients on 2
#: workers (when both woke for every connection), p99 was 2.2-2.3 s with 64 and 0.3-0.65 s
#: with 8 (docs/benchmarks.md, issue 17).
ACCEPT_BATCH = 8
#: A connection past ``max_connection_time`` whose handler neither reads nor writes is
#: cancelled this long after (the fork model's timer gives a process as long).
EXPIRY_GRACE = 5.0


class AioWorker:
    """One hybrid worker's loop and connections. Runs in the worker process only."""

    def __init__(self, ctx: WorkerContext, slot: int, generation: int,
                 places: Places | None = None) -> None:
        self.ctx = ctx
        self.config = config = ctx.config
        self.slot = slot
        self.generation = generation
        self.pid = os.getpid()
        jitter = random.randint(0, config.max_requests_jitter) if config.max_requests else 0
        self.max_requests = config.max_requests + jitter if config.max_requests else 0
        self.app = async_form(ctx.app)
        self.served = self.errors = self.bytes_in = self.bytes_out = 0
        self.conns: set[AsyncConnection] = set()
        #: The TLS handshakes under way (``_open_transport``).
        self.handshakes: set[asyncio.Task[Any]] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.stopping = False
        self.stop_began = 0.0
        self.orphaned = False
        self.accepting = False
        self.admission = LoopAdmission(ctx, slot, places)
        #: The stress mode's deadlines (None: no stress setting), the master's word read from
        #: the scoreboard; ``LOOK_AGAIN`` settles ``stress_word`` (waits look again).
        self.stress: Patience | None = None
        if config.stress_idle_timeout or config.stress_first_byte_timeout:
            board = ctx.scoreboard
            self.stress = Patience(stress_idle=config.stress_idle_timeout or None,
                                   stress_first_byte=config.stress_first_byte_timeout or None,
                                   stressed=lambda: board.stressed)
        self.stress_word: asyncio.Future[None] | None = None
        self._publish_due = False
        #: The thread pool of a blocking handler (None: an async one).
        self.threads: ThreadedHandlers | None = None
        self.report = PoolReport(ctx.ready_fd, slot, self.pid)
        self._done: asyncio.Future[None] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._waiter: ListenerWaiter | None = None
        self._by_fd = {lst.sock.fileno(): lst.sock for lst in ctx.listeners}

    def _look_again(self) -> None:
        """``LOOK_AGAIN``: the stress mode began or ended; every wait for a client looks at
        its deadline again."""
        for conn in self.conns:
            conn.look_again()
        if self.threads is not None:
            self.threads.look_again()
        assert self.loop is not None
        word, self.stress_word = self.stress_word, self.loop.create_future()
        if word is not None and not word.done():
            word.set_result(None)

    # ------------------------------------------------------------------ boot

    def boot(self) -> asyncio.AbstractEventLoop:
        """Hygiene, the loop, its signals; then tell the master this worker is ready."""
        ctx = self.ctx
        ctx.close_master_fds()
        apply_limits(self.config)
        signal.set_wakeup_fd(-1)
        for sig in ctx.master_signals:
            signal.signal(sig, signal.SIG_DFL)
        loop = self.loop = new_loop(self.config.loop)
        asyncio.set_event_loop(loop)
        if self.app is None:
            self.threads = ThreadedHandlers(self)
        self.stress_word = loop.create_future()
        # the hybrid worker's table (``signals.HYBRID``): most steps on the loop
        install_on_loop(HYBRID, loop, {
            Step.FINISH: functools.partial(self.begin_stop, "signal"),
            Step.REOPEN: self._reopen, Step.LOOK_AGAIN: self._look_again,
            Step.GIVE_WAY: self.admission.given_way,
        }, {Step.QUIT: quit_now})
        faulthandler.enable(file=sys.stderr)  # the watchdog's SIGABRT prints every stack
        signal.pthread_sigmask(signal.SIG_SETMASK, ())
        set_parent_death_signal(signal.SIGTERM)
        if os.getppid() != ctx.master_pid:
            self.begin_stop("signal")
        set_title(f"forkserve: hybrid worker {self.slot} (gen {self.generation})")
        if not hooks.call(self.config, "post_fork",
                          Process(self.pid, "worker", self.slot, self.generation)):
            raise BootAborted
        self.publish()
        try:
            self.report.ready()
        except BrokenPipeError:
            raise BootAborted from None
        return loop

    # ------------------------------------------------------------------ loop

    async def main(self) -> WorkerExit:
        loop = asyncio.get_running_loop()
        self._done = loop.create_future()
        if not self.stopping:
            self._waiter = ListenerWaiter(list(self._by_fd), loop, self._listeners_ready)
            self._watch_listeners(True)
        self._beat(first=True)
        await self._done
        await self._finish_connections()
        return WorkerExit.OK

    def _beat(self, *, first: bool = False) -> None:
        """Stamp the heartbeat (the watchdog's proof that the loop turns), and look at the
        memory bound (not at the first beat, before any accept: a bound below what a new
        worker holds would then end every worker unserved); again in ``timeout / 2``."""
        self.ctx.scoreboard.beat(self.slot)
        self.report.tell_pauses(time.monotonic())
        limit = self.config.max_worker_memory
        if limit and not first and not self.stopping and (rss := resident_mb()) > limit:
            log.info("worker %d: resident memory %.0f MB is over max_worker_memory %d MB, "
                     "recycling", self.pid, rss, limit)
            self.begin_stop("recycle")
        assert self.loop is not None
        self.loop.call_later(self.config.timeout / 2, self._beat)

    def _watch_listeners(self, on: bool) -> None:
        if on == self.accepting or self._waiter is None:
            return
        self.accepting = on
        self._waiter.watch(on)

    def _listeners_ready(self, fds: list[int]) -> None:
        """The waiter thread's hand-off: accept a batch, then let it wait again (unless
        this worker stopped accepting meanwhile: then ``_watch_listeners`` re-arms it)."""
        if not self.accepting:
            return
        for fd in fds:
            self._accept(self._by_fd[fd])
        if self.accepting and self._waiter is not None:
            self._waiter.rearm()

    def _room(self) -> int:
        return self.config.worker_connections - len(self.tasks)

    def _accept(self, lsock: socket.socket, batch: int = ACCEPT_BATCH) -> int:
        """Take up to ``batch`` queued connections (and no more than there is room for);
        returns how many were taken."""
        taken = 0
        while taken < batch and self._room() > 0:
            try:
                # (``accept`` builds the socket through the family and type properties,
                # enum code: a sixth of the accept's cost here; the listener's family is known)
                fd, addr = lsock._accept()  # type: ignore[attr-defined]
                sock = socket.socket(family_of(lsock), socket.SOCK_STREAM, 0, fd)
            except BlockingIOError:
                break  # another worker took it, or the queue is empty
            except OSError as exc:
                if skip(exc):
                    continue
                self._pause_accepting(exc.errno or 0)
                break
            taken += 1
            self._start(sock, addr)
        if self._room() <= 0 and self.accepting:
            self._watch_listeners(False)  # the backlog holds the rest (rule 4)
            # the master judges its stress mode now (all workers at their cap: stress), from
            # the slot: written first
            self.publish()
            self.report.busy()
        return taken

    def _pause_accepting(self, code: int) -> None:
        """EMFILE and kin: load, not a bug; never spin (``accept``)."""
        assert self.loop is not None
        self.report.pause(code, time.monotonic())
        self._watch_listeners(False)
        self.loop.call_later(ACCEPT_PAUSE_SECONDS, self._resume_accepting)

    def _resume_accepting(self) -> None:
        if not self.stopping and self._room() > 0:
            self._watch_listeners(True)

    def _start(self, sock: socket.socket, addr: object) -> None:
        assert self.loop is not None
        sock.setblocking(False)
        task = self.loop.create_task(self._connection(sock, addr))
        self.tasks.add(task)
        task.add_done_callback(self._ended)
        self.publish_soon()

    def _ended(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("worker %d: a connection task failed: %r", self.pid, exc)
        self.publish_soon()
        if self.stopping:
            if not self.tasks and self._done is not None and not self._done.done():
                self._done.set_result(None)
            return
        if self.max_requests and self.served >= self.max_requests:
            log.info("worker %d: served %d connections, recycling", self.pid, self.served)
            self.begin_stop("recycle")
        elif not self.accepting and self._room() > 0:
            self._watch_listeners(True)

    # ------------------------------------------------------------------ one connection

    async def _connection(self, sock: socket.socket, addr: object) -> None:
        """PROXY, admission, TLS, handler, close: the whole life of one connection."""
        started = time.monotonic()
        config = self.config
        deadline = started + config.handshake_timeout
        header = None
        try:
            if config.proxy_protocol:
                header = await self.admission.header(sock, addr, deadline)
                addr = header.addr
            admitted, key, place = self.admission.admit(sock, addr)
        except (ClientError, OSError) as exc:
            log.info("%s: closed before the handler: %s",
                     format_address(addr, sock.family), exc)
            if isinstance(exc, TimeoutError):
                self.report.ended_badly(addr, Cause.HANDSHAKE)
            sock.close()
            return
        if not admitted:
            return
        release = self.admission.releaser(place)
        try:
            if self.app is not None:
                await self._serve_async(self.app, sock, addr, header=header, started=started,
                                        deadline=deadline, place=place, release=release)
            else:
                assert self.threads is not None
                await self.threads.serve(sock, addr, header, started, place=place,
                                         release=release)
        finally:
            release()  # (a client that never proved itself)
            self.admission.leave(key)

    async def _serve_async(self, app: AsyncApp, sock: socket.socket, addr: object, *,
                           header: Proxied | None, started: float, deadline: float,
                           place: int, release: Callable[[], None]) -> None:
        config = self.config
        family = family_of(sock) if header is None else header.family
        # (the socket's own address: looked up only if the handler asks, ``conn.local``)
        local = None if header is None or header.local is None else \
            format_address(header.local, family)
        conn = AsyncConnection(
            max_line=config.max_line, idle_timeout=config.idle_timeout,
            write_timeout=config.write_timeout,
            first_byte_timeout=config.first_byte_timeout or None,
            max_time=config.max_connection_time or None, linger_timeout=config.linger_timeout,
            settings=config, peer=format_address(addr, family), local=local,
            on_proven=release, stress=self.stress)
        if not await self._open_transport(conn, sock, addr, deadline, place):
            return
        self.admission.hold(place, functools.partial(conn.interrupt, 0.0))
        self.conns.add(conn)
        if self.stopping:
            conn.interrupt(self.grace())
        expiry = self._arm_expiry(started)
        try:
            status = await self._run_async(app, conn)
        finally:
            if expiry is not None:
                expiry.cancel()
            self.conns.discard(conn)
            await conn.close()
        self.count(conn.peer, addr, started, bytes_in=conn.bytes_in,
                    bytes_out=conn.bytes_out, status=status)

    async def _open_transport(self, conn: AsyncConnection, sock: socket.socket, addr: object,
                              deadline: float, place: int) -> bool:
        """The transport (and the TLS handshake, on the loop, by ``deadline``); False if the
        client failed it, gave way to a newcomer during it, or the stop's grace ended it
        (the socket is closed)."""
        loop = asyncio.get_running_loop()
        tls = self.ctx.tls
        if tls is None:
            await loop.connect_accepted_socket(lambda: conn, sock)
            return True
        left = max(deadline - time.monotonic(), 0.001)
        handshake = loop.create_task(loop.connect_accepted_socket(
            lambda: conn, sock, ssl=tls, ssl_handshake_timeout=left))
        # a client in its handshake is unproven: a newcomer may displace it, a stop gives it
        # the grace of an incomplete request (``begin_stop``)
        self.admission.hold(place, functools.partial(_cancel, handshake))
        self.handshakes.add(handshake)
        if self.stopping:
            loop.call_later(self.grace(), handshake.cancel)
        try:
            await handshake
            return True
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # (this connection's task itself: the end of the stop's wait)
            log.info("%s: closed during its TLS handshake: %s", conn.peer,
                     "the server stops" if self.stopping else "gave way to a newcomer")
            if sock.fileno() != -1:
                sock.close()
            return False
        except (TimeoutError, OSError) as exc:
            timed_out = isinstance(exc, TimeoutError) or "timed out" in str(exc)
            log.info("%s: closed before the handler: %s", conn.peer,
                     f"no TLS handshake within {self.config.handshake_timeout:g} s"
                     if timed_out else f"TLS handshake failed: {exc}")
            if timed_out:
                self.report.ended_badly(addr, Cause.HANDSHAKE)
            if sock.fileno() != -1:
                sock.close()
            return False
        finally:
            self.handshakes.discard(handshake)

    def _arm_expiry(self, started: float) -> asyncio.TimerHandle | None:
        """``max_connection_time``: a handler still running ``EXPIRY_GRACE`` after it (one
        that neither reads nor writes) is cancelled."""
        limit = self.config.max_connection_time
        task = asyncio.current_task()
        if not limit or task is None:
            return None
        loop = asyncio.get_running_loop()
        return loop.call_at(loop.time() + started + limit + EXPIRY_GRACE - time.monotonic(),
                            task.cancel)

    async def _run_async(self, app: AsyncApp, conn: AsyncConnection) -> ChildExit:
        """Await the handler; say how it ended (``child.serve_one``'s statuses)."""
        try:
            await app.run(conn)
            return ChildExit.OK
        except LineTooLong:
            with contextlib.suppress(ClientError, OSError):
                await conn.write(b"ERR line too long\n")
            log.info("%s: closed: line longer than max_line", conn.peer)
            return ChildExit.LINE_TOO_LONG
        except ClientError as exc:
            return client_ended(conn.peer, exc)
        except asyncio.CancelledError:
            if self.stopping:
                raise  # the end of the stop's wait: nothing more to account for
            log.info("%s: ended: max_connection_time passed and the handler did not read "
                     "or write", conn.peer)
            return ChildExit.OK
        except Exception:
            log.exception("handler failed on the connection from %s", conn.peer)
            return ChildExit.HANDLER_ERROR

    def count(self, peer: str, addr: object, started: float, *, bytes_in: int,
               bytes_out: int, status: ChildExit) -> None:
        self.served += 1
        self.errors += status == ChildExit.HANDLER_ERROR
        self.bytes_in += bytes_in
        self.bytes_out += bytes_out
        if (cause := PENALISED_EXITS.get(status)) is not None:
            self.report.ended_badly(addr, cause)
        if self.ctx.access_log is not None:
            self.ctx.access_log.write(AccessRecord(
                peer=peer, pid=self.pid, duration_s=round(time.monotonic() - started, 6),
                bytes_in=bytes_in, bytes_out=bytes_out, status=str(int(status))))

    # ------------------------------------------------------------------ stopping

    def begin_stop(self, why: str) -> None:
        """Stop accepting and finish (rule 5). From the loop (a signal, a recycle)."""
        if why == "signal":
            self.orphaned = self.orphaned or os.getppid() != self.ctx.master_pid
        if self.stopping:
            return
        self.stopping = True
        self.stop_began = time.monotonic()
        draining = why == "signal" and self.ctx.scoreboard.draining and not self.orphaned
        # out of the waiter's set before the close (other processes hold the listeners); the
        # drain then the close with nothing between them: the master refused new clients
        # already, but a handshake may still complete until this worker's copy is closed
        self._watch_listeners(False)
        for listener in self.ctx.listeners:
            if draining:
                with contextlib.suppress(OSError):
                    self._accept(listener.sock, self.config.backlog)
            listener.sock.close()
        if self._waiter is not None:
            self._waiter.close()
        grace = self.grace()
        for conn in list(self.conns):
            conn.interrupt(grace)
        if self.loop is not None:
            for handshake in self.handshakes:
                self.loop.call_later(grace, handshake.cancel)
        if self.threads is not None:
            self.threads.interrupt(grace)
        self.ctx.scoreboard.mark(self.slot, SlotState.FINISHING)
        # with connections open, the wait ends when the last one does (``_ended``)
        if self._done is not None and not self._done.done() and not self.tasks:
            self._done.set_result(None)

    def grace(self) -> float:
        return 0.0 if self.orphaned else STOP_GRACE

    async def _finish_connections(self) -> None:
        """Wait for the connections in flight, up to ``graceful_timeout``; cancel the rest."""
        if not self.tasks:
            return
        left = self.stop_began + self.config.graceful_timeout + CHILD_GRACE_MARGIN \
            - time.monotonic()
        _, pending = await asyncio.wait(set(self.tasks), timeout=max(left, 0.0))
        for task in pending:
            task.cancel()

    def _reopen(self) -> None:
        if self.ctx.access_log is not None:
            self.ctx.access_log.reopen()

    # ------------------------------------------------------------------ the scoreboard, the pipe

    def publish_soon(self) -> None:
        """``publish`` at the end of this turn of the loop: once for a whole accept batch,
        or for the connections that ended in one turn."""
        if not self._publish_due and self.loop is not None:
            self._publish_due = True
            self.loop.call_soon(self.publish)

    def publish(self) -> None:
        self._publish_due = False
        open_now = len(self.tasks)
        state = SlotState.FINISHING if self.stopping else (
            SlotState.WRITING if open_now else SlotState.IDLE)
        self.ctx.scoreboard.write(self.slot, pid=self.pid, generation=self.generation,
                                  state=state, connections=self.served,
                                  bytes_in=self.bytes_in, bytes_out=self.bytes_out,
                                  conn_start=0.0, heartbeat=time.monotonic(),
                                  peer=slot_text(open_now, None if self.threads is None
                                                 else self.threads.in_use),
                                  errors=self.errors)


def _cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()


def run_aio_worker(ctx: WorkerContext, slot: int, generation: int,
                   places: Places | None = None) -> NoReturn:
    """Body of a freshly forked hybrid worker (``places``: the places board, see
    ``aio_guard``). Never returns."""
    def start() -> Callable[[], int]:
        worker = AioWorker(ctx, slot, generation, places)
        loop = worker.boot()
        return functools.partial(loop.run_until_complete, worker.main())

    worker_body(start)
