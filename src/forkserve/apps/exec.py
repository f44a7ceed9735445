"""exec: one program per connection, the socket as its stdin and stdout (inetd, tcpserver).

Theory of operation
-------------------
``forkserve exec [OPTIONS] -- PROGRAM [ARGS...]`` is the fork model with a different child:
instead of calling a Python handler, the per-connection child turns itself into PROGRAM. This
module holds what is decided once in the master (``prepare``: the program, its environment)
and what the child does before ``execve`` (``run_program``); the master's side of a running
program (its stderr, its idle deadline, its exit line) is ``models.fork_exec``.

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
5. The environment is built, not inherited: ``PATH`` (the master's, or ``DEFAULT_PATH``),
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

PROGRAM is resolved to an absolute path once, at start, on the program's ``PATH``: a
program that cannot be found is an operator error (exit 2 before anything is bound, like a
bad app name), and no child searches ``PATH`` per connection.

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
import re
import shutil
import signal
import socket
import struct
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, NoReturn

from .. import hooks
from ..errors import ClientError, ConfigError
from ..hooks import Process
from ..ops.scoreboard import SlotState
from ..protocol.address import format_address
from ..serving.child import ChildContext, set_parent_death_signal
from ..serving.limits import apply_limits
from ..serving.preamble import Proxied, proxy_addresses

if TYPE_CHECKING:
    from ..serving.connection import Connection

#: The exit status of a child whose ``execve`` failed (the shell's "command not found").
EXEC_FAILED = 127
#: The program's PATH when the master has none.
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
#: Variables that forkserve sets per connection; ``--env`` and ``--pass-env`` may not name them.
CONNECTION_VARIABLES = frozenset({
    "PROTO", "TCPLOCALIP", "TCPLOCALPORT", "TCPREMOTEIP", "TCPREMOTEPORT", "TCPLOCALHOST",
    "TCPREMOTEHOST", "TCPREMOTEINFO", "UNIXLOCALPATH", "UNIXREMOTEPID", "UNIXREMOTEUID",
    "UNIXREMOTEGID",
})
#: A portable environment variable name (POSIX: letters, digits, underscore; no leading digit).
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
#: struct ucred of SO_PEERCRED: pid, uid, gid.
_UCRED = struct.Struct("3i")
#: Models that can run a program per connection (see ``check_model``).
EXEC_MODELS = ("fork",)


@dataclass(frozen=True)
class Program:
    """The program to run per connection, checked in the master before anything is bound.

    It takes the place of the app: the supervisor hands it to the model, and the fork model
    (``models.fork_exec``) runs it. It is not a handler; calling it is a programming error.
    """

    path: str
    argv: tuple[str, ...]
    #: The environment shared by every connection (the connection's variables are added).
    env: Mapping[str, str]

    def __call__(self, conn: Connection) -> None:
        raise RuntimeError("exec programs run only under the fork model")


def check_model(model: str) -> None:
    """Refuse models that cannot give each program its own process; raise ``ConfigError``."""
    if model in EXEC_MODELS:
        return
    if model == "single":
        why = ("the single model serves in the master itself, and running a program there "
               "would replace the server; use --model fork (the default), with "
               "--max-children 1 to serve one connection at a time")
    else:
        why = (f"{model} workers serve many connections in turn, but a program per connection "
               "is fork-per-connection by nature; use --model fork (the default)")
    raise ConfigError("--model", f"exec cannot run under the {model} model: {why}")


def parse_env(item: str) -> tuple[str, str]:
    """``NAME=VALUE`` from ``--env``; raise ``ConfigError`` naming what is wrong."""
    name, sep, value = item.partition("=")
    if not sep:
        raise ConfigError("--env", f"{item!r}: expected NAME=VALUE")
    _check_name("--env", name)
    if "\0" in value:
        raise ConfigError("--env", f"{name}: a value cannot contain a NUL byte")
    return name, value


def _check_name(option: str, name: str) -> None:
    if not _NAME.match(name):
        raise ConfigError(option, f"{name!r} is not a variable name (letters, digits and _, "
                                  "not starting with a digit)")
    if name in CONNECTION_VARIABLES:
        raise ConfigError(option, f"{name} is set by forkserve for each connection")


def base_env(env_items: Iterable[str], pass_env: Iterable[str],
             master_env: Mapping[str, str]) -> dict[str, str]:
    """The environment every program gets before its connection's variables.

    ``PATH`` (the master's, else ``DEFAULT_PATH``), then each ``pass_env`` name the master has,
    then each ``NAME=VALUE`` of ``env_items``: later ones win.
    """
    env = {"PATH": master_env.get("PATH") or DEFAULT_PATH}
    for name in pass_env:
        _check_name("--pass-env", name)
        if name in master_env:
            env[name] = master_env[name]
    for item in env_items:
        name, value = parse_env(item)
        env[name] = value
    return env


def resolve(program: str, path: str, cwd: str) -> str:
    """The absolute path of ``program`` (searched on ``path`` unless it has a ``/``)."""
    if "/" in program:
        found: str | None = os.path.join(cwd, program)
        if not (os.path.isfile(found) and os.access(found, os.X_OK)):  # type: ignore[arg-type]
            raise ConfigError("PROGRAM", f"{program!r} is not an executable file")
    else:
        found = shutil.which(program, path=path)
        if found is None:
            raise ConfigError("PROGRAM", f"{program!r} is not an executable on PATH ({path})")
    assert found is not None
    return os.path.abspath(os.path.join(cwd, found))


def prepare(argv: Iterable[str], *, env_items: Iterable[str] = (),
            pass_env: Iterable[str] = (), master_env: Mapping[str, str] | None = None,
            chdir: str | None = None) -> Program:
    """Check the command line of ``forkserve exec``; raise ``ConfigError`` (exit 2) if unusable."""
    args = tuple(argv)
    if not args or not args[0]:
        raise ConfigError("PROGRAM", "missing: write forkserve exec [OPTIONS] -- PROGRAM [ARGS...]")
    if any("\0" in arg for arg in args):
        raise ConfigError("PROGRAM", "an argument cannot contain a NUL byte")
    env = base_env(env_items, pass_env, os.environ if master_env is None else master_env)
    cwd = os.path.abspath(chdir) if chdir else os.getcwd()
    return Program(resolve(args[0], env["PATH"], cwd), args, env)


# --------------------------------------------------------------------------- in the child


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


def _default_signals() -> None:
    """Every disposition back to SIG_DFL (the mask is cleared later, right before execve)."""
    signal.set_wakeup_fd(-1)
    for sig in signal.valid_signals():
        if sig in (signal.SIGKILL, signal.SIGSTOP) or signal.getsignal(sig) == signal.SIG_DFL:
            continue
        with contextlib.suppress(OSError, ValueError):  # the C library's reserved signals
            signal.signal(sig, signal.SIG_DFL)
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


def run_program(ctx: ChildContext, program: Program, sock: socket.socket, addr: object,
                slot: int, *, stderr_fd: int, header: Proxied | None = None) -> NoReturn:
    """In a freshly forked child: become ``program`` on ``sock``. Never returns."""
    try:
        ctx.close_master_fds()
        apply_limits(ctx.config)
        if not hooks.call(ctx.config, "post_fork", Process(os.getpid(), "child", slot)):
            os._exit(EXEC_FAILED)
        _default_signals()
        set_parent_death_signal(signal.SIGTERM)
        if os.getppid() != ctx.master_pid:  # the master died before prctl: nobody to serve
            os._exit(EXEC_FAILED)
        local, family = None, int(sock.family)
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
        signal.pthread_sigmask(signal.SIG_SETMASK, ())
        os.execve(program.path, program.argv, env)
    except BaseException as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else repr(exc)
        with contextlib.suppress(OSError):
            os.write(2, f"forkserve: cannot run {program.path}: {reason}\n".encode())
    finally:
        # This must never return into the master's accept loop, hence os._exit() on every
        # path (DESIGN decision 3); after a successful execve this code no longer exists.
        os._exit(EXEC_FAILED)
