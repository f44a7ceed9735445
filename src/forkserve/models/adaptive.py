"""The adaptive pre-fork pool: its size, decided from how many workers are idle (pure logic).

Theory of operation
-------------------
Apache prefork's rule, with Apache's defaults unless the operator fixed the pool (``plan``):

- ``workers`` 0, the default: adaptive, starting with ``config.START_WORKERS``. ``workers`` N
  alone: a fixed pool of N, as ``--workers N`` always meant. N with ``min_spare`` or
  ``max_spare``: N to start with, then adaptive. Unset, ``min_spare`` is ``config.MIN_SPARE``
  and ``max_spare`` twice that; the ceiling is ``max_workers`` (256, Apache's
  MaxRequestWorkers). A fixed pool of 4 is what five silent clients took down entirely: every
  worker held, ten well-behaved clients served nothing for as long as the five stayed.
- Once a second (``ADAPT_INTERVAL``), once every worker of the current generation is forked
  and ready (a pool being forked is not a busy one): fewer than ``min_spare`` idle, the pool
  grows by 1, then 2, 4 ... up to ``MAX_SPAWN_RATE`` in consecutive seconds; more than
  ``max_spare`` idle, one idle worker retires.
- Rest: when every worker is idle and neither rule applies, nothing can change until a worker
  takes a connection. The master then sets no timer (an idle master uses no CPU): it asks the
  workers, in the scoreboard, to say so through the pool pipe, and looks again at once when one
  does. An exit, TTIN or TTOU wakes the master by themselves and end the rest too. A rest
  lasts ``REST_RECHECK`` at most: a lost word (see ``Scoreboard.want_wake``) makes the pool
  grow late, never not at all.

Worst case: clients that connect and stay silent each hold a worker, as in Apache prefork; the
pool grows past them (32 workers a second at most) up to ``max_workers``, each of which costs
memory (``config.WORKER_PSS_MB`` for the hello app), and beyond that new clients wait in the
backlog until ``idle_timeout`` frees a worker.

Rejected: a timer every second while idle (Apache's way: the master never rests); telling the
master of every state change of every worker (a write per connection, for a rule that looks
once a second).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ..config import MAX_SPARE_PER_MIN_SPARE, MIN_SPARE, START_WORKERS, Config

#: The adaptive pool looks at the idle count this often ...
ADAPT_INTERVAL = 1.0
#: ... and grows by at most this many workers at a time (Apache's MAX_SPAWN_RATE) ...
MAX_SPAWN_RATE = 32
#: ... except while workers hold clients that have not proven themselves (no whole first
#: line: silent clients, the cheapest attack on a pool): then it looks this often and grows
#: past them at once (bounded by the per-source startups cap and the early drop,
#: ``sourceguard``, and by the ceiling), so that well-behaved clients find an idle worker.
UNPROVEN_INTERVAL = 0.25
#: ... by this many workers per worker so held: a flood fills the new workers as fast as they
#: come, so growing by as many as it holds would only keep pace with it.
UNPROVEN_GROWTH = 2
#: A pool at rest is looked at again after this long all the same: the bound on a lost
#: wake-up, long enough that a resting master is idle (the watchdog wakes it about as often).
REST_RECHECK = 30.0


@dataclass(frozen=True)
class PoolPlan:
    """The pool a config asks for. ``max_spare`` 0: never shrink."""

    start: int
    adaptive: bool
    min_spare: int = 0
    max_spare: int = 0


def plan(config: Config) -> PoolPlan:
    """Resolve ``workers``, ``min_spare`` and ``max_spare`` (see the module doc)."""
    if config.workers and config.min_spare is None and config.max_spare is None:
        return PoolPlan(start=min(config.workers, config.max_workers), adaptive=False)
    min_spare, max_spare = _spares(config.min_spare, config.max_spare)
    start = config.workers or _auto_start(min_spare, max_spare)
    return PoolPlan(min(start, config.max_workers), True, min_spare, max_spare)


def _spares(min_spare: int | None, max_spare: int | None) -> tuple[int, int]:
    if min_spare is None:  # below an explicit max_spare (Config checks explicit pairs)
        min_spare = min(MIN_SPARE, max_spare - 1) if max_spare else MIN_SPARE
    if max_spare is None:
        max_spare = MAX_SPARE_PER_MIN_SPARE * min_spare
    return min_spare, max_spare


def _auto_start(min_spare: int, max_spare: int) -> int:
    """Apache's StartServers, moved into [min_spare, max_spare] (a pool already at rest)."""
    start = max(START_WORKERS, min_spare)
    return max(1, min(start, max_spare)) if max_spare else start


class Step(enum.Enum):
    GROW = "grow"
    SHRINK = "shrink"
    #: Within bounds, some workers busy: look again in a second.
    HOLD = "hold"
    #: Every worker idle, within bounds: nothing changes until one takes a connection.
    REST = "rest"


class Adapter:
    """The adaptive rule's state: when to look next, how fast to grow, whether at rest.
    Runs in the master; the time is given."""

    def __init__(self, pool_plan: PoolPlan) -> None:
        self.plan = pool_plan
        self.next_look = 0.0
        self.spawn_rate = 1
        self.resting = False

    def due(self, now: float) -> bool:
        return self.plan.adaptive and now >= self.next_look

    def deadline(self) -> float | None:
        return self.next_look if self.plan.adaptive else None

    def wait(self, now: float, unproven: int = 0) -> None:
        """Not judged now (the pool is still being forked): look again in a second (a
        quarter of one while workers hold unproven clients)."""
        self.next_look = now + (UNPROVEN_INTERVAL if unproven else ADAPT_INTERVAL)

    def decide(self, now: float, *, workers: int, idle: int, target: int,
               ceiling: int, unproven: int = 0) -> tuple[Step, int]:
        """The step for ``workers`` ready workers of which ``idle`` are idle and ``unproven``
        hold an unproven client, and by how many workers (GROW only)."""
        self.next_look = now + (UNPROVEN_INTERVAL if unproven else ADAPT_INTERVAL)
        if idle < self.plan.min_spare and target < ceiling:
            grow = min(max(self.spawn_rate, UNPROVEN_GROWTH * unproven), ceiling - target)
            self.spawn_rate = min(self.spawn_rate * 2, MAX_SPAWN_RATE)
            return Step.GROW, grow
        self.spawn_rate = 1
        if self.plan.max_spare and idle > self.plan.max_spare and target > 1:
            return Step.SHRINK, 1
        return (Step.REST if idle == workers else Step.HOLD), 0

    def rest(self, now: float) -> None:
        self.resting = True
        self.next_look = now + REST_RECHECK

    def stir(self, now: float) -> bool:
        """Something changed: end a rest and look now. False if not at rest."""
        if not self.resting:
            return False
        self.resting = False
        self.next_look = now
        return True
