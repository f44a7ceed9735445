"""Accept control: what an accept() error means, and how long accepting pauses for it.

One classification for every process that accepts client connections: the master (fork,
exec and single models) and the prefork workers, which accept on the same listeners and so
meet the same errors (trio's ``ACCEPT_CAPACITY_ERRNOS``, with the reason next to each set).

- **One connection's error** (``ACCEPT_TRANSIENT_ERRNOS``): Linux passes errors that are
  already pending on the new connection to accept() (accept(2), "Error handling": ENETDOWN,
  EPROTO, ENOPROTOOPT, EHOSTDOWN, ENONET, EHOSTUNREACH, EOPNOTSUPP, ENETUNREACH for TCP/IP,
  to be treated "like EAGAIN by retrying"), and ECONNABORTED when the client reset before it
  was accepted; EPERM is a firewall rule that refused that connection; EINTR a signal (PEP
  475 retries it, so it is listed for a handler that raises). That connection is gone, the
  next one may be fine: take it at once. Both the master and a worker need the whole set:
  they accept on the same TCP and unix listeners.
- **Out of a resource** (``ACCEPT_CAPACITY_ERRNOS``: EMFILE, ENFILE, ENOBUFS, ENOMEM): the
  pending connection stays queued, so retrying at once would spin (DESIGN decision 5). The
  process pauses accepting for ``ACCEPT_PAUSE_SECONDS`` and the master logs it as a warning
  (load, not a bug), rate-limited for the whole server.
- **Anything else** (EBADF, EINVAL: a listener closed or broken under us) is paused the same
  way, never spun on, but logged as an error: it is a bug or a broken environment.

It also says what a process that accepts needs of a listener and of the admission rules
(``Listening``, ``Rules``: the master's ``Listener`` and ``Gate`` are both), so that a prefork
worker names them without importing the master, and how many clients a TCP listener holds
(``accept_queue``, for a stop's drain).
"""

from __future__ import annotations

import errno
import socket
import struct
from typing import Protocol

from ..protocol.admission import ClientKey

#: accept() errors that mean "out of a resource right now": the pending connection stays
#: queued, so retrying at once would spin. Pause; a warning, not an error.
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: accept() errors that belong to one connection that is already gone: skip it, take the next.
ACCEPT_TRANSIENT_ERRNOS = frozenset({
    errno.ECONNABORTED, errno.EPROTO, errno.ENETDOWN, errno.ENOPROTOOPT, errno.EHOSTDOWN,
    errno.ENONET, errno.EHOSTUNREACH, errno.EOPNOTSUPP, errno.ENETUNREACH, errno.EPERM,
    errno.EINTR,
})
#: How long accepting pauses after any other accept() error: short enough that a passing
#: spike costs little latency, long enough that a lasting one costs ten wake-ups a second,
#: not a spin. The master and every prefork worker pause this long.
ACCEPT_PAUSE_SECONDS = 0.1


def skip(exc: OSError) -> bool:
    """True if ``exc`` from accept() was one connection's: take the next one at once;
    False: pause accepting for ``ACCEPT_PAUSE_SECONDS``."""
    return exc.errno in ACCEPT_TRANSIENT_ERRNOS


def is_capacity(code: int) -> bool:
    """True if errno ``code`` is load (a warning), False if it is a bug (an error)."""
    return code in ACCEPT_CAPACITY_ERRNOS


class Listening(Protocol):
    """What an accepting process needs of a listener (``master.listeners.Listener``)."""

    @property
    def sock(self) -> socket.socket: ...
    def fileno(self) -> int: ...


class Rules(Protocol):
    """The admission rules a prefork worker applies itself (``master.gate.Gate``)."""

    def tick(self, now: float) -> None: ...
    def admit(self, sock: socket.socket, addr: object) -> tuple[bool, ClientKey | None]: ...
    def release(self, key: ClientKey | None) -> None: ...


#: Offset of ``tcpi_unacked`` in struct tcp_info (include/uapi/linux/tcp.h; ``master.traffic``
#: reads the same struct for exec programs' connections).
_UNACKED_AT = 24
_U32 = struct.Struct("=I")


def accept_queue(sock: socket.socket) -> int | None:
    """How many clients wait in the accept queue of the listening TCP socket ``sock`` (for a
    listener, Linux reports that count in ``tcpi_unacked``); ``None`` where the kernel does
    not say (a unix socket, another system)."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _UNACKED_AT + 4)
    except (OSError, AttributeError):  # AttributeError: no TCP_INFO on this system
        return None
    return int(_U32.unpack_from(info, _UNACKED_AT)[0]) if len(info) >= _UNACKED_AT + 4 else None
