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
"""

from __future__ import annotations

import errno

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
