"""Models decide how connections meet processes; the supervisor does everything else.

Every model implements ``Model``. The supervisor owns the listeners, the signals, reaping and
the stop checklist; it calls the model when a listener is readable (``on_readable``), when a
child has been reaped (``on_exit``), and asks it which processes to signal on a stop
(``pids``). Adding a model is one class here and one name in ``config.MODELS``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from ..ops.scoreboard import Slot

log = logging.getLogger("forkserve")

if TYPE_CHECKING:
    from ..kernel import Exited
    from ..master.listeners import Listener
    from ..master.supervisor import Supervisor


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


class WithoutPool:
    """The pool operations of ``Model`` for models that keep no pool (fork, single)."""

    sup: Supervisor
    ends_on_sigterm = False

    def manage(self) -> None:
        pass  # nothing to keep up between events

    def next_deadline(self) -> float | None:
        return None

    def scale(self, delta: int) -> None:
        log.info("TTIN/TTOU: only the prefork model has a pool to scale")

    def drain(self, listener: Listener) -> None:
        pass  # the single model serves in the master: it cannot take more without waiting

    def close_in_child(self) -> None:
        pass  # nothing of the model's own to close in a child

    def pending(self) -> int:
        return 0

    def signal(self, pid: int, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.sup.kernel.kill(pid, sig)

    def reopen_logs(self) -> None:
        pass  # the master writes every access-log line of these models itself


class Model(Protocol):
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

    def drain(self, listener: Listener) -> None:
        """A graceful stop is about to close ``listener``: serve what is queued on it, if
        this model can without waiting (the fork model forks for it)."""

    def close_in_child(self) -> None:
        """In a forked child: close the model's own fds (the supervisor closes the rest)."""

    def pending(self) -> int:
        """Connections held that no process serves yet (the fork model's PROXY headers being
        read): a stop waits for them too."""

    def start(self) -> None:
        """Called once in the master before the first accept."""

    def reconfigure(self) -> str:
        """The supervisor's ``config`` and ``app`` were reloaded: fork from them from now on.
        Returns what happens now, for the reload's log line."""

    def manage(self) -> None:
        """Called after every turn of the master's loop: keep the processes up to target."""

    def next_deadline(self) -> float | None:
        """The monotonic time at which ``manage`` has something to do, if any."""

    def scale(self, delta: int) -> None:
        """TTIN (+1) or TTOU (-1)."""

    def on_readable(self, listener: Listener) -> None:
        """``listener`` has connections waiting: take what the model can."""

    def on_exit(self, exited: Exited) -> bool:
        """A child was reaped; return False if it was not this model's."""

    def interrupt(self, fast: bool) -> None:
        """A stop was asked for. Called from the signal handler: at most a couple of system
        calls on a connection served in this process, no locks, no logging."""

    def pids(self) -> Collection[int]:
        """Processes that a stop must wait for (and may have to kill)."""

    def signal(self, pid: int, sig: int) -> None:
        """Send a stop's ``sig`` to the process ``pid`` (exec: to its process group)."""

    def reopen_logs(self) -> None:
        """USR1: the master has reopened its log files; processes that write their own
        reopen theirs (prefork workers: the access log)."""

    def status(self) -> ModelStatus:
        """The model's figures now (read from the scoreboard; no system call)."""

    def close(self) -> None:
        """Release what the model holds; called once, after the last child is reaped."""


def create(name: str, supervisor: Supervisor) -> Model:
    """The model called ``name`` (a checked ``Config.model``).

    An exec ``Program`` in place of the app runs under the fork model only (``forkserve
    exec``); raises ``ConfigError`` for another model.
    """
    if isinstance(supervisor.app, Program):
        check_model(name)
        if supervisor.tls is not None:
            raise ConfigError("certfile", "exec hands the program the raw socket, so it "
                                          "cannot speak TLS for it; put a TLS terminator "
                                          "(HAProxy, stunnel) in front")
        return ExecModel(supervisor)
    return _MODELS[name](supervisor)


from ..apps.exec import Program, check_model  # noqa: E402
from ..errors import ConfigError  # noqa: E402
from .fork import ForkModel  # noqa: E402  (the models need the protocol above)
from .fork_exec import ExecModel  # noqa: E402
from .prefork import PreforkModel  # noqa: E402
from .single import SingleModel  # noqa: E402

_MODELS: dict[str, Callable[[Supervisor], Model]] = {
    "fork": ForkModel, "single": SingleModel, "prefork": PreforkModel,
}
