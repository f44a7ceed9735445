"""``forkserve demo``: the tutorial's story, live, in under a minute.

Theory of operation
-------------------
For each model in ``DEMO_MODELS`` (single, fork, prefork, then hybrid) the demo starts
``forkserve serve --model M`` on a free 127.0.0.1 port (``bench.servers``: own session, probed
until it accepts, stopped with SIGTERM then SIGKILL and reaped, in a ``finally``). Then:

1. one slow client connects and sends nothing (someone typing slowly);
2. ten fast clients connect, send ``ping``, read the answer, close, and start again, for
   ``--duration`` seconds (one ``LoadLoop`` in this process, so the view updates live);
3. the slow client leaves; the fast clients' last requests may still be answered during
   ``DRAIN`` seconds (they count: for single, that is when the queue finally moves).

The per-request timeout is longer than the whole run, so a fast client stuck in the queue
shows as a long wait, not as an error. Worst-case time: 3 x (start <= 15 s + duration +
DRAIN + stop <= 8 s); typically 3 x (duration + 1) seconds.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ExitCode
from .bench.loadclient import LoadLoop
from .bench.runner import slow_clients
from .bench.servers import BenchFailed, RunningServer, free_port, model_spec

DEMO_MODELS = ("single", "fork", "prefork", "hybrid")
FAST_CLIENTS = 10
#: After the slow client leaves, how long queued fast clients have to be answered.
DRAIN = 2.0
#: After the port accepts, time for a prefork pool to finish forking.
BOOT_PAUSE = 0.3
MAX_DURATION = 120.0
DASH = "\u2013"
EXPLANATION = (
    "single:  one process serves one connection at a time; the slow client held it, so the "
    "fast clients queued in the kernel's backlog until it left.",
    "fork:    a process per connection; the slow client ties up only its own process, so the "
    "fast clients never wait for it.",
    "prefork: a pool of processes forked ahead; the slow client holds one worker and the "
    "others serve everyone (the pool grows past slow clients; a fixed one, --workers N, "
    "would queue everyone behind N of them).",
    "hybrid:  a few workers, each an event loop over many connections; the slow client is "
    "one connection among many and costs the fast ones nothing.",
)


@dataclass
class Row:
    model: str
    state: str = "waiting"
    answered: int = 0
    p50_us: float | None = None
    p99_us: float | None = None
    in_queue: int = 0
    longest_wait_s: float = 0.0

    def cells(self) -> list[str]:
        return [self.model, self.state, str(self.answered), _ms(self.p50_us), _ms(self.p99_us),
                str(self.in_queue), f"{self.longest_wait_s:.1f}"]


COLUMNS = ("model", "state", "answered", "p50 ms", "p99 ms", "waiting", "longest wait s")


def _ms(us: float | None) -> str:
    return DASH if us is None else f"{us / 1000:.1f}"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = sub.add_parser(
        "demo", help="watch one slow client block single, and not fork, prefork or hybrid",
        description="One slow client and ten fast ones against single, fork, prefork and hybrid in "
                    "turn, on 127.0.0.1: the fast clients' latency side by side.")
    demo.add_argument("--duration", type=float, default=8.0, metavar="SECONDS",
                      help="seconds per model (default 8)")
    demo.set_defaults(tool=run)


def snapshot(row: Row, loop: LoadLoop) -> None:
    now = time.monotonic()
    row.answered = loop.tally.ok
    row.p50_us = loop.tally.hist.percentile(0.5)
    row.p99_us = loop.tally.hist.percentile(0.99)
    waiting = loop.in_flight()
    row.in_queue = len(waiting)
    row.longest_wait_s = max((now - s.started for s in waiting), default=0.0)


def run_model(row: Row, duration: float, logdir: Path, refresh: Callable[[], None]) -> None:
    """Start the model, run the slow and fast clients, stop the model (always)."""
    server = RunningServer(model_spec(row.model), free_port(), logdir / f"{row.model}.log")
    try:
        server.start()
        time.sleep(BOOT_PAUSE)
        with slow_clients(server.port, 1) as slow:
            start = time.monotonic()
            loop = LoadLoop(server.port, FAST_CLIENTS, "connect", timeout=duration + DRAIN + 5,
                            record_from=start, record_until=start + duration + DRAIN)

            def tick() -> None:
                snapshot(row, loop)
                refresh()

            try:
                row.state = "running"
                loop.run(start + duration, tick)
                slow[0].close()  # the slow client leaves; whoever queued behind it moves
                row.state = "draining"
                loop.new_requests = False
                loop.run(start + duration + DRAIN, tick)
                snapshot(row, loop)
            finally:
                loop.close()
        row.state = "done"
        refresh()
    finally:
        server.stop()


def plain_table(rows: list[Row]) -> str:
    cells = [list(COLUMNS), *(r.cells() for r in rows)]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(line, widths, strict=True)))
                     for line in cells) + "\n"


class View:
    """A rich Live table on a terminal; otherwise one line per model as it finishes."""

    def __init__(self, rows: list[Row]) -> None:
        self.rows = rows
        self._live: Any = None
        if sys.stdout.isatty():
            try:
                from rich.live import Live  # noqa: PLC0415  (optional extra)
            except ImportError:
                return
            self._live = Live(self._render(), refresh_per_second=4)

    def _render(self) -> Any:
        from rich.table import Table  # noqa: PLC0415  (optional extra)

        table = Table(*COLUMNS, title="fast clients' latency, one slow client holding a "
                                      "connection")
        for r in self.rows:
            table.add_row(*r.cells())
        return table

    def __enter__(self) -> View:
        if self._live is not None:
            self._live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.stop()

    def refresh(self) -> None:
        if self._live is not None:
            self._live.update(self._render())

    def announce(self, row: Row, duration: float) -> None:
        if self._live is None:
            print(f"demo: {row.model}: 1 slow client, {FAST_CLIENTS} fast clients for "
                  f"{duration:g} s ...", flush=True)

    @property
    def live(self) -> bool:
        return self._live is not None


def run(args: argparse.Namespace) -> int:
    """The demo command; returns the exit status."""
    if not 0 < args.duration <= MAX_DURATION:
        print(f"forkserve: demo: --duration must be in (0, {MAX_DURATION:g}]", file=sys.stderr)
        return ExitCode.USAGE
    rows = [Row(m) for m in DEMO_MODELS]
    view = View(rows)
    try:
        with tempfile.TemporaryDirectory(prefix="forkserve-demo-") as logdir, view:
            for row in rows:
                view.announce(row, args.duration)
                run_model(row, args.duration, Path(logdir), view.refresh)
    except BenchFailed as exc:
        print(f"forkserve: demo: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("forkserve: demo: interrupted; every server was stopped", file=sys.stderr)
        return 130
    if not view.live:
        sys.stdout.write(plain_table(rows))
    print("\n".join(EXPLANATION))
    return 0
