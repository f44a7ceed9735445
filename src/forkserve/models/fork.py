"""The fork model: the master accepts, and a zygote forks one child per connection (the seed,
done right, and fast: issue 16).

Theory of operation
-------------------
The master accepts, reads PROXY headers, and decides admission (rules, per-source caps, the
startups cap and early drop, stress mode, penalties) exactly as before; it never forks a
serving process. It passes each admitted socket to the **zygote** (``serving/zygote.py``): a
small process started by exec (a fresh interpreter that imports the connection code and the
app, ``gc.freeze()``d), which forks one child per socket through ``child.run_child`` and
reports each child's start and end (``protocol/zygote.py``). The sockets of one accept batch
go as one packet (``SCM_RIGHTS``); a wire that is full (the zygote is behind) keeps them in
the zygote's outbox until it has room, and they count as children meanwhile.

- Bounds: at most ``max_children`` children, those passed and not started yet included; then
  the master stops accepting and clients wait in the kernel backlog (tcpserver ``-c``).
- Reaping: the zygote reaps its children and reports ``Ended``; the master keeps the books
  (slots, admission, penalties, the access log from the child's scoreboard slot, shared
  through a memfd). The master is a child subreaper: the children of a zygote that died are
  re-parented to it and reaped here like any other end. A zygote can die between two of its
  steps (a fast stop's SIGKILL, the OOM killer): what it said last is read before its end is
  handled, and before a reaped pid is called a stranger; a child whose ``Started`` was lost
  is found by the pid it wrote to its slot; a child it reaped without a word left is ended
  with status ``unknown`` once that round of reaping is done (``_settle_orphans``). A stop
  never waits for a process that is gone.
- A dead zygote is replaced at once and counted; its children get SIGTERM from the kernel
  (their PDEATHSIG) and finish as orphans. A zygote that cannot import the app stops the
  server with its one line (``Failed``), as prefork's boot failures do.
- A stop retires the zygote (it exits after its last child) and signals the children by pid;
  a reload (HUP) starts a new zygote with the new code and retires the old one once the new
  one is ready (a new one that fails keeps the old one serving).
- An app the zygote cannot import by name (a handler defined in the script that called
  ``forkserve.serve``) or a hook given as a function: the zygote is then forked from the
  master instead of exec'd (as large as the master, but the master still forks nothing per
  connection).
- exec's programs (``fork_exec``) come from the same zygote: each ``Conn`` carries the write
  end of the program's stderr pipe too, and the child becomes the program
  (``serving.program``) instead of running a handler.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import logging
import os
import pickle
import signal
import socket
import sys
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .. import hooks
from ..config import Config
from ..errors import ChildExit, ClientError, ExitCode, PeerGone
from ..hooks import ChildExited
from ..kernel import Exited, Kernel
from ..master.gate import Gate, startups, startups_per_source
from ..master.listeners import Listener
from ..ops.logs import AccessRecord
from ..ops.scoreboard import Scoreboard
from ..protocol import zygote as wire
from ..protocol.address import format_address
from ..protocol.admission import ClientKey, Reason, source_tag
from ..protocol.defence import Cause
from ..protocol.proxyproto import ProxyParser
from ..serving.child import PENALISED_EXITS
from ..serving.preamble import Proxied, check_trusted, proxied
from ..serving.signals import LOOK_AGAIN
from ..serving.sourceguard import SourceGuard
from ..serving.zygote import Settings, run_forked, setup_record
from .host import Host, ModelStatus, Serving, WithoutPool
from .stress import StressMode

if TYPE_CHECKING:
    from ..apps.exec import Program

log = logging.getLogger("forkserve")

#: Connections taken per readiness event before the loop looks at signals again.
ACCEPT_BATCH = 32
#: How much of a new connection's input the master looks at for a whole line (its proof).
PEEK_BYTES = 1024
#: A connection that the startups cap or the early drop would refuse for being unproven gets
#: this long to prove itself (its first whole line) before it is refused. Those defences are
#: for clients that stay silent; a client that opens its connections first and then talks on
#: each of them (a pool, a bench, test_processes' 200) is only slower than a master that
#: accepts a whole backlog in milliseconds, and the old master, which forked between two
#: accepts, gave it that time by accident. The connection holds a place meanwhile (as one
#: waiting for its PROXY header does), no process; a silent one costs its client this delay
#: and then the same refusal as before.
PROOF_GRACE = 0.25
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
class OnProbation:
    """An accepted connection the startups defences would refuse: it has ``PROOF_GRACE`` to
    send a whole line (``FORK._guard``)."""

    sock: socket.socket
    addr: object
    key: ClientKey | None
    header: Proxied | None
    reason: Reason
    deadline: float
    watched: bool = True


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
    #: The pid of the zygote that forked it (0 until its ``Started``).
    zygote: int = 0


@dataclass
class Outgoing:
    """A record for a zygote, and the fds that go with it (closed here once sent): a
    ``Conn``'s socket, and for a program its stderr pipe's write end (-1: none)."""

    data: bytes
    sock: socket.socket | None = None
    stderr_w: int = -1

    def fds(self) -> list[int]:
        if self.sock is None:
            return []
        return [self.sock.fileno()] if self.stderr_w < 0 else [self.sock.fileno(), self.stderr_w]

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        if self.stderr_w >= 0:
            os.close(self.stderr_w)
            self.stderr_w = -1


@dataclass
class Zygote:
    """A zygote process, master side: its pid and its end of the wire."""

    pid: int
    sock: socket.socket
    generation: int
    decoder: wire.Decoder = field(default_factory=wire.Decoder)
    ready: bool = False
    #: Told ``Retire`` (a reload replaced it, or a stop): its exit is expected.
    retired: bool = False
    #: It said ``Failed`` (the app does not import).
    failed: bool = False
    #: Children passed to it whose ``Started`` has not come yet, by slot.
    booting: dict[int, Child] = field(default_factory=dict)
    #: ``Conn`` records and their sockets not sent yet (the wire was full: the zygote is
    #: behind; a unix datagram queue holds few packets), in order.
    outbox: list[Outgoing] = field(default_factory=list)
    #: A duplicate of ``sock``'s fd, watched for room while ``outbox`` waits (the loop
    #: watches one event per fd: ``sock`` itself is watched for reading).
    room_fd: int = -1


_PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    """Children orphaned by a dead zygote are re-parented to this process (the master), which
    reaps them (Linux; elsewhere a no-op: init reaps them)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


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
        #: The zygote's children share the scoreboard through a memfd (it is started by exec).
        self.scoreboard, self._board_fd = Scoreboard.in_memfd(size)
        #: The zygote that forks new children; one started by a reload until it is ready;
        #: those retired (by a reload), until they exit, by pid.
        self.zygote: Zygote | None = None
        self._next: Zygote | None = None
        self._retired: dict[int, Zygote] = {}
        self._generation = 0
        self.zygote_deaths = 0
        #: A stop came while PROXY headers were being read: the zygote retires after them.
        self._retire_when_headers_read = False
        #: Children of a zygote that died, to account for once its round of reaping is done.
        self._orphans: list[int] = []
        #: What the stop sends its processes (``stop_begun``), sent also to those that start
        #: during it.
        self._stop_signal: int | None = None
        #: Inside ``_take``: Conn records wait to go as one packet.
        self._batching = False
        #: An exec'd zygote could not start (not the app's fault): zygotes are forked.
        self._exec_failed = False
        self.children: dict[int, Child] = {}
        self._free_slots = list(range(size - 1, -1, -1))
        self.accepted = 0
        self.handler_errors = 0
        #: PROXY protocol: accepted sockets whose header is still being read, by fd.
        self._awaiting: dict[int, AwaitingHeader] = {}
        #: Connections the startups defences would refuse, given PROOF_GRACE, by fd.
        self._probation: dict[int, OnProbation] = {}
        self.stress = StressMode(self.scoreboard, self.kernel, self.host.count)
        self.guard = self._make_guard()

    @property
    def config(self) -> Config:
        return self.serving.config

    def start(self) -> None:
        become_subreaper()
        self.zygote = self._start_zygote()

    # ------------------------------------------------------------------ the zygote

    def _start_zygote(self) -> Zygote | None:
        """Start a zygote by exec (``serving/zygote.py``) and send it its Setup; None (and
        the server halts) if it cannot be started at all."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        settings = Settings(self.config, self.host.pid, self._generation, self._program())
        try:
            data = setup_record(settings) if self._by_name() else None
        except (TypeError, AttributeError, ValueError, pickle.PicklingError):
            data = None  # a hook given as a function: the zygote is forked (see below)
        try:
            if data is not None and not self._exec_failed:
                try:
                    pid = self._exec_zygote(theirs)
                except OSError as exc:  # (after a privilege drop: the interpreter unreadable)
                    log.warning("cannot start the zygote by exec (%s): forking it from the "
                                "master instead", exc)
                    self._exec_failed = True
                else:
                    socket.send_fds(ours, [data], [self._board_fd])
            if data is None or self._exec_failed:
                pid = self._fork_zygote(ours, theirs, settings)
        except OSError as exc:
            ours.close()
            self.host.halt(f"cannot start the zygote: {exc}", ExitCode.BOOT_ERROR)
            return None
        finally:
            theirs.close()
        ours.setblocking(False)
        zygote = Zygote(pid, ours, self._generation)
        self.host.watch(ours.fileno(), functools.partial(self._heard_from, zygote))
        return zygote

    def _program(self) -> Program | None:
        """exec's program, for the zygote's children to become (None: they run the app)."""
        return None

    def _by_name(self) -> bool:
        """Whether a fresh interpreter can load the app by its name (not a handler defined in
        the script that called ``forkserve.serve``: importing it would run the script)."""
        return not self.config.app.startswith("__main__:")

    def _exec_zygote(self, theirs: socket.socket) -> int:
        """A fresh interpreter running ``serving.zygote`` on ``theirs``: its pid."""
        env = dict(os.environ)
        here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
        os.set_inheritable(theirs.fileno(), True)
        return self.kernel.spawn(
            sys.executable,
            [sys.executable, "-m", "forkserve.serving.zygote", str(theirs.fileno())], env)

    def _fork_zygote(self, ours: socket.socket, theirs: socket.socket,
                     settings: Settings) -> int:
        """The zygote as a fork of the master, for an app or hooks that only this process
        has (``serving.zygote.run_forked``): as large as the master, but forking from it
        still spares the master a fork per connection."""
        with self.host.signals_blocked():
            pid = self.kernel.fork()
            if pid == 0:
                self.host.close_in_child()
                ours.close()
                run_forked(theirs, settings, self.scoreboard, self.serving.app,
                           tls=self.serving.tls, master_signals=self.host.handled_signals)
        return pid

    def _zygotes(self) -> list[Zygote]:
        found = [z for z in (self.zygote, self._next) if z is not None]
        return found + list(self._retired.values())

    def _zygote_of(self, pid: int) -> Zygote | None:
        return next((z for z in self._zygotes() if z.pid == pid), None)

    def _heard_from(self, zygote: Zygote) -> None:
        self._on_zygote(zygote)

    def _on_zygote(self, zygote: Zygote) -> bool:
        """Read and obey one packet from ``zygote``; False if there was none (or it is gone)."""
        try:
            data = zygote.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            data = b""
        if not data:  # it is gone: its reaping (on_exit) says how
            self._hang_up(zygote)
            return False
        try:
            records = zygote.decoder.feed(data)
        except wire.WireError as exc:
            log.error("the zygote (pid %d) said something wrong, killing it: %s",
                      zygote.pid, exc)
            self._hang_up(zygote)
            with contextlib.suppress(ProcessLookupError):
                self.kernel.kill(zygote.pid, signal.SIGKILL)
            return False
        for record in records:
            self._heard(zygote, record)
        return True

    def _hang_up(self, zygote: Zygote) -> None:
        """Stop watching ``zygote``'s wire, and close it and what waits for it."""
        self._stop_watching_room(zygote)
        if zygote.sock.fileno() >= 0:
            self.host.unwatch(zygote.sock.fileno())
        self._close_wire(zygote)

    @staticmethod
    def _close_wire(zygote: Zygote) -> None:
        """Close ``zygote``'s wire and what waits to go on it (in a forked child: copies)."""
        if zygote.room_fd >= 0:
            os.close(zygote.room_fd)
            zygote.room_fd = -1
        for outgoing in zygote.outbox:  # never sent: their clients see the connection close
            outgoing.close()
        zygote.outbox.clear()
        zygote.sock.close()

    def _heard(self, zygote: Zygote, record: wire.Record) -> None:
        if isinstance(record, wire.Started):
            self._started(zygote, record)
        elif isinstance(record, wire.Ended):
            if record.pid in self.children:
                self._gone(Exited(record.pid, os.waitstatus_to_exitcode(record.status)))
        elif isinstance(record, wire.ForkFailed):
            child = zygote.booting.pop(record.slot, None)
            if child is not None:
                self._lost(child)
            self.host.fork_failed(OSError(record.errno, os.strerror(record.errno)))
        elif isinstance(record, wire.Ready):
            zygote.ready = True
            if zygote is self._next:  # a reload's: it takes over, the old one retires
                old, self.zygote, self._next = self.zygote, zygote, None
                if old is not None:
                    self._retire(old)
        elif isinstance(record, wire.Failed):
            zygote.failed = True
            self._boot_failed(zygote, record.reason)

    def _started(self, zygote: Zygote, record: wire.Started) -> None:
        child = zygote.booting.pop(record.slot, None)
        if child is None:
            return
        child.pid, child.zygote = record.pid, zygote.pid
        self.children[record.pid] = child
        self._on_started(child)
        if self.stress.active and self.client_proof:  # it began before it was told
            with contextlib.suppress(ProcessLookupError):
                self.kernel.kill(record.pid, LOOK_AGAIN)
        if self.host.stopping and self._stop_signal is not None:
            self.signal(record.pid, self._stop_signal)  # (it went out before it existed)
        self._update_stress()

    def _on_started(self, child: Child) -> None:
        """``child`` has its pid now (the exec model watches its program from here)."""

    def _boot_failed(self, zygote: Zygote, reason: str) -> None:
        if zygote is self._next:  # a reload's: the running zygote keeps serving
            log.error("reload failed, still serving with the running code: the new zygote "
                      "cannot start: %s", reason)
            self._next = None
            self._retired[zygote.pid] = zygote
            zygote.retired = True
            return
        self.host.halt(f"the zygote cannot start: {reason}", ExitCode.BOOT_ERROR)

    def _retire(self, zygote: Zygote) -> None:
        """No connection goes to ``zygote`` any more: it exits when its children are done."""
        if zygote is self.zygote:
            self.zygote = None
        if zygote is self._next:
            self._next = None
        self._retired[zygote.pid] = zygote
        if not zygote.retired:
            zygote.retired = True
            zygote.outbox.append(Outgoing(wire.encode(wire.Retire())))  # after what it has
            self._send(zygote)

    def _lost(self, child: Child) -> None:
        """A connection passed to a zygote that never forked for it: free what it held."""
        self.scoreboard.mark_proven(child.slot)
        self._free_slots.append(child.slot)
        self.gate.release(child.key)

    def _zygote_exited(self, zygote: Zygote, exited: Exited) -> None:
        # what it said last (a retired zygote's last Ended, just before it exits) may still
        # wait in the socket when its exit is reaped first: read it, or that child stays in
        # the books and a stop waits for a process that is gone
        while zygote.sock.fileno() >= 0 and self._on_zygote(zygote):
            pass
        self._hang_up(zygote)
        # its children still in the books are the master's now (the subreaper's), or were
        # reaped by the zygote just before it died, their Ended never sent: once this round of
        # reaping is done, ``manage`` asks the kernel which (``_settle_orphans``)
        for slot in list(zygote.booting):
            pid = self.scoreboard.read(slot).pid
            if pid:  # forked (its slot names it), its Started lost with the zygote: adopted
                self._started(zygote, wire.Started(slot, pid))
        self._orphans += [pid for pid, c in self.children.items() if c.zygote == zygote.pid]
        for child in zygote.booting.values():  # never forked: their sockets died with it
            self._lost(child)
        zygote.booting.clear()
        if zygote is self._next:
            self._next = None
            if not zygote.ready:
                self._boot_failed(zygote, f"it exited ({exited.describe()})")
            return
        self._retired.pop(zygote.pid, None)
        if zygote is not self.zygote:
            return  # retired: expected
        self.zygote = None
        if self.host.stopping:
            return
        if not zygote.ready:
            if not zygote.failed and not self._exec_failed:
                log.warning("the zygote exited during its boot (%s) without a word: forking "
                            "it from the master instead", exited.describe())
                self._exec_failed = True
                self.zygote = self._start_zygote()
                return
            self._boot_failed(zygote, f"it exited during its boot ({exited.describe()})")
            return
        self.zygote_deaths += 1
        self.host.count("zygote", "died")
        self.host.report_abnormal_exit(exited, "the zygote")
        self.zygote = self._start_zygote()  # at once: its children finish or die with it

    def _make_guard(self) -> SourceGuard:
        config = self.config
        return SourceGuard(self.scoreboard, startups_per_source(config), startups(config))

    def reconfigure(self, serving: Serving) -> str:
        """A reload: children forked from now on use ``serving`` (those running keep what
        they were forked with): a new zygote, which takes over once it is ready."""
        self.serving = serving
        self.guard = self._make_guard()
        if self._next is not None:
            self._retire(self._next)
        self._generation += 1
        self._next = self._start_zygote()
        return ("new children use it (a new zygote forks them once it is ready; the old one "
                "exits when its children are done)")

    def _booting(self) -> int:
        # (asked several times per connection: ``full``, the stress mode; no list built)
        count = len(self.zygote.booting) if self.zygote is not None else 0
        if self._next is not None:
            count += len(self._next.booting)
        for retired in self._retired.values():
            count += len(retired.booting)
        return count

    @property
    def full(self) -> bool:
        # a connection waiting for its PROXY header holds the room its child will need
        return (len(self.children) + len(self._awaiting) + len(self._probation)
                + self._booting() >= self.config.max_children)

    def on_readable(self, listener: Listener) -> None:
        self._take(listener, ACCEPT_BATCH)

    def drain(self, listener: Listener) -> bool:
        """A graceful stop is about to close ``listener``: take what the kernel has queued
        (bounded by the backlog and by room), so those clients are served, not reset. True
        if it stopped at ``max_children``: more may wait, to take as children end."""
        return self._take(listener, self.config.backlog)

    def listeners_closed(self) -> None:
        """No connection will come: the serving zygote retires (once the PROXY headers and
        probations it is still owed are settled, ``manage``)."""
        if self.zygote is not None:
            if self._awaiting or self._probation:
                self._retire_when_headers_read = True
            else:
                self._retire(self.zygote)

    def _take(self, listener: Listener, limit: int) -> bool:
        """Accept up to ``limit`` connections; what goes to the zygote goes as one packet.
        True if it stopped because the model is full (``on_full`` defer)."""
        self._batching = True
        try:
            return self._take_batch(listener, limit)
        finally:
            self._batching = False
            for zygote in self._zygotes():
                if zygote.outbox and zygote.room_fd < 0:
                    self._send(zygote)

    def _take_batch(self, listener: Listener, limit: int) -> bool:
        for _ in range(limit):
            if self.full and self.config.on_full == "defer":
                self.host.update_accepting()
                return True
            try:
                sock, addr = listener.sock.accept()
            except BlockingIOError:
                return False
            except OSError as exc:
                if self.host.accept_failed(exc):
                    return False
                continue
            if self.full:  # on_full = refuse
                self.gate.refuse(sock, "full", format_address(addr, sock.family))
                continue
            if self.config.proxy_protocol:
                self._await_header(sock, addr)
                continue
            if not self._admit_and_spawn(sock, addr, None):
                return False
        return False

    def _admit_and_spawn(self, sock: socket.socket, addr: object,
                         header: Proxied | None) -> bool:
        """Admission (on the real client's address), then a child; False if forking failed."""
        admitted, key = self.gate.admit(sock, addr)
        if not admitted:
            return True
        if not self._guard(sock, addr, key, header):
            return True
        return self._spawn_admitted(sock, addr, header, key)

    def _spawn_admitted(self, sock: socket.socket, addr: object, header: Proxied | None,
                        key: ClientKey | None) -> bool:
        child = self._spawn(sock, addr, header)
        if child is None:
            self.gate.release(key)
            return False
        child.key = key
        self._update_stress()
        return True

    # ------------------------------------------------------------------ defences

    def _guard(self, sock: socket.socket, addr: object, key: ClientKey | None,
               header: Proxied | None) -> bool:
        """The startups cap and the early drop (``sourceguard``), on the slot the child will
        take; False if ``sock`` was refused (closed, ``key`` released) or put on probation
        (``PROOF_GRACE``: it is served once it proves itself, refused if it does not)."""
        guard = self.guard
        if not (self.client_proof and guard.active and isinstance(addr, tuple)):
            return True
        if self._proven_already(sock) is True:
            # its first whole line is waiting: it has proven itself (``connection``, rule 1)
            # and is none of the silent startups the guard counts; only a penalty refuses it.
            # (The master hands a batch to the zygote faster than the master forked one by
            # one: counting these would refuse clients that talk at once.)
            if guard.penalties and self.scoreboard.penalised(source_tag(addr[0])):
                self.gate.refuse(sock, str(Reason.PENALTY), str(addr[0]))
                self.gate.release(key)
                return False
            return True
        refused = guard.admit(self._free_slots[-1], addr[0])  # (the slot _spawn takes)
        if refused is not None:
            if refused is not Reason.PENALTY and self._can_prove(sock):
                self._probate(OnProbation(sock, addr, key, header, refused,
                                          self.kernel.monotonic() + PROOF_GRACE))
                return False
            self.gate.refuse(sock, str(refused), str(addr[0]))
            self.gate.release(key)
            return False
        if guard.displaced is not None:
            displaced = self.children.get(guard.displaced)
            if displaced is not None:
                displaced.displaced = True
            self.host.count("refused", "displaced")
        return True

    def _can_prove(self, sock: socket.socket) -> bool:
        """Can the master see this connection's proof (``_proven_already``)?"""
        return self.serving.tls is None

    def _proven_already(self, sock: socket.socket) -> bool | None:
        """True: a whole line from the client is in the socket already (without TLS, whose
        first bytes prove nothing; a look, not a read: the child reads it). None: the client
        has closed (or reset) the connection. False: no whole line yet."""
        if not self._can_prove(sock):
            return False
        try:
            waiting = sock.recv(PEEK_BYTES, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return None
        if not waiting:
            return None
        return b"\n" in waiting

    def _probate(self, held: OnProbation) -> None:
        fd = held.sock.fileno()
        self._probation[fd] = held
        self.host.watch(fd, functools.partial(self._on_probation_bytes, fd))

    def _on_probation_bytes(self, fd: int) -> None:
        held = self._probation[fd]
        proven = self._proven_already(held.sock)
        if proven is False:
            # a part of a line: no more wake-ups for it (level-triggered), its deadline decides
            self.host.unwatch(fd)
            held.watched = False
            return
        self._end_probation(fd, proven is True)

    def _end_probation(self, fd: int, proven: bool) -> None:
        """Serve a connection that proved itself on probation; refuse one that did not."""
        held = self._probation.pop(fd)
        if held.watched:
            self.host.unwatch(fd)
        ip = str(held.addr[0]) if isinstance(held.addr, tuple) else str(held.addr)
        reason: Reason | None = None if proven else held.reason
        if proven and self.guard.penalties and self.scoreboard.penalised(source_tag(ip)):
            reason = Reason.PENALTY  # (published meanwhile)
        if reason is not None:
            self.gate.refuse(held.sock, str(reason), ip)
            self.gate.release(held.key)
            self.host.update_accepting()
            return
        if not self._spawn_admitted(held.sock, held.addr, held.header, held.key):
            self.host.update_accepting()  # (a stop's signal reaches it at ``_started``)

    def _update_stress(self) -> None:
        if self.client_proof:  # (SIGUSR2 would end a program: exec has no stress mode)
            busy = len(self.children) + self._booting()  # (those forking count: their room)
            self.stress.update(self.config, busy, self.config.max_children, self.children)

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
        if not self._admit_and_spawn(waiting.sock, named.addr, named):
            self.host.update_accepting()  # (a stop's signal reaches it at ``_started``)

    def pending(self) -> int:
        return len(self._awaiting) + len(self._probation) + self._booting()

    def _drop_awaiting(self, fd: int, why: str) -> None:
        waiting = self._awaiting.pop(fd)
        self.host.unwatch(fd)
        self.gate.refuse(waiting.sock, "proxy",
                             f"{format_address(waiting.addr, waiting.sock.family)}: {why}")
        self.host.update_accepting()

    def next_deadline(self) -> float | None:
        return min([*(w.deadline for w in self._awaiting.values()),
                    *(held.deadline for held in self._probation.values())], default=None)

    def manage(self) -> None:
        if self._orphans:
            self._settle_orphans()
        if self._probation:
            now = self.kernel.monotonic()
            for fd in [fd for fd, held in self._probation.items() if held.deadline <= now]:
                # (a last look: a line that completed after a part of it woke the loop)
                self._end_probation(fd, self._proven_already(self._probation[fd].sock) is True)
        if not self._awaiting and not self._probation:
            if self._retire_when_headers_read and self.zygote is not None:
                self._retire(self.zygote)
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
        for held in self._probation.values():
            held.sock.close()
        self._probation.clear()
        for zygote in self._zygotes():  # (a zygote forked by a reload: the others' wires)
            self._close_wire(zygote)

    def _spawn(self, sock: socket.socket, addr: object, header: Proxied | None = None, *,
               stderr_w: int = -1) -> Child | None:
        """Have a child serve ``sock``: the zygote forks it; None if that failed (accepting is
        then paused). ``stderr_w`` (exec: the write end of the program's stderr pipe) goes
        with the socket; either way, ``sock`` and ``stderr_w`` are closed here."""
        # after a reload, connections go to the new zygote at once: it reads them once it
        # has booted (a reload is seen by the next connection, as before)
        zygote = self._next if self._next is not None else self.zygote
        slot = self._free_slots.pop()
        family = sock.family if header is None else header.family
        peer = addr if header is None else header.addr
        local = None if header is None or header.local is None else header.local
        record = wire.Conn(slot, wire.Address.of(peer, family), proxied=header is not None,
                           local=None if local is None else wire.Address.of(local, family),
                           stderr=stderr_w >= 0)
        outgoing = Outgoing(wire.encode(record), sock, stderr_w)
        if zygote is None or zygote.sock.fileno() < 0:
            self.scoreboard.mark_proven(slot)
            self._free_slots.append(slot)
            outgoing.close()  # this client is refused: better than a master that waits
            self.host.fork_failed(OSError(errno.EAGAIN, "no zygote (it is being replaced)"))
            return None
        zygote.outbox.append(outgoing)
        self.accepted += 1
        child = zygote.booting[slot] = Child(0, slot, format_address(peer, family),
                                             self.kernel.monotonic())
        if not self._batching:
            self._send(zygote)
        return child

    def _send(self, zygote: Zygote) -> None:
        """Send what waits in ``zygote``'s outbox, up to ``wire`` packets of ACCEPT_BATCH
        sockets; what finds the wire full waits for room (the loop watches for it)."""
        while zygote.outbox and zygote.sock.fileno() >= 0:
            batch = zygote.outbox[:ACCEPT_BATCH]
            try:
                socket.send_fds(zygote.sock, [b"".join(out.data for out in batch)],
                                [fd for out in batch for fd in out.fds()])
            except (BlockingIOError, InterruptedError):
                if zygote.room_fd < 0:
                    zygote.room_fd = os.dup(zygote.sock.fileno())
                    self.host.watch(zygote.room_fd, functools.partial(self._send, zygote),
                                    write=True)
                return
            except OSError:
                return  # it is gone: its reaping frees what it held (``_zygote_exited``)
            del zygote.outbox[:len(batch)]
            for out in batch:
                out.close()  # the zygote has its copies
        self._stop_watching_room(zygote)

    def _stop_watching_room(self, zygote: Zygote) -> None:
        if zygote.room_fd >= 0:
            self.host.unwatch(zygote.room_fd)
            os.close(zygote.room_fd)
            zygote.room_fd = -1

    def on_exit(self, exited: Exited) -> bool:
        zygote = self._zygote_of(exited.pid)
        if zygote is not None:
            self._zygote_exited(zygote, exited)
            self.host.update_accepting()
            return True
        # a zygote's child whose zygote died (re-parented to the master, the subreaper); its
        # Started may still wait in the dead zygote's wire, not read yet: read it first
        if exited.pid not in self.children:
            for zygote in self._zygotes():
                while zygote.sock.fileno() >= 0 and self._on_zygote(zygote):
                    pass
        if exited.pid not in self.children:
            return False
        self._ended(exited)
        return True

    def _gone(self, exited: Exited) -> None:
        """A child's end that the master's reaper did not see (it runs ``child_exit`` for
        those it reaps itself)."""
        self._ended(exited)
        if self.config.child_exit is not None:
            hooks.call(self.config, "child_exit",
                       ChildExited(exited.pid, exited.describe(), exited.code))

    def _settle_orphans(self) -> None:
        """The children of a zygote that died, after the round of reaping that saw it die:
        one still running is the master's child now (its reaping ends it); one already gone
        was reaped by the zygote, which died before it said so: it ends here, how unknown.
        (Without this, a stop would wait for it for ever.)"""
        orphans, self._orphans = self._orphans, []
        for pid in orphans:
            if pid not in self.children:
                continue
            try:
                done, status = self.kernel.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                self._gone(Exited(pid, Exited.UNSEEN))
                continue
            if done:  # (it ended after that round: reaped here, not by the loop's reaper)
                self._gone(Exited(pid, os.waitstatus_to_exitcode(status)))

    def _ended(self, exited: Exited) -> None:
        """The end of a child (reported by its zygote, or reaped here)."""
        child = self.children.pop(exited.pid)
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

    def _report_exit(self, child: Child, exited: Exited) -> None:
        """Count and log how a child ended (the access record is written after this)."""
        self.handler_errors += exited.code == ChildExit.HANDLER_ERROR
        if exited.code == Exited.UNSEEN:
            log.log(logging.INFO if self.host.stopping else logging.WARNING,
                    "pid %d (connection from %s) ended unseen: its zygote reaped it and died "
                    "before it said how", exited.pid, child.peer)
        elif exited.code not in NORMAL_EXITS:
            self.host.report_abnormal_exit(exited, f"connection from {child.peer}")

    def interrupt(self, fast: bool) -> None:
        pass  # children are signalled by the master's stop checklist

    def stop_begun(self, sig: int | None) -> None:
        """A child whose ``Started`` comes from now on is sent ``sig``; the zygotes that
        serve no more (a reload's old ones) retire. The serving zygote retires once the
        listeners are closed (``listeners_closed``)."""
        self._stop_signal = sig
        for zygote in self._zygotes():
            if zygote is not self.zygote:
                self._retire(zygote)

    def pids(self) -> Collection[int]:
        return [*self.children, *(z.pid for z in self._zygotes())]

    def signal(self, pid: int, sig: int) -> None:
        """A stop's signal: a zygote is not told SIGTERM (it ignores the operator's signals;
        ``stop_begun`` has retired it: it exits when its children are done)."""
        if sig in (signal.SIGTERM, signal.SIGINT) and self._zygote_of(pid) is not None:
            return
        super().signal(pid, sig)

    def status(self) -> ModelStatus:
        # a connection passed to a zygote whose Started has not come yet is served all the
        # same (its child may have answered already: the report is on its way); its slot is
        # shown once its child has written it
        board = self.scoreboard
        booting = [board.read(child.slot) for z in self._zygotes()
                   for child in z.booting.values()]
        return ModelStatus(
            capacity=self.config.max_children, busy=len(self.children) + len(booting),
            idle=None, connections_total=self.accepted, handler_errors=self.handler_errors,
            stress=self.stress.active,
            processes=[*(board.read(c.slot) for c in self.children.values()),
                       *(slot for slot in booting if slot.pid)],
        )

    def close(self) -> None:
        for fd in list(self._awaiting):
            waiting = self._awaiting.pop(fd)
            self.host.unwatch(fd)
            waiting.sock.close()
        for fd in list(self._probation):
            held = self._probation.pop(fd)
            if held.watched:
                self.host.unwatch(fd)
            held.sock.close()
        for zygote in self._zygotes():
            self._hang_up(zygote)
        if self._board_fd >= 0:
            os.close(self._board_fd)
            self._board_fd = -1
        with contextlib.suppress(BufferError):
            self.scoreboard.close()

