"""``Patience``: how long a connection waits for its client beyond ``idle_timeout`` (rule 1 of
``connection``). Made by the code that runs the handler (from the settings and the
scoreboard's stress word), read by ``Connection`` before each wait.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Patience:
    """How long a connection waits for its client beyond ``idle_timeout`` (rule 1): the
    first-byte deadline, the shorter deadlines under stress, and who to tell once the client
    has proven itself. Deadlines of 0 or None are off."""

    first_byte: float | None = None
    stress_idle: float | None = None
    stress_first_byte: float | None = None
    #: Is the server under stress now? (the master's word in the scoreboard)
    stressed: Callable[[], bool] = lambda: False
    on_proven: Callable[[], None] | None = None

    def idle_limit(self, idle: float | None, stressed: bool) -> float | None:
        if stressed and self.stress_idle:
            return self.stress_idle if idle is None else min(idle, self.stress_idle)
        return idle

    def first_byte_limit(self, stressed: bool) -> float:
        assert self.first_byte is not None
        if stressed and self.stress_first_byte:
            return min(self.first_byte, self.stress_first_byte)
        return self.first_byte
