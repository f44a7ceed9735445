"""systemd integration without libsystemd: socket activation and ``sd_notify``. Master only.

Theory of operation
-------------------
**Socket activation** (sd_listen_fds(3)). For a ``.socket`` unit with ``Accept=no``, systemd
starts the service with the listening sockets already open as fds 3, 4, ...
(``SD_LISTEN_FDS_START``) and describes them in three variables: ``LISTEN_PID`` (the process
they are meant for), ``LISTEN_FDS`` (how many) and, optionally, ``LISTEN_FDNAMES`` (the
``FileDescriptorName=`` of each, colon-separated). :func:`inherited_listeners` reads them and
then *removes all three from the environment on every path*: when they are for us, when they
are for another pid, and when they are malformed. That is what libsystemd does with
``unset_environment`` ("regardless whether the function call itself succeeded or not").
Variables for another pid reached us through a process that did not consume them. The fds they
describe are not ours, and keeping the variables would pass the same false claim to our
children. Variables that are for us must not reach a child either. A program run per connection
(the ``exec`` app) would otherwise take its fd 3 for a listener it does not have.

Each fd is checked before anything is changed: it must be open, a socket, ``SOCK_STREAM``
(``SO_TYPE``), listening (``SO_ACCEPTCONN``), of family ``AF_INET``, ``AF_INET6`` or
``AF_UNIX``. Nothing else is checked (no port, no address), as sd_listen_fds(3) advises: the unit
file decides the addresses. A failed check raises ``ConfigError`` that names the fd and the likely
unit-file mistake. In that case no fd has been closed or altered: the process is expected to exit
with status 2. Once all fds pass, each is made non-blocking and close-on-exec. ``O_NONBLOCK``
belongs to the open file description that systemd shares, so systemd sees it too. That does no
harm, because systemd only polls its copy. For the same reason an inherited socket must never be
``shutdown(2)``: that would cut systemd's copy as well. Closing it is fine.

The sockets are systemd's. :func:`as_listeners` builds ``Listener`` objects with
``unix_inode=None``, so ``Listener.close`` never unlinks the socket file that systemd created.
Whether that file is removed is for the unit (``RemoveOnStop=``) to decide.

**Notification** (sd_notify(3)). ``NOTIFY_SOCKET`` names an ``AF_UNIX`` datagram socket: a path,
or ``@name`` for the abstract namespace (``@`` stands for the leading NUL). :class:`Notifier`
reads it once, together with ``WATCHDOG_USEC`` and ``WATCHDOG_PID``, and unsets all three.
This keeps any child or exec'd program from notifying as if it were the main process: with
``NotifyAccess=main`` systemd would drop such messages, and with ``all`` it would believe them.
Each notification is one datagram of ``KEY=VALUE`` lines.

Sending never blocks and never raises into the master's loop. The socket is created once, as
``SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC``. Each notification is exactly one ``sendto``.
Any ``OSError`` is counted in ``failures`` and logged the first time only, and the loop goes on
serving. The usual causes are ``EAGAIN`` (systemd's queue is full), ``ECONNREFUSED`` and
``ENOENT`` (systemd is re-executing or gone). A lost ``READY=1`` costs a start timeout, never a
wedged master. Rejected alternatives: retrying, or sending from a thread. A retry blocks the
very loop that the watchdog ping is meant to prove alive, and a thread would keep pinging for
a master that is stuck.

**Call sites** (all in the master, ``supervisor.py``):

- ``ready(status)``: ``READY=1``, once the listeners are up and ``model.start()`` has returned
  (end of ``Supervisor._start``). For ``Type=notify``, this is when ``systemctl start``
  returns.
- ``reloading()``: ``RELOADING=1`` with ``MONOTONIC_USEC=``, first thing in
  ``Supervisor._reload``, on every path, even "no config file". Then ``ready(status)`` when
  the reload is done, whether the new config was applied or refused. systemd ≥ 253 uses the
  timestamp to match this reload to the one it asked for (``Type=notify-reload``), and waits
  for the ``READY=1`` that follows.
- ``stopping()``: ``STOPPING=1``, at the first call of ``Supervisor._begin_stop`` (not again
  when a graceful stop turns fast).
- ``status(text)``: ``STATUS=``, a one-line summary for ``systemctl status`` (on start, after a
  reload, on a halt). Newlines and NULs are replaced, and the text is capped at
  ``MAX_STATUS_CHARS``.
- ``watchdog()``: ``WATCHDOG=1``, sent by :class:`Heartbeat` from the master's loop.
  ``Heartbeat.next_deadline()`` joins the deadlines of ``Supervisor._timeout`` and
  ``Heartbeat.tick(now)`` runs once per loop turn, so the ping proves that the loop turns. A
  master stuck anywhere (a blocking call, a slow reload) misses the ping, and systemd acts on
  ``WatchdogSec=``.
- ``mainpid(pid)``: ``MAINPID=``, only if the main pid ever changes (a re-exec upgrade).

Worst-case cost: one ``sendto`` per notification, and with a watchdog one loop wake-up per
``WatchdogSec/2``.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
import time
from collections.abc import MutableMapping
from dataclasses import dataclass

from ..config import Address
from ..errors import ConfigError
from ..protocol.address import format_address
from .listeners import Listener

__all__ = [
    "SD_LISTEN_FDS_START", "Heartbeat", "InheritedSocket", "Notifier", "as_listeners",
    "inherited_listeners",
]

log = logging.getLogger("forkserve")

#: The first inherited fd (sd-daemon.h); the others follow without gaps.
SD_LISTEN_FDS_START = 3
#: The activation variables, unset on every path (see the module doc).
LISTEN_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
#: The notification variables, unset once read.
NOTIFY_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
#: Families forkserve can serve; anything else (netlink, vsock) is a unit-file mistake here.
SERVED_FAMILIES = frozenset({socket.AF_INET, socket.AF_INET6, socket.AF_UNIX})
#: systemd reads at most 4096 bytes of one notification (NOTIFY_BUFFER_MAX = PIPE_BUF) and
#: drops what does not fit; a status line far below that keeps every message whole.
MAX_STATUS_CHARS = 1024
#: Characters that would end a STATUS= line early or make systemd drop the whole datagram.
_NOT_IN_A_LINE = str.maketrans({"\n": " ", "\r": " ", "\0": " "})

_KIND_HINTS: dict[int, str] = {
    socket.SOCK_DGRAM: "a datagram socket (use ListenStream=, not ListenDatagram=)",
    socket.SOCK_SEQPACKET: "a seqpacket socket (use ListenStream=)",
}


# --------------------------------------------------------------------------- activation


@dataclass(frozen=True)
class InheritedSocket:
    """One listening socket passed by systemd, already non-blocking and close-on-exec.

    ``name`` is its ``FileDescriptorName=`` (``None`` without ``LISTEN_FDNAMES``); ``address``
    the text ``Listener.name`` uses: ``127.0.0.1:8080``, ``[::1]:8080``, ``unix:/run/app.sock``,
    ``unix:@abstract``.
    """

    sock: socket.socket
    name: str | None
    address: str


def inherited_listeners(environ: MutableMapping[str, str] | None = None,
                        pid: int | None = None) -> list[InheritedSocket]:
    """Take the listening sockets systemd passed to this process (sd_listen_fds(3)).

    Runs in the master, before any fork. ``environ`` defaults to ``os.environ`` and ``pid`` to
    ``os.getpid()`` (read at call time). ``LISTEN_PID``, ``LISTEN_FDS`` and ``LISTEN_FDNAMES``
    are removed from ``environ`` on every path, including errors.

    Returns ``[]`` when there is no ``LISTEN_PID``, when it names another process, or when
    ``LISTEN_FDS`` is absent or 0. Otherwise one ``InheritedSocket`` per fd, in unit-file order.

    Raises ``ConfigError`` (setting ``LISTEN_PID``, ``LISTEN_FDS`` or ``LISTEN_FDNAMES``) when a
    variable is malformed, or an fd is closed, not a socket, not a listening stream socket, or
    of a family forkserve cannot serve. When it raises, no fd has been closed or altered.
    """
    env = os.environ if environ is None else environ
    values = {key: env.pop(key, None) for key in LISTEN_VARIABLES}
    if values["LISTEN_PID"] is None or values["LISTEN_FDS"] is None:
        return []
    listen_pid = _parse_number("LISTEN_PID", values["LISTEN_PID"])
    if listen_pid != (os.getpid() if pid is None else pid):
        log.debug("ignoring LISTEN_FDS: they are for pid %d", listen_pid)
        return []
    count = _parse_number("LISTEN_FDS", values["LISTEN_FDS"])
    names = _parse_names(values["LISTEN_FDNAMES"], count)
    fds = range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count)
    socks = _adopt_all(fds)
    for sock in socks:
        sock.setblocking(False)
        sock.set_inheritable(False)
    return [InheritedSocket(sock, name, _describe(sock)) for sock, name in zip(socks, names,
                                                                                strict=True)]


def as_listeners(inherited: list[InheritedSocket]) -> list[Listener]:
    """``Listener`` objects for inherited sockets; closing them never unlinks a socket file.

    ``unix_inode`` stays ``None``: ``Listener.close`` unlinks only a file whose inode it
    recorded when it bound it, and systemd bound these.
    """
    return [Listener(_address_of(item.sock), item.sock, item.address) for item in inherited]


def _parse_number(variable: str, text: str) -> int:
    if not text.isascii() or not text.isdigit():
        raise ConfigError(variable, f"{text!r} is not a non-negative number "
                          "(set by the service manager or a wrapper script)")
    return int(text)


def _parse_names(text: str | None, count: int) -> list[str | None]:
    if text is None:
        return [None] * count
    names = text.split(":")
    if len(names) != count:
        raise ConfigError("LISTEN_FDNAMES", f"{len(names)} name(s) for {count} fd(s) "
                          f"in LISTEN_FDS: {text!r}")
    return [name or None for name in names]


def _adopt_all(fds: range) -> list[socket.socket]:
    """Wrap every fd, or none: on the first bad one, give back those wrapped, untouched."""
    adopted: list[socket.socket] = []
    try:
        for fd in fds:
            adopted.append(_adopt(fd))
    except ConfigError:
        for sock in adopted:
            sock.detach()  # the fd stays open, exactly as inherited
        raise
    return adopted


def _adopt(fd: int) -> socket.socket:
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        raise ConfigError("LISTEN_FDS", f"fd {fd} is not open") from None
    if not stat.S_ISSOCK(mode):
        raise ConfigError("LISTEN_FDS", f"fd {fd} is not a socket")
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise ConfigError("LISTEN_FDS", f"fd {fd}: {exc.strerror}") from None
    try:
        problem = _unservable(sock)
    except OSError as exc:
        problem = f"cannot be inspected ({exc.strerror})"
    if problem is not None:
        sock.detach()
        raise ConfigError("LISTEN_FDS", f"fd {fd} is {problem}")
    return sock


def _unservable(sock: socket.socket) -> str | None:
    """Why forkserve cannot serve on ``sock``, or None."""
    if sock.family not in SERVED_FAMILIES:
        family = getattr(sock.family, "name", sock.family)  # an int if Python does not know it
        return f"a {family} socket; forkserve serves TCP and unix sockets"
    kind = sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
    if kind != socket.SOCK_STREAM:
        return _KIND_HINTS.get(kind, f"not a stream socket (type {kind})")
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        return "not listening (with Accept=yes systemd passes connections: use Accept=no)"
    return None


def _describe(sock: socket.socket) -> str:
    name = sock.getsockname()
    if sock.family != socket.AF_UNIX:
        return format_address(name, sock.family)
    if isinstance(name, bytes):  # the abstract namespace: a leading NUL, shown as @
        text = name.decode(errors="backslashreplace")
        return f"unix:@{text[1:]}" if text.startswith("\0") else f"unix:{text}"
    return f"unix:{name}" if name else "unix"


def _address_of(sock: socket.socket) -> Address:
    if sock.family == socket.AF_UNIX:
        text = _describe(sock)
        return Address("unix", path=text[len("unix:"):])
    host, port = sock.getsockname()[:2]
    return Address("tcp", host=host, port=port)


# --------------------------------------------------------------------------- notification


class Notifier:
    """Sends sd_notify(3) messages to systemd; a no-op when not started by it.

    Runs in the master. Every method returns quickly and never raises; a failed send is
    counted in ``failures`` and logged once. Use :meth:`from_environ` to create one.
    """

    def __init__(self, address: str | None, *, watchdog_usec: int | None = None) -> None:
        #: Failed sends (EAGAIN, ECONNREFUSED, ENOENT, ...); the first one is logged.
        self.failures = 0
        self._watchdog_usec = watchdog_usec
        self._address: bytes | None = None
        self._sock: socket.socket | None = None
        #: ``NOTIFY_SOCKET`` as given, when usable (an upgrade passes it to the new master).
        self.address: str | None = None
        if address is None:
            return
        target = _notify_address(address)
        if target is None:
            log.warning("NOTIFY_SOCKET=%r is not a path or an @abstract name; "
                        "systemd will not be notified", address)
            return
        try:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK
                                       | socket.SOCK_CLOEXEC)
        except OSError as exc:
            log.warning("cannot create the sd_notify socket (%s); systemd will not be "
                        "notified", exc.strerror)
            return
        self._address = target
        self.address = address

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str] | None = None,
                     pid: int | None = None) -> Notifier:
        """Read ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID``, then unset them.

        ``environ`` defaults to ``os.environ`` and ``pid`` to ``os.getpid()`` (read at call
        time). The watchdog applies only when ``WATCHDOG_PID`` is absent or equals ``pid``.
        A malformed ``WATCHDOG_USEC`` means no watchdog (logged); it never raises.
        """
        env = os.environ if environ is None else environ
        values = {key: env.pop(key, None) for key in NOTIFY_VARIABLES}
        pid = os.getpid() if pid is None else pid
        return cls(values["NOTIFY_SOCKET"],
                   watchdog_usec=_watchdog_usec(values["WATCHDOG_USEC"],
                                                values["WATCHDOG_PID"], pid))

    def environment(self) -> dict[str, str]:
        """What a process replacing this one as systemd's main process needs to notify it
        (``NOTIFY_SOCKET``, and ``WATCHDOG_USEC`` when the watchdog is on)."""
        env: dict[str, str] = {}
        if self.address is not None:
            env["NOTIFY_SOCKET"] = self.address
        if self._watchdog_usec is not None:
            env["WATCHDOG_USEC"] = str(self._watchdog_usec)
        return env

    @property
    def enabled(self) -> bool:
        """True when messages go somewhere (systemd gave a usable NOTIFY_SOCKET)."""
        return self._sock is not None

    def watchdog_interval(self) -> float | None:
        """``WatchdogSec=`` in seconds, or None when this process is not asked to ping.

        Ping every half of it (sd_watchdog_enabled(3)); :class:`Heartbeat` does.
        """
        if self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 1_000_000

    def ready(self, status: str | None = None) -> None:
        """Start-up, or a reload, is complete: ``READY=1``."""
        self.send("READY=1", *_status_field(status))

    def reloading(self, status: str | None = None) -> None:
        """A reload begins: ``RELOADING=1`` with ``MONOTONIC_USEC`` (systemd ≥ 253)."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", *_status_field(status))

    def stopping(self, status: str | None = None) -> None:
        """A stop begins: ``STOPPING=1``."""
        self.send("STOPPING=1", *_status_field(status))

    def status(self, text: str) -> None:
        """A one-line status for ``systemctl status``: ``STATUS=``."""
        self.send(*_status_field(text))

    def watchdog(self) -> None:
        """The keep-alive ping: ``WATCHDOG=1``."""
        self.send("WATCHDOG=1")

    def mainpid(self, pid: int) -> None:
        """The service's main process is now ``pid``: ``MAINPID=``."""
        self.send(f"MAINPID={pid}")

    def send(self, *fields: str) -> bool:
        """Send ``fields`` as one datagram of lines; True if the kernel took it. Never raises."""
        if self._sock is None or self._address is None or not fields:
            return False
        data = "\n".join(fields).encode("utf-8", errors="replace")
        try:
            self._sock.sendto(data, self._address)
        except OSError as exc:
            self._failed(exc)
            return False
        return True

    def close(self) -> None:
        """Close the socket; later calls are no-ops. Idempotent."""
        if self._sock is not None:
            self._sock.close()
        self._sock = None
        self._address = None

    def close_in_child(self) -> None:
        """In a forked child: drop the master's notify socket, so the child can never notify."""
        self.close()
        self._watchdog_usec = None

    def _failed(self, exc: OSError) -> None:
        self.failures += 1
        if self.failures == 1:
            name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
            log.warning("sd_notify failed: %s (%s); further failures are only counted",
                        exc.strerror, name)


def _notify_address(text: str) -> bytes | None:
    if text.startswith("@") and len(text) > 1:
        return b"\0" + os.fsencode(text[1:])
    if text.startswith("/"):
        return os.fsencode(text)
    return None  # relative, empty, or vsock: (systemd ≥ 254 in VMs): not supported here


def _watchdog_usec(usec: str | None, owner: str | None, pid: int) -> int | None:
    if usec is None:
        return None
    if owner is not None and owner != str(pid):
        return None  # meant for another process (sd_watchdog_enabled(3))
    if not usec.isascii() or not usec.isdigit() or int(usec) == 0:
        log.warning("ignoring WATCHDOG_USEC=%r: not a positive number of microseconds", usec)
        return None
    return int(usec)


def _status_field(text: str | None) -> tuple[str, ...]:
    if text is None:
        return ()
    return ("STATUS=" + text.translate(_NOT_IN_A_LINE)[:MAX_STATUS_CHARS],)


class Heartbeat:
    """Sends ``WATCHDOG=1`` from the master's loop every half ``WatchdogSec``, as a deadline.

    The loop adds :meth:`next_deadline` to its select timeout and calls :meth:`tick` once per
    turn; both are free when systemd asked for no watchdog. ``now`` is the loop's monotonic
    clock (``kernel.monotonic()``), so tests drive it with a virtual one.
    """

    def __init__(self, notifier: Notifier, now: float) -> None:
        self._notifier = notifier
        interval = notifier.watchdog_interval() if notifier.enabled else None
        #: Seconds between pings, or None without a watchdog (or with nowhere to send).
        self.period = interval / 2 if interval else None
        self._due = now + self.period if self.period else None

    def next_deadline(self) -> float | None:
        return self._due

    def tick(self, now: float) -> None:
        """Ping if due; the next ping is a period from *now*, so a late loop never bursts."""
        if self._due is None or self.period is None or now < self._due:
            return
        self._notifier.watchdog()
        self._due = now + self.period
