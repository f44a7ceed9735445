"""The host interface: what the master gives a model, and what a model answers.

This module is the one place that says how a model meets the master (DESIGN decision 17). A
model never sees the supervisor: it is built from explicit parts, reports its events through
``Host`` (a small protocol the master implements), and answers the master's calls through
``Model``. Nothing here imports the master's loop, so a model cannot reach into it.

What the master gives a model (its constructor's parameters)
------------------------------------------------------------
Each model's constructor names the parts it uses, as keyword parameters; the master hands
them over as one ``Parts`` bundle to ``models.create``, which passes each model its own.

- ``serving``: what serving processes are made from, the ``Serving`` bundle: the checked
  ``Config``, the app (or an exec ``Program``), the TLS context and the access log. A reload
  replaces it as a whole (``Model.reconfigure``); a model keeps the bundle it was given, and
  reads no setting from anywhere else.
- ``kernel``: the seam for fork, kill and the clock (``kernel.Kernel``; the tests' fake
  kernel runs models on a virtual clock). A model forks, signals and reads the time through it.
- ``listeners``: the bound listening sockets (the master owns and closes them); only a model
  whose own processes accept needs them (prefork).
- ``gate``: admission (``master.gate.Gate``): admit, refuse, release, penalise.
- ``host``: the ``Host`` below: the loop's services and the events a model reports.

What a model must answer: ``Model``
-----------------------------------
``Model`` lists every call, with the process it runs in. Every call runs in the master, in its
one loop (never in a signal handler), except:

- ``interrupt``: in the master's signal handler (a couple of system calls, no locks, no log);
- ``close_in_child``: in a freshly forked process, before it does anything else;
- whatever a model forks runs in the child and must end in ``os._exit`` (``serving.child``).

The master's loop calls, each turn: ``on_readable`` for a readable listener while ``accepts``
and not ``full``; ``on_exit`` for every reaped pid until one model claims it; ``manage``
after the events; ``next_deadline`` to bound its wait. A stop (``master.stopping``) calls
``drain`` for each listener before it closes it, then signals ``pids()`` through ``signal``
until ``pids()`` and ``pending()`` are empty; ``close`` comes last.

Who forks what
--------------
The interface does not assume that the master forks the serving processes itself:

- fork, exec, prefork: the master forks (``kernel.fork`` inside ``host.signals_blocked()``;
  the child calls ``host.close_in_child`` first). ``pids()`` are the master's children.
- a zygote (issue 16): the model starts one small process and either hands it each accepted
  socket (``accepts`` True, ``on_readable`` accepts and passes the socket on) or lets it
  accept (``accepts`` False). ``pids()`` and ``on_exit`` are the zygote's; the children it
  forks are reported to the model over a pipe that the model watches (``host.watch``), and
  a stop reaches them through the model's ``signal``. The access log and the scoreboard work
  as in the fork model.
- hybrid (issue 17): a pool like prefork's, each worker an event loop: the same calls as
  prefork; ``status`` counts connections per worker from the scoreboard.

Adding a model
--------------
One class that implements ``Model``, in its own module under ``models/``, whose constructor
takes ``serving`` and, as keyword parameters, the parts it uses; a factory from ``Parts`` under
its name in ``models.MODELS``, and the name in ``config.MODELS``. It imports from
here, ``kernel``, ``serving``, ``protocol``, ``ops`` and the master's helpers (``gate``,
``listeners``), never ``master.supervisor``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Collection, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Protocol

from ..apps import App
from ..config import Config
from ..errors import ExitCode
from ..kernel import Exited, Kernel
from ..master.gate import Gate
from ..master.listeners import Listener
from ..ops.logs import AccessLog
from ..ops.scoreboard import Slot
from ..serving.accept import ACCEPT_PAUSE_SECONDS

if TYPE_CHECKING:
    import ssl  # only with TLS on: the module costs a forking master 6 MB

log = logging.getLogger("forkserve")


@dataclass(frozen=True)
class Serving:
    """What serving processes are made from. A reload makes a new one (``reconfigure``)."""

    config: Config
    #: The handler, or an exec ``Program`` (the fork model only).
    app: App
    #: The TLS context (made before privileges were dropped), or None.
    tls: ssl.SSLContext | None = None
    #: The access log, or None; the master owns it (closes and reopens it).
    access_log: AccessLog | None = None

    def with_config(self, config: Config) -> Serving:
        return replace(self, config=config)


class Host(Protocol):
    """What the master does for a model. Every method runs in the master's loop, except
    ``close_in_child`` (in a new child) and ``stopping`` (readable anywhere in the master)."""

    #: The master's pid: a serving process compares its parent's with it (an orphan stops).
    @property
    def pid(self) -> int: ...

    #: The signals whose handlers a forked process must reset (the master's).
    @property
    def handled_signals(self) -> tuple[int, ...]: ...

    #: True once a stop has begun: a model forks no new process then.
    @property
    def stopping(self) -> bool: ...

    def watch(self, fd: int, callback: Callable[[], None], *, write: bool = False) -> None:
        """Call ``callback`` from the loop whenever ``fd`` is readable (or writable)."""

    def unwatch(self, fd: int) -> None:
        """Stop watching ``fd`` (before it is closed). Idempotent."""

    def update_accepting(self) -> None:
        """The model's room (``full``) changed: watch the listeners again, or stop."""

    def signals_blocked(self) -> AbstractContextManager[None]:
        """``with host.signals_blocked(): kernel.fork()``: the master's signals stay pending
        in the child until it has installed its own."""

    def close_in_child(self, *, worker: bool = False) -> None:
        """In a forked child: close the master's fds (a pre-fork ``worker`` keeps the
        listeners and the access log)."""

    def accept_failed(self, exc: OSError) -> bool:
        """accept() failed in the master: skip, or pause accepting (True: stop taking)."""

    def accept_paused(self, code: int, pauses: int = 1, *, by: str = "",
                      pause: float = ACCEPT_PAUSE_SECONDS) -> None:
        """Serving processes paused their accepts ``pauses`` times after errno ``code``:
        count and report it through the master's one rate limiter."""

    def fork_failed(self, exc: OSError, *, refused: bool = True) -> None:
        """fork() failed: count and report it; ``refused``: a client was closed for it and
        accepting pauses (else the model retries on its own)."""

    def count(self, kind: str, label: str) -> None:
        """One event for the status view and the metrics (``kind``, ``label``)."""

    def report_abnormal_exit(self, exited: Exited, what: str) -> None:
        """Log an unexpected exit of ``what`` (a signal: killed; else its status)."""

    def note_killed(self, message: str, *, cut: int = 0) -> None:
        """Something had to be killed to stop: the master logs it and exits 1. ``cut``: the
        connections cut in the master itself (the single model's), for the last log line."""

    def halt(self, reason: str, status: ExitCode) -> None:
        """The model cannot go on (workers cannot boot): stop gracefully, exit ``status``."""


@dataclass(frozen=True)
class Parts:
    """Everything the master offers a model (see the module doc): ``models.create`` passes
    each model the parts its constructor names."""

    serving: Serving
    host: Host
    kernel: Kernel
    listeners: Sequence[Listener]
    gate: Gate


@dataclass
class ModelStatus:
    """What a model says about itself for the status view and the metrics."""

    capacity: int
    busy: int
    #: Processes waiting for a connection (prefork); ``None`` where the idea does not apply.
    idle: int | None
    #: Connections served or being served since start.
    connections_total: int
    generation: int = 0
    processes: list[Slot] = field(default_factory=list)
    #: Connections whose handler raised, since start.
    handler_errors: int = 0
    #: Under stress now (``defence``: the deadlines of waiting connections shrink).
    stress: bool = False


class Model(Protocol):
    """What the master asks of a model. Runs in the master unless said otherwise."""

    name: str
    #: Whether the master accepts connections (fork, single) or the workers do (prefork).
    accepts: bool
    #: Whether a stop repeats SIGTERM to its processes until they are gone: they run
    #: forkserve's own code, whose handler a SIGTERM can miss for a while
    #: (``child.STOP_REMINDER``). Not for programs (exec), which get one, as inetd sends.
    remind_stop: bool
    #: Whether SIGTERM ends its processes outright (exec programs) rather than asking them to
    #: finish (forkserve's own): an upgrade's handover then leaves them to end on their own.
    ends_on_sigterm: bool

    @property
    def full(self) -> bool:
        """True while the model can take no more connections (accepting pauses)."""

    def start(self) -> None:
        """Called once, before the first accept (prefork forks its pool here)."""

    def reconfigure(self, serving: Serving) -> str:
        """A reload: fork from ``serving`` from now on. Returns what happens now, for the
        reload's log line."""

    def on_readable(self, listener: Listener) -> None:
        """``listener`` has connections waiting: take what the model can."""

    def on_exit(self, exited: Exited) -> bool:
        """A child was reaped; return False if it was not this model's."""

    def manage(self) -> None:
        """After every turn of the master's loop: keep the processes up to target."""

    def next_deadline(self) -> float | None:
        """The monotonic time at which ``manage`` has something to do, if any."""

    def scale(self, delta: int) -> None:
        """TTIN (+1) or TTOU (-1)."""

    def drain(self, listener: Listener) -> bool:
        """A graceful stop is about to close ``listener``: serve what is queued on it, if
        this model can without waiting (the fork model forks for it). True if clients may
        still wait that it could serve once it has room (the fork model at ``max_children``):
        the stop then keeps ``listener`` open a while and calls this again as processes end,
        then closes it."""

    def listeners_closed(self) -> None:
        """Every listener of the stop is closed (at once, or once those a ``drain`` kept are
        done): no connection will come any more (the fork model retires its zygote). Once
        per stop, after ``stop_begun``."""

    def stop_begun(self, sig: int | None) -> None:
        """A stop has closed the listeners, but those a ``drain`` keeps open (on a handover
        too), and sends every process ``sig`` (None: nothing, on an upgrade's handover of
        exec programs). A process that starts from now on is sent ``sig`` too. Called again
        with SIGKILL when a fast stop overtakes a graceful one."""

    def interrupt(self, fast: bool) -> None:
        """A stop was asked for. Called from the master's signal handler: at most a couple
        of system calls on a connection served in this process, no locks, no logging."""

    def pids(self) -> Collection[int]:
        """Processes that a stop must wait for (and may have to kill)."""

    def pending(self) -> int:
        """Connections held that no process serves yet (the fork model's PROXY headers being
        read): a stop waits for them too."""

    def signal(self, pid: int, sig: int) -> None:
        """Send a stop's ``sig`` to the process ``pid`` (exec: to its process group)."""

    def reopen_logs(self) -> None:
        """USR1: the master has reopened its log files; processes that write their own
        reopen theirs (prefork workers: the access log)."""

    def status(self) -> ModelStatus:
        """The model's figures now (read from the scoreboard; no system call)."""

    def close_in_child(self) -> None:
        """In a forked child: close the model's own fds (the master closes the rest)."""

    def close(self) -> None:
        """Release what the model holds; called once, after the last child is reaped."""


class WithoutPool:
    """The pool operations of ``Model`` for models that keep no pool (fork, single)."""

    kernel: Kernel
    ends_on_sigterm = False

    def manage(self) -> None:
        pass  # nothing to keep up between events

    def next_deadline(self) -> float | None:
        return None

    def scale(self, delta: int) -> None:
        log.info("TTIN/TTOU: only the prefork model has a pool to scale")

    def drain(self, listener: Listener) -> bool:
        return False  # (the fork and single models serve them: see theirs)

    def listeners_closed(self) -> None:
        pass

    def stop_begun(self, sig: int | None) -> None:
        pass  # no process starts but by the master's own hand

    def close_in_child(self) -> None:
        pass  # nothing of the model's own to close in a child

    def pending(self) -> int:
        return 0

    def signal(self, pid: int, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.kernel.kill(pid, sig)

    def reopen_logs(self) -> None:
        pass  # their access-log lines are written in the master, which reopened the file


#: How a model is made (every model's class is one).
Factory = Callable[[Parts], Model]
