"""What the master counts and how it reports trouble: the status counters and one rate limiter.

Counters are (kind, label) pairs: accept pauses by errno, fork failures by errno, refused
connections by reason, worker exits by reason, stress mode entered and left. The status
socket and the metrics endpoint show them (``counter_table``).

Reports: at most one log line per kind of trouble per ``REPORT_INTERVAL`` for the whole
server, with the count of what it held back, so a lasting EMFILE is one line every 5 s, not
a flood (pg_doorman PR#262 paces its log the same way after a log storm in an outage).
Prefork workers report through the master (``poolpipe``): a pool of 64 logs what one process
would. Runs in the master.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable

from ..ops.logs import RateLimiter

log = logging.getLogger("forkserve")

#: At most one report per kind of trouble per this many seconds, for the whole server.
REPORT_INTERVAL = 5.0


class Events:
    """The master's counters and its one rate limiter for reports."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self.counters: Counter[tuple[str, str]] = Counter()
        self._reports = RateLimiter(REPORT_INTERVAL)

    def count(self, kind: str, label: str, n: int = 1) -> None:
        self.counters[kind, label] += n

    def counter_table(self) -> dict[str, dict[str, int]]:
        """The counters by kind, then label (the status snapshot's ``counters``)."""
        table: dict[str, dict[str, int]] = {}
        for (kind, label), n in sorted(self.counters.items()):
            table.setdefault(kind, {})[label] = n
        return table

    def report(self, key: str, level: int, message: str, *args: object,
               events: int = 1) -> None:
        """Log ``message`` unless a report of ``key`` went out less than ``REPORT_INTERVAL``
        ago (then it is held back and counted in the next one)."""
        held = self._reports.allow(key, self._clock(), events)
        if held is not None:
            suffix = f" ({held} more since the last report)" if held else ""
            log.log(level, message + suffix, *args)
