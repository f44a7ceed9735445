"""The fork model: the master accepts, and forks one child per connection (the seed, done right).

Costs and bounds: one fork per connection (about 1 ms of CPU for a small Python master, more
with a large heap: hence ``gc.freeze()`` in the supervisor before the first fork); at most
``max_children`` children, after which the master stops accepting and clients wait in the
kernel backlog (tcpserver ``-c``). A child's slot in the scoreboard gives the master the byte
counts for the access log after it reaps the child.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import signal
import socket
from collections.abc import Collection
from dataclasses import dataclass
from typing import NoReturn

from ..config import Config
from ..errors import ChildExit, ClientError, PeerGone
from ..kernel import Exited, Kernel
from ..master.gate import Gate, startups, startups_per_source
from ..master.listeners import Listener
from ..ops.logs import AccessRecord
from ..ops.scoreboard import Scoreboard
from ..protocol.address import format_address
from ..protocol.admission import ClientKey
from ..protocol.defence import Cause
from ..protocol.proxyproto import ProxyParser
from ..serving.child import PENALISED_EXITS, ChildContext, run_child
from ..serving.preamble import Proxied, check_trusted, proxied
from ..serving.sourceguard import SourceGuard
from .host import Host, ModelStatus, Serving, WithoutPool
from .stress import StressMode

log = logging.getLogger("forkserve")

#: Connections taken per readiness event before the loop looks at signals again.
ACCEPT_BATCH = 32
#: fork() errors that mean "no resources right now" (RLIMIT_NPROC, pids.max, memory).
FORK_CAPACITY_ERRNOS = frozenset({errno.EAGAIN, errno.ENOMEM})
#: Child exits that say nothing is wrong with the server (the client's doing, or a stop's).
NORMAL_EXITS = frozenset({ChildExit.OK, ChildExit.HANDLER_ERROR, ChildExit.QUIT,
                          ChildExit.FIRST_BYTE, ChildExit.HANDSHAKE, ChildExit.LINE_TOO_LONG})
#: Signals that end a child only when its code crashed (a memory error, an abort): likely
#: an exploit attempt, so they earn its client a penalty (sshd's "crash"). A handler's
#: Python exception does not: that is the app's bug, not the client's attack.
CRASH_SIGNALS = frozenset({signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE,
                           signal.SIGABRT, signal.SIGSYS})


def penalty_cause(exited: Exited, displaced: bool) -> Cause | None:
    """What a child's end earns its client's source, if anything."""
    if exited.signal is not None:
        return Cause.CRASH if exited.signal in CRASH_SIGNALS else None
    if displaced:
        return None  # the early drop closed it: it had no time to miss a deadline
    return PENALISED_EXITS.get(exited.code)


@dataclass
class AwaitingHeader:
    """An accepted connection whose PROXY header the master is reading."""

    sock: socket.socket
    addr: object
    parser: ProxyParser
    deadline: float


@dataclass
class Child:
    pid: int
    slot: int
    peer: str
    started: float
    #: What admission control counts this connection under (released at the exit).
    key: ClientKey | None = None
    #: Closed by the early drop to make room for a newcomer (SIGQUIT).
    displaced: bool = False


class ForkModel(WithoutPool):
    name = "fork"
    accepts = True
    remind_stop = True
    #: Children run forkserve's Connection: they record their client's proof, end with the
    #: statuses of ``PENALISED_EXITS`` and look again on LOOK_AGAIN. Not so for programs
    #: (exec): their exit statuses are their own, and SIGUSR2 would end them.
    client_proof = True

    def __init__(self, serving: Serving, *, host: Host, kernel: Kernel, gate: Gate) -> None:
        self.serving = serving
        self.host = host
        self.kernel = kernel
        self.gate = gate
        size = self.config.max_children
        self.scoreboard = Scoreboard(size)
        self.children: dict[int, Child] = {}
        self._free_slots = list(range(size - 1, -1, -1))
        self._context = self._make_context()
        self.accepted = 0
        self.handler_errors = 0
        #: PROXY protocol: accepted sockets whose header is still being read, by fd.
        self._awaiting: dict[int, AwaitingHeader] = {}
        self.stress = StressMode(self.scoreboard, self.kernel, self.host.count)
        self.guard = self._make_guard()

    @property
    def config(self) -> Config:
        return self.serving.config

    def _make_context(self) -> ChildContext:
        serving, host = self.serving, self.host
        return ChildContext(
            app=serving.app, config=serving.config, scoreboard=self.scoreboard,
            master_pid=host.pid, close_master_fds=host.close_in_child,
            master_signals=host.handled_signals, tls=serving.tls,
        )

    def start(self) -> None:
        pass

    def _make_guard(self) -> SourceGuard:
        config = self.config
        return SourceGuard(self.scoreboard, startups_per_source(config), startups(config))

    def reconfigure(self, serving: Serving) -> str:
        """A reload: children forked from now on use ``serving`` (those running keep what
        they were forked with)."""
        self.serving = serving
        self._context = self._make_context()
        self.guard = self._make_guard()
        return "new children use it"

    @property
    def full(self) -> bool:
        # a connection waiting for its PROXY header holds the room its child will need
        return len(self.children) + len(self._awaiting) >= self.config.max_children

    def on_readable(self, listener: Listener) -> None:
        self._take(listener, ACCEPT_BATCH)

    def drain(self, listener: Listener) -> None:
        """A graceful stop is about to close ``listener``: take what the kernel has queued
        (bounded by the backlog and by room), so those clients are served, not reset."""
        self._take(listener, self.config.backlog)

    def _take(self, listener: Listener, limit: int) -> None:
        for _ in range(limit):
            if self.full and self.config.on_full == "defer":
                self.host.update_accepting()
                return
            try:
                sock, addr = listener.sock.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if self.host.accept_failed(exc):
                    return
                continue
            if self.full:  # on_full = refuse
                self.gate.refuse(sock, "full", format_address(addr, sock.family))
                continue
            if self.config.proxy_protocol:
                self._await_header(sock, addr)
                continue
            if not self._admit_and_spawn(sock, addr, None):
                return

    def _admit_and_spawn(self, sock: socket.socket, addr: object,
                         header: Proxied | None) -> bool:
        """Admission (on the real client's address), then a child; False if forking failed."""
        admitted, key = self.gate.admit(sock, addr)
        if not admitted:
            return True
        if not self._guard(sock, addr):
            self.gate.release(key)
            return True
        child = self._spawn(sock, addr, header)
        if child is None:
            self.gate.release(key)
            return False
        child.key = key
        self._update_stress()
        return True

    # ------------------------------------------------------------------ defences

    def _guard(self, sock: socket.socket, addr: object) -> bool:
        """The startups cap and the early drop (``sourceguard``), on the slot the child will
        take; False if ``sock`` was refused (and closed)."""
        guard = self.guard
        if not (self.client_proof and guard.active and isinstance(addr, tuple)):
            return True
        refused = guard.admit(self._free_slots[-1], addr[0])  # (the slot _spawn takes)
        if refused is not None:
            self.gate.refuse(sock, str(refused), str(addr[0]))
            return False
        if guard.displaced is not None:
            displaced = self.children.get(guard.displaced)
            if displaced is not None:
                displaced.displaced = True
            self.host.count("refused", "displaced")
        return True

    def _update_stress(self) -> None:
        if self.client_proof:  # (SIGUSR2 would end a program: exec has no stress mode)
            self.stress.update(self.config, len(self.children), self.config.max_children,
                               self.children)

    def _await_header(self, sock: socket.socket, addr: object) -> None:
        """PROXY protocol: read the header here, without waiting, before admission and the
        fork, so the rules and per-IP limits see the real client (see the module doc)."""
        peer = format_address(addr, sock.family)
        try:
            check_trusted(sock, addr, self.config)
        except ClientError as exc:
            self.gate.refuse(sock, "proxy", f"{peer}: {exc}")
            return
        sock.setblocking(False)
        fd = sock.fileno()
        deadline = self.kernel.monotonic() + self.config.handshake_timeout
        self._awaiting[fd] = AwaitingHeader(sock, addr, ProxyParser(), deadline)
        self.host.watch(fd, functools.partial(self._on_header_bytes, fd))

    def _on_header_bytes(self, fd: int) -> None:
        waiting = self._awaiting[fd]
        try:
            data = waiting.sock.recv(waiting.parser.wanted)
            if not data:
                raise PeerGone("closed before its PROXY header was complete")
            header = waiting.parser.feed(data)
        except (BlockingIOError, InterruptedError):
            return
        except (ClientError, OSError) as exc:
            self._drop_awaiting(fd, str(exc))
            return
        if header is None:
            return
        del self._awaiting[fd]
        self.host.unwatch(fd)
        named = proxied(header, waiting.sock, waiting.addr)
        before = set(self.children)
        if not self._admit_and_spawn(waiting.sock, named.addr, named):
            self.host.update_accepting()
        if self.host.stopping:  # the stop's SIGTERM went out before this child existed
            for pid in set(self.children) - before:
                with contextlib.suppress(ProcessLookupError):
                    self.kernel.kill(pid, signal.SIGTERM)

    def pending(self) -> int:
        return len(self._awaiting)

    def _drop_awaiting(self, fd: int, why: str) -> None:
        waiting = self._awaiting.pop(fd)
        self.host.unwatch(fd)
        self.gate.refuse(waiting.sock, "proxy",
                             f"{format_address(waiting.addr, waiting.sock.family)}: {why}")
        self.host.update_accepting()

    def next_deadline(self) -> float | None:
        return min((w.deadline for w in self._awaiting.values()), default=None)

    def manage(self) -> None:
        if not self._awaiting:
            return
        now = self.kernel.monotonic()
        late = [fd for fd, w in self._awaiting.items() if w.deadline <= now]
        for fd in late:
            self._drop_awaiting(fd, f"no whole PROXY header within "
                                    f"{self.config.handshake_timeout:g} s")

    def close_in_child(self) -> None:
        """In a child: the sockets still waiting for their header are the master's."""
        for waiting in self._awaiting.values():
            waiting.sock.close()
        self._awaiting.clear()

    def _spawn(self, sock: socket.socket, addr: object,
               header: Proxied | None = None) -> Child | None:
        """Fork a child for ``sock``; None if forking failed (accepting is then paused)."""
        slot = self._free_slots.pop()  # (tagged unproven by _guard: the child clears it)
        kernel = self.kernel
        try:
            with self.host.signals_blocked():
                pid = kernel.fork()
                if pid == 0:
                    self._run_child(sock, addr, slot, header)  # never returns
        except OSError as exc:
            self.scoreboard.mark_proven(slot)
            self._free_slots.append(slot)
            sock.close()  # this client is refused: better than a master that dies
            self.host.fork_failed(exc)
            return None
        sock.close()  # the child has its copy; the master must not keep one
        self.accepted += 1
        family = sock.family if header is None else header.family
        child = self.children[pid] = Child(pid, slot, format_address(addr, family),
                                           kernel.monotonic())
        return child

    def _run_child(self, sock: socket.socket, addr: object, slot: int,
                   header: Proxied | None) -> NoReturn:
        """In the new child: serve ``sock`` and exit (the exec model runs a program instead)."""
        run_child(self._context, sock, addr, slot, header=header)

    def on_exit(self, exited: Exited) -> bool:
        child = self.children.pop(exited.pid, None)
        if child is None:
            return False
        slot = self.scoreboard.read(child.slot)
        self.scoreboard.clear(child.slot)
        self.scoreboard.mark_proven(child.slot)
        self._free_slots.append(child.slot)
        self.gate.release(child.key)
        cause = penalty_cause(exited, child.displaced) if self.client_proof else None
        if cause is not None:
            self.gate.penalise(child.key, cause)
        self._report_exit(child, exited)
        self._update_stress()
        access_log = self.serving.access_log
        if access_log is not None:  # (nothing built per connection without one)
            ours = slot.pid == exited.pid
            access_log.write(AccessRecord(
                peer=slot.peer if ours and slot.peer else child.peer, pid=exited.pid,
                duration_s=round(self.kernel.monotonic() - child.started, 6),
                bytes_in=slot.bytes_in if ours else 0, bytes_out=slot.bytes_out if ours else 0,
                status=exited.describe(),
            ))
        self.host.update_accepting()
        return True

    def _report_exit(self, child: Child, exited: Exited) -> None:
        """Count and log how a child ended (the access record is written after this)."""
        self.handler_errors += exited.code == ChildExit.HANDLER_ERROR
        if exited.code not in NORMAL_EXITS:
            self.host.report_abnormal_exit(exited, f"connection from {child.peer}")

    def interrupt(self, fast: bool) -> None:
        pass  # children are signalled by the master's stop checklist

    def pids(self) -> Collection[int]:
        return self.children.keys()

    def status(self) -> ModelStatus:
        return ModelStatus(
            capacity=self.config.max_children, busy=len(self.children), idle=None,
            connections_total=self.accepted, handler_errors=self.handler_errors,
            stress=self.stress.active,
            processes=[self.scoreboard.read(c.slot) for c in self.children.values()],
        )

    def close(self) -> None:
        for fd in list(self._awaiting):
            waiting = self._awaiting.pop(fd)
            self.host.unwatch(fd)
            waiting.sock.close()
        with contextlib.suppress(BufferError):
            self.scoreboard.close()

