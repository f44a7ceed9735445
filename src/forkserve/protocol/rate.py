"""What each client key has done: its recent arrivals (the sliding-window rate with its
penalty box, ``RateTable``) and its connections in flight (``InFlight``). Sans-I/O: the
clock is passed in.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from dataclasses import dataclass

from .clientkey import ClientKey

#: Keys the rate table tracks by default: about 3 MB at 10/1, see the theory above.
DEFAULT_MAX_TRACKED = 10_000
#: Largest N of ``rate_per_ip N/SECONDS``: each key may hold N timestamps (8 bytes each).
MAX_RATE_COUNT = 1000
#: Longest rate window and penalty: a day; more is a typo, not a rate.
MAX_RATE_SECONDS = 86_400.0
#: Shortest rate window: the kernel's timers and our clock do not resolve less usefully.
MIN_RATE_SECONDS = 0.001


@dataclass(frozen=True, slots=True)
class Rate:
    """``count`` new connections per ``seconds``, as in ``rate_per_ip 10/1``."""

    count: int
    seconds: float

    def __str__(self) -> str:
        return f"{self.count}/{self.seconds:g}"


def parse_rate(text: str) -> Rate:
    """Parse ``N/SECONDS`` (``"10/1"``, ``"100/60"``, ``"5/0.5"``); raise ``ValueError``."""
    count, sep, seconds = text.strip().partition("/")
    if not sep:
        raise ValueError(f"{text!r}: write the rate as N/SECONDS, as in 10/1 (ten a second)")
    try:
        n = int(count.strip())
        s = float(seconds.strip())
    except ValueError:
        raise ValueError(f"{text!r}: N must be a whole number and SECONDS a number, "
                         f"as in 100/60") from None
    if not 1 <= n <= MAX_RATE_COUNT:
        raise ValueError(f"{text!r}: N must be from 1 to {MAX_RATE_COUNT}; for more, "
                         f"shorten the window")
    if not MIN_RATE_SECONDS <= s <= MAX_RATE_SECONDS:  # also refuses nan and inf
        raise ValueError(f"{text!r}: SECONDS must be from {MIN_RATE_SECONDS:g} to "
                         f"{MAX_RATE_SECONDS:g}")
    return Rate(n, s)


# --------------------------------------------------------------------------- counters


class InFlight:
    """Connections in flight per client key. Memory: one entry per key with a connection."""

    __slots__ = ("_counts",)

    def __init__(self) -> None:
        self._counts: dict[ClientKey, int] = {}

    def acquire(self, key: ClientKey, limit: int) -> bool:
        """Count one more connection unless ``limit`` (0: none) is reached; ``True`` if counted."""
        count = self._counts.get(key, 0)
        if limit and count >= limit:
            return False
        self._counts[key] = count + 1
        return True

    def release(self, key: ClientKey) -> bool:
        """Count one connection less; ``False`` (and nothing changes) if none was in flight."""
        count = self._counts.get(key, 0)
        if count <= 0:
            return False
        if count == 1:
            del self._counts[key]
        else:
            self._counts[key] = count - 1
        return True

    def count(self, key: ClientKey) -> int:
        return self._counts.get(key, 0)

    def __len__(self) -> int:
        return len(self._counts)


class _History:
    """The last N counted arrival times of one key (a ring once full) and its penalty."""

    __slots__ = ("head", "last", "penalty_until", "times")

    def __init__(self, now: float) -> None:
        self.times = array("d", (now,))
        self.head = 0  # index of the oldest time once the ring is full
        self.last = now
        self.penalty_until = 0.0


class RateTable:
    """Sliding-window rate limit with a penalty box, over at most ``max_tracked`` keys."""

    __slots__ = ("_keys", "evictions", "max_tracked", "penalty", "rate")

    def __init__(self, rate: Rate, penalty: float | None = None,
                 max_tracked: int = DEFAULT_MAX_TRACKED) -> None:
        self.rate = rate
        self.penalty = rate.seconds if penalty is None else penalty
        self.max_tracked = max_tracked
        self.evictions = 0
        # least recently active first: the front is where expired and stale keys are
        self._keys: OrderedDict[ClientKey, _History] = OrderedDict()

    def hit(self, key: ClientKey, now: float) -> bool:
        """Count an arrival of ``key`` at ``now``; ``False`` if it is refused (penalty)."""
        history = self._keys.get(key)
        if history is None:
            self._make_room(now)
            self._keys[key] = _History(now)
            return True
        self._keys.move_to_end(key)
        if history.penalty_until > now:
            return False
        times, n = history.times, self.rate.count
        if len(times) < n:
            times.append(now)
        elif times[history.head] > now - self.rate.seconds:  # N already in the window
            history.penalty_until = now + self.penalty
            history.times = array("d")
            history.head = 0
            return False
        else:
            times[history.head] = now
            history.head = (history.head + 1) % n
        history.last = now
        return True

    def penalised(self, key: ClientKey, now: float) -> bool:
        history = self._keys.get(key)
        return history is not None and history.penalty_until > now

    def _expired(self, history: _History, now: float) -> bool:
        return history.penalty_until <= now and history.last <= now - self.rate.seconds

    def _make_room(self, now: float) -> None:
        keys = self._keys
        while keys and self._expired(next(iter(keys.values())), now):
            keys.popitem(last=False)
        if len(keys) >= self.max_tracked:
            keys.popitem(last=False)
            self.evictions += 1

    def __len__(self) -> int:
        return len(self._keys)


