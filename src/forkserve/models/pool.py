"""What the master knows of a pre-fork pool: its workers and its target (data, no I/O)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..ops.scoreboard import SlotState

#: Slot states of a worker that has a connection.
BUSY = frozenset({SlotState.READING, SlotState.WRITING, SlotState.CLOSING,
                  SlotState.FINISHING})


@dataclass
class WorkerInfo:
    """One worker, as the master forked it and has heard of it since."""

    pid: int
    slot: int
    generation: int
    started: float
    #: The watchdog's ``timeout`` of the config this worker was forked with.
    timeout: float
    ready: bool = False
    retiring: bool = False
    #: When SIGTERM went to it, while ``retiring``, and whether it went again since
    #: (``child.STOP_REMINDER``).
    told_at: float = 0.0
    reminded: bool = False
    #: When the watchdog sent SIGABRT, then SIGKILL (``watchdog``).
    aborted_at: float | None = None
    killed_at: float | None = None


@dataclass
class Pool:
    target: int
    generation: int = 0
    boot_failures: int = 0
    #: slot -> monotonic time before which it may not be forked again
    slot_free_at: dict[int, float] = field(default_factory=dict)
