"""The master: one selectors loop that accepts, reaps, and runs the lifecycle.

Theory of operation
-------------------
The master is single-threaded and blocks in exactly one place: ``selector.select`` with a
timeout equal to the nearest deadline (an accept pause ending, the graceful stop deadline), or
no timeout at all. It never polls on a timer: an idle master uses no CPU.

Signals (DESIGN decision 1, STYLE rules 4 and 5): ``SIGNALS`` is the one table that maps each
signal to an intent; it drives installation, dispatch and the docs. A handler only appends the
signal number to a queue (and, for a stop, lets the model interrupt a connection it serves
in-process); ``signal.set_wakeup_fd`` makes the selector return, and the loop then acts on the
queued intents by name. PEP 475 retries system calls after a handler that does not raise, so
nothing may block outside ``select``.

Reaping (decision 2, rule 7): after every wake-up, ``kernel.reap`` loops ``waitpid(-1,
WNOHANG)`` until nothing is left, because SIGCHLDs coalesce. Children are registered in the
same loop iteration that forked them, before any reaping, so there is no registration race.

The parts (each in its own module, the loop calls them by name):

- ``accepting``: backpressure (decision 4) and the pauses after accept and fork errors
  (decision 5; the errno classification is ``serving.accept``, shared with prefork workers).
- ``events``: the status counters and the one rate limiter of the master's reports.
- ``stopping``: the stop checklist with its deadlines (rule 17).
- ``signals``: the signal table; ``_steps`` maps each intent to its step.
- the model, behind ``models.host``: the Supervisor is the model's ``Host``.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import os
import selectors
import signal
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any

from .. import hooks, models
from .._version import __version__
from ..config import Config
from ..errors import ExitCode, ForkserveError
from ..hooks import ChildExited
from ..kernel import Exited, Kernel, OsKernel, reap
from ..models import Parts, Serving
from ..ops import pidfile
from ..ops.logs import AccessLog, configure, reopen_files
from ..ops.loopserver import LoopServer
from ..ops.metrics import MetricsServer
from ..ops.status import StatusServer, process_row
from ..protocol.admission import Admission
from ..serving.accept import ACCEPT_PAUSE_SECONDS
from ..serving.child import set_title
from . import gate, ready, reload, systemd, upgrade
from .accepting import Accepting
from .events import Events
from .gate import Gate
from .listeners import Listener
from .signals import _INTENTS, HANDLED, IGNORED_WHILE_STOPPING, SIGNALS, Intent, SignalsBlocked
from .stopping import StopChecklist
from .upgrade import Upgrader

if TYPE_CHECKING:
    pass  # only with TLS on: the module costs a forking master 6 MB

log = logging.getLogger("forkserve")


def _stopped_already(signum: int, frame: FrameType | None) -> None:
    """A signal after the server stopped, in a process about to exit: nothing to do."""


@dataclass(frozen=True)
class Launch:
    """How this master came to be, for what it does later: where a reload finds the settings
    and the app again (``origin``), where it was started (``cwd``: an upgrade's new master
    starts there too), systemd's notification socket, and the pipe to the master an upgrade
    replaces (written to once this one serves)."""

    origin: reload.Origin | None = None
    cwd: str | None = None
    notifier: systemd.Notifier | None = None
    upgrade_ready_fd: upgrade.Successor | None = None
    #: The process exits once the server has stopped (the command line, not ``serve()``
    #: called by a program that goes on).
    exits_after: bool = False


@dataclass(frozen=True)
class Operators:
    """The operators' listeners, served in the master's loop: status and metrics."""

    control: Listener | None = None
    metrics: Listener | None = None


class Supervisor:
    """The master process's loop. Create it after binding; ``run()`` serves until stopped."""

    def __init__(self, serving: Serving, listeners: Sequence[Listener], *,
                 admission: Admission | None = None, kernel: Kernel | None = None,
                 operators: Operators = Operators(), launch: Launch = Launch()) -> None:
        #: What serving processes are made from (config, app, TLS, access log): the model
        #: gets it, and a reload replaces it.
        self.serving = serving
        config = serving.config
        self.listeners = list(listeners)
        self.kernel: Kernel = kernel or OsKernel()
        self.pid = os.getpid()
        self._started = self.kernel.monotonic()
        #: Where a reload finds the settings and the app again.
        self._origin = launch.origin or reload.Origin(config)
        #: Where the server was started (an upgrade's new master starts there too).
        self._cwd = launch.cwd or os.getcwd()
        #: Set when an upgrade started this master: written to once it serves.
        self._upgrade_ready_fd = launch.upgrade_ready_fd
        self._exits_after = launch.exits_after
        #: systemd's notification socket (a no-op outside systemd) and its watchdog pings.
        self.notifier = launch.notifier or systemd.Notifier(None)
        self.heartbeat = systemd.Heartbeat(self.notifier, self._started)
        self._make_loop()
        self._make_operators(operators.control, operators.metrics)
        self.gate = Gate(admission or gate.build(config), config, clock=self.kernel.monotonic,
                         count=self.events.count, report=self.events.report, host=self)
        self.model = models.create(Parts(self.serving, self, self.kernel, self.listeners,
                                         self.gate))
        self.checklist = StopChecklist(self.model, self.listeners, self.kernel, self.notifier,
                                       self.update_accepting)
        #: Set by ``halt``: the reason and exit status of a stop the server itself decided.
        self._halt: tuple[str, ExitCode] | None = None

    def _make_loop(self) -> None:
        """The selector, its wakeup pipe, the queue of signals received, accept control."""
        self.selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._received: deque[int] = deque()
        #: Set by the signal handler for anything but SIGCHLD: the loop acts before accepting.
        self._urgent = False
        #: Counters (status, metrics) and the one rate limiter of reports.
        self.events = Events(self.kernel.monotonic)
        self.accepting = Accepting(self.selector, self.listeners, self.kernel.monotonic,
                                   self.events)
        #: What each signal's intent does, in the loop (``signals.SIGNALS``).
        self._steps: dict[Intent, Callable[[], None]] = {
            Intent.GRACEFUL_STOP: functools.partial(self._begin_stop, fast=False),
            Intent.FAST_STOP: functools.partial(self._begin_stop, fast=True),
            Intent.RELOAD: self._reload,
            Intent.MORE: lambda: self.model.scale(1),
            Intent.FEWER: lambda: self.model.scale(-1),
            Intent.UPGRADE: lambda: self.upgrader.start(self._cwd),
            Intent.REOPEN_LOGS: self._reopen_logs,
        }

    def _make_operators(self, control: Listener | None, metrics: Listener | None) -> None:
        """The operators' servers in this loop (the status socket, the metrics endpoint) and
        the upgrader, which hands their sockets over too."""
        self._loop_servers: list[LoopServer] = []
        if control is not None:
            self._loop_servers.append(StatusServer(control, self.snapshot, self,
                                                   self.kernel.monotonic))
        if metrics is not None:
            self._loop_servers.append(MetricsServer(metrics, self, self.kernel.monotonic))
        self._operator_listeners = [(upgrade.CONTROL, control), (upgrade.METRICS, metrics)]
        self.upgrader = Upgrader(self, self.kernel, self.notifier, listeners=self.listeners,
                                 operators=self.operator_listeners(),
                                 pid_file=self.config.pid_file, pid=self.pid)

    @property
    def config(self) -> Config:
        return self.serving.config

    @property
    def access_log(self) -> AccessLog | None:
        return self.serving.access_log

    # ------------------------------------------------------------------ the loop

    def run(self) -> int:
        """Serve until a stop completes; return the exit status. Runs in the master."""
        try:
            with self._signals_installed():
                self._start()
                while not self._finished():
                    self._wait()
                    self._act_on_signals()
                    self._reap()
                    self.checklist.advance()
                    self._tick()
                    self.model.manage()
                    self.update_accepting()
        except BaseException:
            self.checklist.abandon()
            raise
        finally:
            self._close()
        if self._halt is not None:
            log.critical("stopped: %s", self._halt[0])
        killed = ExitCode.KILLED if self.checklist.killed else ExitCode.OK
        status = self._halt[1] if self._halt else killed
        ready.stopped(self.checklist.stop, status, self.checklist.cut())
        return status

    def halt(self, reason: str, status: ExitCode) -> None:
        """The server cannot go on (workers cannot boot): stop gracefully, exit ``status``."""
        if self._halt is None:
            self._halt = (reason, status)
            log.critical("%s", reason)
            self.notifier.status(reason)
        self._begin_stop(fast=False)

    def _start(self) -> None:
        # Everything imported and built so far is shared with every child: freeze it so that a
        # child's garbage collector never writes to those pages (bpo-31558).
        gc.collect()
        gc.freeze()
        for server in self._loop_servers:
            server.start()
        self.model.start()
        names = " ".join(listener.name for listener in self.listeners)
        set_title(f"forkserve: master [{self.model.name}] {names}")
        self.update_accepting()
        operators = self.operator_listeners()
        ready.announce(self.listeners, operators, self.model.name, self.pid)
        self.notifier.ready(f"serving {names} (model={self.model.name})")
        if self._upgrade_ready_fd is not None:
            successor, self._upgrade_ready_fd = self._upgrade_ready_fd, None
            upgrade.announce_ready(successor, [*self.listeners, *(x for _, x in operators)])

    def operator_listeners(self) -> list[tuple[str, Listener]]:
        """The control and metrics sockets, by their names for an upgrade's handover."""
        return [(name, lst) for name, lst in self._operator_listeners if lst is not None]

    def begin_graceful_stop(self, *, handover: bool = False) -> None:
        """``handover``: a new master serves the same sockets now (an upgrade): what the
        kernel has queued is left to it, and systemd is not told the service stops."""
        self._begin_stop(fast=False, handover=handover)

    def _finished(self) -> bool:
        return self.checklist.finished()

    def _wait(self) -> None:
        for key, _ in self.selector.select(self._timeout()):
            if key.data is None:
                self._drain_wakeup()
            elif callable(key.data):
                key.data()  # a model's own fd (the prefork ready pipe)
            elif self._urgent:
                return  # a signal came in (perhaps a stop): act on it before taking more
            elif not self.stopping and self.accepting.active:
                self.model.on_readable(key.data)

    # ------------------------------------------------------------------ status

    def count(self, kind: str, label: str) -> None:
        self.events.count(kind, label)

    def snapshot(self) -> dict[str, Any]:
        """The status of this server now, as the control socket serves it (see ``status``)."""
        now = self.kernel.monotonic()
        model = self.model.status()
        return {
            "pid": self.pid, "model": self.model.name, "version": __version__,
            "uptime_s": round(now - self._started, 3), "generation": model.generation,
            "listeners": [lst.name for lst in self.listeners if lst.sock.fileno() >= 0],
            "connections_total": model.connections_total, "busy": model.busy,
            "idle": model.idle, "capacity": model.capacity,
            "counters": {**self.events.counter_table(),
                         "errors": {"handler": model.handler_errors}},
            "processes": [process_row(slot, now) for slot in model.processes],
            "stress": model.stress, "penalised": self.gate.penalised(now),
        }

    def _tick(self) -> None:
        """Deadlines of the master's helpers: peers of the loop servers, the rules file."""
        now = self.kernel.monotonic()
        for server in self._loop_servers:
            server.tick(now)
        self.gate.tick(now)
        self.heartbeat.tick(now)
        self.upgrader.tick(now)

    def watch(self, fd: int, callback: Callable[[], None], *, write: bool = False) -> None:
        """Call ``callback`` from the loop whenever ``fd`` is readable (or writable)."""
        self.selector.register(fd, selectors.EVENT_WRITE if write else selectors.EVENT_READ,
                               callback)

    def unwatch(self, fd: int) -> None:
        with contextlib.suppress(KeyError, ValueError, OSError):
            self.selector.unregister(fd)

    @property
    def stopping(self) -> bool:
        return self.checklist.stop is not None

    def _timeout(self) -> float | None:
        deadlines = self.checklist.deadlines()
        if (paused := self.accepting.deadline()) is not None and not self.stopping:
            deadlines.append(paused)
        for deadline in (self.model.next_deadline(), self.gate.next_deadline(),
                         self.heartbeat.next_deadline(), self.upgrader.next_deadline(),
                         *(server.next_deadline() for server in self._loop_servers)):
            if deadline is not None:
                deadlines.append(deadline)
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - self.kernel.monotonic())

    def _drain_wakeup(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 4096):
                pass

    # ------------------------------------------------------------------ signals

    @contextlib.contextmanager
    def _signals_installed(self) -> Iterator[None]:
        """Install the table's handlers and the wakeup fd; restore the previous ones after.
        A process that exits once the server has stopped gets handlers that do nothing
        instead: a TERM repeated by an operator while it exits must not turn its status into
        death by that signal (nor TTIN stop it)."""
        previous = {route.signal: signal.signal(route.signal, self._record) for route in SIGNALS}
        old_wakeup = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        try:
            yield
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in previous.items():
                signal.signal(sig, _stopped_already if self._exits_after else handler)

    def _record(self, signum: int, frame: FrameType | None) -> None:
        """The signal handler: record, and nothing else (see the module doc)."""
        self._received.append(signum)
        intent = _INTENTS.get(signum)
        if intent is not Intent.REAP:
            self._urgent = True
        if intent is Intent.GRACEFUL_STOP or intent is Intent.FAST_STOP:
            self.model.interrupt(fast=intent is Intent.FAST_STOP)

    @property
    def handled_signals(self) -> tuple[int, ...]:
        """The signals this master handles (a forked process resets them)."""
        return HANDLED

    def signals_blocked(self) -> SignalsBlocked:
        """Hold the handled signals back around a fork (see ``SignalsBlocked``)."""
        return SignalsBlocked()

    def _act_on_signals(self) -> None:
        """Each intent received, in order, by its step (``_steps``); an intent that makes no
        sense during a stop (``IGNORED_WHILE_STOPPING``) is dropped then."""
        self._urgent = False
        while self._received:
            intent = _INTENTS.get(self._received.popleft())
            step = self._steps.get(intent) if intent is not None else None
            if step is not None and not (self.stopping and intent in IGNORED_WHILE_STOPPING):
                step()

    def _reopen_logs(self) -> None:
        reopen_files(self.access_log)
        self.model.reopen_logs()

    # ------------------------------------------------------------------ reload

    def _reload(self) -> None:
        """Settings and app code again, new processes forked from them (see ``reload``); or
        keep the running ones and say why."""
        self.notifier.reloading()
        outcome = "reload failed: still serving with the running config"
        try:
            if self._apply_reload():
                outcome = "reloaded the config"
        finally:
            self.notifier.ready(outcome)  # systemd's reload ends with READY=1, whatever it was

    def _apply_reload(self) -> bool:
        try:
            new = reload.prepare(self.config, self.serving.app, self.access_log, self._origin,
                                 self.gate.admission)
        except ForkserveError as exc:
            log.error("reload failed, still serving with the running code and config: %s", exc)
            return False
        if new.kept:
            log.warning("reload: %s can only change with a restart; kept the running value",
                        ", ".join(new.kept))
        if new.access_log is not self.access_log and self.access_log is not None:
            self.access_log.close()
        self.serving = Serving(new.config, new.app, new.tls, new.access_log)
        self.gate.replace(new.admission, new.config)
        configure(new.config.log_level, new.config.log_file)
        reload.refreeze()
        log.info("%s; %s", new.summary, self.model.reconfigure(self.serving))
        hooks.call(self.config, "on_reload", self.config)
        return True

    # ------------------------------------------------------------------ children

    def _reap(self) -> None:
        for exited in reap(self.kernel):
            if self.model.on_exit(exited):
                if self.config.child_exit is not None:
                    hooks.call(self.config, "child_exit",
                               ChildExited(exited.pid, exited.describe(), exited.code))
            elif not self.upgrader.on_reaped(exited.pid, exited.describe()):
                log.info("reaped pid %d, which is not one of ours (exit %d)",
                         exited.pid, exited.code)

    def report_abnormal_exit(self, exited: Exited, what: str) -> None:
        if exited.signal is None:
            log.warning("pid %d (%s) exited with status %d", exited.pid, what, exited.code)
            return
        oom = exited.signal == signal.SIGKILL and not self.stopping
        log.warning("pid %d (%s) was killed by %s%s", exited.pid, what, exited.describe(),
                    " (out of memory?)" if oom else "")

    # ------------------------------------------------------------------ accepting

    def update_accepting(self) -> None:
        """Watch the listeners exactly when the model has room and accepting is not paused."""
        self.accepting.update(self.model.accepts and not self.stopping
                              and not (self.model.full and self.config.on_full == "defer"))

    def accept_failed(self, exc: OSError) -> bool:
        return self.accepting.failed(exc)

    def accept_paused(self, code: int, pauses: int = 1, *, by: str = "",
                      pause: float = ACCEPT_PAUSE_SECONDS) -> None:
        self.accepting.paused(code, pauses, by=by, pause=pause)

    def fork_failed(self, exc: OSError, *, refused: bool = True) -> None:
        self.accepting.fork_failed(exc, refused=refused)

    # ------------------------------------------------------------------ stopping

    def _begin_stop(self, *, fast: bool, handover: bool = False) -> None:
        self.checklist.begin(fast=fast, handover=handover, shared=self.upgrader.pending is not None,
                             timeout=self.config.graceful_timeout)

    def note_killed(self, message: str, *, cut: int = 0) -> None:
        """Something had to be killed to stop: say so, and exit 1 at the end."""
        self.checklist.note_killed(message, cut=cut)

    # ------------------------------------------------------------------ cleaning up

    def close_in_child(self, *, worker: bool = False) -> None:
        """In a forked child: close the fds that belong to the master (not the unix files).

        A pre-fork ``worker`` keeps the listeners (it accepts) and the access log (it writes).
        """
        if not worker:
            for listener in self.listeners:
                listener.sock.close()
            if self.access_log is not None:
                self.access_log.close()
        for server in self._loop_servers:
            server.close_in_child()
        self.gate.close_in_child()
        self.model.close_in_child()
        self.notifier.close_in_child()
        self.upgrader.close_in_child()
        if self._upgrade_ready_fd is not None:
            os.close(self._upgrade_ready_fd.fd)
            self._upgrade_ready_fd = None
        self.selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _close(self) -> None:
        if self.config.pid_file is not None:
            pidfile.remove(self.config.pid_file, self.pid)
        for server in self._loop_servers:
            server.close()
        self.gate.close()
        self.notifier.close()
        self.upgrader.close()
        for listener in self.listeners:
            listener.close()
        self.selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        self.model.close()
        if self.access_log is not None:
            self.access_log.close()
