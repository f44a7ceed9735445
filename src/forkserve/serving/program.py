"""A program per connection, the child's side: from the fork to ``execve`` (``forkserve exec``;
what the master decides once is ``apps.exec``, its side of a running program
``models.fork_exec``). Runs in a per-connection child and never returns.

Rules of the child, in the order it applies them:

1. The master's fds are closed first (as every fork child does), then the connection is put
   on fds 0 and 1 and the stderr pipe on fd 2, and *every* fd above 2 is closed
   (``close_range``), so the program inherits exactly 0, 1 and 2 (DESIGN decision 11).
2. Every signal goes back to its default disposition, SIGPIPE included (CPython ignores it,
   and an ignored disposition survives ``execve``: ``yes | head -1`` would never end;
   LESSONS 1.17), and the signal mask is emptied immediately before ``execve``. The
   master's handled signals stay blocked until then, so a stop that arrives between the
   fork and the exec is not lost: it is delivered at its default action (the child ends),
   exactly as it would have reached the program.
3. PR_SET_PDEATHSIG (SIGTERM) survives ``execve``: a program does not outlive the master.
4. The program leads its own process group, so an idle timeout can kill a whole pipeline
   (``sh -c 'a | b'``), whose last member would otherwise keep the client's connection open.
5. The environment is built, not inherited (``apps.exec.base_env``, then ``connection_env``
   here): ``PATH`` (the master's, or ``DEFAULT_PATH``),
   the ``--pass-env`` names the master has, the ``--env`` values, then the tcpserver
   variables of this connection (tcp-environ(5): ``PROTO=TCP``, ``TCPLOCALIP``,
   ``TCPLOCALPORT``, ``TCPREMOTEIP``, ``TCPREMOTEPORT``; for a unix listener ``PROTO=UNIX``
   and ucspi-unix's ``UNIXLOCALPATH``, ``UNIXREMOTEPID``, ``UNIXREMOTEUID``,
   ``UNIXREMOTEGID``). Nothing else of the master's environment reaches the program.
   ``TCPLOCALHOST``, ``TCPREMOTEHOST`` and ``TCPREMOTEINFO`` (DNS and ident lookups) are not
   set. The connection's variables cannot be overridden by ``--env``.
6. ``execve`` failing (the program was removed after start, or is not executable any more)
   writes one line to the stderr pipe, which the master logs, and exits ``EXEC_FAILED``
   (127, the shell's "command not found"); the child never returns (decision 3).

The socket is left as accepted: blocking, Nagle on (tcpserver's default ``-d``), no
receive or send timeouts (forkserve's own handlers use ``SO_RCVTIMEO``, which a program
would see as ``EAGAIN`` from ``read``). ``max_line`` does not apply: the program reads the
socket itself.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import platform
import signal
import socket
import struct
import time
from collections.abc import Callable, Mapping
from typing import NoReturn, Protocol

from .. import hooks
from ..errors import ClientError
from ..hooks import Process
from ..kernel import SIG_DFL, get_handler, pthread_sigmask, set_handler
from ..ops.scoreboard import SlotState
from ..protocol.address import format_address
from .child import ChildContext, set_parent_death_signal
from .limits import apply_limits
from .preamble import Proxied, proxy_addresses
from .sockets import family_of

#: The exit status of a child whose ``execve`` failed (the shell's "command not found").
EXEC_FAILED = 127
#: struct ucred of SO_PEERCRED: pid, uid, gid.
_UCRED = struct.Struct("3i")


class Executable(Protocol):
    """What ``run_program`` needs of ``apps.exec.Program``: checked in the master already."""

    @property
    def path(self) -> str: ...
    @property
    def argv(self) -> tuple[str, ...]: ...
    @property
    def env(self) -> Mapping[str, str]: ...


def connection_env(sock: socket.socket, addr: object,
                   local: object | None = None) -> dict[str, str]:
    """The tcpserver (or ucspi-unix) variables of one accepted connection; ``addr`` and
    ``local``, when given, are the addresses a PROXY header named."""
    if sock.family == socket.AF_UNIX:
        env = {"PROTO": "UNIX"}
        path = sock.getsockname()
        if path:
            env["UNIXLOCALPATH"] = path if isinstance(path, str) else path.decode()
        with contextlib.suppress(OSError):
            pid, uid, gid = _UCRED.unpack(
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
            env.update(UNIXREMOTEPID=str(pid), UNIXREMOTEUID=str(uid), UNIXREMOTEGID=str(gid))
        return env
    local_ip, local_port = (local if isinstance(local, tuple) else sock.getsockname())[:2]
    remote_ip, remote_port = addr[:2] if isinstance(addr, tuple) else sock.getpeername()[:2]
    return {"PROTO": "TCP", "TCPLOCALIP": local_ip, "TCPLOCALPORT": str(local_port),
            "TCPREMOTEIP": remote_ip, "TCPREMOTEPORT": str(remote_port)}


#: Every signal number but SIGKILL and SIGSTOP, as plain ints (``signal.valid_signals()``
#: gives enum members, and ``signal.getsignal`` converts each answer to one: some 270 calls of
#: enum's Python code in every program's child, each a page it copies).
_SIGNALS = tuple(int(sig) for sig in signal.valid_signals()
                 if sig not in (signal.SIGKILL, signal.SIGSTOP))


def _default_signals() -> None:
    """Every disposition back to SIG_DFL (the mask is cleared later, right before execve)."""
    signal.set_wakeup_fd(-1)
    for sig in _SIGNALS:
        if get_handler(sig) == SIG_DFL:  # (None, a handler not set by Python: reset it too)
            continue
        try:  # noqa: SIM105  (not contextlib.suppress: its Python code, in every child)
            set_handler(sig, SIG_DFL)
        except (OSError, ValueError):  # the C library's reserved signals: see below
            pass
    _default_reserved_signals()


#: rt_sigaction(2)'s system call number, where forkserve knows it.
_RT_SIGACTION = {"x86_64": 13, "aarch64": 134}.get(platform.machine())


def _default_reserved_signals() -> None:
    """Signals 32 and 33 are the C library's (NPTL's), so ``signal.signal`` refuses them, but a
    parent may pass them on ignored (GNU make does), and an ignored disposition survives
    execve: set them to SIG_DFL with the raw system call (a zeroed ``struct sigaction``)."""
    if _RT_SIGACTION is None or _syscall is None:
        return
    action = (ctypes.c_ulong * 4)()  # handler SIG_DFL (0), no flags, no restorer, empty mask
    for sig in range(32, signal.SIGRTMIN):
        _syscall(_RT_SIGACTION, sig, ctypes.byref(action), None, 8)


try:
    _syscall: Callable[..., int] | None = ctypes.CDLL(None, use_errno=True).syscall
except (OSError, AttributeError):
    _syscall = None


def _install_fds(conn_fd: int, stderr_fd: int) -> None:
    """The connection on 0 and 1, the stderr pipe on 2, and nothing else open."""
    # Copies above 2 first: the accepted socket or the pipe may itself be fd 0, 1 or 2 when
    # the master was started with those closed.
    conn = fcntl.fcntl(conn_fd, fcntl.F_DUPFD_CLOEXEC, 3)
    err = fcntl.fcntl(stderr_fd, fcntl.F_DUPFD_CLOEXEC, 3)
    os.dup2(conn, 0)
    os.dup2(conn, 1)
    os.dup2(err, 2)
    os.set_blocking(0, True)
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))  # close_range(2) where the kernel has it


def run_program(ctx: ChildContext, program: Executable, sock: socket.socket, addr: object,
                slot: int, *, stderr_fd: int, header: Proxied | None = None) -> NoReturn:
    """In a freshly forked child: become ``program`` on ``sock``. Never returns."""
    try:
        ctx.close_master_fds()
        if ctx.limited:
            apply_limits(ctx.config)
        if (ctx.config.post_fork is not None
                and not hooks.call(ctx.config, "post_fork", Process(os.getpid(), "child", slot))):
            os._exit(EXEC_FAILED)
        _default_signals()
        set_parent_death_signal(signal.SIGTERM)
        if os.getppid() != ctx.master_pid:  # the master died before prctl: nobody to serve
            os._exit(EXEC_FAILED)
        local, family = None, family_of(sock)
        if header is not None:  # the master read the PROXY header
            addr, local, family = header.addr, header.local, header.family
        elif ctx.config.proxy_protocol:  # the real client's addresses, the header consumed
            deadline = time.monotonic() + ctx.config.handshake_timeout
            try:
                addr, local, family = proxy_addresses(sock, addr, ctx.config, deadline)
            except ClientError as exc:
                with contextlib.suppress(OSError):
                    os.write(2, f"forkserve: {format_address(addr, sock.family)}: closed "
                                f"before the program: {exc}\n".encode())
                os._exit(0)
        env = {**program.env, **connection_env(sock, addr, local)}
        now = time.monotonic()
        ctx.scoreboard.write(slot, pid=os.getpid(), state=SlotState.READING, conn_start=now,
                             heartbeat=now, peer=format_address(addr, family))
        os.setpgid(0, 0)
        _install_fds(sock.fileno(), stderr_fd)
        pthread_sigmask(signal.SIG_SETMASK, ())  # (raw: no enum made of the old mask)
        os.execve(program.path, program.argv, env)
    except BaseException as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else repr(exc)
        with contextlib.suppress(OSError):
            os.write(2, f"forkserve: cannot run {program.path}: {reason}\n".encode())
    finally:
        # This must never return into the master's accept loop, hence os._exit() on every
        # path (DESIGN decision 3); after a successful execve this code no longer exists.
        os._exit(EXEC_FAILED)
