"""What a serving process does with each signal: one table per process role (STYLE rule 5).

The master's own table is ``master.signals.SIGNALS``; this module holds the others, for the
processes that serve connections:

- ``CHILD``: a fork model's per-connection child (``serving.child``);
- ``WORKER``: a prefork worker (``serving.worker``);
- ``HYBRID``: a hybrid worker (``serving.aio_worker``): its event loop runs most steps as
  the loop's callbacks (``install_on_loop``);
- ``PROGRAM``: an exec program's child between fork and ``execve`` (``apps.exec``): every
  signal at its default, so the program starts as inetd or tcpserver would start it;
- ``SINGLE``: the single model, which serves in the master: the master's table, plus the
  timer that ends a handler outliving a stop (``models.single``).

Each row names a signal, the ``Step`` it triggers and a doc line. ``install`` drives the
installation from a table and a map from step to handler: ``DEFAULT`` and ``IGNORE`` need no
handler; any other step must have one (a missing one is a bug, raised at once). The README's
signal section is generated from these tables and the master's (``signal_tables``).

Handlers in serving processes record, or make at most a couple of system calls on the
connection being served (``Connection.interrupt``, ``setitimer``): they have no loop to
record into (see ``serving.child``, rule 3). Runs in the serving process (or, for
``SINGLE``, in the master).
"""

from __future__ import annotations

import enum
import signal
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import FrameType
from typing import Any, Protocol

from ..kernel import SIG_DFL, SIG_IGN, set_handler

#: The master's word to serving processes: "the stress mode changed, look at your deadlines
#: again" (``defence``). Harmless when an operator sends SIGUSR2 (upgrade) to the whole group.
LOOK_AGAIN = signal.SIGUSR2
#: Sent to a serving process whose unproven connection must give way (``sourceguard``).
DROP_UNPROVEN = signal.SIGWINCH
#: From the master (or the whole group): a prefork worker reopens its access log.
REOPEN = signal.SIGUSR1

Handler = Callable[[int, FrameType | None], object]


class Step(enum.Enum):
    """What a serving process does on a signal."""

    FINISH = "finish"
    QUIT = "exit at once"
    LOOK_AGAIN = "look at the deadlines again"
    GIVE_WAY = "give way"
    REOPEN = "reopen the access log"
    DEADLINE = "end the handler"
    IGNORE = "ignore"
    DEFAULT = "default action"

    #: Members are singletons and compare by identity: hash them so too, in C. (Enum's own
    #: ``__hash__`` is Python code, run for each row a child installs: pages it copies.)
    __hash__ = object.__hash__


@dataclass(frozen=True)
class Row:
    """One row of a role's table: a signal, its step, and the README's line for it."""

    signal: signal.Signals
    step: Step
    doc: str


_FINISH = ("Finish: answer the requests received whole, then close; an incomplete one gets "
           "`STOP_GRACE` (none for an orphan). A timer of `graceful_timeout` plus a margin "
           "ends a handler that will not finish.")
_QUIT = "Exit at once (a fast stop), without a core dump."
_LOOK_AGAIN = "The stress mode changed: look at the connection's deadlines again."
_GIVE_WAY = ("A newcomer needs this slot: a client that has not proven itself (no whole first "
             "line yet) is closed now.")
_GROUP = "Meant for the master (sent to the whole process group): ignored."

#: A fork model's per-connection child. The master's other signals are at their defaults.
CHILD: tuple[Row, ...] = (
    Row(signal.SIGTERM, Step.FINISH, _FINISH),
    Row(signal.SIGINT, Step.FINISH, "Same as TERM."),
    Row(signal.SIGQUIT, Step.QUIT, _QUIT),
    Row(signal.SIGHUP, Step.IGNORE, _GROUP),
    Row(signal.SIGUSR1, Step.IGNORE, _GROUP),
    Row(LOOK_AGAIN, Step.LOOK_AGAIN, _LOOK_AGAIN),
    Row(DROP_UNPROVEN, Step.GIVE_WAY, _GIVE_WAY),
    Row(signal.SIGALRM, Step.DEFAULT,
        "The backstop timer (`max_connection_time`, a stop's deadline): the child ends."),
)

#: A prefork worker. The master's other signals are at their defaults.
WORKER: tuple[Row, ...] = (
    Row(signal.SIGTERM, Step.FINISH,
        "Finish the connection in service (as a child does), then exit; an idle worker at a "
        "stop of the whole server first serves what is queued on the listeners."),
    Row(signal.SIGINT, Step.FINISH, "Same as TERM."),
    Row(signal.SIGQUIT, Step.QUIT, _QUIT),
    Row(signal.SIGHUP, Step.IGNORE, _GROUP),
    Row(signal.SIGTTIN, Step.IGNORE, _GROUP),
    Row(signal.SIGTTOU, Step.IGNORE, _GROUP),
    Row(REOPEN, Step.REOPEN,
        "Reopen the access log, after the connection in service (the master sends it on "
        "`reopen`)."),
    Row(LOOK_AGAIN, Step.LOOK_AGAIN, _LOOK_AGAIN),
    Row(DROP_UNPROVEN, Step.GIVE_WAY, _GIVE_WAY),
    Row(signal.SIGALRM, Step.DEFAULT,
        "The backstop timer (`max_connection_time`, a stop's deadline): the worker ends."),
    Row(signal.SIGABRT, Step.DEFAULT,
        "From the master's watchdog: print the Python stack (faulthandler) and end."),
)

#: A hybrid worker: one event loop over many connections. The master's other signals are at
#: their defaults.
HYBRID: tuple[Row, ...] = (
    Row(signal.SIGTERM, Step.FINISH,
        "Stop accepting, then finish every connection: idle ones close at once, a request in "
        "flight is answered (an incomplete one gets `STOP_GRACE`), within `graceful_timeout`; "
        "then exit. At a stop of the whole server it first takes what is queued on the "
        "listeners."),
    Row(signal.SIGINT, Step.FINISH, "Same as TERM."),
    Row(signal.SIGQUIT, Step.QUIT, _QUIT),
    Row(signal.SIGHUP, Step.IGNORE, _GROUP),
    Row(signal.SIGTTIN, Step.IGNORE, _GROUP),
    Row(signal.SIGTTOU, Step.IGNORE, _GROUP),
    Row(REOPEN, Step.REOPEN, "Reopen the access log (the master sends it on `reopen`)."),
    Row(LOOK_AGAIN, Step.LOOK_AGAIN,
        "The stress mode changed: every connection that waits for its client looks at its "
        "deadline again."),
    Row(DROP_UNPROVEN, Step.GIVE_WAY,
        "A newcomer took the place of some of this worker's clients that have not proven "
        "themselves yet: their input ends now."),
    Row(signal.SIGALRM, Step.DEFAULT,
        "At its default: the worker sets no timer (its deadlines are the loop's)."),
    Row(signal.SIGABRT, Step.DEFAULT,
        "From the master's watchdog (the loop blocked for `timeout`): print every thread's "
        "Python stack (faulthandler) and end."),
)

#: An exec program's child, from the fork to ``execve``: every signal at its default and the
#: mask empty at ``execve`` (installed by ``apps.exec``, its rule 2, for every signal).
PROGRAM: tuple[Row, ...] = (
    Row(signal.SIGTERM, Step.DEFAULT,
        "At its default, as every signal: the program gets one TERM at a stop (as inetd "
        "sends), and one from the kernel when the master dies."),
    Row(signal.SIGPIPE, Step.DEFAULT,
        "At its default, not ignored as in Python: `yes` piped into `head -1` ends."),
)

#: The single model serves in the master: the master's table applies, and a stop's handler
#: tells the connection in service to finish (``Model.interrupt``); this row is its own.
SINGLE: tuple[Row, ...] = (
    Row(signal.SIGALRM, Step.DEADLINE,
        "A stop's deadline passed (`graceful_timeout`; 1 s for QUIT) with the handler still "
        "running: end it (exit 1); a handler that swallows that is ended 1 s later."),
)

#: The tables by role, in the order the README shows them.
ROLES: dict[str, tuple[Row, ...]] = {
    "fork child": CHILD, "prefork worker": WORKER, "hybrid worker": HYBRID,
    "exec program": PROGRAM,
    "single model (in the master)": SINGLE,
}


def install(table: tuple[Row, ...], handlers: Mapping[Step, Handler]) -> dict[int, object]:
    """Install ``table``: each row's step, from ``handlers`` (``DEFAULT`` and ``IGNORE`` need
    none); return the handlers replaced (for ``restore``). Uses ``kernel.set_handler``: no
    enum conversion on a child's path."""
    previous = {}
    for row in table:
        if row.step is Step.DEFAULT:
            handler: Handler | int = SIG_DFL
        elif row.step is Step.IGNORE:
            handler = SIG_IGN
        else:
            handler = handlers[row.step]
        previous[int(row.signal)] = set_handler(row.signal, handler)
    return previous


class SignalLoop(Protocol):
    """What ``install_on_loop`` needs of an event loop (asyncio's, uvloop's)."""

    def add_signal_handler(self, sig: int, callback: Callable[..., object],
                           *args: Any) -> None: ...


def install_on_loop(table: tuple[Row, ...], loop: SignalLoop,
                    on_loop: Mapping[Step, Callable[[], object]],
                    handlers: Mapping[Step, Handler]) -> dict[int, object]:
    """Install ``table`` in a process with an event loop: the steps in ``on_loop`` become the
    loop's callbacks (``add_signal_handler``: the loop's wakeup fd records the signal and the
    callback runs on the loop, rule 4); the others as ``install`` does, from ``handlers``.
    Returns what ``install`` replaced (for ``restore``; the loop's own are removed with
    ``remove_signal_handler``)."""
    for row in table:
        if row.step in on_loop:
            loop.add_signal_handler(row.signal, on_loop[row.step])
    return install(tuple(row for row in table if row.step not in on_loop), handlers)


def restore(previous: Mapping[int, object]) -> None:
    """Put back the handlers ``install`` replaced (STYLE rule 16: restore what you change)."""
    for sig, handler in previous.items():
        set_handler(sig, handler if callable(handler) or isinstance(handler, int) else SIG_DFL)


def reset(signals: Iterable[int]) -> None:
    """Put ``signals`` (the master's, inherited over fork) back at their defaults."""
    for sig in signals:
        set_handler(sig, SIG_DFL)


def look_again(signum: int, frame: object) -> None:
    """LOOK_AGAIN from the master: the stress mode changed. The signal has already woken any
    wait on the client (its wakeup pipe), which looks at its deadline again."""


def role_tables() -> str:
    """The README's tables of the serving processes' signals, one per role (``ROLES``)."""
    rows = ["| process | signal | what it does |", "|---|---|---|"]
    for role, table in ROLES.items():
        rows += [f"| {role} | `{row.signal.name}` | {row.doc} |" for row in table]
    return "\n".join(rows) + "\n"
