"""The pre-fork watchdog: a worker whose own code makes no progress is aborted, then killed.

A ready worker whose slot is idle or working (not waiting on its client: ``WATCHED``) and
whose heartbeat is older than the ``timeout`` it was forked with gets SIGABRT (its Python
stack is printed: ``faulthandler``), then SIGKILL after ``ABORT_GRACE``, repeated every
``KILL_RETRY`` until it is reaped (a process in uninterruptible sleep dies late; the master
must not spin meanwhile). A worker not ready ``timeout`` after its fork (a ``post_fork`` hook
or an app's start that hangs) is ended the same way. Runs in the master; reads the scoreboard,
signals through the kernel seam, and sets no timer of its own: ``deadlines`` says when the
master's loop must look again. A worker that waits on its client when the master looks is
looked at again ``timeout`` later all the same: it may work again at any moment, unseen (a
worker tells the master nothing when it does), and a master that set no timer for it would
never see it stuck after that.
"""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Iterable

from ..kernel import Kernel
from ..ops.scoreboard import Scoreboard, SlotState
from .pool import WorkerInfo

log = logging.getLogger("forkserve")

#: After the watchdog's SIGABRT (which prints the stack), SIGKILL if still alive this long.
ABORT_GRACE = 2.0
#: After that, SIGKILL again this often until the worker is reaped.
KILL_RETRY = 1.0
#: Slot states whose time the watchdog bounds: the worker's own code (not its client) runs.
WATCHED = frozenset({SlotState.IDLE, SlotState.WRITING})


class Watchdog:
    """Looks at the workers' heartbeats in ``board``; signals through ``kernel``."""

    def __init__(self, board: Scoreboard, kernel: Kernel) -> None:
        self.board = board
        self.kernel = kernel

    def deadlines(self, workers: Iterable[WorkerInfo]) -> list[float]:
        """When ``check`` has something to do, per worker that it may have to end."""
        out = []
        now = self.kernel.monotonic()
        for worker in workers:
            if worker.killed_at is not None:
                out.append(worker.killed_at + KILL_RETRY)
            elif worker.aborted_at is not None:
                out.append(worker.aborted_at + ABORT_GRACE)
            elif not worker.ready:
                out.append(worker.started + worker.timeout)
            else:
                slot = self.board.read(worker.slot)
                if slot.pid == worker.pid:
                    # waiting on its client: stuck no sooner than ``timeout`` from now
                    watched = slot.state in WATCHED
                    out.append((slot.heartbeat if watched else now) + worker.timeout)
        return out

    def check(self, workers: Iterable[WorkerInfo], now: float) -> None:
        """SIGABRT a worker whose own code made no progress for ``timeout``; then SIGKILL."""
        for worker in list(workers):
            if worker.aborted_at is not None:
                self._escalate(worker, now)
            elif not worker.ready:
                self._boot_deadline(worker, now)
            else:
                self._heartbeat(worker, now)

    def _escalate(self, worker: WorkerInfo, now: float) -> None:
        """Aborted: SIGKILL after ``ABORT_GRACE``, then every ``KILL_RETRY``."""
        assert worker.aborted_at is not None
        due = (worker.aborted_at + ABORT_GRACE if worker.killed_at is None
               else worker.killed_at + KILL_RETRY)
        if now >= due:
            worker.killed_at = now
            self._kill(worker, signal.SIGKILL)

    def _boot_deadline(self, worker: WorkerInfo, now: float) -> None:
        if now - worker.started < worker.timeout:
            return
        log.error("worker %d (pid %d) is not ready after %.1f s (a post_fork hook or the app's "
                  "start stuck?): sending SIGABRT (its Python stack follows), then SIGKILL",
                  worker.slot, worker.pid, now - worker.started)
        self._abort(worker, now)

    def _heartbeat(self, worker: WorkerInfo, now: float) -> None:
        slot = self.board.read(worker.slot)
        if slot.pid != worker.pid or slot.state not in WATCHED:
            return
        stalled = now - slot.heartbeat
        if stalled < worker.timeout:
            return
        doing = (f"serving {slot.peer} (connected {now - slot.conn_start:.1f} s ago)"
                 if slot.peer else "idle")
        log.error("worker %d (pid %d) made no progress for %.1f s while %s: sending SIGABRT "
                  "(its Python stack follows), then SIGKILL", worker.slot, worker.pid, stalled,
                  doing)
        self._abort(worker, now)

    def _abort(self, worker: WorkerInfo, now: float) -> None:
        worker.aborted_at = now
        self._kill(worker, signal.SIGABRT)

    def _kill(self, worker: WorkerInfo, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.kernel.kill(worker.pid, sig)
