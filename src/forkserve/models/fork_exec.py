"""The fork model running a program per connection (``forkserve exec``): the master's side.

Theory of operation
-------------------
Accepting, the cap on children, the zygote that forks them, the access record and the stop
checklist are the fork model's (this class only adds to it); the zygote's child becomes the
program (``serving.program.run_program``) instead of running a handler. The master adds
three things per program, all from its one loop:

1. **stderr**. For each connection the master makes a pipe and passes its write end to the
   zygote with the socket (``Conn``'s ``stderr``); the child puts it on fd 2. Once the
   zygote reports the child's pid (``Started``), the master watches the read end
   (``Host.watch``) and logs each line at info level as ``[PID] line`` (until then the pipe
   holds what the program writes). Reads are non-blocking, one ``STDERR_READ`` chunk per
   readiness event, so a chatty program costs the master work in proportion to what it
   writes and can neither block it nor starve the other fds; a line longer than
   ``MAX_STDERR_LINE`` is cut and logged in pieces, and control characters are escaped. At
   EOF the pipe is closed; when the program is reaped, what is left in the pipe is logged
   before its exit line and the pipe is closed (output of a background grandchild after that
   is lost). A connection whose child never started (the fork failed, the zygote died) has
   its pipe closed with its slot.
2. **Idle and write timeouts**, without touching the connection: see ``traffic``. Each
   program has one check time, kept in a heap; the model's ``next_deadline`` makes the
   master's ``select`` wake for the earliest one and ``manage`` runs those that are due. The
   first check is at ``idle_timeout`` after the connection was passed (a connection that
   ends sooner costs nothing); a check reschedules itself for when the timeout could next
   expire, never sooner than ``MIN_RECHECK`` (at most one look per program per second with
   the usual timeouts). A program quiet for ``idle_timeout`` (no data either way), or whose
   output waits for a client that has taken nothing for ``write_timeout``, is killed with
   SIGKILL, with its process group (the program leads one: a pipeline dies whole, so the
   client gets its FIN). Where TCP_INFO cannot be read (unix listeners), the
   ``/proc/PID/io`` counters are looked at every ``idle_timeout / IO_CHECKS`` (the kill then
   comes within 1.25 x idle_timeout).
3. **The exit line**, like ``tcpserver -v``'s ``end``: ``end pid P peer ADDR status S
   duration Ds`` at info level when the program's end is reported (by the zygote; by the
   master's reaper if its zygote died), with the reason when forkserve killed it (``status
   SIGKILL (idle timeout)``); a signal nobody here sent is a warning. The access record
   follows, as in the fork model (its byte counts are 0: the program's I/O does not pass
   through forkserve).

Costs: one pipe (two fds, one kept by the master while the program runs; the other passed
to the zygote with the socket) and one ``fstat`` per connection on top of the fork model; a
master holds ``max_children`` extra fds at most.
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import logging
import os
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

from ..apps.exec import Program
from ..kernel import Exited, Kernel
from ..master.gate import Gate
from ..master.listeners import Listener
from ..master.traffic import Quiet, io_total, tcp_quiet
from ..serving import program as _program_module  # noqa: F401  (see below)
from ..serving.preamble import Proxied
from .fork import Child, ForkModel
from .host import Host, Serving

# ``serving.program`` runs in the zygote's children; it is imported here too because a zygote
# forked from the master (a hook given as a function, or the interpreter unreadable after a
# privilege drop) cannot always import it itself: the standard library may be out of the
# dropped user's reach.

log = logging.getLogger("forkserve")

#: Bytes read from a program's stderr pipe per readiness event (the pipe's default capacity).
STDERR_READ = 65536
#: A program's stderr line longer than this is logged in pieces of this size.
MAX_STDERR_LINE = 4096
#: Reads of a reaped program's pipe at most (what it wrote before it exited is all there).
DRAIN_READS = 16
#: The soonest a program's connection is looked at again after a look.
MIN_RECHECK = 1.0
#: TCP_INFO counts in jiffies (1 to 10 ms): a check exactly at the deadline could read just
#: under it and need a second look, so checks are scheduled this much after.
CHECK_SLACK = 0.02
#: Looks per idle_timeout when only /proc/PID/io counters can tell.
IO_CHECKS = 4
#: Control characters of a program's stderr are escaped in the log (tabs are kept).
_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(32), 127) if c != ord("\t")}


class StderrRelay:
    """A program's stderr pipe, logged line by line with its pid. Master side."""

    def __init__(self, fd: int, pid: int, unwatch: Callable[[int], None]) -> None:
        self.fd = fd
        self.pid = pid
        self._unwatch = unwatch
        self._partial = b""

    def on_readable(self) -> None:
        """Called by the master's loop when the pipe is readable."""
        self.read()

    def read(self) -> bool:
        """Log what can be read without waiting; False at EOF (the pipe is then closed)."""
        try:
            data = os.read(self.fd, STDERR_READ)
        except BlockingIOError:
            return True
        except OSError:
            data = b""
        if not data:
            self.close()
            return False
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            self._log(line)
        while len(self._partial) > MAX_STDERR_LINE:
            self._log(self._partial[:MAX_STDERR_LINE])
            self._partial = self._partial[MAX_STDERR_LINE:]
        return True

    def _log(self, line: bytes) -> None:
        text = line.removesuffix(b"\r").decode("utf-8", "backslashreplace")
        log.info("[%d] %s", self.pid, text.translate(_ESCAPES))

    def drain(self) -> None:
        """The program was reaped: log what it left in the pipe, then close it."""
        for _ in range(DRAIN_READS):
            if self.fd < 0 or not self.read():
                break
        self.close()

    def close(self) -> None:
        if self._partial:
            self._log(self._partial)
            self._partial = b""
        if self.fd >= 0:
            self._unwatch(self.fd)  # before the close: the number may be reused at once
            os.close(self.fd)
            self.fd = -1


@dataclass(frozen=True)
class Booting:
    """A connection passed to the zygote whose program has no pid yet."""

    #: The read end of the program's stderr pipe.
    stderr_r: int
    #: The accepted socket's inode, for TCP_INFO; ``None`` for unix listeners.
    tcp_inode: int | None
    #: Passed by a stop's drain: the stop's SIGTERM spares it (see ``ExecModel.signal``).
    spared: bool


@dataclass
class Running:
    """A program the master watches."""

    child: Child
    stderr: StderrRelay
    #: The accepted socket's inode, for TCP_INFO; ``None`` for unix listeners.
    tcp_inode: int | None
    next_check: float
    spared: bool = False
    killed_for: str | None = None
    #: ``/proc/PID/io`` fallback: the last total seen and when it last changed.
    io_seen: int | None = None
    io_since: float = field(default=0.0)


class ExecModel(ForkModel):
    """``forkserve exec``: the fork model whose children become ``serving.app``."""

    remind_stop = False  # a program gets one SIGTERM at a stop, as from inetd or systemd
    ends_on_sigterm = True  # (an upgrade leaves the old master's programs to end by themselves)
    client_proof = False  # its exit statuses are the program's own; SIGUSR2 would end it

    def __init__(self, serving: Serving, *, host: Host, kernel: Kernel, gate: Gate) -> None:
        super().__init__(serving, host=host, kernel=kernel, gate=gate)
        self.program = _checked(serving)
        self.running: dict[int, Running] = {}
        self._checks: list[tuple[float, int]] = []  # (when, pid), stale entries skipped
        #: Connections passed to the zygote whose program has no pid yet, by slot.
        self._passed: dict[int, Booting] = {}
        #: Why forkserve killed the program being reported (set around ``_ended``).
        self._killed_for: str | None = None
        #: Inside a stop's ``drain``: the programs it starts are spared the stop's SIGTERM.
        self._draining = False

    def _program(self) -> Program:
        return self.program

    def reconfigure(self, serving: Serving) -> str:
        self.program = _checked(serving)  # (before the new zygote is started with it)
        return super().reconfigure(serving)

    # ------------------------------------------------------------------ starting

    def _spawn(self, sock: socket.socket, addr: object, header: Proxied | None = None, *,
               stderr_w: int = -1) -> Child | None:
        try:
            tcp_inode = None if sock.family == socket.AF_UNIX else os.fstat(sock.fileno()).st_ino
            read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        except OSError as exc:  # out of fds: refuse this client and pause, as accept() would
            sock.close()
            self.host.accept_failed(exc)
            return None
        child = super()._spawn(sock, addr, header, stderr_w=write_fd)  # (it closes write_fd)
        if child is None:
            os.close(read_fd)
            return None
        os.set_blocking(read_fd, False)
        self._passed[child.slot] = Booting(read_fd, tcp_inode, spared=self._draining)
        return child

    def _on_started(self, child: Child) -> None:
        """The zygote forked ``child``: watch its stderr and its connection from now on."""
        booting = self._passed.pop(child.slot)
        relay = StderrRelay(booting.stderr_r, child.pid, self.host.unwatch)
        config = self.config
        # a client that stops reading may do so from the start: the write timeout is a
        # deadline as soon as the idle one (each check looks again within both)
        first = child.started + min(config.idle_timeout, config.write_timeout) + CHECK_SLACK
        if self.config.max_connection_time:
            first = min(first, child.started + self.config.max_connection_time)
        self.running[child.pid] = Running(child, relay, booting.tcp_inode, first,
                                          spared=booting.spared, io_since=child.started)
        heapq.heappush(self._checks, (first, child.pid))
        self.host.watch(booting.stderr_r, relay.on_readable)

    def _lost(self, child: Child) -> None:
        """A connection whose child never started: its pipe goes with its slot."""
        booting = self._passed.pop(child.slot, None)
        if booting is not None:
            os.close(booting.stderr_r)
        super()._lost(child)

    # ------------------------------------------------------------------ timeouts

    def next_deadline(self) -> float | None:
        deadlines = [d for d in (self._next_check(), super().next_deadline()) if d is not None]
        return min(deadlines, default=None)

    def _next_check(self) -> float | None:
        while self._checks:
            when, pid = self._checks[0]
            program = self.running.get(pid)
            if program is not None and program.next_check == when:
                return when
            heapq.heappop(self._checks)  # the program ended or was rescheduled
        return None

    def manage(self) -> None:
        super().manage()  # PROXY headers past their deadline
        now = self.kernel.monotonic()
        while (when := self._next_check()) is not None and when <= now:
            _, pid = heapq.heappop(self._checks)
            self._check(self.running[pid], now)

    def _check(self, program: Running, now: float) -> None:
        config = self.config
        limit = config.max_connection_time
        if limit and now - program.child.started >= limit:
            self._kill(program, "max connection time")
            return
        quiet, left_factor = self._quiet(program, now), 1.0
        if program.tcp_inode is None or program.io_seen is not None:
            left_factor = 1.0 / IO_CHECKS  # counters only: look more often
        if quiet.stalled is not None and quiet.stalled >= config.write_timeout:
            self._kill(program, "write timeout")
            return
        if quiet.idle >= config.idle_timeout:
            self._kill(program, "idle timeout")
            return
        left = config.idle_timeout - quiet.idle
        if quiet.stalled is not None:
            left = min(left, config.write_timeout - quiet.stalled)
        # a stall may begin after this look: look again within write_timeout at most
        wait = max(min(left, config.idle_timeout * left_factor, config.write_timeout),
                   min(MIN_RECHECK, config.idle_timeout))
        program.next_check = now + wait + CHECK_SLACK
        if limit:
            program.next_check = min(program.next_check, program.child.started + limit)
        heapq.heappush(self._checks, (program.next_check, program.child.pid))

    def _quiet(self, program: Running, now: float) -> Quiet:
        pid = program.child.pid
        if program.tcp_inode is not None and program.io_seen is None:
            quiet = tcp_quiet(pid, program.tcp_inode)
            if quiet is not None:
                return quiet
        total = io_total(pid)  # a unix socket, or TCP_INFO out of reach: the coarse way
        if total is None:
            return Quiet(idle=0.0, stalled=None)  # already gone: the reaper will see it
        if total != program.io_seen:
            program.io_seen, program.io_since = total, now
        return Quiet(idle=now - program.io_since, stalled=None)

    def _kill(self, program: Running, reason: str) -> None:
        program.killed_for = reason
        self.signal(program.child.pid, signal.SIGKILL)

    def signal(self, pid: int, sig: int) -> None:
        """``sig`` to the program's whole process group (a pipeline such as ``sh -c 'a | b'``
        ends whole), or to the program alone if the group is gone or refuses. A program
        started by a stop's drain is spared the stop's SIGTERM: its client waited in the
        queue for an answer, not for a signal."""
        if self._zygote_of(pid) is not None:
            super().signal(pid, sig)  # (a stop retires a zygote: see ForkModel.signal)
            return
        program = self.running.get(pid)
        if sig == signal.SIGTERM and program is not None and program.spared:
            return
        try:
            self.kernel.kill(-pid, sig)
        except ProcessLookupError:
            with contextlib.suppress(ProcessLookupError):
                self.kernel.kill(pid, sig)
        except OSError as exc:  # EPERM: a member changed its uid; at least the program
            if exc.errno == errno.EPERM:
                with contextlib.suppress(ProcessLookupError):
                    self.kernel.kill(pid, sig)

    def drain(self, listener: Listener) -> bool:
        self._draining = True
        try:
            return super().drain(listener)
        finally:
            self._draining = False

    # ------------------------------------------------------------------ ending

    def _ended(self, exited: Exited) -> None:
        if self.host.stopping:
            # what is left of its pipeline goes with it at a stop (nothing else would end it)
            with contextlib.suppress(OSError):
                self.kernel.kill(-exited.pid, signal.SIGKILL)
        program = self.running.pop(exited.pid, None)
        if program is not None:
            program.stderr.drain()  # its last words come before its end line
            self._killed_for = program.killed_for
        try:
            super()._ended(exited)
        finally:
            self._killed_for = None

    def _report_exit(self, child: Child, exited: Exited) -> None:
        """The ``end`` line (tcpserver -v): pid, peer, status, duration."""
        reason = self._killed_for
        duration = self.kernel.monotonic() - child.started
        status = exited.describe() + (f" ({reason})" if reason else "")
        unexpected = exited.signal is not None and reason is None and not self.host.stopping
        log.log(logging.WARNING if unexpected else logging.INFO,
                "end pid %d peer %s status %s duration %.3fs", exited.pid, child.peer, status,
                duration)

    def close_in_child(self) -> None:
        """In a zygote forked from the master: the programs' stderr pipes are the master's."""
        super().close_in_child()
        for program in self.running.values():
            if program.stderr.fd >= 0:
                os.close(program.stderr.fd)
        for booting in self._passed.values():
            os.close(booting.stderr_r)

    def close(self) -> None:
        for program in self.running.values():
            program.stderr.close()
        self.running.clear()
        for booting in self._passed.values():
            os.close(booting.stderr_r)
        self._passed.clear()
        super().close()


def _checked(serving: Serving) -> Program:
    assert isinstance(serving.app, Program), "models.create gives exec a Program"
    return serving.app
