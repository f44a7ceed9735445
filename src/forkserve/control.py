"""``forkserve signal VERB``: send a running master the signal for a verb of the signal table."""

from __future__ import annotations

import os

from . import pidfile
from .errors import ForkserveError
from .signals import SIGNALS

#: verb -> signal, from the one signal table.
VERBS = {route.verb: route.signal for route in SIGNALS if route.verb}


class SignalFailed(ForkserveError):
    """The signal could not be sent; the message says why in one line."""


def read_pid(pid_file: str) -> int:
    try:
        return pidfile.read(pid_file)
    except OSError as exc:
        raise SignalFailed(f"cannot read the pid file {pid_file}: {exc.strerror}") from None
    except ValueError as exc:
        raise SignalFailed(f"the pid file {pid_file} does not hold a pid: {exc}") from None


def send(verb: str, *, pid_file: str | None = None, pid: int | None = None) -> int:
    """Send ``verb``'s signal to the master named by ``pid`` or ``pid_file``; return its pid."""
    sig = VERBS[verb]
    if pid is None:
        if pid_file is None:
            raise SignalFailed("say which server: --pid-file FILE or --pid PID")
        pid = read_pid(pid_file)
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        where = f" (stale pid file {pid_file}?)" if pid_file else ""
        raise SignalFailed(f"no process {pid}{where}") from None
    except PermissionError:
        raise SignalFailed(f"not allowed to signal process {pid}") from None
    return pid
