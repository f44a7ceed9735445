"""Defences on by default: early drop of unproven connections, per-source penalties, stress.

Pure logic, like ``admission``: no sockets, no clock (``now`` is passed in), no randomness
(the caller passes a uniform number in [0, 1)). The master (fork, single) or each worker
(prefork) asks; tests drive it on a virtual clock.

Theory of operation
-------------------
A process-per-connection server is taken down by clients that connect and say nothing
(slowloris): each holds a process until a timeout. The trusted servers answer by default;
forkserve does the same, each piece a setting that can be changed or turned off:

- **Early drop** (OpenSSH ``MaxStartups start:rate:full``, ``should_drop_connection`` in
  sshd.c). A connection is *unproven* until its client has sent a complete first line (or
  finished its TLS handshake and PROXY header and a first line). With ``unproven`` such
  connections held, a new one is refused with probability 0 below ``start``, ``rate`` % at
  ``start``, rising linearly to 100 % at ``full``. Proven clients are never dropped, so a flood
  of idle connections can fill at most ``full`` places, and well-behaved clients, which prove
  themselves within a round trip, keep the rest.
- **Penalties** (OpenSSH 9.8 ``PerSourcePenalties``). A source whose connection ended in a way
  only an abuser or a broken client causes (silent past the first-byte deadline, a handshake
  not finished in time, a line over ``max_line``, a handler crash) collects penalty time for
  that cause. Penalties add up (to ``maximum`` at most) and, as sshd's ``min``, are enforced
  only once what is accrued reaches ``minimum``: one slip (a line too long, a timeout on a
  bad network) costs a client nothing, a pattern refuses it at accept, before any fork, until
  its accrued time has passed. At most ``max_tracked`` sources are held (the least recently
  penalised are forgotten first: the table fails open, never locking out newcomers). Sources
  are keyed as admission keys them (IPv4 address, IPv6 /64), on the real client behind a
  trusted PROXY header. ``exempt`` networks (health checkers) are never penalised.
- **Stress mode** (Postfix ``-o stress=yes``). While the server is at its capacity (all
  ``max_children``, or the prefork ceiling busy), the first-byte and idle deadlines shrink for
  new connections and for those already waiting; it ends once fewer than
  ``STRESS_EXIT_FRACTION`` of the capacity is busy (hysteresis: no flapping at the edge).

Worst cases: ``Penalties`` holds at most ``max_tracked`` entries (about 200 bytes each: 65 536
sources, 13 MB); each operation is O(1) amortised. ``EarlyDrop`` is arithmetic.
"""

from __future__ import annotations

import enum
import math
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

#: Stress mode ends when no more than this share of the capacity is busy.
STRESS_EXIT_FRACTION = 0.75
#: Sources held in the penalty table by default (OpenSSH: 65 536).
DEFAULT_PENALTY_SOURCES = 65_536
#: Longest penalty a setting may give: a day; more is a typo, not a penalty.
MAX_PENALTY_SECONDS = 86_400.0

Key = TypeVar("Key")


class Cause(enum.StrEnum):
    """How a connection ended that earns its source a penalty; values are metrics labels."""

    FIRST_BYTE = "first_byte"
    HANDSHAKE = "handshake"
    LINE_TOO_LONG = "line_too_long"
    CRASH = "crash"


#: The causes by a number (their index), for messages between processes.
CAUSES = tuple(Cause)


# --------------------------------------------------------------------------- early drop


@dataclass(frozen=True)
class Startups:
    """``start:rate:full`` as sshd's ``MaxStartups``: see the module doc."""

    start: int
    rate: int
    full: int

    def __str__(self) -> str:
        return f"{self.start}:{self.rate}:{self.full}"

    def drop_probability(self, unproven: int) -> float:
        """The chance that a new connection is refused with ``unproven`` held."""
        if unproven < self.start:
            return 0.0
        if unproven >= self.full:
            return 1.0
        rise = (100 - self.rate) * (unproven - self.start) / (self.full - self.start)
        return (self.rate + rise) / 100.0

    def drop(self, unproven: int, uniform: float) -> bool:
        """Refuse a new connection? ``uniform`` is a random number in [0, 1)."""
        return uniform < self.drop_probability(unproven)


def parse_startups(text: str) -> Startups:
    """Parse ``START:RATE:FULL`` (or ``START``, which means ``START:100:START``, as sshd).

    Raises ``ValueError`` (``config`` names the setting)."""
    parts = text.strip().split(":")
    try:
        numbers = [int(p) for p in parts]
    except ValueError:
        numbers = []
    if len(numbers) == 1:
        numbers = [numbers[0], 100, numbers[0]]
    if len(numbers) != 3:
        raise ValueError(f"write it as START:RATE:FULL, as in 10:30:100, got {text!r}")
    start, rate, full = numbers
    if not (1 <= start <= full and 0 <= rate <= 100):
        raise ValueError(f"needs 1 <= START <= FULL and RATE from 0 to 100 (a "
                                   f"percentage), got {text!r}")
    return Startups(start, rate, full)


# --------------------------------------------------------------------------- penalties


@dataclass(frozen=True)
class PenaltyPolicy:
    """Seconds of penalty per cause, their sum's ``maximum``, and the table's size."""

    durations: dict[Cause, float]
    maximum: float
    minimum: float = 0.0
    max_tracked: int = DEFAULT_PENALTY_SOURCES

    def duration(self, cause: Cause) -> float:
        return self.durations.get(cause, 0.0)


#: sshd's PerSourcePenalties, mapped onto forkserve's causes: a deadline missed costs like
#: sshd's grace-exceeded (10 s), a line too long like authfail (5 s), a crash (a process
#: killed by SIGSEGV and the like: an exploit attempt, more likely than not) 90 s; at most
#: ``max`` in all (sshd: 600 s).
DEFAULT_PENALTIES = "first_byte:10 handshake:10 line_too_long:5 crash:90 min:15 max:600"


def parse_penalties(text: str) -> PenaltyPolicy | None:
    """Parse ``CAUSE:SECONDS ...`` plus ``min:SECONDS`` and ``max:SECONDS`` (or ``off``:
    None). A cause left out costs nothing. Raises ``ValueError`` (``config`` names the
    setting)."""
    if text.strip().lower() == "off":
        return None
    durations: dict[Cause, float] = {}
    maximum, minimum = 600.0, 0.0
    for word in text.replace(",", " ").split():
        name, _, value = word.partition(":")
        try:
            seconds = float(value)
        except ValueError:
            seconds = math.nan
        if not 0 <= seconds <= MAX_PENALTY_SECONDS:  # (nan fails too)
            raise ValueError(f"{word!r}: write CAUSE:SECONDS, seconds from 0 to "
                                       f"{MAX_PENALTY_SECONDS:g}")
        if name == "max":
            maximum = seconds
        elif name == "min":
            minimum = seconds
        elif name in Cause.__members__.values():
            durations[Cause(name)] = seconds
        else:
            causes = ", ".join(c.value for c in Cause)
            raise ValueError(f"{name!r} is not a cause ({causes}), min or max")
    return PenaltyPolicy(durations, maximum, minimum)



@dataclass
class Penalty:
    """A source's penalty, accrued until ``until``; refused while ``enforced`` and not past
    ``until``; ``causes`` counts what earned it."""

    until: float
    causes: dict[Cause, int] = field(default_factory=dict)
    enforced: bool = False


class Penalties(Generic[Key]):
    """Sources refused for a while after their connections ended badly (see the module doc)."""

    def __init__(self, policy: PenaltyPolicy,
                 exempt: Callable[[Key], bool] | None = None) -> None:
        self.policy = policy
        self._exempt = exempt
        # least recently penalised first: the front is what to forget when full
        self._table: OrderedDict[Key, Penalty] = OrderedDict()
        #: Sources forgotten early because the table was full.
        self.evictions = 0

    def penalise(self, key: Key, cause: Cause, now: float) -> float | None:
        """``key``'s connection ended by ``cause`` at ``now``: add its penalty. Returns the
        time until which ``key`` is now refused, or None (not refused: no penalty for that
        cause, exempt, or less than ``minimum`` accrued)."""
        seconds = self.policy.duration(cause)
        if seconds <= 0 or (self._exempt is not None and self._exempt(key)):
            return None
        entry = self._table.pop(key, None)
        if entry is None or entry.until <= now:
            self._make_room(now)
            entry = Penalty(now, entry.causes if entry is not None else {})
        entry.until = min(entry.until + seconds, now + self.policy.maximum)
        entry.causes[cause] = entry.causes.get(cause, 0) + 1
        entry.enforced = entry.enforced or entry.until - now >= self.policy.minimum
        self._table[key] = entry
        return entry.until if entry.enforced else None

    def refused(self, key: Key, now: float) -> bool:
        """Is ``key`` penalised at ``now``?"""
        entry = self._table.get(key)
        return entry is not None and entry.enforced and entry.until > now

    def active(self, now: float) -> Iterator[tuple[Key, Penalty]]:
        """The sources penalised at ``now``, most recently penalised first."""
        for key, entry in reversed(self._table.items()):
            if entry.enforced and entry.until > now:
                yield key, entry

    def adopt(self, old: Penalties[Key]) -> None:
        """Take over ``old``'s penalties (a reload): they stay in force until they end."""
        self._table = old._table
        self.evictions = old.evictions

    def _make_room(self, now: float) -> None:
        table = self._table
        while table and next(iter(table.values())).until <= now:
            table.popitem(last=False)
        while len(table) >= self.policy.max_tracked:
            table.popitem(last=False)
            self.evictions += 1

    def __len__(self) -> int:
        return len(self._table)


# --------------------------------------------------------------------------- stress


class Stress:
    """Whether the server is under stress now: on at capacity, off once usage falls to
    ``STRESS_EXIT_FRACTION`` of it. ``update`` returns True when the state changed."""

    def __init__(self) -> None:
        self.active = False
        self.since = 0.0

    def update(self, busy: int, capacity: int, now: float) -> bool:
        if not self.active and capacity and busy >= capacity:
            self.active, self.since = True, now
            return True
        if self.active and busy <= capacity * STRESS_EXIT_FRACTION:
            self.active, self.since = False, now
            return True
        return False
