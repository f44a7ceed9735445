"""The gate: admission control where the master accepts, before any fork.

Theory of operation
-------------------
``admission`` decides (rules, rate, per-IP concurrency) on an injected clock; this module is
its glue to the master. For every connection the fork and single models accept, ``admit``
either returns the key to release when the connection ends, or refuses it: the reason is
counted (``refused`` by reason, in status and metrics), ``refuse_message`` is sent without
waiting (one non-blocking ``send``: a client that does not read gets nothing rather than a
master that waits), the socket closed, and the refusal logged at most once a second per
reason. Unix-socket peers have no address and are always admitted.

A refused socket is closed the way ``Connection.close`` closes: the message, then the write
side shut down, then what the client sends is read and dropped until it closes too, for at
most ``linger_timeout``, so the message is not destroyed by the reset that closing a socket
with unread input sends; without a message the client is owed nothing, and the socket is
closed at once. In the master this is done from its loop (a watched fd per refused
client, at most ``MAX_LINGERING``; past that, or in a prefork worker, which must not wait, the
socket is closed after one read that does not wait).

The rules file is polled once a second (one ``stat``) through the master's deadline, and read
again on every reload. A file that does not parse keeps the rules in force; the log says why.

Prefork workers accept by themselves, so the master never sees their clients: each worker
runs its own copy of the gate (forked with it; it polls the rules file the same way), which
applies the rules only; the per-IP limits, which need one place that sees every connection,
are refused for that model (``check_model``). A worker's refusals are in the log, not in the
master's counters.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import socket
from collections.abc import Callable

from ..config import Config
from ..errors import ConfigError
from ..ops import loopserver
from ..protocol.admission import Admission, ClientKey
from ..protocol.defence import Cause, Startups, parse_penalties, parse_startups

log = logging.getLogger("forkserve")

#: How often the rules file's signature is looked at.
RULES_POLL = 1.0
#: Refused sockets lingering at once in the master; more are closed at once.
MAX_LINGERING = 256
#: ... and what one may send while it lingers before it is closed anyway.
LINGER_MAX_BYTES = 1 << 20


#: The status view lists at most this many penalised sources (the most recent).
PENALISED_SHOWN = 20
#: ``max_startups_per_source`` unset: an eighth of the capacity, but never fewer than this
#: (a household behind one NAT address opens a few connections at once).
MIN_AUTO_PER_SOURCE = 8
#: ``max_startups auto``: START an eighth of the capacity (never below sshd's 10: a small
#: server is not dropping a client's second connection), RATE 30 % (sshd's), FULL a half.
AUTO_STARTUPS_RATE = 30
AUTO_STARTUPS_MIN = 10


def capacity(config: Config) -> int:
    """Connections served at once at most: ``max_children``, prefork's ``max_workers``, or
    hybrid's ``worker_connections`` per worker (one worker per CPU unless set)."""
    if config.model == "hybrid":
        workers = config.workers or len(os.sched_getaffinity(0)) or 1
        return workers * config.worker_connections
    return config.max_workers if config.model == "prefork" else config.max_children


def startups_per_source(config: Config) -> int:
    """``max_startups_per_source`` in force (0: none; single serves one at a time)."""
    if config.max_startups_per_source is not None:
        return config.max_startups_per_source
    if config.model == "single":
        return 0
    return max(MIN_AUTO_PER_SOURCE, capacity(config) // 8)


def startups(config: Config) -> Startups | None:
    """The early drop in force (fork and prefork; None: off)."""
    if config.max_startups == "off" or config.model == "single":
        return None
    if config.max_startups != "auto":
        return parse_startups(config.max_startups)
    cap = capacity(config)
    start = max(AUTO_STARTUPS_MIN, cap // 8)
    return Startups(start, AUTO_STARTUPS_RATE, max(start, cap // 2))


def rules_wanted(config: Config) -> bool:
    """Are there allow/deny rules to apply (prefork workers check them themselves)?"""
    return bool(config.allow or config.deny or config.rules_file)


def check_model(config: Config) -> None:
    """Refuse per-IP limits where no process sees every connection. Raises ``ConfigError``."""
    if config.model in ("prefork", "hybrid"):
        for name in ("max_per_ip", "rate_per_ip"):
            if getattr(config, name):
                raise ConfigError(name, "needs the master to see every connection, and "
                                        f"{config.model} workers accept by themselves: use "
                                        "the fork model, or limit on the load balancer (prefork "
                                        "caps the unproven: max_startups_per_source)")


def build(config: Config, previous: Admission | None = None) -> Admission:
    """The ``Admission`` for ``config`` (the defences are on by default). Raises
    ``ConfigError``. The defences that count unproven connections are applied through the
    scoreboard (``sourceguard``); prefork workers apply the rules themselves, and the
    penalties that the master keeps and publishes in the scoreboard."""
    check_model(config)
    return Admission(allow=config.allow, deny=config.deny, rules_file=config.rules_file,
                     max_per_ip=config.max_per_ip, rate_per_ip=config.rate_per_ip,
                     rate_penalty=config.rate_penalty or None,
                     penalties=parse_penalties(config.penalties),
                     penalty_exempt=config.penalty_exempt, previous=previous)


class Gate:
    """Admission in the master: admit or refuse accepted sockets; release; poll the rules."""

    def __init__(self, admission: Admission | None, config: Config, *,
                 clock: Callable[[], float], count: Callable[[str, str], None],
                 report: Callable[[str, int, str], None],
                 host: loopserver.Host | None = None) -> None:
        self.admission = admission
        self.config = config
        self._clock = clock
        self._count = count
        self._report = report
        self._next_poll = clock() + RULES_POLL
        #: The master's loop, to linger in (None in a worker: it closes without waiting).
        self._host = host
        #: fd -> (socket, deadline) of refused clients lingering, and the bytes they sent since
        self._lingering: dict[int, tuple[socket.socket, float]] = {}
        self._drained: dict[int, int] = {}

    def replace(self, admission: Admission | None, config: Config) -> None:
        """A reload: the new admission (its in-flight counts carried over) and settings."""
        self.admission, self.config = admission, config
        if admission is not None:
            self._reload_rules(force=True)

    def admit(self, sock: socket.socket, addr: object) -> tuple[bool, ClientKey | None]:
        """(admitted, the key to release). A refused ``sock`` is closed here."""
        if self.admission is None or not isinstance(addr, tuple):
            return True, None  # a unix-socket peer has no address (a PROXY header may give one)
        verdict = self.admission.check(addr[0], self._clock())
        if verdict.admitted:
            return True, verdict.key
        assert verdict.reason is not None
        rule = f" by {verdict.rule}" if verdict.rule is not None and verdict.reason == "denied" \
            else ""
        self.refuse(sock, str(verdict.reason), f"{addr[0]}{rule}")
        return False, None

    def penalised(self, now: float, limit: int = PENALISED_SHOWN) -> list[dict[str, object]]:
        """The sources refused for a penalty now, most recent first (for the status view)."""
        table = self.admission.penalties if self.admission is not None else None
        if table is None:
            return []
        return [{"source": str(key), "left_s": round(entry.until - now, 1),
                 "causes": {str(c): n for c, n in entry.causes.items()}}
                for key, entry in itertools.islice(table.active(now), limit)]

    def penalise(self, key: ClientKey | None, cause: Cause) -> None:
        """``key``'s connection ended by ``cause``: penalise it (see ``defence``)."""
        if key is None or self.admission is None:
            return
        until = self.admission.penalise(key, cause, self._clock())
        if until is not None:
            self._count("penalties", str(cause))
            self._report(f"penalty:{cause}", logging.INFO,
                         f"penalised {key} for {cause}: refused for "
                         f"{until - self._clock():.0f} s")


    def refuse(self, sock: socket.socket, reason: str, who: str) -> None:
        """Close ``sock`` at once, after ``refuse_message``; count and report (rate-limited)."""
        self._count("refused", reason)
        self._report(f"refused:{reason}", logging.INFO, f"refused {who}: {reason}")
        message = self.config.refuse_message
        try:
            sock.setblocking(False)
            if message is not None:
                sock.send(message.encode() + b"\n")
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            sock.close()
            return
        owed_nothing = message is None or not self.config.linger_timeout
        if owed_nothing or self._host is None or len(self._lingering) >= MAX_LINGERING:
            self._drain(sock)
            sock.close()
            return
        fd = sock.fileno()
        self._lingering[fd] = (sock, self._clock() + self.config.linger_timeout)
        self._host.watch(fd, functools.partial(self._on_lingering, fd))

    @staticmethod
    def _drain(sock: socket.socket) -> int | None:
        """Read what is there without waiting: the bytes read, or None once the client has
        closed (or reset)."""
        total = 0
        try:
            for _ in range(16):
                chunk = sock.recv(65536)
                if not chunk:
                    return None
                total += len(chunk)
        except (BlockingIOError, InterruptedError):
            return total
        except OSError:
            return None
        return total

    def _on_lingering(self, fd: int) -> None:
        sock, _ = self._lingering[fd]
        drained = self._drain(sock)
        self._drained[fd] = self._drained.get(fd, 0) + (drained or 0)
        if drained is None or self._drained[fd] >= LINGER_MAX_BYTES:
            self._end_lingering(fd)  # closed, or streaming at us: enough

    def _end_lingering(self, fd: int) -> None:
        sock, _ = self._lingering.pop(fd)
        self._drained.pop(fd, None)
        if self._host is not None:
            self._host.unwatch(fd)
        sock.close()

    def close_in_child(self) -> None:
        """In a forked child: the lingering sockets are the master's."""
        for sock, _ in self._lingering.values():
            sock.close()
        self._lingering.clear()
        self._host = None

    def close(self) -> None:
        for fd in list(self._lingering):
            self._end_lingering(fd)

    def release(self, key: ClientKey | None) -> None:
        if key is not None and self.admission is not None and not self.admission.release(key):
            log.error("admission: released a client that was not in flight (a bug)")

    def next_deadline(self) -> float | None:
        deadlines = [deadline for _, deadline in self._lingering.values()]
        if self.admission is not None and self.config.rules_file is not None:
            deadlines.append(self._next_poll)
        return min(deadlines, default=None)

    def tick(self, now: float) -> None:
        for fd in [fd for fd, (_, deadline) in self._lingering.items() if deadline <= now]:
            self._end_lingering(fd)
        if self.admission is None or self.config.rules_file is None or now < self._next_poll:
            return
        self._next_poll = now + RULES_POLL
        self._reload_rules(force=False)

    def _reload_rules(self, *, force: bool) -> None:
        assert self.admission is not None
        try:
            if self.admission.reload_rules(force=force) and not force:
                log.info("admission: %s changed: its rules are in force", self.config.rules_file)
        except ConfigError as exc:
            log.error("admission: %s; the rules in force stay", exc)
