"""Stress mode in a model (``defence.Stress``, Postfix's ``-o stress=yes``): at capacity, the
deadlines of connections waiting for their client shrink, and the processes serving them are
told to look at their deadlines again (``serving.signals.LOOK_AGAIN``); it ends once a quarter
of the capacity is free again. Runs in the master."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable

from ..config import Config
from ..kernel import Kernel
from ..ops.scoreboard import Scoreboard
from ..protocol.defence import Stress
from ..serving.signals import LOOK_AGAIN

log = logging.getLogger("forkserve")


class StressMode:
    """One model's stress mode: ``update`` after anything that changes how busy it is."""

    def __init__(self, board: Scoreboard, kernel: Kernel,
                 count: Callable[[str, str], None]) -> None:
        self.board = board
        self.kernel = kernel
        self._count = count
        self.stress = Stress()

    @property
    def active(self) -> bool:
        return self.stress.active

    def update(self, config: Config, busy: int, capacity: int, pids: Iterable[int]) -> None:
        """``busy`` of ``capacity`` in use, under ``config``'s stress settings; on a change,
        ``pids`` are told to look at their deadlines again."""
        if not (config.stress_idle_timeout or config.stress_first_byte_timeout):
            return
        if not self.stress.update(busy, capacity, self.kernel.monotonic()):
            return
        on = self.stress.active
        self.board.set_stress(on)
        if on:
            log.warning("entering stress mode: %d of %d connections in use (idle_timeout %g s, "
                        "first_byte_timeout %g s)", busy, capacity,
                        config.stress_idle_timeout or config.idle_timeout,
                        config.stress_first_byte_timeout or config.first_byte_timeout)
        else:
            log.warning("leaving stress mode: %d of %d connections in use", busy, capacity)
        self._count("stress", "entered" if on else "left")
        for pid in list(pids):
            with contextlib.suppress(ProcessLookupError):
                self.kernel.kill(pid, LOOK_AGAIN)
