"""How long a program's connection has been quiet, seen from the master without holding it.

Runs in the master (exec mode). Theory of operation
---------------------------------------------------
The program owns its connection (fds 0 and 1) and the master keeps no copy of it: a copy
would keep the connection open after the program closed it (no FIN for the client until the
master got round to closing its copy), and relaying the bytes through the master would cost
a copy of every byte and a master wake-up per read. So the master looks at the connection
only when an idle deadline may have passed, and then only for an instant:

- **TCP**: ``pidfd_getfd(2)`` (Linux 5.6) duplicates the program's fd 0 (or fd 1, if 0 was
  replaced) into the master, ``getsockopt(TCP_INFO)`` says how many milliseconds ago data was
  last received and last sent (``tcpi_last_data_recv``, ``tcpi_last_data_sent``, counted in
  jiffies) and whether data still waits to reach the client (``tcpi_unacked``,
  ``tcpi_notsent_bytes``), and the duplicate is closed at once. Five system calls per look
  (pidfd_open, pidfd_getfd, fstat, getsockopt, two closes). This counts exactly the bytes on
  the connection, whichever process of the program's pipeline moved them. The fd is used only
  if it is still the accepted socket (same inode). Should the program close its copy while
  the master holds the duplicate, the master's close is the last one and sends the FIN: the
  client sees it microseconds later, not never.
- **Otherwise** (a unix socket has no TCP_INFO; no pidfd_getfd; ptrace rules refuse it; the
  program moved the socket off fds 0 and 1): ``rchar + wchar`` of ``/proc/PID/io``, compared
  between looks. Coarser: the program's file I/O counts as traffic, the I/O of its children
  does not, and it only tells that something moved between two looks.

Rejected: ``/proc/PID/io`` for TCP too (it misses ``sh -c 'a | b'``, where the shell's
children do the I/O); SIOCINQ/SIOCOUTQ (queue sizes, not times).
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

# (how many clients a listener holds: in serving.accept, which the prefork workers import too)
from ..serving.accept import accept_queue

__all__ = ["Quiet", "accept_queue", "io_total", "tcp_quiet"]

#: pidfd_getfd(2); the same number on every Linux architecture (the unified syscall table).
_SYS_PIDFD_GETFD = 438
#: Bytes of struct tcp_info read: up to tcpi_notsent_bytes (Linux 4.6) and a little more.
_TCP_INFO_SIZE = 160
#: Offsets in struct tcp_info (include/uapi/linux/tcp.h).
_UNACKED_AT = 24
_LAST_DATA_SENT_AT = 44
_LAST_DATA_RECV_AT = 52
_NOTSENT_AT = 144
_U32 = struct.Struct("=I")

_syscall: Callable[..., int] | None
try:
    _syscall = ctypes.CDLL(None, use_errno=True).syscall
except (OSError, AttributeError):  # not Linux: the /proc fallback (or nothing) remains
    _syscall = None


@dataclass(frozen=True)
class Quiet:
    """What a look at a TCP connection found."""

    #: Seconds since data last crossed the connection in either direction.
    idle: float
    #: Seconds since data was last sent while some still waits to reach the client; ``None``
    #: when nothing is waiting.
    stalled: float | None


def _pidfd_getfd(pidfd: int, target: int) -> int:
    assert _syscall is not None
    fd = _syscall(_SYS_PIDFD_GETFD, pidfd, target, 0)
    if fd < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return int(fd)


def _decode(info: bytes) -> Quiet:
    def u32(offset: int) -> int:
        return int(_U32.unpack_from(info, offset)[0]) if len(info) >= offset + 4 else 0

    sent, received = u32(_LAST_DATA_SENT_AT) / 1000, u32(_LAST_DATA_RECV_AT) / 1000
    waiting = u32(_UNACKED_AT) > 0 or u32(_NOTSENT_AT) > 0
    return Quiet(idle=min(sent, received), stalled=sent if waiting else None)


def tcp_quiet(pid: int, inode: int) -> Quiet | None:
    """Look at the TCP connection ``inode`` on fd 0 or 1 of ``pid`` (a child, not yet reaped).

    Returns ``None`` when it cannot: the program no longer has the connection there, the
    kernel has no pidfd_getfd, or the kernel refuses (EPERM). Raises nothing.
    """
    if _syscall is None:
        return None
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return None
    try:
        for target in (0, 1):
            try:
                fd = _pidfd_getfd(pidfd, target)
            except OSError as exc:
                if exc.errno in (errno.ENOSYS, errno.EPERM, errno.ESRCH):
                    return None
                continue  # EBADF: that fd is closed
            if not _is(fd, inode):
                os.close(fd)
                continue
            with socket.socket(fileno=fd) as sock:
                info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SIZE)
            return _decode(info)
        return None
    except OSError:
        return None
    finally:
        os.close(pidfd)


def _is(fd: int, inode: int) -> bool:
    try:
        return os.fstat(fd).st_ino == inode
    except OSError:
        return False


def io_total(pid: int) -> int | None:
    """``rchar + wchar`` of ``pid`` from ``/proc/PID/io``, or ``None`` if it cannot be read."""
    try:
        with open(f"/proc/{pid}/io", "rb") as fh:
            fields = dict(line.split(b":", 1) for line in fh.read().splitlines() if b":" in line)
        return int(fields[b"rchar"]) + int(fields[b"wchar"])
    except (OSError, KeyError, ValueError):
        return None
