"""A pre-forked worker: accepts on the shared listeners and serves one connection at a time.

Theory of operation
-------------------
1. It never returns into the master's code: ``run_worker`` ends in ``os._exit`` on every path.
2. It keeps the listeners and closes the master's private fds (selector, wakeup and ready
   pipes' read ends).
3. It has one loop, like the master: an epoll set with the listeners, registered with
   ``EPOLLEXCLUSIVE`` so that a new connection wakes one idle worker, not all of them (the
   thundering herd), and the worker's own signal wakeup fd (``stopsignal.StopSignal``, which
   every wait on a client polls too: a stop is never missed). The listeners are
   non-blocking: a worker woken for a connection another worker took gets EAGAIN and waits
   again.
4. Signal handlers (its table: ``signals.WORKER``) only record (SIGTERM/SIGINT: finish;
   SIGQUIT: exit now), except that a stop
   while a connection is in service tells it to finish (``Connection.interrupt``, one
   ``setsockopt``) and arms a timer, so a worker whose master died cannot hang on. A worker
   retired from a pool that goes on (reload, TTOU, a shrinking pool) first serves the
   connections its last wake-up was for, then closes its listeners: ``EPOLLEXCLUSIVE`` woke
   no other worker for them, so a worker that dropped them would leave those clients queued
   with nobody woken, until another client came (a sequential client waits for ever). At a
   stop of the whole server (the master has refused new clients, announced a drain on the
   scoreboard and closed its own copies) every worker serves what is queued on the listeners
   before it closes them, an idle one at once, a busy one once its connection ends, so that
   queued clients are answered, not reset by the last close; a busy worker that finds nothing
   queued lets go at once (nothing new can queue: the port closes with the server). An
   orphan (its master died: PR_SET_PDEATHSIG) lets go of the listeners at once, so the port
   is free for a new server, and waits for no incomplete request. The master sends SIGTERM
   once more to a worker still there (``child.STOP_REMINDER``), for handlers that read the
   socket themselves.
5. When it is ready to accept it says so through the pool pipe (``poolpipe``), and keeps the
   pipe to tell the master what it must not log alone: its accept errors (the master counts
   them and logs them at the rate of the whole server), and that it took a connection while
   the master rests.
6. Heartbeat: every turn of its loop (a connection served, a wake-up for a connection another
   worker took, an accept error's pause) and every ``timeout / 2`` while idle, the worker
   stamps its slot, so the master's watchdog only ever fires on a worker that is stuck.
7. It exits 0 after ``max_requests`` connections (plus its jitter) and the master replaces it.

Exit statuses: 0 (stopped or recycled), ``WorkerExit.BOOT_ERROR`` (failed before ready).
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import math
import os
import random
import select
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, NoReturn

from .. import hooks
from ..apps import App
from ..config import Config
from ..errors import ChildExit, ClientError, WorkerExit
from ..hooks import Process
from ..ops.logs import AccessLog, AccessRecord, RateLimiter
from ..ops.scoreboard import Scoreboard, SlotState
from ..protocol.address import format_address
from ..protocol.defence import Cause, Startups
from .accept import ACCEPT_PAUSE_SECONDS, Listening, Rules, accept_queue, skip
from .child import (
    CHILD_GRACE_MARGIN,
    PENALISED_EXITS,
    arm_connection_timer,
    exit_process,
    patience_for,
    serve_one,
    set_parent_death_signal,
    set_title,
)
from .connection import Connection
from .limits import apply_limits
from .poolreport import PoolReport
from .preamble import Proxied, open_connection, proxy_addresses
from .signals import WORKER, Step, install, look_again, reset
from .sourceguard import SourceGuard
from .stopsignal import StopSignal, drain
from .tls import HandshakeTimeout

if TYPE_CHECKING:
    import ssl  # only with TLS on: the module costs a forking master 6 MB

log = logging.getLogger("forkserve")

#: At a stop of the whole server, a worker takes the clients queued on the listeners for at
#: most this long, and only until half of ``graceful_timeout`` after the stop: each may cost
#: it a STOP_GRACE (a silent one) and a linger (one that does not close), one after the
#: other; those still queued then are reset, as without a drain.
DRAIN_SECONDS = 5.0
#: A worker logs its refusals (per-source cap, early drop) at most once per reason this often.
REFUSAL_REPORT_INTERVAL = 5.0


@dataclass(frozen=True)
class WorkerContext:
    """What a worker needs from the master, fixed at fork time."""

    app: App
    config: Config
    listeners: Sequence[Listening]
    scoreboard: Scoreboard
    access_log: AccessLog | None
    master_pid: int
    #: The pool pipe's write end (non-blocking): ready, then reports (``poolpipe``).
    ready_fd: int
    #: Closes the master's private fds (not the listeners, not the ready pipe's write end).
    close_master_fds: Callable[[], None]
    master_signals: Iterable[int]
    #: The TLS context, when TLS is on.
    tls: ssl.SSLContext | None = None
    #: Admission rules (allow/deny, rules_file), applied by the worker itself.
    gate: Rules | None = None
    #: The per-source cap in force (0: none) and the early drop (``sourceguard``).
    source_limit: int = 0
    startups: Startups | None = None


class BootAborted(Exception):
    """The worker cannot become ready (the reason is already in the log)."""


class Worker:
    """The loop of one pre-forked worker. Runs in the worker process only."""

    def __init__(self, ctx: WorkerContext, slot: int, generation: int) -> None:
        self.ctx = ctx
        self.slot = slot
        self.generation = generation
        self.pid = os.getpid()
        config = ctx.config
        jitter = random.randint(0, config.max_requests_jitter) if config.max_requests else 0
        self.max_requests = config.max_requests + jitter if config.max_requests else 0
        self.served = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.errors = 0
        self.stopping = False
        self._draining = False
        self._stop_began = 0.0
        self.serving: Connection | None = None
        self.stop = StopSignal(ctx.master_pid)
        #: SIGUSR1 came: reopen the access log at the next turn of the loop.
        self._reopen = False
        self.guard = SourceGuard(ctx.scoreboard, ctx.source_limit, ctx.startups,
                                 penalties=ctx.config.penalties != "off")
        self._refusals = RateLimiter(REFUSAL_REPORT_INTERVAL)
        self._stop_poll = select.poll()  # (the accept pause: the stop pipe alone)
        self._stop_poll.register(self.stop.fd, select.POLLIN)
        self.poller = select.epoll()
        self._listeners = {lst.fileno(): lst for lst in ctx.listeners}
        self.report = PoolReport(ctx.ready_fd, slot, self.pid)

    # ------------------------------------------------------------------ boot

    def boot(self) -> None:
        """Hygiene, signals, the epoll set; then tell the master this worker is ready."""
        self.ctx.close_master_fds()
        apply_limits(self.ctx.config)
        # the epoll set first, while signals are still blocked (as fork left them): a SIGTERM
        # already pending closes the listeners the moment the mask clears, and they must be
        # registered by then, not after
        for fd in self._listeners:
            self.poller.register(fd, select.EPOLLIN | select.EPOLLEXCLUSIVE)
        self.poller.register(self.stop.fd, select.EPOLLIN)
        self._install_signals()
        faulthandler.enable(file=sys.stderr)  # the watchdog's SIGABRT prints the stack
        set_title(f"forkserve: worker {self.slot} (gen {self.generation})")
        if not hooks.call(self.ctx.config, "post_fork",
                          Process(self.pid, "worker", self.slot, self.generation)):
            raise BootAborted  # logged by the hook's caller; not ready: a boot failure
        self._state(SlotState.IDLE)
        try:
            self.report.ready()  # (a master behind: READY waits for room)
        except BrokenPipeError:
            raise BootAborted from None  # the master died while this worker booted

    def _install_signals(self) -> None:
        """The worker's signal table (``signals.WORKER``), its wakeup pipe, then the mask."""
        signal.set_wakeup_fd(-1)
        reset(self.ctx.master_signals)
        install(WORKER, {Step.FINISH: self._finish, Step.QUIT: quit_now,
                         Step.LOOK_AGAIN: look_again, Step.REOPEN: self._reopen_asked,
                         Step.GIVE_WAY: self._drop_unproven})
        self.stop.install()
        signal.pthread_sigmask(signal.SIG_SETMASK, ())
        set_parent_death_signal(signal.SIGTERM)
        if os.getppid() != self.ctx.master_pid:
            self._finish(signal.SIGTERM, None)

    def _finish(self, signum: int, frame: FrameType | None) -> None:
        """SIGTERM: record the stop; a connection in service is told to finish. A worker
        retired from a pool that goes on (reload, TTOU) keeps the listeners until its loop
        has served the connections it was woken for (``run``): the rest of the queue is the
        other workers'. At a stop of the whole server (the master has announced a drain), a
        worker keeps them until it has taken what is queued there (``_take_queued``: an idle
        one now, a busy one after its connection), so those clients are answered instead of
        reset; a busy one with nothing queued lets go at once. An orphan has no server to
        drain for: it lets go at once."""
        first = self.stop.record()
        conn = self.serving
        if conn is not None:
            conn.interrupt(self.stop.grace)
            self.ctx.scoreboard.mark(self.slot, SlotState.FINISHING)
        whole_stop = self.ctx.scoreboard.draining
        if self.stop.orphaned or (whole_stop and conn is not None and not self._queued()):
            # the port closes with the server: a busy worker holds it only for clients that
            # were queued when the stop began (the master refused new ones: none can come)
            self._close_listeners()
        if not first:
            return  # the master's reminder (child.STOP_REMINDER): the rest is done
        self.stopping = True
        self._stop_began = self.stop.began
        self._draining = whole_stop and not self.stop.orphaned
        signal.setitimer(signal.ITIMER_REAL, self.ctx.config.graceful_timeout
                         + CHILD_GRACE_MARGIN)

    def _reopen_asked(self, signum: int, frame: FrameType | None) -> None:
        self._reopen = True

    def _reopen_access_log(self) -> None:
        self._reopen = False
        if self.ctx.access_log is not None:
            self.ctx.access_log.reopen()

    def _drop_unproven(self, signum: int, frame: FrameType | None) -> None:
        """Another worker's newcomer needs room (``sourceguard``): if this worker's client
        still has not proven itself, its input ends now (no grace)."""
        conn = self.serving
        if conn is not None and not conn.proven:
            conn.interrupt(0.0)

    def _queued(self) -> bool:
        """Someone waits on an open listener (or may: a unix socket does not say)."""
        return any(listener.sock.fileno() != -1 and accept_queue(listener.sock) != 0
                   for listener in self.ctx.listeners)

    def _close_listeners(self) -> None:
        for listener in self.ctx.listeners:
            listener.sock.close()  # one close(2) each; also leaves this worker's epoll set

    # ------------------------------------------------------------------ loop

    def run(self) -> WorkerExit:
        beat = self.ctx.config.timeout / 2  # idle, it still shows the watchdog it is alive
        while not self.stopping:
            events = self.poller.poll(self.report.pauses.wait(beat, time.monotonic()))
            if self._reopen:  # (before a connection that came with it writes its line)
                self._reopen_access_log()
            if not events:
                self._state(SlotState.IDLE)
            for fd, _ in events:
                if fd == self.stop.fd:
                    drain(self.stop.fd)
                elif (listener := self._listeners[fd]).sock.fileno() != -1:
                    # even after a stop: this wake-up was this worker's alone (EPOLLEXCLUSIVE)
                    self._accept(listener)
            self.ctx.scoreboard.beat(self.slot)
            self.report.tell_pauses(time.monotonic())
            if self._should_recycle():
                break
        if self._draining:
            self._take_queued()
        self._close_listeners()
        self.report.tell_pauses(math.inf)
        return WorkerExit.OK

    def _take_queued(self) -> None:
        """A stop of the whole server: serve the clients queued on the listeners, each on the
        stop's terms (its first request answered, then the end), within the bounds of
        ``DRAIN_SECONDS``. A TCP listener says how many wait: no more than those are taken,
        so that new clients arriving meanwhile do not keep the stop going; elsewhere (unix)
        at most ``backlog``."""
        deadline = min(time.monotonic() + DRAIN_SECONDS,
                       self._stop_began + self.ctx.config.graceful_timeout / 2)
        for listener in self.ctx.listeners:
            if listener.sock.fileno() == -1:
                continue  # (closed at the stop: nothing was queued)
            queued = accept_queue(listener.sock)
            for _ in range(self.ctx.config.backlog if queued is None else queued):
                if time.monotonic() >= deadline or not self._accept(listener):
                    break

    def _should_recycle(self) -> bool:
        if self.max_requests and self.served >= self.max_requests:
            log.info("worker %d: served %d connections, recycling", self.pid, self.served)
            return True
        limit = self.ctx.config.max_worker_memory
        if limit and (rss := resident_mb()) > limit:
            log.info("worker %d: resident memory %.0f MB is over max_worker_memory %d MB, "
                     "recycling", self.pid, rss, limit)
            return True
        return False

    def _accept(self, listener: Listening) -> bool:
        """Take one connection and serve it; False if none was queued (or accept failed)."""
        try:
            sock, addr = listener.sock.accept()
        except BlockingIOError:
            return False  # another worker took it
        except OSError as exc:
            if skip(exc):
                return True  # that client is gone; the next one may be there
            # (``accept``: never spin) the master logs it, for the whole pool
            self.report.pause(exc.errno or 0, time.monotonic())
            self._stop_poll.poll(ACCEPT_PAUSE_SECONDS * 1000)  # a stop ends the pause
            return False
        header = None
        if self.ctx.config.proxy_protocol:  # first: the rules must see the real client
            header = self._read_header(sock, addr)
            if header is None:
                return True
            addr = header.addr
        gate = self.ctx.gate
        if gate is None:
            self._guarded(sock, addr, header)
            return True
        gate.tick(time.monotonic())  # the rules file, polled as the master polls it
        admitted, key = gate.admit(sock, addr)  # the rules only: see gate.build
        if admitted:
            try:
                self._guarded(sock, addr, header)
            finally:
                gate.release(key)
        return True

    def _guarded(self, sock: socket.socket, addr: object, header: Proxied | None) -> None:
        """The per-source cap and the early drop (``sourceguard``), then serve."""
        if not isinstance(addr, tuple) or not self.guard.active:  # (unix peers: no source)
            self._serve(sock, addr, header)
            return
        refused = self.guard.admit(self.slot, addr[0])
        if refused is not None:
            self._refuse(sock, refused, addr[0])
            return
        try:
            self._serve(sock, addr, header)
        finally:
            self.guard.leave(self.slot)

    def _refuse(self, sock: socket.socket, reason: str, who: str) -> None:
        with contextlib.suppress(OSError):
            sock.setblocking(False)
            message = self.ctx.config.refuse_message
            if message is not None:
                sock.send(message.encode() + b"\n")
        sock.close()
        if self._refusals.allow(reason, time.monotonic()) is not None:
            log.info("worker %d: refused %s: %s", self.pid, who, reason)

    def _read_header(self, sock: socket.socket, addr: object) -> Proxied | None:
        """The PROXY header (waiting up to handshake_timeout: the client's time)."""
        peer = format_address(addr, sock.family)
        self._state(SlotState.READING, peer=peer, conn_start=time.monotonic())
        try:
            named = proxy_addresses(sock, addr, self.ctx.config,
                                    time.monotonic() + self.ctx.config.handshake_timeout,
                                    self.stop)
        except (ClientError, OSError) as exc:
            log.info("%s: closed before the handler: %s", peer, exc)
            sock.close()
            self._state(SlotState.IDLE)
            return None
        return Proxied(*named)

    def _serve(self, sock: socket.socket, addr: object, header: Proxied | None) -> None:
        config = self.ctx.config
        started = time.monotonic()
        peer = format_address(addr, sock.family if header is None else header.family)
        self._state(SlotState.WRITING, peer=peer, conn_start=started)
        try:
            conn = open_connection(sock, addr, config, self.ctx.tls, header=header,
                                   monitor=self.ctx.scoreboard.monitor(self.slot),
                                   stop=self.stop,
                                   patience=patience_for(config, self.ctx.scoreboard, self.slot))
        except (ClientError, OSError) as exc:
            log.info("%s: closed before the handler: %s", peer, exc)
            self._state(SlotState.IDLE)
            if isinstance(exc, HandshakeTimeout):
                self.report.ended_badly(addr, Cause.HANDSHAKE)
            return
        if conn.peer != peer:  # the PROXY header named the real client
            peer = conn.peer
            self._state(SlotState.WRITING, peer=peer, conn_start=started)
        self.serving = conn
        if self.stopping:
            conn.interrupt(self.stop.grace)
        else:
            arm_connection_timer(config, started)
        try:
            status = serve_one(self.ctx.app, conn)
        finally:
            self.serving = None
            if config.max_connection_time and not self.stopping:
                signal.setitimer(signal.ITIMER_REAL, 0)  # the backstop, not needed now
        self.served += 1
        self.errors += status == ChildExit.HANDLER_ERROR
        if (cause := PENALISED_EXITS.get(status)) is not None:
            self.report.ended_badly(addr, cause)
        self.bytes_in += conn.bytes_in
        self.bytes_out += conn.bytes_out
        self._state(SlotState.IDLE)
        if self.ctx.access_log is not None:
            self.ctx.access_log.write(AccessRecord(
                peer=peer, pid=self.pid, duration_s=round(time.monotonic() - started, 6),
                bytes_in=conn.bytes_in, bytes_out=conn.bytes_out, status=str(int(status))))

    def _state(self, state: SlotState, *, peer: str = "", conn_start: float = 0.0) -> None:
        self.ctx.scoreboard.write(self.slot, pid=self.pid, generation=self.generation,
                                  state=state, connections=self.served, bytes_in=self.bytes_in,
                                  bytes_out=self.bytes_out, conn_start=conn_start,
                                  heartbeat=time.monotonic(), peer=peer, errors=self.errors)
        # (after the slot is written: see Scoreboard.want_wake)
        if state is not SlotState.IDLE and self.ctx.scoreboard.take_wake():
            self.report.busy()

_PAGE_MB = os.sysconf("SC_PAGE_SIZE") / 1048576


def resident_mb() -> float:
    """This process's resident set size in MB (one read of /proc/self/statm)."""
    with open("/proc/self/statm", "rb") as fh:
        return int(fh.read().split()[1]) * _PAGE_MB


def quit_now(signum: int, frame: object) -> None:
    """SIGQUIT in a pool worker (prefork or hybrid): a fast stop, nothing to finish."""
    os._exit(WorkerExit.OK)  # (no core dump)


def worker_body(start: Callable[[], Callable[[], int]]) -> NoReturn:
    """Body of a freshly forked pool worker, prefork's or hybrid's: ``start`` boots it (or
    raises ``BootAborted``, the reason logged) and returns what serves until the worker's
    end, which returns its exit status. Never returns."""
    status: int = WorkerExit.BOOT_ERROR
    try:
        serve = start()
        status = WorkerExit.ERROR
        status = serve()
    except BootAborted:
        pass
    except BaseException:
        with contextlib.suppress(BaseException):
            log.exception("worker %d failed", os.getpid())
    finally:
        # This must never return into the master's loop, hence os._exit() on every path.
        exit_process(status)


def run_worker(ctx: WorkerContext, slot: int, generation: int) -> NoReturn:
    """Body of a freshly forked prefork worker. Never returns."""
    def start() -> Callable[[], int]:
        worker = Worker(ctx, slot, generation)
        worker.boot()
        return worker.run

    worker_body(start)
