"""The hybrid model: pre-forked workers, each an event loop over many connections.

Theory of operation
-------------------
nginx's workers, gunicorn's gthread and gevent workers, uvicorn with ``--workers``: a few
processes (``workers``, default one per CPU), each serving up to ``worker_connections`` at
once on one loop (``serving.aio_worker``). The master's side is prefork's pool, unchanged:
this class is ``PreforkModel`` with another worker body and a fixed size, so spawning,
respawning (at most once a second per slot), boot failures, generations on HUP (the old
workers drain once the new ones are ready), TTIN/TTOU, recycling, the pool pipe and the
watchdog are the same code. The watchdog reads the heartbeat each worker's loop stamps, so a
handler that blocks the loop for ``timeout`` gets its worker's stacks dumped and the worker
replaced.

What differs:

- The pool is fixed (never adaptive): a hybrid worker is not "busy" with one client, so the
  idle count that drives prefork's adaptation means nothing here. ``workers`` 0: one per CPU
  this process may run on.
- ``status`` counts connections, not workers: each worker publishes how many it holds in its
  scoreboard slot (``aio_worker.OPEN_FORMAT``), and ``busy`` is their sum, ``capacity``
  ``workers x worker_connections``.
- The unproven clients (the per-source cap, the early drop) are counted on a second board
  with a place per connection, not one slot per worker (``serving.aio_guard`` says why).
- The stress mode (``models.stress``) is judged on connections, not workers: when a worker
  reaches ``worker_connections`` it says BUSY on the pool pipe, and the master compares the
  connections held with ``workers x worker_connections``; under stress it looks again once
  a second, so an idle server sets no timer. With a blocking handler the threads are a
  capacity too (a connection holds its thread until it ends): a worker also says BUSY when
  its last thread is taken, and the master judges on whichever is fuller, the connections
  or those in the pools (running or waiting for a thread) against ``workers x threads``.
- A blocking handler needs the thread pool: ``threads 0`` with one is refused at start.
- ``exec`` hands a program the raw socket of one connection: it has no place on a loop, and
  is refused (``apps.exec.check_model``).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from typing import NoReturn

from ..kernel import Kernel
from ..master.gate import Gate
from ..master.listeners import Listener
from ..ops.scoreboard import Slot, SlotState
from ..serving.aio_guard import places_board
from ..serving.aio_loop import async_form
from ..serving.aio_slots import slot_counts
from ..serving.handlers import check_app
from ..serving.worker import WorkerContext
from .adaptive import Adapter, PoolPlan
from .host import Host, ModelStatus, Serving
from .prefork import PreforkModel

#: Under stress, how often the master looks whether it is over (a quarter of the capacity free).
STRESS_LOOK_SECONDS = 1.0


def cpus() -> int:
    """The CPUs this process may run on (its affinity, not the machine's count)."""
    return len(os.sched_getaffinity(0)) or 1


def hybrid_plan(serving: Serving) -> PoolPlan:
    """The fixed pool ``serving`` asks for; raises ``ConfigError`` for a handler it cannot
    run (``reload.prepare`` has checked a reload's already)."""
    config = serving.config
    check_app(serving.app, config)
    return PoolPlan(start=min(config.workers or cpus(), config.max_workers), adaptive=False)


class HybridModel(PreforkModel):
    name = "hybrid"

    def __init__(self, serving: Serving, *, host: Host, kernel: Kernel, gate: Gate,
                 listeners: Sequence[Listener]) -> None:
        pool_plan = hybrid_plan(serving)  # first: a refused handler leaves nothing open
        # the loop's modules (asyncio, uvloop: about 5 MB) are loaded here, in this model's
        # master only, before any fork: the workers share their pages
        importlib.import_module("forkserve.serving.aio_worker")
        importlib.import_module("forkserve.serving.aio_loop").preload(serving.config.loop)
        super().__init__(serving, host=host, kernel=kernel, gate=gate, listeners=listeners)
        # the unproven clients of every worker, one place each (``serving.aio_guard``)
        self.places = places_board(pool_plan.start, serving.config.worker_connections)
        self.adapter = Adapter(pool_plan)
        self.pool.target = pool_plan.start
        #: When to judge the stress mode (None: when a worker reaches its cap and says so).
        self._stress_look: float | None = None

    def _run_worker(self, ctx: WorkerContext, slot: int) -> NoReturn:
        from ..serving.aio_worker import run_aio_worker  # noqa: PLC0415  (imported already)

        run_aio_worker(ctx, slot, self.pool.generation, self.places)

    def reconfigure(self, serving: Serving) -> str:
        pool_plan = hybrid_plan(serving)
        self.serving = serving
        self.pool.generation += 1
        self.adapter.plan = pool_plan
        self.pool.target = pool_plan.start
        return f"starting worker generation {self.pool.generation}"

    # ------------------------------------------------------------------ stress mode

    @property
    def _blocking(self) -> bool:
        """A blocking handler: its worker's threads are a capacity too."""
        return async_form(self.serving.app) is None

    def _stir(self) -> None:
        """A worker spoke (a worker at its cap, or with every thread in use, says BUSY):
        judge the stress mode now."""
        self._stress_look = self.kernel.monotonic()

    def _adapt(self, now: float) -> None:
        """The pool is fixed: only the stress mode (``models.stress``) is judged here, on
        the connections held against ``workers x worker_connections``; when a worker says
        it reached its cap, then once a second while under stress (idle: no timer)."""
        if self._stress_look is None or now < self._stress_look:
            return
        figures = [slot_figures(self.scoreboard.read(w.slot)) for w in self._current()]
        held = sum(f[0] for f in figures)
        capacity = self.pool.target * self.config.worker_connections
        if self._blocking:  # the threads are a capacity too: whichever is fuller counts
            in_threads = sum(f[1] for f in figures)
            threads = self.pool.target * self.config.threads
            if in_threads * capacity > held * threads:
                held, capacity = in_threads, threads
        self.stress.update(self.config, held, capacity, self.workers)
        self._stress_look = now + STRESS_LOOK_SECONDS if self.stress.active else None

    def next_deadline(self) -> float | None:
        deadline = super().next_deadline()
        if self._stress_look is None or self.host.stopping:
            return deadline
        return self._stress_look if deadline is None else min(deadline, self._stress_look)

    def status(self) -> ModelStatus:
        figures = super().status()
        slots = figures.processes
        held = sum(open_count(s) for s in slots)
        figures.capacity = self.pool.target * self.config.worker_connections
        figures.busy = held
        figures.idle = None
        figures.connections_total = self.served_by_gone + sum(s.connections for s in slots) \
            + held
        return figures


def open_count(slot: Slot) -> int:
    """The connections a hybrid worker's slot says it holds."""
    return slot_figures(slot)[0]


def slot_figures(slot: Slot) -> tuple[int, int]:
    """The connections a hybrid worker's slot says it holds, and those in its thread pool."""
    if slot.state is SlotState.STARTING or not slot.peer:
        return 0, 0
    return slot_counts(slot.peer)
