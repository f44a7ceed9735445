"""The stop checklist (STYLE rule 17): how the master stops, step by step, with its deadlines.

A stop begins on TERM or INT (graceful), QUIT (fast), a halt (the server cannot go on) or an
upgrade's handover (a new master serves the same sockets). ``begin`` runs steps 1 to 4 at
once; the master's loop calls ``advance`` after every wake-up for steps 5 and 6, and waits at
most until ``deadlines()``; it reaps (step 7) and ends once ``finished``.

1. **Stop accepting.** The listeners leave the selector; systemd is told the service stops
   (not on a handover: the service goes on, in the new master). A graceful stop refuses new
   clients on the sockets nobody else holds (``Listener.refuse_new``: not systemd's, not on a
   handover, not while an upgrade's new master may still take them), so that step 2 leaves
   nothing queued for the close to reset.
2. **Serve what is queued** (graceful, not a handover): the model takes what the kernel has
   queued on each listener (``Model.drain``: the fork model forks for it, prefork workers are
   told on the scoreboard, the single model serves them one after the other), so those
   clients are answered, not reset by the close. A fork model at ``max_children`` keeps the
   listener (its filter lets no one new in) and takes the rest as its children end, for
   ``QUEUE_HOLD`` at most (half of ``graceful_timeout`` if less): then it is closed and the
   model told. What is still queued then is reset by the close.
3. **Close the listeners**: new clients are refused, not left hanging in a queue nobody
   reads. (On a handover the sockets stay open in the new master.) The model is told
   (``Model.stop_begun``, then ``Model.listeners_closed`` once no listener is kept): the
   fork model's zygote retires, and exits after its last child.
4. **Ask every process to finish**: SIGTERM (a child stops reading and writes what it owes).
   A fast stop sends SIGKILL instead and is done. A handover of exec programs sends nothing:
   SIGTERM would cut them short, and they end on their own.
5. **Remind once**, ``STOP_REMINDER`` after step 4: SIGTERM again to what still runs
   forkserve's own code (``Model.remind_stop``): a handler blocked in ``recv`` may have missed
   the first one (see ``serving.child``). Exec programs get one SIGTERM, as inetd sends.
6. **Deadline**, ``graceful_timeout`` after step 4: SIGKILL what is left; the master then
   exits 1 (``killed``). A QUIT during a graceful stop jumps here at once.
7. **Reap** (the loop does): the stop is finished when the model has no process left and no
   connection pending (``Model.pids``, ``Model.pending``).

Worst case: ``graceful_timeout`` plus the time the kernel takes to deliver SIGKILL and the
loop to reap; the master never waits on a timer it has not set here.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..kernel import Kernel
from ..models import Model
from ..serving.child import STOP_REMINDER
from .listeners import Listener
from .systemd import Notifier

log = logging.getLogger("forkserve")

#: The longest a graceful stop keeps a listener open for the clients queued on it that the
#: model had no room for (as a busy prefork worker's ``DRAIN_SECONDS``).
QUEUE_HOLD = 5.0


@dataclass
class Stop:
    fast: bool
    deadline: float
    #: When SIGTERM went to the processes (``child.STOP_REMINDER``) ...
    told_at: float
    #: ... and whether it went again to those still running.
    reminded: bool = False
    killed: bool = False
    #: An upgrade's new master serves the same sockets now.
    handover: bool = False
    #: Connections (processes serving them) killed to stop.
    cut: int = 0
    #: Until when listeners a drain kept open stay open (step 2).
    hold_until: float = 0.0


class StopChecklist:
    """The master's stop, as data and steps (see the module doc). Runs in the master."""

    def __init__(self, model: Model, listeners: Sequence[Listener], kernel: Kernel,
                 notifier: Notifier, stop_accepting: Callable[[], None]) -> None:
        self._model = model
        self._listeners = listeners
        self._kernel = kernel
        self._notifier = notifier
        #: Step 1: the master's accept control, told that a stop has begun.
        self._stop_accepting = stop_accepting
        self.stop: Stop | None = None
        #: Something had to be killed to stop: the master exits 1.
        self.killed = False
        #: Connections the master cut itself (the single model's), not by killing a process.
        self._cut_here = 0
        #: Listeners kept open by step 2 for what is queued on them.
        self._kept: list[Listener] = []

    def begin(self, *, fast: bool, timeout: float, handover: bool = False,
              shared: bool = False) -> None:
        """Steps 1 to 4 (or, during a graceful stop, a fast one jumps to step 6). ``shared``:
        an upgrade's new master, not ready yet, holds the sockets too."""
        now = self._kernel.monotonic()
        if self.stop is not None:
            if fast and not self.stop.fast:
                self._close_kept()
                self.stop.fast, self.stop.cut = True, len(self._model.pids())
                self._model.stop_begun(signal.SIGKILL)
                self._kill_all(signal.SIGKILL)
            return
        stop = self.stop = Stop(fast=fast, deadline=now + timeout, told_at=now,
                                handover=handover)
        if not handover:
            self._notifier.stopping()
        self._stop_accepting()  # 1
        if not (fast or handover or shared):
            for listener in self._listeners:
                listener.refuse_new()
        for listener in self._listeners:
            if (not fast and not handover and self._model.drain(listener)  # 2
                    and listener.ours and not shared):
                # the model was full and more may wait, in a queue the close would reset
                # (not systemd's socket, nor one a new master may take: theirs outlives us)
                self._kept.append(listener)
                continue
            listener.close()  # 3
        if self._kept:
            stop.hold_until = now + min(QUEUE_HOLD, timeout / 2)
        told = None if handover and not fast and self._model.ends_on_sigterm else (
            signal.SIGKILL if fast else signal.SIGTERM)
        self._model.stop_begun(told)
        if not self._kept:
            self._model.listeners_closed()
        pending = len(self._model.pids())
        if fast:
            stop.cut = pending
            log.info("fast stop: killing %d process(es)", pending)
        else:
            log.info("graceful stop: waiting up to %g s for %d process(es)", timeout, pending)
        if told is not None:
            self._kill_all(told)  # 4

    def advance(self) -> None:
        """Step 2 for the listeners it kept, then steps 5 and 6, when due."""
        stop = self.stop
        if stop is None or stop.killed or stop.fast:
            return
        if self._kept:
            past = self._kernel.monotonic() >= stop.hold_until
            for listener in list(self._kept):
                if past or not self._model.drain(listener):
                    self._kept.remove(listener)
                    listener.close()
            if not self._kept:
                self._model.listeners_closed()
        left = self._model.pids()
        now = self._kernel.monotonic()
        if left and now >= stop.deadline:  # 6
            stop.killed, stop.cut = True, len(left)
            self.note_killed(f"graceful timeout: killing {len(left)} connection(s) still open")
            self._kill_all(signal.SIGKILL)
        elif left and self._reminder_due(stop) <= now:  # 5
            stop.reminded = True
            self._kill_all(signal.SIGTERM)

    def deadlines(self) -> list[float]:
        """When ``advance`` has something to do (none once everything left was killed, as a
        fast stop does at once: only SIGCHLD can wake the loop then, not a past deadline
        that would have it spin)."""
        stop = self.stop
        if stop is None or stop.killed or stop.fast:
            return []
        out = [stop.deadline]
        if self._kept:
            out.append(stop.hold_until)
        if not stop.fast and self._model.pids():
            out.append(self._reminder_due(stop))  # (inf when none is due)
        return out

    def finished(self) -> bool:
        """Step 7 done: nothing left to wait for."""
        return (self.stop is not None and not self._kept and not self._model.pids()
                and not self._model.pending())

    def note_killed(self, message: str, *, cut: int = 0) -> None:
        """Something had to be killed to stop: say so, and exit 1 at the end. ``cut``:
        connections the master cut itself (a killed process's are the stop's count)."""
        self.killed = True
        self._cut_here += cut
        log.warning("%s", message)

    def cut(self) -> int:
        """Connections the stop cut: its processes killed, and those the master cut."""
        return (self.stop.cut if self.stop is not None else 0) + self._cut_here

    def abandon(self) -> None:
        """The loop failed: leave no child behind. Kill them and reap them, blocking."""
        for pid in list(self._model.pids()):
            with contextlib.suppress(OSError):
                self._kernel.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                self._kernel.waitpid(pid, 0)

    def _close_kept(self) -> None:
        if self._kept:
            for listener in self._kept:
                listener.close()
            self._kept.clear()
            self._model.listeners_closed()

    def _reminder_due(self, stop: Stop) -> float:
        """When SIGTERM goes again to what a graceful stop still waits for (inf: never)."""
        if stop.reminded or not self._model.remind_stop:
            return math.inf
        return stop.told_at + STOP_REMINDER

    def _kill_all(self, sig: int) -> None:
        for pid in list(self._model.pids()):
            self._model.signal(pid, sig)
