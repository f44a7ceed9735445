"""The zygote: the small process that forks the fork model's children (issue 16).

Theory of operation
-------------------
The master starts the zygote by exec (``python -m forkserve.serving.zygote FD``): a fresh
interpreter, not a copy of the master, holding one end of a ``SOCK_SEQPACKET`` socketpair (fd
``FD``) and nothing else of the master's. The wire is ``protocol/zygote.py``.

1. Boot. The first record is ``Setup``: the settings (pickled: the ``Config``, the master's pid,
   the generation) with the scoreboard's memfd in the packet. The zygote asks for SIGKILL when
   the master dies (``PR_SET_PDEATHSIG``, plus a ``getppid`` check), loads the app by name
   and makes the TLS context (only with TLS on: ``ssl`` costs 6 MB), then ``gc.collect()``,
   ``gc.freeze()`` and ``Ready``. It imports neither ``threading`` nor ``logging``, whose
   after-fork handlers every child would run (``serving.lazylog``: a child imports and
   configures ``logging`` at its first log record; an app that imports it is configured
   before the first fork). An app that does not import ends the boot
   with ``Failed`` (one line: the same ``ConfigError`` text the master would print) and exit
   status ``BOOT_ERROR``, and the master stops the server with that line.
2. Serving. It reads packets of ``Conn`` records, each with its socket in the packet's
   ``SCM_RIGHTS``, and forks one child per record, which runs ``child.run_child`` exactly as a
   child of the master did (hygiene, limits, PDEATHSIG, PROXY, TLS, handler, slot) and
   ``_exit``s. For ``forkserve exec`` the settings carry the program, each ``Conn`` the write
   end of its stderr pipe too, and the child becomes the program (``program.run_program``: fds
   0, 1 and 2, then ``execve``). The ``Conn`` records of a packet are forked for back to back,
   the books and reports after the last fork: between two forks the zygote writes, and so
   copies, almost none of the pages it shares with its children. The zygote's PDEATHSIG is
   SIGKILL, the child's SIGTERM relative to the zygote: a dead master takes the zygote, a dead
   zygote its children (each finishes as an orphan: no grace for incomplete requests, gone
   within milliseconds).
3. Reaping. SIGCHLD wakes the loop (``set_wakeup_fd``; the handler does nothing); the loop
   reaps with ``waitpid(-1, WNOHANG)`` until 0 and reports ``Ended`` with the wait status
   and the bytes the child's slot counted. Reports are batched: one ``send`` per turn.
4. It never grows: its state is a dict of children (at most ``max_children``), its loop
   allocates nothing that survives a turn, and ``gc.freeze()`` runs before every run of
   forks, so a child shares every page of the zygote that it does not write.
5. Retire. ``Retire`` means no more ``Conn`` records will come: it exits once the last child
   is reaped. The end of the socketpair (the master gone) ends it at once.
6. Signals. The operator's signals to the process group (TERM, INT, QUIT, HUP, USR1, USR2)
   are the master's to act on: the zygote ignores them, and a child sets its own at once.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import pickle
import select
import signal
import socket
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, NoReturn

from ..errors import ExitCode, ForkserveError
from ..kernel import pthread_sigmask
from ..ops.scoreboard import MEMFD_NAME, Scoreboard
from ..protocol import zygote as wire
from . import lazylog
from .child import ChildContext, exit_process, run_child, set_parent_death_signal, set_title
from .lazylog import LazyLogger
from .limits import any_limits
from .preamble import Proxied

if TYPE_CHECKING:
    import ssl

    from ..apps import App
    from ..apps.exec import Program
    from ..config import Config

log = LazyLogger("forkserve")

#: Blocked around each run of forks (see ``Zygote._fork_each``).
BLOCKED = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2,
           signal.SIGHUP, signal.SIGALRM, signal.SIGCHLD)

#: A zygote's name in /proc/PID/comm (ps -o comm, pgrep): the same with or without
#: setproctitle, so tools and tests tell it from the children that serve.
COMM = b"fs-zygote"
_PR_SET_NAME = 15

#: At most this many fds in one packet: the master's ``ACCEPT_BATCH`` (32) ``Conn`` records
#: of two fds each (exec: the socket and the stderr pipe); the kernel's SCM_MAX_FD is 253.
MAX_FDS = 64
#: A packet from the master is at most this long (64 ``Conn`` records of under 600 bytes).
MAX_PACKET = 64 * 1024
#: Signals the zygote ignores (the operator's, meant for the master).
IGNORED = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGUSR1,
           signal.SIGUSR2, signal.SIGTTIN, signal.SIGTTOU, signal.SIGWINCH)


@dataclass(frozen=True)
class Settings:
    """What ``Setup`` carries (pickled): everything the zygote knows of the server."""

    config: Config
    master_pid: int
    generation: int = 0
    #: exec: the program each child becomes (``serving.program``), in place of the app.
    program: Program | None = None


def setup_record(settings: Settings) -> bytes:
    """The master's first packet's bytes (its fds: the scoreboard's memfd)."""
    return wire.encode(wire.Setup(pickle.dumps(settings, pickle.HIGHEST_PROTOCOL)))


class Zygote:
    """The forking loop (see the module doc), once booted."""

    def __init__(self, ctl: socket.socket, settings: Settings, board: Scoreboard, app: App,
                 tls: ssl.SSLContext | None, *, board_fds: list[int] | None = None) -> None:
        self.ctl = ctl
        self._board_fds = board_fds or []
        self.settings = settings
        self.board = board
        self.children: dict[int, int] = {}  # pid -> slot
        self.forks = self.fork_failures = 0
        self.retiring = False
        self._decoder = wire.Decoder()
        #: The fds of the packet being read that no child has taken yet.
        self._unclaimed: list[int] = []
        #: The fds of the child being forked: its socket, and its stderr pipe for a program
        #: (``_close_in_child`` keeps them open).
        self._kept: tuple[int, int] = (-1, -1)
        self._reports: list[bytes] = []
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._poller = select.epoll()
        self._poller.register(ctl.fileno(), select.EPOLLIN)
        self._poller.register(self._wake_r, select.EPOLLIN)
        self._program = settings.program
        if self._program is not None:
            from .program import run_program  # noqa: PLC0415  (exec's zygote only)

            self._run_program = run_program
        self._context = ChildContext(
            app=app, config=settings.config, scoreboard=board, master_pid=os.getpid(),
            close_master_fds=self._close_in_child, master_signals=(signal.SIGCHLD, *IGNORED),
            tls=tls, limited=any_limits(settings.config))
        self._unix = int(socket.AF_UNIX)
        #: What a child closes (``_close_in_child``), besides the packet's other sockets.
        self._own_fds = (*self._board_fds, self._poller.fileno(), ctl.fileno(), self._wake_r,
                         self._wake_w)

    def _close_in_child(self) -> None:
        # by number, not through the objects that own them (each object touched is a page
        # the child copies); they are never used or collected in the child, which _exits
        for fd in self._own_fds:
            os.close(fd)
        kept = self._kept
        for fd in self._unclaimed:
            if fd not in kept:
                os.close(fd)

    def run(self) -> int:
        """Serve until retired (and every child reaped) or the master is gone."""
        signal.set_wakeup_fd(self._wake_w)
        signal.signal(signal.SIGCHLD, _nothing)
        self._report(wire.Ready(os.getpid(), self.settings.generation))
        self._flush()
        while not (self.retiring and not self.children):
            for fd, _ in self._poller.poll():
                if fd == self._wake_r:
                    self._reap()
                elif not self._read_master():
                    return 0  # the master is gone: the children follow (PDEATHSIG)
            self._flush()
        return 0

    def _read_master(self) -> bool:
        try:
            data, fds, flags, _ = socket.recv_fds(self.ctl, MAX_PACKET, MAX_FDS)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False
        if not data:
            for fd in fds:
                os.close(fd)
            return False
        if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
            for fd in fds:
                os.close(fd)
            raise wire.WireError("a packet from the master was cut (too many fds or bytes)")
        done = 0  # fds[:done] are closed (their runs forked)
        try:
            # Conn records in a row, their sockets and stderr pipes (-1: none), and the
            # number of fds they own
            run: list[tuple[wire.Conn, int, int]] = []
            owned = 0
            for record in self._decoder.feed(data):
                if isinstance(record, wire.Conn):
                    at = done + owned
                    if at + record.fds > len(fds):
                        raise wire.WireError("a Conn record without its fds")
                    run.append((record, fds[at], fds[at + 1] if record.stderr else -1))
                    owned += record.fds
                    continue
                done = self._fork_run(run, fds, done, owned)
                run, owned = [], 0
                self._obey(record)
            done = self._fork_run(run, fds, done, owned)
        finally:
            for fd in fds[done:]:  # a packet with more fds than Conn records (a bug) or cut
                os.close(fd)  # by an error: never a leak
        return True

    def _obey(self, record: wire.Record) -> None:
        if isinstance(record, wire.Retire):
            self.retiring = True
        elif isinstance(record, wire.Query):
            self._report(wire.Counters(self.forks, self.fork_failures, len(self.children)))
        else:
            raise wire.WireError(f"the zygote cannot obey {type(record).__name__}")

    def _fork_run(self, run: list[tuple[wire.Conn, int, int]], fds: list[int], done: int,
                  owned: int) -> int:
        """Fork one child per record of ``run`` (consecutive ``Conn`` records of the packet
        whose fds are ``fds``, the first ``done`` of them closed already, the next ``owned``
        those of ``run``), back to back: between two forks the zygote runs only the loop
        below, so it writes (and copies, its pages being shared with the children) as little
        as it can; the books and the reports come after the last fork. Each child closes the
        packet's other open fds (``_close_in_child``). Every fd of ``run`` is closed here;
        returns ``done`` past them."""
        if not run:
            return done
        unix = self._unix
        ready = []
        self._unclaimed = fds[done:]
        try:
            for conn, fd, stderr in run:
                peer = conn.peer.as_addr(unix)
                header = None
                if conn.proxied:
                    local = conn.local.as_addr(unix) if conn.local is not None else None
                    header = Proxied(peer, local, conn.peer.family)
                # (the socket objects made here, not in each child: their code's pages are
                # this process's own; the child would copy them)
                ready.append((conn.slot, socket.socket(fileno=fd), peer, header, stderr))
            forked = self._fork_each(ready)
        finally:
            self._unclaimed = []
            for _, sock, _, _, _ in ready:
                sock.detach()  # (closed below, with those of the run no object was made for)
            for fd in fds[done:done + owned]:
                os.close(fd)  # (the children have their copies)
        for (slot, _, _, _, _), outcome in zip(ready, forked, strict=True):
            if isinstance(outcome, OSError):
                self.fork_failures += 1
                self._report(wire.ForkFailed(slot, outcome.errno or 0))
            else:
                self.forks += 1
                self.children[outcome] = slot
                self._report(wire.Started(slot, outcome))
        return done + owned

    def _fork_each(self, ready: list[tuple[int, socket.socket, object, Proxied | None, int]]
                   ) -> list[int | OSError]:
        """The forks of ``_fork_run``: a pid or the error, per entry of ``ready``."""
        forked: list[int | OSError] = []
        context = self._context
        gc.freeze()  # (whatever this turn allocated: a child must not copy it to collect)
        # the signals a child handles stay pending until it has installed its handlers
        # (run_child clears the mask then): a SIGUSR2 or SIGTERM from the master in between
        # would otherwise meet the default action, which ends the process
        pthread_sigmask(signal.SIG_BLOCK, BLOCKED)
        try:
            for slot, sock, peer, header, stderr in ready:
                self._kept = (sock.fileno(), stderr)
                try:
                    pid = os.fork()
                except OSError as exc:
                    forked.append(exc)
                    continue
                if pid == 0:  # (neither returns)
                    if self._program is not None:
                        self._run_program(context, self._program, sock, peer, slot,
                                          stderr_fd=stderr, header=header)
                    run_child(context, sock, peer, slot, header=header)
                forked.append(pid)
        finally:
            pthread_sigmask(signal.SIG_UNBLOCK, BLOCKED)
        return forked

    def _reap(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 4096):
                pass
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            slot = self.children.pop(pid, None)
            if slot is None:
                continue
            counted = self.board.read(slot)
            ours = counted.pid == pid
            self._report(wire.Ended(slot, pid, status, counted.bytes_in if ours else 0,
                                    counted.bytes_out if ours else 0))

    def _report(self, record: wire.Record) -> None:
        self._reports.append(wire.encode(record))

    def _flush(self) -> None:
        if self._reports:
            with contextlib.suppress(OSError):  # the master gone: the next read says so
                self.ctl.sendall(b"".join(self._reports))
            self._reports.clear()


def _nothing(signum: int, frame: object) -> None:
    """SIGCHLD: the wakeup fd has woken the loop already."""


def boot(ctl: socket.socket) -> tuple[Settings, Scoreboard, list[int]]:
    """Read ``Setup`` (blocking): the settings, the scoreboard, and the fd its mapping keeps.

    Python's ``mmap`` of a file keeps a duplicate of its fd (until 3.13's ``trackfd=False``);
    a child closes it (``Zygote._close_in_child``): the mapping stays, and nothing a child
    calls uses that fd (``size``, ``resize``, ``close``: it leaves by ``os._exit``)."""
    data, fds, _, _ = socket.recv_fds(ctl, wire.MAX_PAYLOAD + wire.HEADER.size, 1)
    records = wire.Decoder().feed(data)
    if len(records) != 1 or not isinstance(records[0], wire.Setup) or len(fds) != 1:
        raise wire.WireError("the master's first packet is not a Setup with the scoreboard")
    settings = pickle.loads(records[0].settings)  # (our own master's, over a socketpair)
    if not isinstance(settings, Settings):
        raise wire.WireError("Setup does not carry the zygote's Settings")
    try:
        board = Scoreboard(settings.config.max_children, fd=fds[0])
    finally:
        os.close(fds[0])
    return settings, board, _fds_of(MEMFD_NAME)


def _fds_of(name: str) -> list[int]:
    """The fds open on the file ``name`` (as /proc/self/fd shows it)."""
    found = []
    for entry in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{entry}").startswith(name):
                found.append(int(entry))
    return found


def load_app(settings: Settings) -> tuple[App, ssl.SSLContext | None]:
    """The app and the TLS context, as the master made them (exec: the program, no TLS).
    Raises ``ForkserveError``."""
    from .handlers import load  # noqa: PLC0415  (imports in the order of the boot)
    from .tls import make_context  # noqa: PLC0415

    config = settings.config
    lazylog.defer(config.log_level, config.log_file)  # (not logging: see lazylog)
    app: App
    if settings.program is not None:  # (checked in the master: nothing to load)
        app, tls = settings.program, None
    else:
        tls = make_context(config) if config.certfile is not None else None
        app = load(config.app)
    lazylog.settle()  # an app that imported logging itself logs as forkserve does
    return app, tls


def _name_process() -> None:
    set_title("forkserve: zygote")
    # (prctl, not a write to /proc/self/comm: after a privilege drop the process is not
    # dumpable and its /proc files are root's; ctypes is loaded for PDEATHSIG anyway)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_NAME, COMM, 0, 0, 0)


def run_forked(ctl: socket.socket, settings: Settings, board: Scoreboard, app: App, *,
               tls: ssl.SSLContext | None, master_signals: tuple[int, ...]) -> NoReturn:
    """The zygote as a fork of the master, for an app it cannot import by name (a handler
    defined in the script that called ``forkserve.serve``, whose import would run the script
    again) or settings that do not pickle (a hook given as a function). The master has closed
    its fds (``Host.close_in_child``) and forked with its signals blocked. Never returns."""
    status: int = ExitCode.BOOT_ERROR
    try:
        signal.set_wakeup_fd(-1)
        for sig in (*master_signals, *IGNORED):
            signal.signal(sig, signal.SIG_IGN)
        set_parent_death_signal(signal.SIGKILL)
        signal.pthread_sigmask(signal.SIG_SETMASK, ())
        if os.getppid() == settings.master_pid:
            _name_process()
            status = Zygote(ctl, settings, board, app, tls,
                            board_fds=_fds_of(MEMFD_NAME)).run()
    except BaseException:
        with contextlib.suppress(BaseException):
            log.exception("the zygote failed")
    finally:
        exit_process(status)  # never back into the code that started it: os._exit


def main(argv: list[str]) -> int:
    """``python -m forkserve.serving.zygote FD``: boot on the socketpair ``FD`` and serve."""
    for sig in IGNORED:
        signal.signal(sig, signal.SIG_IGN)
    if len(argv) != 1 or not argv[0].isdigit():
        print("usage: python -m forkserve.serving.zygote FD (the master starts it)",
              file=sys.stderr)
        return ExitCode.USAGE
    ctl = socket.socket(fileno=int(argv[0]))
    settings, board, board_fds = boot(ctl)
    set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != settings.master_pid:
        return ExitCode.BOOT_ERROR  # the master died before prctl
    _name_process()
    try:
        app, tls = load_app(settings)
    except (ForkserveError, OSError) as exc:
        with contextlib.suppress(OSError):
            ctl.sendall(wire.encode(wire.Failed(str(exc))))
        return ExitCode.BOOT_ERROR
    gc.collect()
    gc.freeze()
    return Zygote(ctl, settings, board, app, tls, board_fds=board_fds).run()


if __name__ == "__main__":
    # run as the module of its name, not as __main__: Settings must be the class it pickled
    import importlib

    sys.exit(importlib.import_module("forkserve.serving.zygote").main(sys.argv[1:]))
