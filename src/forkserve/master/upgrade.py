"""Zero-downtime upgrade (SIGUSR2): a new master on the same listening sockets.

Theory of operation
-------------------
The old master forks a child that execs the same command line (``sys.orig_argv``, from the
directory the server was started in), so the new master runs new code with the same settings.
The listening sockets are handed over as systemd hands them over (``LISTEN_FDS``, on fds 3 and
up, named in ``LISTEN_FDNAMES``; the control and metrics sockets by their names), so the new
master adopts the very same sockets (``systemd.inherited_listeners``): the kernel's accept
queue is never closed, and no client is refused or reset during the switch. Rebinding with
``SO_REUSEPORT`` was rejected: for a moment two queues exist and the one that closes resets
what it held. ``NOTIFY_SOCKET`` is passed on, so that under systemd the new master can notify.

The new master says it is ready by writing to a pipe (``FORKSERVE_UPGRADE_FD``) once it serves:
its listeners are watched and its model started. Then the old master hands the pid over
(``MAINPID=`` to systemd; the new master has written the pid file already, and the old one
removes it only if it still holds its own pid), forgets its unix socket files and stops
gracefully. The files are the new master's now: the old one names them and their inodes
in ``FORKSERVE_UPGRADE_FILES``, and the new one takes them over once it has said it is ready
(not before: a new master that is abandoned must not remove the files the old one still
serves on), so whichever master ends last removes them. The old master closes its copies of
the sockets, which stay open in the new master, and lets its children finish. If the new
master exits before it is ready, or does not say so within ``READY_TIMEOUT``, the upgrade is
abandoned (the new master is killed if it is still there) and the old master goes on
serving; the log says why.

The same goes for the right to seal a socket at a stop (``Listener.refuse_new``): only a socket
that no one else holds is sealed, and systemd holds the sockets it passed. The old master names
the sockets that were its alone (their inodes, in ``FORKSERVE_UPGRADE_OURS``), and they become
the new master's alone once it has said it is ready.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from ..kernel import Kernel
from ..ops import pidfile

if TYPE_CHECKING:
    from .listeners import Listener
    from .systemd import Notifier

log = logging.getLogger("forkserve")

#: The new master has this long to say it serves.
READY_TIMEOUT = 30.0
#: The environment variable that carries the ready pipe's fd to the new master.
READY_FD = "FORKSERVE_UPGRADE_FD"
#: The environment variable that names the unix socket files handed over (JSON: path -> inode).
FILES = "FORKSERVE_UPGRADE_FILES"
#: The environment variable that names the sockets only forkserve holds (JSON: inodes).
OURS = "FORKSERVE_UPGRADE_OURS"
#: The message the new master writes when it serves.
READY = b"ready\n"
#: The first fd of a socket-activation handover (sd_listen_fds(3)).
FIRST_FD = 3
#: Names of the handed-over sockets (LISTEN_FDNAMES): clients', the control socket, metrics.
LISTENER, CONTROL, METRICS = "forkserve-listener", "forkserve-control", "forkserve-metrics"


@dataclass
class Upgrade:
    """An upgrade in progress, as the old master sees it."""

    pid: int
    #: The ready pipe's read end; -1 once it reached its end (the reap will say how).
    ready_r: int
    deadline: float
    received: bytes = b""


@dataclass
class Successor:
    """A new master's side of an upgrade: the ready pipe, and the unix socket files that
    become its own once it has said it serves (path -> inode, as the old master bound them)."""

    fd: int
    files: dict[str, int]
    #: The inodes of the sockets no one but the old master held (not systemd's).
    ours: frozenset[int] = frozenset()


def spawn(sockets: Sequence[tuple[str, int]], cwd: str, notify: dict[str, str],
          deadline: float, files: dict[str, int] | None = None, *,
          ours: Sequence[int] = ()) -> Upgrade:
    """Fork and exec the new master, handing it ``sockets`` ((name, fd) each). Raises
    ``OSError`` if the fork fails. Call with the master's signals blocked."""
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    try:
        pid = os.fork()
    except OSError:
        os.close(ready_r)
        os.close(ready_w)
        raise
    if pid == 0:
        _exec_new_master(sockets, ready_w, cwd, {**notify, FILES: json.dumps(files or {}),
                                                 OURS: json.dumps(list(ours))})
    os.close(ready_w)
    os.set_blocking(ready_r, False)
    return Upgrade(pid, ready_r, deadline)


def _exec_new_master(sockets: Sequence[tuple[str, int]], ready_w: int, cwd: str,
                     notify: dict[str, str]) -> None:
    """In the forked child: put the sockets on fds 3.., the ready pipe after them, exec."""
    try:
        # copies above every fd we are about to overwrite, then into place (dup2 makes the
        # target inheritable; everything else is close-on-exec and goes away at the exec)
        top = FIRST_FD + len(sockets) + 1
        moved = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, top) for _, fd in sockets]
        ready = fcntl.fcntl(ready_w, fcntl.F_DUPFD_CLOEXEC, top)
        for index, fd in enumerate(moved):
            os.dup2(fd, FIRST_FD + index)
        ready_fd = FIRST_FD + len(moved)
        os.dup2(ready, ready_fd)
        env = dict(os.environ)
        env.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(moved)),
                   LISTEN_FDNAMES=":".join(name for name, _ in sockets),
                   **{READY_FD: str(ready_fd)})
        env.update(notify)  # NOTIFY_SOCKET and WATCHDOG_USEC: the new master is systemd's next
        os.chdir(cwd)
        for sig in signal.valid_signals():  # what the master ignored stays ignored over exec
            if sig not in (signal.SIGKILL, signal.SIGSTOP):
                with contextlib.suppress(OSError, ValueError):
                    signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, ())
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except BaseException as exc:  # report and end: never back into the master's code
        with contextlib.suppress(OSError):
            os.write(2, f"forkserve: upgrade: cannot start the new master: {exc}\n".encode())
    finally:
        os._exit(127)


def read_ready(upgrade: Upgrade) -> bool | None:
    """Read the ready pipe: True once ready, False at EOF without it (the new master is gone
    or failed), None while there is nothing more to say."""
    try:
        while chunk := os.read(upgrade.ready_r, 64):
            upgrade.received += chunk
            if READY in upgrade.received:
                return True
    except BlockingIOError:
        return None
    return READY in upgrade.received


def take_ready_fd() -> Successor | None:
    """In a new master that an upgrade started: the fd to announce readiness on, and the
    socket files handed over (the variables are removed, so no child sees them). None when
    this master was not started by an upgrade."""
    text = os.environ.pop(READY_FD, None)
    files = {str(path): inode for path, inode in _handed(
        FILES, dict, "the socket files stay the old master's").items()
        if isinstance(inode, int)}
    ours = frozenset(inode for inode in _handed(
        OURS, list, "no socket is sealed at this master's stop") if isinstance(inode, int))
    if text is None:
        return None
    try:
        fd = int(text)
        os.set_inheritable(fd, False)
    except (ValueError, OSError) as exc:
        log.warning("upgrade: %s=%r is unusable (%s); the old master will give up on this "
                    "one", READY_FD, text, exc)
        return None
    return Successor(fd, files, ours)


def _handed(variable: str, kind: type, unusable: str) -> Any:
    """The JSON value of the environment variable ``variable`` (removed), if it is a
    ``kind``; else ``kind()``, and the log says the value was ``unusable``."""
    text = os.environ.pop(variable, json.dumps(kind()))
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, kind):
        log.warning("upgrade: %s=%r is unusable; %s", variable, text[:80], unusable)
        return kind()
    return value


def socket_inode(listener: Listener) -> int:
    """The socket's inode: the same in every process that holds it."""
    return os.fstat(listener.fileno()).st_ino


def owned_files(listeners: Sequence[Listener]) -> dict[str, int]:
    """The unix socket files this master bound and removes when it ends (path -> inode)."""
    return {lst.address.path: lst.unix_inode for lst in listeners if lst.unix_inode}


def announce_ready(successor: Successor, listeners: Sequence[Listener]) -> None:
    """Tell the old master this one serves (once its listeners are watched); then the socket
    files it handed over are this master's to remove when it ends."""
    try:
        os.write(successor.fd, READY)
    except OSError as exc:
        log.warning("upgrade: could not tell the old master this one is ready: %s",
                    exc.strerror)
        return
    finally:
        os.close(successor.fd)
    for listener in listeners:
        inode = successor.files.get(listener.address.path)
        if listener.address.kind == "unix" and inode is not None:
            listener.unix_inode = inode
        with contextlib.suppress(OSError):
            listener.ours = socket_inode(listener) in successor.ours


class Host(Protocol):
    """What an upgrade needs from the master's loop."""

    def watch(self, fd: int, callback: Callable[[], None], *, write: bool = False) -> None: ...
    def unwatch(self, fd: int) -> None: ...
    def signals_blocked(self) -> AbstractContextManager[None]: ...
    def begin_graceful_stop(self, *, handover: bool = False) -> None: ...


class Upgrader:
    """The old master's side, driven by its loop (see the module doc).

    ``listeners`` are the clients' sockets, ``operators`` the control and metrics sockets by
    their handover names; ``pid_file`` is restored if an upgrade fails."""

    def __init__(self, host: Host, kernel: Kernel, notifier: Notifier, *,
                 listeners: Sequence[Listener], operators: Sequence[tuple[str, Listener]],
                 pid_file: str | None, pid: int) -> None:
        self.host = host
        self.kernel = kernel
        self.notifier = notifier
        self.listeners = list(listeners)
        self.operators = list(operators)
        self.pid_file = pid_file
        self.pid = pid
        self.pending: Upgrade | None = None
        #: New masters started by this one (a pid reaped here is not a model's child).
        self.started: set[int] = set()

    def start(self, cwd: str) -> None:
        if self.pending is not None:
            log.info("upgrade: already under way (new master pid %d)", self.pending.pid)
            return
        sockets = [(LISTENER, listener.fileno()) for listener in self.listeners]
        sockets += [(name, listener.fileno()) for name, listener in self.operators]
        files = owned_files(self._all_sockets())
        ours = [socket_inode(lst) for lst in self._all_sockets() if lst.ours]
        try:
            with self.host.signals_blocked():
                self.pending = spawn(sockets, cwd, self.notifier.environment(),
                                     self.kernel.monotonic() + READY_TIMEOUT, files, ours=ours)
        except OSError as exc:
            log.error("upgrade: cannot fork the new master: %s; still serving", exc.strerror)
            return
        self.started.add(self.pending.pid)
        self.host.watch(self.pending.ready_r, self._on_readable)
        log.info("upgrade: started a new master, pid %d, on the same %d socket(s)",
                 self.pending.pid, len(sockets))

    def _all_sockets(self) -> list[Listener]:
        return [*self.listeners, *(lst for _, lst in self.operators)]

    def _on_readable(self) -> None:
        assert self.pending is not None
        ready = read_ready(self.pending)
        if ready:
            self._hand_over()
        elif ready is False:  # it is gone, or going: its reap (or the deadline) says how
            self._close_pipe()

    def _hand_over(self) -> None:
        assert self.pending is not None
        pid = self._end()
        self.notifier.mainpid(pid)
        for listener in self._all_sockets():
            listener.unix_inode = None  # the socket files are the new master's now
            listener.ours = False
        log.info("upgrade: the new master (pid %d) serves; this one stops gracefully", pid)
        self.host.begin_graceful_stop(handover=True)

    def _abandon(self, why: str) -> None:
        assert self.pending is not None
        pid = self.pending.pid
        self._end()
        with contextlib.suppress(ProcessLookupError):
            self.kernel.kill(pid, signal.SIGTERM)
        log.error("upgrade failed: %s; this master goes on serving", why)
        path = self.pid_file
        if path is not None:  # the new master may have written its pid there already
            try:
                pidfile.write(path, self.pid)
            except OSError as exc:
                log.warning("upgrade: could not restore the pid file %s: %s", path,
                            exc.strerror)

    def _close_pipe(self) -> None:
        assert self.pending is not None
        if self.pending.ready_r >= 0:
            self.host.unwatch(self.pending.ready_r)
            os.close(self.pending.ready_r)
            self.pending.ready_r = -1

    def _end(self) -> int:
        assert self.pending is not None
        self._close_pipe()
        pending, self.pending = self.pending, None
        return pending.pid

    def next_deadline(self) -> float | None:
        return None if self.pending is None else self.pending.deadline

    def tick(self, now: float) -> None:
        if self.pending is not None and now >= self.pending.deadline:
            if self.pending.ready_r >= 0 and read_ready(self.pending):
                self._hand_over()  # it said so just now: it owns the socket files already
                return
            self._abandon(f"the new master did not say it serves within {READY_TIMEOUT:g} s")

    def on_reaped(self, pid: int, how: str) -> bool:
        """A reaped pid: True if it was a new master started here (then it is reported)."""
        if pid not in self.started:
            return False
        self.started.discard(pid)
        if self.pending is not None and self.pending.pid == pid:
            self._on_readable_or_gone(how)
        else:
            log.info("upgrade: new master pid %d exited (%s)", pid, how)
        return True

    def _on_readable_or_gone(self, how: str) -> None:
        assert self.pending is not None
        if self.pending.ready_r >= 0 and read_ready(self.pending):
            self._hand_over()
        else:
            self._abandon(f"the new master exited ({how}) before it served; its log says why")

    def close_in_child(self) -> None:
        if self.pending is not None and self.pending.ready_r >= 0:
            os.close(self.pending.ready_r)
        self.pending = None

    def close(self) -> None:
        if self.pending is not None:
            self._end()
