"""The pre-fork model: N workers forked ahead of time accept on the shared listeners.

Theory of operation
-------------------
Apache prefork and gunicorn's sync worker: each worker (``worker.py``) serves one connection
at a time, and the kernel queues the rest in the backlog. The master does not accept at all;
it keeps the pool at its target size and rolls it on reload.

- Slots: generation ``g`` forks into slots ``[b, b + target)`` with ``b = (g % 2) *
  max_workers``, so a reload's new generation never competes with the old one for slots.
- Replacing: a worker that exits is replaced at once, unless its slot was forked less than
  ``RESPAWN_INTERVAL`` ago (a crash loop at run time), in which case the new one waits for the
  rest of the interval: at most ``target`` forks per interval, however fast workers crash.
- Pool pipe (``poolpipe``): workers say they are ready, and tell of their accept errors, which
  the master counts (``accept_pauses``) and logs through its one rate limiter: the log of a
  pool out of fds is the log of one process, whatever the number of workers.
- Boot failures: a worker that exits before it wrote its ready message failed while booting
  (the pool pipe is drained before an exit is judged, so a worker that was ready and left at
  once is not mistaken for one). ``BOOT_FAILURES_TO_HALT`` of those in a row, with no worker
  ready in between and none left serving, stop the master gracefully with exit status 3
  instead of forking forever (gunicorn's WORKER_BOOT_ERROR). While ready workers still serve
  (a reload whose workers cannot boot), they keep serving and the failing slots back off,
  doubling up to ``BOOT_BACKOFF_MAX``.
- Reload (SIGHUP, with or without a config file): a new generation is forked with the new
  config and the app's code imported again (``reload``); each old worker is retired (SIGTERM:
  it finishes its connection and exits; told once more ``STOP_REMINDER`` later if it has not)
  only once a new one has said it is ready, so the pool never shrinks and the shared accept
  queue never loses a connection.
- Scaling: TTIN and TTOU change the target by one, never below 1 nor above ``max_workers``;
  a worker retired to shrink the pool is an idle one if any is (a busy one finishes its
  connection first, but an idle one costs nobody anything).
- Watchdog (``watchdog``): a worker whose own code made no progress for the ``timeout`` it was
  forked with gets SIGABRT, then SIGKILL; one not ready ``timeout`` after its fork is ended the
  same way, and counts as a boot failure.
- Adaptive pool, the default (``adaptive``: Apache prefork's rule and defaults): once a
  second the target grows while too few workers are idle and shrinks while too many are. Only
  ready workers of the current generation count. A pool whose workers are all idle rests: the
  master sets no timer until a worker takes a connection and says so.
- Stress mode (``stress``) at ``max_workers`` busy, the ceiling: judged in the adaptive look, and
  in a fixed pool at its ceiling (or under stress) on the same schedule: when a worker says it
  took a connection (asked as at rest), then each second while one is busy; idle, no timer.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Collection, Sequence
from typing import NoReturn

from ..config import Config
from ..errors import ExitCode, WorkerExit
from ..kernel import Exited, Kernel
from ..master.gate import Gate, rules_wanted, startups, startups_per_source
from ..master.listeners import Listener
from ..ops.scoreboard import Scoreboard, Slot, SlotState
from ..protocol.admission import key_of_tag, tag_of_key
from ..protocol.defence import CAUSES
from ..protocol.poolpipe import Inbox, Kind, Message
from ..serving.accept import ACCEPT_PAUSE_SECONDS
from ..serving.child import STOP_REMINDER
from ..serving.signals import REOPEN
from ..serving.worker import WorkerContext, run_worker
from .adaptive import ADAPT_INTERVAL, UNPROVEN_INTERVAL, Adapter, Step, plan
from .host import Host, ModelStatus, Serving
from .pool import BUSY, Pool, WorkerInfo
from .stress import StressMode
from .watchdog import Watchdog

log = logging.getLogger("forkserve")

#: At most one replacement per slot per this many seconds (a worker that crashes at once).
RESPAWN_INTERVAL = 1.0
#: Workers that fail while booting, in a row, before the master gives up.
BOOT_FAILURES_TO_HALT = 3
#: While ready workers serve, a slot whose workers fail to boot waits at most this long.
BOOT_BACKOFF_MAX = 30.0


class PreforkModel:
    name = "prefork"
    #: The master never accepts: the workers do.
    accepts = False
    remind_stop = True
    ends_on_sigterm = False
    full = False

    def __init__(self, serving: Serving, *, host: Host, kernel: Kernel, gate: Gate,
                 listeners: Sequence[Listener]) -> None:
        self.serving = serving
        self.host = host
        self.kernel = kernel
        self.gate = gate
        #: The workers accept on them (the master does not).
        self.listeners = listeners
        config = self.config
        # room for two full generations: a reload forks the new one before the old one leaves
        self.scoreboard = Scoreboard(2 * config.max_workers)
        self.workers: dict[int, WorkerInfo] = {}
        self.adapter = Adapter(plan(config))
        self.pool = Pool(target=self.adapter.plan.start)
        self.stress = StressMode(self.scoreboard, self.kernel, self.host.count)
        self.watchdog = Watchdog(self.scoreboard, self.kernel)
        #: A fixed pool's next judgement of its stress mode (None: none due until a worker
        #: says it took a connection, or the pool changes; see ``_judge_stress``).
        self._fixed_stress_look: float | None = None
        #: When the earliest published penalty ends (the scoreboard is written again then).
        self._penalties_end: float | None = None
        #: Connections served by workers that have exited (the live ones are in their slots).
        self.served_by_gone = 0
        self.errors_by_gone = 0
        self._ready_r, self._ready_w = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(self._ready_r, False)
        # the write end too (one open file for every worker): see poolpipe
        os.set_blocking(self._ready_w, False)
        self._inbox = Inbox()

    @property
    def config(self) -> Config:
        return self.serving.config

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self.host.watch(self._ready_r, self._on_pipe)
        self.manage()

    def manage(self) -> None:
        """Fork what the pool lacks now; called after every turn of the master's loop."""
        if self.host.stopping:
            return
        self._retire_replaced()
        now = self.kernel.monotonic()
        if self._penalties_end is not None and now >= self._penalties_end:
            self._publish_penalties(now)  # one ended: the workers let that source in again
        self._remind_retiring(now)
        self.watchdog.check(self.workers.values(), now)
        self._adapt(now)
        while self._current_count() < self.pool.target:
            slot = self._free_slot(now)
            if slot is None:
                return
            self._spawn(slot, now)

    def next_deadline(self) -> float | None:
        if self.host.stopping:
            return None
        deadlines = self.watchdog.deadlines(self.workers.values())
        deadlines += [w.told_at + STOP_REMINDER for w in self.workers.values()
                      if w.retiring and not w.reminded]
        if (look := self.adapter.deadline()) is not None:
            deadlines.append(look)
        if not self.adapter.plan.adaptive and self._fixed_stress_look is not None:
            deadlines.append(self._fixed_stress_look)
        if self._penalties_end is not None:
            deadlines.append(self._penalties_end)
        if self._current_count() < self.pool.target:
            used = {w.slot for w in self.workers.values()}
            deadlines += [self.pool.slot_free_at.get(s, 0.0) for s in self._slots()
                          if s not in used]
        return min(deadlines) if deadlines else None

    # ------------------------------------------------------------------ adaptive pool

    def _adapt(self, now: float) -> None:
        """Once a second: grow while too few workers are idle, shrink while too many are;
        rest while all are idle (see ``adaptive``). A fixed pool: its stress mode only."""
        if not self.adapter.plan.adaptive:
            self._judge_stress(now)
            return
        if not self.adapter.due(now):
            return
        current = self._current()
        unproven = self.scoreboard.count_unproven()
        if len(current) < self.pool.target or not all(w.ready for w in current):
            # still forking what was asked for: judge it once it is there
            self.adapter.wait(now, unproven)
            return
        idle = [w for w in current if self._is_idle(w)]
        self.stress.update(self.config, len(current) - len(idle), self.config.max_workers,
                           self.workers)
        step, n = self.adapter.decide(now, workers=len(current), idle=len(idle),
                                      target=self.pool.target,
                                      ceiling=self.config.max_workers, unproven=unproven)
        spares = self.adapter.plan
        if step is Step.GROW:
            self.pool.target += n
            log.info("workers: %d idle (min_spare %d): growing the pool to %d", len(idle),
                     spares.min_spare, self.pool.target)
        elif step is Step.SHRINK:
            self.pool.target -= 1
            self._retire(max(idle, key=lambda w: w.started))
            log.info("workers: %d idle (max_spare %d): shrinking the pool to %d", len(idle),
                     spares.max_spare, self.pool.target)
        elif step is Step.REST:
            self._rest(now, current)

    def _judge_stress(self, now: float) -> None:
        """A fixed pool's stress mode, at ``max_workers`` busy as the adaptive pool's: judged
        while the pool is at that ceiling or under stress (a smaller one cannot reach it)."""
        if self._fixed_stress_look is None or now < self._fixed_stress_look:
            return
        busy = self._busy()
        self.stress.update(self.config, busy, self.config.max_workers, self.workers)
        self._fixed_stress_look = None
        if not self._may_be_stressed():
            return  # judged again when the pool changes (TTIN, a reload: ``_stir``)
        if not busy:  # as at rest: set, then look once more (``Scoreboard.want_wake``)
            self.scoreboard.want_wake(True)
            if not self._busy():
                return
            self.scoreboard.want_wake(False)  # one was quicker
        unproven = self.scoreboard.count_unproven()
        self._fixed_stress_look = now + (UNPROVEN_INTERVAL if unproven else ADAPT_INTERVAL)

    def _rest(self, now: float, current: list[WorkerInfo]) -> None:
        """Ask the first worker that takes a connection to say so, then look once more: a
        worker marks its slot before it looks at the request (``Scoreboard.want_wake``)."""
        self.scoreboard.want_wake(True)
        if all(self._is_idle(w) for w in current):
            self.adapter.rest(now)
        else:
            self.scoreboard.want_wake(False)  # one was quicker: look again in a second

    def _stir(self) -> None:
        """A worker spoke, or the pool changed: a pool at rest is judged again now (a fixed
        pool: its stress mode)."""
        now = self.kernel.monotonic()
        if self.adapter.stir(now):
            self.scoreboard.want_wake(False)
        if not self.adapter.plan.adaptive and self._may_be_stressed():
            self._fixed_stress_look = now

    def _may_be_stressed(self) -> bool:
        """Can a fixed pool's stress mode change? Only at its ceiling, or under stress."""
        return self.stress.active or self.pool.target >= self.config.max_workers

    def _busy(self) -> int:
        """Ready workers of the current generation that hold a connection."""
        return sum(1 for w in self._current() if w.ready and self._slot_of(w).state in BUSY)

    def _current(self) -> list[WorkerInfo]:
        """The workers of the current generation that are not retiring."""
        return [w for w in self.workers.values()
                if w.generation == self.pool.generation and not w.retiring]

    def _is_idle(self, worker: WorkerInfo) -> bool:
        slot = self.scoreboard.read(worker.slot)
        return worker.ready and slot.pid == worker.pid and slot.state is SlotState.IDLE

    def _current_count(self) -> int:
        return len(self._current())

    def _slots(self) -> range:
        base = (self.pool.generation % 2) * self.config.max_workers
        return range(base, base + self.pool.target)

    def _free_slot(self, now: float) -> int | None:
        used = {w.slot for w in self.workers.values()}
        for slot in self._slots():
            if slot not in used and self.pool.slot_free_at.get(slot, 0.0) <= now:
                return slot
        return None

    def _spawn(self, slot: int, now: float) -> None:
        serving, host = self.serving, self.host
        config = serving.config
        self.pool.slot_free_at[slot] = now + RESPAWN_INTERVAL
        ctx = WorkerContext(
            app=serving.app, config=config, listeners=self.listeners,
            scoreboard=self.scoreboard, access_log=serving.access_log, master_pid=host.pid,
            ready_fd=self._ready_w, close_master_fds=self._close_in_worker,
            master_signals=host.handled_signals, tls=serving.tls,
            gate=self.gate if rules_wanted(config) else None,
            source_limit=startups_per_source(config), startups=startups(config),
        )
        # before the fork: once forked, the slot is the worker's alone (it writes IDLE there)
        self.scoreboard.write(slot, pid=0, generation=self.pool.generation,
                              state=SlotState.STARTING, heartbeat=now)
        try:
            with host.signals_blocked():
                pid = self.kernel.fork()
                if pid == 0:
                    self._run_worker(ctx, slot)  # never returns
        except OSError as exc:
            self.scoreboard.clear(slot)
            host.fork_failed(exc, refused=False)
            return
        self.workers[pid] = WorkerInfo(pid, slot, self.pool.generation, now,
                                       timeout=config.timeout)

    def _run_worker(self, ctx: WorkerContext, slot: int) -> NoReturn:
        """The body of a worker just forked (the hybrid model runs its own)."""
        run_worker(ctx, slot, self.pool.generation)

    def _close_in_worker(self) -> None:
        self.host.close_in_child(worker=True)
        os.close(self._ready_r)

    # ------------------------------------------------------------------ events

    def _on_pipe(self) -> None:
        self._read_pipe()
        self._retire_replaced()

    def _read_pipe(self) -> None:
        """Act on every message in the pool pipe (all of it)."""
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(self._ready_r, 65536):
                for message in self._inbox.feed(chunk):
                    self._received(message)

    def _received(self, message: Message) -> None:
        self._stir()  # whatever a worker says (BUSY, or anything when the pipe was full)
        if message.kind is Kind.READY:
            worker = self.workers.get(message.pid)
            if worker is not None:
                worker.ready = True
                self.pool.boot_failures = 0
        elif message.kind is Kind.ACCEPT_PAUSED:
            self.host.accept_paused(message.errno, message.count, by="workers: ",
                                   pause=ACCEPT_PAUSE_SECONDS)
        elif message.kind is Kind.ENDED_BADLY and 0 <= message.errno < len(CAUSES):
            self.gate.penalise(key_of_tag(message.tag), CAUSES[message.errno])
            self._publish_penalties(self.kernel.monotonic())

    def _publish_penalties(self, now: float) -> None:
        """The sources refused for a penalty now, for the workers to see at accept (they
        keep no table: the master does, from their ENDED_BADLY messages)."""
        table = self.gate.admission.penalties if self.gate.admission else None
        if table is None:
            return
        active = list(table.active(now))
        self.scoreboard.publish_penalised([tag_of_key(key) for key, _ in active])
        self._penalties_end = min((entry.until for _, entry in active), default=None)

    def _retire_replaced(self) -> None:
        """Keep at most ``target - ready new`` old workers serving: each new worker that is
        ready lets one old one go (oldest generation first), so the pool never shrinks."""
        gen = self.pool.generation
        ready_new = sum(1 for w in self.workers.values() if w.generation == gen and w.ready)
        old = sorted((w for w in self.workers.values()
                      if w.generation != gen and not w.retiring),
                     key=lambda w: (w.generation, w.started))
        for worker in old[: max(0, len(old) - max(0, self.pool.target - ready_new))]:
            self._retire(worker)

    def _retire(self, worker: WorkerInfo) -> None:
        worker.retiring = True
        worker.told_at = self.kernel.monotonic()
        with contextlib.suppress(ProcessLookupError):
            self.kernel.kill(worker.pid, signal.SIGTERM)

    def _remind_retiring(self, now: float) -> None:
        """SIGTERM once more to a retiring worker still there after ``STOP_REMINDER``: the
        first one may wait in a blocking read for its handler to run (see ``child``)."""
        for worker in self.workers.values():
            if (worker.retiring and not worker.reminded
                    and now >= worker.told_at + STOP_REMINDER):
                worker.reminded = True
                with contextlib.suppress(ProcessLookupError):
                    self.kernel.kill(worker.pid, signal.SIGTERM)

    def on_exit(self, exited: Exited) -> bool:
        if exited.pid not in self.workers:
            return False
        # a ready message still in the pipe was written before this exit; retiring waits for
        # manage(), once every exit of this batch is known
        self._read_pipe()
        worker = self.workers.pop(exited.pid)
        self._stir()
        slot = self.scoreboard.read(worker.slot)
        if slot.pid == worker.pid:
            # a connection in service when the worker died was taken all the same: the
            # total counts connections served or being served, and must not go backwards
            self.served_by_gone += slot.connections + (slot.state in BUSY)
            self.errors_by_gone += slot.errors
        self.scoreboard.clear(worker.slot)
        self.host.count("worker_exits", self._exit_reason(worker, exited))
        if self.host.stopping or worker.retiring:
            return True
        if not worker.ready:
            self._boot_failed(worker, exited)  # a boot the watchdog ended included
        elif worker.aborted_at is not None:
            log.warning("worker %d (pid %d), stopped by the watchdog, ended (%s)", worker.slot,
                        worker.pid, exited.describe())
        elif exited.code == WorkerExit.OK:
            self.pool.slot_free_at[worker.slot] = 0.0  # recycled: replace it at once
        else:
            self.host.report_abnormal_exit(exited, f"worker {worker.slot}")
        return True

    @staticmethod
    def _exit_reason(worker: WorkerInfo, exited: Exited) -> str:
        if worker.retiring:
            return "retired"
        if not worker.ready:
            return "boot_error"
        if worker.aborted_at is not None:
            return "watchdog"
        return "recycled" if exited.code == WorkerExit.OK else "crashed"

    def _boot_failed(self, worker: WorkerInfo, exited: Exited) -> None:
        self.pool.boot_failures += 1
        log.error("worker %d (pid %d) failed while booting (exit %s)", worker.slot,
                  exited.pid, exited.describe())
        if self.pool.boot_failures < BOOT_FAILURES_TO_HALT:
            return
        serving = sum(1 for w in self.workers.values() if w.ready and not w.retiring)
        if not serving:
            self.host.halt(f"workers keep failing while booting ({self.pool.boot_failures} in "
                          "a row): stopping; the log above says why", ExitCode.BOOT_ERROR)
            return
        extra = self.pool.boot_failures - BOOT_FAILURES_TO_HALT
        backoff = min(RESPAWN_INTERVAL * 2 ** (extra + 1), BOOT_BACKOFF_MAX)
        self.pool.slot_free_at[worker.slot] = self.kernel.monotonic() + backoff
        log.error("workers keep failing while booting (%d in a row); %d ready worker(s) "
                  "still serve; retrying this slot in %.0f s", self.pool.boot_failures,
                  serving, backoff)

    # ------------------------------------------------------------------ operator intents

    def scale(self, delta: int) -> None:
        target = min(max(self.pool.target + delta, 1), self.config.max_workers)
        if target == self.pool.target:
            log.info("workers: staying at %d (between 1 and max_workers=%d)", target,
                     self.config.max_workers)
            return
        self.pool.target = target
        self._stir()
        log.info("workers: target is now %d", target)
        current = self._current()
        # idle ones first (retiring a busy worker costs its client a wait), youngest first
        current.sort(key=lambda w: (not self._is_idle(w), -w.started))
        for worker in current[: max(0, len(current) - target)]:
            self._retire(worker)

    def reconfigure(self, serving: Serving) -> str:
        """A reload: fork a new generation; old workers retire as new ones become ready."""
        self.serving = serving
        self.pool.generation += 1
        was_adaptive = self.adapter.plan.adaptive
        self.adapter.plan = plan(self.config)
        # an adaptive pool keeps the size the load gave it; a fixed one takes its new size
        if not (was_adaptive and self.adapter.plan.adaptive):
            self.pool.target = self.adapter.plan.start
        return f"starting worker generation {self.pool.generation}"

    def drain(self, listener: Listener) -> bool:
        # the workers accept: they serve what is queued before they let go of the listeners
        self.scoreboard.announce_drain()
        return False

    def listeners_closed(self) -> None:
        pass  # (the master keeps no listener open for the workers)

    def stop_begun(self, sig: int | None) -> None:
        pass  # no worker starts during a stop; each lets go of its listeners itself

    def close_in_child(self) -> None:
        pass  # the ready pipe's read end is closed by the worker itself

    def pending(self) -> int:
        return 0  # the workers hold their own connections

    def on_readable(self, listener: Listener) -> None:
        pass  # the master never watches the listeners in this model: the workers accept

    def interrupt(self, fast: bool) -> None:
        pass  # workers are signalled by the master's stop checklist

    def pids(self) -> Collection[int]:
        return self.workers.keys()

    def signal(self, pid: int, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.kernel.kill(pid, sig)

    def reopen_logs(self) -> None:
        for pid in self.workers:  # each reopens after its connection (``worker``)
            self.signal(pid, REOPEN)

    def status(self) -> ModelStatus:
        slots = [self._slot_of(w) for w in self.workers.values()]
        idle = sum(1 for s in slots if s.state is SlotState.IDLE)
        busy = sum(1 for s in slots if s.state in BUSY)
        return ModelStatus(
            capacity=self.pool.target, busy=busy, idle=idle,
            connections_total=self.served_by_gone + sum(s.connections for s in slots) + busy,
            generation=self.pool.generation,
            processes=sorted(slots, key=lambda s: s.index),
            handler_errors=self.errors_by_gone + sum(s.errors for s in slots),
            stress=self.stress.active,
        )

    def _slot_of(self, worker: WorkerInfo) -> Slot:
        """The worker's slot; "starting" until the worker has written its own there."""
        slot = self.scoreboard.read(worker.slot)
        if slot.pid == worker.pid:
            return slot
        return Slot(worker.slot, worker.pid, worker.generation, SlotState.STARTING, 0, 0, 0,
                    0.0, worker.started, "")

    def close(self) -> None:
        self.host.unwatch(self._ready_r)
        os.close(self._ready_r)
        os.close(self._ready_w)
        with contextlib.suppress(BufferError):
            self.scoreboard.close()
