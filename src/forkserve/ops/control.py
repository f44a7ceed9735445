"""``forkserve signal VERB``: send a running master the signal for a verb of the signal table.

A pid names whatever process has it now: after a crash, a stale pid file or a typo names
some other program, and ``kill`` would stop it. So the target is checked first, and the
signal goes through a pidfd (``os.pidfd_open``, ``signal.pidfd_send_signal``): the fd names
one process for good, so the checks and the signal are about the same process even if the
pid is reused in between. The checks: the process is a forkserve master (its title
``forkserve: master ...``, or a command line that runs ``forkserve serve`` or ``exec``), and
with a pid file, it started when the file says its writer started (``pidfile``). Anything
else is refused with one line, before any signal is sent.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator

from ..errors import ForkserveError
from ..master.signals import SIGNALS
from . import pidfile

#: verb -> signal, from the one signal table.
VERBS = {route.verb: route.signal for route in SIGNALS if route.verb}
#: The master's process title (``child.set_title``, with setproctitle installed).
MASTER_TITLE = "forkserve: master"
#: Commands whose process is a master, as they appear in its command line.
SERVING_COMMANDS = frozenset({"serve", "exec"})


class SignalFailed(ForkserveError):
    """The signal could not be sent, or was refused; the message says why in one line."""


def read_pid(pid_file: str) -> tuple[int, int | None]:
    try:
        return pidfile.read_record(pid_file)
    except OSError as exc:
        raise SignalFailed(f"cannot read the pid file {pid_file}: {exc.strerror}") from None
    except ValueError as exc:
        raise SignalFailed(f"the pid file {pid_file} does not hold a pid: {exc}") from None


def is_master(argv: list[str]) -> bool:
    """Whether a command line (``/proc/PID/cmdline``, split) is a forkserve master's."""
    if argv and argv[0].startswith(MASTER_TITLE):
        return True
    for index, word in enumerate(argv):
        name = os.path.basename(word)
        if name == "forkserve" or (word == "forkserve" and argv[index - 1:index] == ["-m"]):
            return any(arg in SERVING_COMMANDS for arg in argv[index + 1:index + 2])
    return False


@contextlib.contextmanager
def _pidfd(pid: int, where: str) -> Iterator[int]:
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        raise SignalFailed(f"no process {pid}{where}") from None
    try:
        yield fd
    finally:
        os.close(fd)


def _check(pid: int, start: int | None, pid_file: str | None) -> None:
    """Refuse a ``pid`` that is not the forkserve master named (see the module doc)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            argv = fh.read().decode(errors="replace").split("\0")
        started = pidfile.start_time(pid)
    except OSError:
        raise SignalFailed(f"no process {pid}") from None
    if start is not None and started != start:
        raise SignalFailed(f"process {pid} is not the master that wrote {pid_file} (it "
                           "started later: the file is stale); nothing sent")
    if not is_master([word for word in argv if word]):
        raise SignalFailed(f"process {pid} is not a forkserve master "
                           f"({' '.join(argv).strip()[:60]!r}); nothing sent")


def send(verb: str, *, pid_file: str | None = None, pid: int | None = None) -> int:
    """Send ``verb``'s signal to the master named by ``pid`` or ``pid_file``; return its pid.
    Raises ``SignalFailed`` when the target is gone, is not that master, or refuses."""
    sig = VERBS[verb]
    start = None
    if pid is None:
        if pid_file is None:
            raise SignalFailed("say which server: --pid-file FILE or --pid PID")
        pid, start = read_pid(pid_file)
    where = f" (stale pid file {pid_file}?)" if pid_file else ""
    with _pidfd(pid, where) as fd:
        _check(pid, start, pid_file)
        try:
            # the fd still names the process checked: had it ended, this would fail
            signal.pidfd_send_signal(fd, sig)
        except ProcessLookupError:
            raise SignalFailed(f"process {pid} ended before the signal{where}") from None
        except PermissionError:
            raise SignalFailed(f"not allowed to signal process {pid}") from None
    return pid
