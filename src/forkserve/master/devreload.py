"""``--reload``: a development reload when the app's source files change.

Theory of operation
-------------------
The master must stay single-threaded and block only in its selector, and ``watchfiles``
(the optional ``reload`` extra, the library uvicorn uses) watches from a thread. So the
watching happens in a small process of its own: the master spawns ``python -m
forkserve._watcher`` (``posix_spawn``: a fresh interpreter, nothing of the master's state
copied, no fork of a process with threads), handing it the write end of a pipe. Each batch of
changes to ``.py`` files under the watched directories is one line on the pipe (the first
file changed). The master watches the read end in its loop, and on a line it sends itself
SIGHUP: a change does exactly what ``forkserve signal reload`` does (``reload``: the app's
code imported again in the master, the workers or the next children forked from it; a
broken new version changes nothing and the log says why).

Rejected: ``watchfiles.watch`` in a master thread (a forking master with threads); polling
the files from the master's loop by hand (a wake-up every interval, and what watchfiles does
better); the watcher signalling the master itself (a SIGHUP that arrives before the master's
handlers are installed would end it, and a pid can be reused).

Lifetime: the watcher asks the kernel for SIGTERM when the master ends (``PR_SET_PDEATHSIG``)
and checks its parent on every timeout too; the master does not wait for it when stopping.
If the watcher ends, the master logs it once and serves on without ``--reload``.

Not offered with ``user`` (a development tool has no place in a server that drops root) nor
with ``exec`` (a program is run afresh for each connection already).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from ..errors import ConfigError
from ..serving.handlers import app_dir
from ._watcher import WATCHING

if TYPE_CHECKING:
    from ..config import Config

log = logging.getLogger("forkserve")


def require_watchfiles() -> None:
    """Raise ``ConfigError`` if watchfiles (the ``reload`` extra) is not installed."""
    # found, not imported: the master would carry it (and anyio) into every child for nothing
    if importlib.util.find_spec("watchfiles") is None:
        raise ConfigError("reload", "needs watchfiles: pip install 'forkserve[reload]'")


def directories(config: Config) -> list[str]:
    """What ``--reload`` watches: the app directory and every ``reload_dir``."""
    dirs = [app_dir(config.chdir), *(os.path.abspath(d) for d in config.reload_dir)]
    for path in dirs:
        if not os.path.isdir(path):
            raise ConfigError("reload_dir", f"{path} is not a directory")
    return list(dict.fromkeys(dirs))


class Host(Protocol):
    """What the watcher needs from the master's loop."""

    @property
    def stopping(self) -> bool: ...
    def watch(self, fd: int, callback: Callable[[], None], *, write: bool = False) -> None: ...
    def unwatch(self, fd: int) -> None: ...


class Watcher:
    """The master's side: spawn the watcher, turn its lines into SIGHUP. Runs in the master."""

    def __init__(self, host: Host, dirs: Sequence[str]) -> None:
        self.host = host
        self.dirs = list(dirs)
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        try:
            os.set_inheritable(write_fd, True)
            argv = [sys.executable, "-m", "forkserve.master._watcher", str(write_fd),
                    str(os.getpid()), *self.dirs]
            self.pid = os.posix_spawn(sys.executable, argv, os.environ,
                                      setsigdef=signal.valid_signals() - {signal.SIGKILL,
                                                                          signal.SIGSTOP})
        except OSError as exc:
            os.close(read_fd)
            raise ConfigError("reload", f"cannot start the file watcher: {exc.strerror}") from None
        finally:
            os.close(write_fd)
        os.set_blocking(read_fd, False)
        self.fd = read_fd
        host.watch(read_fd, self._on_readable)

    def _on_readable(self) -> None:
        data = b""
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(self.fd, 4096):
                data += chunk
            self._ended()
            return
        if data.startswith(WATCHING):
            log.info("reload: watching %s for changes (pid %d)", ", ".join(self.dirs),
                     self.pid)
            data = data[len(WATCHING):]
        changed = data.decode(errors="replace").splitlines()
        if changed:
            log.info("reload: %s changed", changed[0])
            os.kill(os.getpid(), signal.SIGHUP)  # what `forkserve signal reload` does

    def _ended(self) -> None:
        self.host.unwatch(self.fd)
        os.close(self.fd)
        if not self.host.stopping:
            log.warning("reload: the file watcher (pid %d) ended; serving on without it",
                        self.pid)
