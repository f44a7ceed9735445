"""The master's signals: one table (STYLE rules 4 and 5) that drives installation, dispatch,
the `forkserve signal` verbs and the README's table."""

from __future__ import annotations

import enum
import signal
from dataclasses import dataclass

from ..kernel import pthread_sigmask
from .reload import RESTART_ONLY


class Intent(enum.Enum):
    GRACEFUL_STOP = "graceful stop"
    FAST_STOP = "fast stop"
    RELOAD = "reload"
    MORE = "one worker more"
    FEWER = "one worker fewer"
    REAP = "reap children"
    REOPEN_LOGS = "reopen log files"
    UPGRADE = "upgrade"


@dataclass(frozen=True)
class SignalRoute:
    """One row of the signal table: a signal, what it means, its CLI verb and its doc line."""

    signal: signal.Signals
    intent: Intent
    verb: str | None
    doc: str


SIGNALS: tuple[SignalRoute, ...] = (
    SignalRoute(signal.SIGTERM, Intent.GRACEFUL_STOP, "stop",
                "Graceful stop: refuse new connections, let those in flight finish up to "
                "`graceful_timeout`, then kill what is left (exit 1 if anything was killed)."),
    SignalRoute(signal.SIGINT, Intent.GRACEFUL_STOP, None, "Same as TERM (Ctrl-C)."),
    SignalRoute(signal.SIGQUIT, Intent.FAST_STOP, "quit",
                "Fast stop: kill every child at once and exit."),
    SignalRoute(signal.SIGHUP, Intent.RELOAD, "reload",
                "Reload, always, with or without a config file: re-read the file if there is "
                "one (else reuse the settings given at start), import the app's code again in "
                "the master (its package, its hooks' modules and the `.py` modules under the "
                "app directory; not built-in apps, an app object given to `serve()` or an "
                "`exec` program), and fork from them: prefork starts a new generation of "
                "workers and retires an old worker as each new one is ready; fork and single "
                "serve the next connections with them; connections in flight finish on the "
                "old code. The master always preloads the app (there is no `--preload` "
                "switch), so a file that does not validate or a new version that fails to "
                "import changes nothing: the old processes keep serving and the log says why "
                "in one line. "
                + ", ".join(f"`{name}`" for name in RESTART_ONLY) + " need a restart."),
    SignalRoute(signal.SIGTTIN, Intent.MORE, "more",
                "prefork: one worker more (up to `max_workers`)."),
    SignalRoute(signal.SIGTTOU, Intent.FEWER, "fewer",
                "prefork: one worker fewer (never below 1); the one retired finishes its "
                "connection first."),
    SignalRoute(signal.SIGUSR1, Intent.REOPEN_LOGS, "reopen",
                "Reopen the log file (`log_file`) and the access log file (after log rotation)."),
    SignalRoute(signal.SIGUSR2, Intent.UPGRADE, "upgrade",
                "Zero-downtime upgrade: start a new master (new code, same command line) on "
                "the same listening sockets; once it serves, this one stops gracefully."),
    SignalRoute(signal.SIGCHLD, Intent.REAP, None, "A child ended: reap it (internal)."),
)
_INTENTS = {route.signal.value: route.intent for route in SIGNALS}
#: Intents dropped once a stop has begun: a reload, a resize or an upgrade would fork new
#: processes that the stop would then have to wait for (or kill). Stops and USR1 still act.
IGNORED_WHILE_STOPPING = frozenset({Intent.RELOAD, Intent.MORE, Intent.FEWER, Intent.UPGRADE})


def signal_table() -> str:
    """The signals table of the README, generated from ``SIGNALS``."""
    rows = ["| signal | `forkserve signal` verb | meaning |", "|---|---|---|"]
    rows += [f"| `{route.signal.name}` | {f'`{route.verb}`' if route.verb else ''} | "
             f"{route.doc} |" for route in SIGNALS]
    return "\n".join(rows) + "\n"


#: The signals the master handles, as numbers.
HANDLED = tuple(route.signal.value for route in SIGNALS)


class SignalsBlocked:
    """``with SignalsBlocked(): fork()``: the master's handled signals are blocked inside.

    A signal that arrived in a new child before it reset its dispositions would run the
    master's handler there and be lost for the child; blocked, it stays pending until the
    child has installed its own handlers and cleared the mask. A plain class over
    ``kernel.pthread_sigmask``: ``signal.pthread_sigmask`` turns each number of the old mask
    into an enum member, and every object the master touches right after a fork costs it a
    copy-on-write page fault while the child shares the page (see docs/benchmarks.md).
    """

    __slots__ = ("_previous",)

    def __enter__(self) -> None:
        self._previous = pthread_sigmask(signal.SIG_BLOCK, HANDLED)

    def __exit__(self, *exc: object) -> None:
        pthread_sigmask(signal.SIG_SETMASK, self._previous)
