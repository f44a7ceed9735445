"""What a process does with one connection: the handler call, and a forked child's hygiene.

Theory of operation
-------------------
``serve_one`` runs the app on one ``Connection`` and turns every outcome into an exit status;
it is shared by the fork model (in a child) and the single model (in the master).

``run_child`` is the body of a per-connection child (fork model). Rules:

1. It never returns into the master's code: every path, exceptions included, ends in
   ``os._exit`` (the seed's child fell back into the accept loop; DESIGN decision 3).
2. First it closes what belongs to the master (listeners, the master's selector and wakeup
   pipe), so no client can ever reach this child but its own and the port is not held.
3. Signals, before anything waits on the client (the PROXY header, the TLS handshake): the
   master's dispositions and its wakeup fd are undone, the child's own wakeup pipe is
   installed (``stopsignal``: every wait on the client polls it too, so no stop is missed),
   and the mask is cleared; what the child does with each signal is its table
   (``signals.CHILD``). SIGTERM and SIGINT mean "finish gracefully": the handler records
   the stop, calls ``Connection.interrupt`` (answer what was received, then end the input and
   close with lingering) and arms a timer of ``graceful_timeout`` plus a margin, whose SIGALRM
   (default action) ends a handler that will not finish. These few system calls are the whole
   signal handler: no logging, no locks (a deliberate, documented exception to "handlers only
   record": the child has no loop to record into). A handler that reads the socket itself (a
   socketserver one) does not poll the pipe, so the master still sends SIGTERM once more
   ``STOP_REMINDER`` later to a child still there; only the first one arms the timer. SIGQUIT
   ends the child at once (``os._exit``, no core dump); SIGHUP and SIGUSR1, which an operator
   may send to the whole process group, are ignored (exec'd programs must get them back at
   their defaults).
4. Parent death: PR_SET_PDEATHSIG delivers SIGTERM when the master dies, plus a ``getppid``
   check for a master that died before the call (prctl(2)). It is set in the child, after
   every credential change (the master drops privileges before it forks; the kernel clears
   the setting on any change of uid or gid). An orphan finishes without the grace for
   incomplete requests (``stopsignal``): it is gone within milliseconds, not seconds.
5. The RNG: CPython's ``random`` reseeds itself in every fork child (``os.register_at_fork``),
   and OpenSSL detects the fork itself; nothing to do here.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NoReturn

from .. import hooks
from ..apps import App
from ..config import Config
from ..errors import ChildExit, ClientError, FirstByteTimeout, LineTooLong
from ..hooks import Process
from ..kernel import pthread_sigmask
from ..ops.scoreboard import Scoreboard, SlotState
from ..protocol.address import format_address
from ..protocol.defence import Cause
from .connection import Connection
from .lazylog import LazyLogger
from .limits import apply_limits
from .patience import Patience
from .preamble import Proxied, open_connection
from .signals import CHILD, Step, install, look_again, reset
from .sockets import family_of
from .stopsignal import StopSignal
from .tls import HandshakeTimeout

if TYPE_CHECKING:
    import ssl  # only with TLS on: the module costs a forking master 6 MB

log = LazyLogger("forkserve")  # (no logging, no threading: see lazylog)

#: What a client gets before the connection closes when a line is over ``max_line``.
LINE_TOO_LONG_ANSWER = b"ERR line too long\n"
#: The child's own stop timer runs this much longer than the master's graceful deadline, so
#: that a live master does the killing (and knows it had to).
CHILD_GRACE_MARGIN = 1.0
#: A process told to stop (SIGTERM) and still running is told once more this much later by the
#: master. A signal that lands after Python's last check and before a blocking ``recv``
#: starts runs its Python handler only when that ``recv`` returns, up to ``idle_timeout``
#: later; the second SIGTERM interrupts the ``recv`` (EINTR), and the handler runs then.
#: Once only: a kernel timeout in progress (a write's, the closing linger's) restarts when a
#: signal interrupts it, so a periodic reminder would keep it from ever expiring.
STOP_REMINDER = 1.0

_PR_SET_PDEATHSIG = 1
try:
    # (without use_errno: its result is not looked at, and ctypes' errno swap costs each
    # child of the zygote some 25 page faults of its own, docs/benchmarks.md, issue 16)
    _prctl: Callable[..., int] | None = ctypes.CDLL(None).prctl
except (OSError, AttributeError):  # not Linux: the getppid check still works
    _prctl = None



def _load_setproctitle() -> Callable[[str], None] | None:
    """setproctitle's C function, if the optional extra is installed. Loaded without its
    package: the package's ``__init__`` imports ``logging`` (and so ``threading``), whose
    after-fork handlers every child of the zygote would run (``lazylog``)."""
    import importlib.machinery  # noqa: PLC0415  (imported by the interpreter's start)
    import importlib.util  # noqa: PLC0415

    try:
        spec = importlib.util.find_spec("setproctitle")  # (does not import the package)
        where = spec.submodule_search_locations if spec is not None else None
        if not where:
            return None
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            path = os.path.join(where[0], "_setproctitle" + suffix)
            if os.path.exists(path):
                loader = importlib.machinery.ExtensionFileLoader("setproctitle._setproctitle",
                                                                 path)
                found_spec = importlib.util.spec_from_loader(loader.name, loader)
                if found_spec is None:
                    return None
                module = importlib.util.module_from_spec(found_spec)
                loader.exec_module(module)
                found: Callable[[str], None] = module.setproctitle
                return found
    except (ImportError, OSError, AttributeError, ValueError):
        pass
    return None  # an optional extra: titles are a nicety


_setproctitle = _load_setproctitle()


def set_title(title: str) -> None:
    """Show ``title`` in ps/top when setproctitle is installed; otherwise do nothing."""
    if _setproctitle is not None:
        _setproctitle(title)


#: What each exit status earns the client's source (``defence.Cause``).
PENALISED_EXITS: dict[int, Cause] = {
    ChildExit.FIRST_BYTE: Cause.FIRST_BYTE, ChildExit.HANDSHAKE: Cause.HANDSHAKE,
    ChildExit.LINE_TOO_LONG: Cause.LINE_TOO_LONG,
}


def serve_one(app: App, conn: Connection) -> ChildExit:
    """Run ``app`` on ``conn``, close it, and say how it went. Raises nothing but BaseException.

    Client misbehaviour (idle, reset, over-long line) is a normal end; the ends that earn the
    client's source a penalty have statuses of their own (``ChildExit.FIRST_BYTE``,
    ``LINE_TOO_LONG``); a handler exception is logged with its traceback and gives
    ``HANDLER_ERROR``.
    """
    try:
        app(conn)
        return ChildExit.OK
    except LineTooLong:
        with contextlib.suppress(ClientError, OSError):
            conn.write(LINE_TOO_LONG_ANSWER)
        log.info("%s: closed: line longer than max_line", conn.peer)
        return ChildExit.LINE_TOO_LONG
    except ClientError as exc:
        return client_ended(conn.peer, exc)
    except (Exception, SystemExit):
        log.exception("handler failed on the connection from %s", conn.peer)
        return ChildExit.HANDLER_ERROR
    finally:
        with contextlib.suppress(OSError):
            conn.close()


@dataclass(frozen=True)
class ChildContext:
    """What a forked child needs from the master, fixed at fork time."""

    app: App
    config: Config
    scoreboard: Scoreboard
    master_pid: int
    #: Closes every fd that belongs to the master (listeners, selector, wakeup pipe).
    close_master_fds: Callable[[], None]
    #: Signals the master handles: their dispositions are reset to the default in the child.
    master_signals: Iterable[int]
    #: The TLS context, when TLS is on.
    tls: ssl.SSLContext | None = None
    #: Whether ``config`` sets any rlimit (``limits.any_limits``, asked once by the process
    #: that forks: a child of the zygote touches as little of its memory as it can).
    limited: bool = True


def set_parent_death_signal(sig: int) -> None:
    """Ask the kernel for ``sig`` when the parent dies (Linux; elsewhere a no-op)."""
    if _prctl is not None:  # a failure leaves the caller's getppid check and the master's kill
        _prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)


def _quit_now(signum: int, frame: object) -> None:
    os._exit(ChildExit.QUIT)  # a fast stop: nothing to finish, no core dump


def patience_for(config: Config, board: Scoreboard, slot: int) -> Patience:
    """A connection's first-byte and stress deadlines, and where it records its proof (the
    master's early drop reads it)."""
    return Patience(first_byte=config.first_byte_timeout or None,
                    stress_idle=config.stress_idle_timeout or None,
                    stress_first_byte=config.stress_first_byte_timeout or None,
                    stressed=lambda: board.stressed,
                    on_proven=functools.partial(board.mark_proven, slot))


class _Finish:
    """The child's SIGTERM/SIGINT handler: record the stop, tell the connection (once it
    exists), arm the backstop timer once (the master's reminder must not push it back)."""

    def __init__(self, stop: StopSignal, stop_after: float) -> None:
        self.stop = stop
        self.stop_after = stop_after
        self.conn: Connection | None = None

    def __call__(self, signum: int, frame: object) -> None:
        first = self.stop.record()
        if self.conn is not None:
            self.conn.interrupt(self.stop.grace)
        if first:
            signal.setitimer(signal.ITIMER_REAL, self.stop_after)

    def give_way(self, signum: int, frame: object) -> None:
        """DROP_UNPROVEN (``sourceguard``): a newcomer needs this unproven connection's room.
        Its input ends now, or its handshake; a client that proved itself meanwhile stays."""
        conn = self.conn
        if conn is None:
            self.stop.give_way()
        elif not conn.proven:
            conn.interrupt(0.0)

    def serving(self, conn: Connection) -> None:
        """``conn`` is open: a stop that came during its handshake applies to it now."""
        self.conn = conn
        if self.stop.requested:
            conn.interrupt(self.stop.grace)


def _reset_signals(ctx: ChildContext) -> _Finish:
    # (kernel.set_handler and kernel.pthread_sigmask: no enum conversions on this path)
    signal.set_wakeup_fd(-1)
    reset(ctx.master_signals)
    stop = StopSignal(ctx.master_pid)
    stop.install()
    finish = _Finish(stop, ctx.config.graceful_timeout + CHILD_GRACE_MARGIN)
    install(CHILD, {Step.FINISH: finish, Step.QUIT: _quit_now, Step.LOOK_AGAIN: look_again,
                    Step.GIVE_WAY: finish.give_way})
    pthread_sigmask(signal.SIG_SETMASK, ())
    set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != ctx.master_pid:  # the master died before prctl: finish now
        finish(signal.SIGTERM, None)
    return finish


#: After ``max_connection_time`` (which Connection enforces at each read and write), the
#: kernel's timer ends the process this much later: a client that trickles one TLS record a
#: byte at a time never lets a read return, so only a timer bounds it.
MAX_TIME_BACKSTOP = 5.0


def arm_connection_timer(config: Config, started: float) -> None:
    """Arm SIGALRM (default action: the process ends) as the backstop of
    ``max_connection_time`` for a connection accepted at ``started``; a stop re-arms it."""
    if config.max_connection_time:
        left = config.max_connection_time - (time.monotonic() - started)
        signal.setitimer(signal.ITIMER_REAL, max(left, 0.0) + MAX_TIME_BACKSTOP)


def _serve_in_child(ctx: ChildContext, sock: socket.socket, addr: object, slot: int,
                    header: Proxied | None) -> ChildExit:
    ctx.close_master_fds()
    if ctx.limited:
        apply_limits(ctx.config)
    pid, start = os.getpid(), time.monotonic()
    peer = format_address(addr, family_of(sock))
    board = ctx.scoreboard
    board.write(slot, pid=pid, state=SlotState.READING, conn_start=start, heartbeat=start,
                peer=peer)
    arm_connection_timer(ctx.config, start)  # (a stop re-arms it: see _Finish)
    finish = _reset_signals(ctx)
    try:
        conn = open_connection(sock, addr, ctx.config, ctx.tls, header=header,
                               stop=finish.stop, patience=patience_for(ctx.config, board, slot))
    except (ClientError, OSError) as exc:
        log.info("%s: closed before the handler: %s", peer, exc)
        return ChildExit.HANDSHAKE if isinstance(exc, HandshakeTimeout) else ChildExit.OK
    if conn.peer != peer:  # the PROXY header named the real client
        board.write(slot, pid=pid, state=SlotState.READING, conn_start=start, heartbeat=start,
                    peer=conn.peer)
    finish.serving(conn)
    set_title(f"forkserve: conn {conn.peer}")
    if (ctx.config.post_fork is not None
            and not hooks.call(ctx.config, "post_fork", Process(pid, "child", slot))):
        conn.close()
        return ChildExit.HANDLER_ERROR
    status = serve_one(ctx.app, conn)
    board.write(slot, pid=pid, state=SlotState.CLOSING, connections=1, bytes_in=conn.bytes_in,
                bytes_out=conn.bytes_out, conn_start=start, heartbeat=time.monotonic(),
                peer=conn.peer)
    return status


def run_child(ctx: ChildContext, sock: socket.socket, addr: object, slot: int, *,
              header: Proxied | None = None) -> NoReturn:
    """Serve one connection in a freshly forked child, then exit. Never returns."""
    status: int = ChildExit.HANDLER_ERROR
    try:
        status = _serve_in_child(ctx, sock, addr, slot, header)
    except BaseException:
        with contextlib.suppress(BaseException):
            log.exception("child failed before or after its handler")
    finally:
        # This must never return into the master's accept loop, hence os._exit() on every
        # path: the seed's child fell through into accept() and served as a second master.
        exit_process(status)


def client_ended(peer: str, exc: ClientError) -> ChildExit:
    """The status of a connection its client ended (any ``ClientError`` but a line too long,
    which answers first): a first-byte timeout has its own, which earns the source a
    penalty; any other is an ordinary end. For the blocking and the async handler paths."""
    log.debug("%s: closed: %s", peer, exc)
    return ChildExit.FIRST_BYTE if isinstance(exc, FirstByteTimeout) else ChildExit.OK


def exit_process(status: int) -> NoReturn:
    """The end of every forked process of forkserve's (a child, a worker, the zygote):
    flush what Python buffered (os._exit skips Python's exit, and a handler may have
    printed), then ``os._exit(status)``: never back into the code that forked it, never
    the atexit handlers it inherited. Raises nothing."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(BaseException):
            stream.flush()
    os._exit(status)
