"""What the bench shows: progress while it runs, then a table, the raw JSON and a plot.

Theory of operation
-------------------
Progress goes to stderr, the table to stdout, so ``forkserve bench > table.txt`` keeps only the
table. rich is used when it is installed and the stream is a terminal; otherwise plain text,
which is also what tests and logs read: one fixed-width row per (server, scenario). matplotlib
is imported only for ``--plot`` (``check_plot`` fails fast, before anything is measured).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from .servers import BenchUsage

DASH = "\u2013"
COLUMNS = ("server", "scenario", "req/s", "p50 ms", "p99 ms", "p99.9 ms", "errors",
           "timeouts", "mem/conn", "client cpu")


def _ms(us: float | None) -> str:
    return DASH if us is None else f"{us / 1000:.2f}"


def _mem(kb: int | None) -> str:
    if kb is None:
        return DASH
    return f"{kb / 1024:.1f} MB" if kb >= 1024 else f"{kb} KB"


def row(r: dict[str, Any]) -> list[str]:
    cpu = "/".join(f"{c:.0%}" for c in r["client_cpu"]) + (" !" if r["client_bound"] else "")
    return [r["server"], r["scenario"], f"{r['rps']:,.0f}", _ms(r["p50_us"]), _ms(r["p99_us"]),
            _ms(r["p999_us"]), str(r["errors"]), str(r["timeouts"]),
            _mem(r["mem_per_conn_kb"]), cpu]


def plain_table(records: Sequence[dict[str, Any]]) -> str:
    rows = [list(COLUMNS), *(row(r) for r in records)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(r, widths, strict=True)))
             for r in rows]
    return "\n".join(lines) + "\n"


def print_table(records: Sequence[dict[str, Any]]) -> None:
    try:
        if not sys.stdout.isatty():
            raise ImportError
        from rich.console import Console  # noqa: PLC0415  (optional extra)
        from rich.table import Table  # noqa: PLC0415
    except ImportError:
        sys.stdout.write(plain_table(records))
        return
    table = Table(*COLUMNS)
    for r in records:
        table.add_row(*row(r))
    Console().print(table)


def notes(records: Sequence[dict[str, Any]]) -> list[str]:
    """Warnings worth a line under the table (client saturated, server died, slow clients)."""
    out = []
    for r in records:
        where = f"{r['server']}/{r['scenario']}"
        if r["client_bound"]:
            out.append(f"warning: {where}: a client process used {max(r['client_cpu']):.0%} of "
                       "a core: these figures may measure the client (try more "
                       "--client-processes, or ../shared/bench's loadgen)")
        if r["slow"] and r["slow_open_at_end"] < r["slow"]:
            out.append(f"note: {where}: the server closed {r['slow'] - r['slow_open_at_end']} "
                       f"of the {r['slow']} slow clients")
    return out


def write_json(path: Path, meta: dict[str, Any], records: Sequence[dict[str, Any]]) -> None:
    path.write_text(json.dumps({**meta, "results": list(records)}, indent=1) + "\n")


def check_plot() -> None:
    try:
        import matplotlib  # noqa: F401, PLC0415  (optional extra)
    except ImportError:
        raise BenchUsage("--plot needs matplotlib: pip install 'forkserve[bench]'") from None


#: The two panels: the record's field, what the axis shows, which way is better.
PANELS = (("rps", "requests per second (higher is better)"),
          ("p99_us", "p99 latency, ms, log scale (lower is better)"))


def plot(path: Path, records: Sequence[dict[str, Any]], meta: dict[str, Any]) -> None:
    """Two bar charts, throughput and p99, one group per scenario, one bar per server, each
    bar with its figure; the title says when, how long and on what, the caption what each
    scenario is."""
    import matplotlib  # noqa: PLC0415  (optional extra, imported only for --plot)

    matplotlib.use("Agg")  # no display: the plot only goes to a file
    import matplotlib.pyplot as plt  # noqa: PLC0415

    scenarios = list(dict.fromkeys(r["scenario"] for r in records))
    servers = list(dict.fromkeys(r["server"] for r in records))
    by_key = {(r["server"], r["scenario"]): r for r in records}
    fig, axes = plt.subplots(2, 1, figsize=(max(8.0, 1.9 * len(scenarios)), 9.0))
    for ax, (field, label) in zip(axes, PANELS, strict=True):
        _panel(ax, field, label, scenarios=scenarios, servers=servers, by_key=by_key)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.suptitle(_title(meta), fontsize=11)
    fig.legend(handles, labels, title="model", loc="upper center", ncol=len(servers),
               bbox_to_anchor=(0.5, 0.965), fontsize=9)
    fig.text(0.01, 0.01, _caption(scenarios), fontsize=8, va="bottom", family="monospace")
    fig.tight_layout(rect=(0, 0.02 + 0.016 * len(scenarios), 1, 0.92))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _panel(ax: Any, field: str, label: str, *, scenarios: list[str], servers: list[str],
           by_key: dict[tuple[str, str], dict[str, Any]]) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator  # noqa: PLC0415

    width = 0.8 / max(1, len(servers))
    for i, name in enumerate(servers):
        raw = [by_key.get((name, s), {}).get(field) for s in scenarios]
        if field == "p99_us":  # no answer, no bar (a zero has no place on a log axis)
            values = [v / 1000 if v else math.nan for v in raw]
        else:
            values = [float(v or 0.0) for v in raw]
        bars = ax.bar([x + i * width for x in range(len(scenarios))], values, width,
                      label=name)
        ax.bar_label(bars, labels=[_figure(v, field) for v in values], fontsize=7,
                     padding=2, rotation=90 if len(servers) > 2 else 0)
        for x, value in enumerate(values):  # a missing bar says why it is missing
            if math.isnan(value):
                ax.annotate("none\nanswered", (x + i * width, 0),
                            xycoords=("data", "axes fraction"), xytext=(0, 4),
                            textcoords="offset points", ha="center", fontsize=7,
                            color="dimgray")
    ax.set_ylabel(label)
    ax.set_xticks([x + width * (len(servers) - 1) / 2 for x in range(len(scenarios))],
                  scenarios)
    ax.margins(y=0.25)
    if field == "p99_us":
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    else:
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:,.0f}"))
    ax.grid(axis="y", alpha=0.3)


def _figure(value: float, field: str) -> str:
    if math.isnan(value):  # nothing was answered: said at the foot of the axis instead
        return ""
    if field == "rps":
        return f"{value:,.0f}"
    return f"{value:.2f}" if value < 10 else f"{value:,.0f}"


def _title(meta: dict[str, Any]) -> str:
    return (f"forkserve bench {meta.get('forkserve_version', '')}, {meta.get('date', '')}: "
            f"{meta.get('duration_s', 0):g} s per scenario after {meta.get('warmup_s', 0):g} s "
            f"of warm-up, {meta.get('cpus')} CPUs, clients and server on 127.0.0.1")


def _caption(scenarios: Sequence[str]) -> str:
    from .runner import SCENARIOS  # noqa: PLC0415  (runner imports this module's users)

    width = max(len(name) for name in scenarios)
    return "\n".join(f"{name.ljust(width)}  {SCENARIOS[name].label if name in SCENARIOS else ''}"
                     for name in scenarios)


class Progress:
    """One step per (server, scenario): a rich bar on a terminal, plain lines otherwise."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self._rich: Any = None
        self._task: Any = None
        if sys.stderr.isatty():
            try:
                from rich.console import Console  # noqa: PLC0415  (optional extra)
                from rich.progress import Progress as RichProgress  # noqa: PLC0415
            except ImportError:
                return
            self._rich = RichProgress(console=Console(stderr=True), transient=True)

    def __enter__(self) -> Progress:
        if self._rich is not None:
            self._rich.start()
            self._task = self._rich.add_task("bench", total=self.total)
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._rich is not None:
            self._rich.stop()

    def say(self, text: str) -> None:
        if self._rich is not None:
            self._rich.update(self._task, description=text)
        else:
            print(f"bench: [{self.done + 1}/{self.total}] {text}" if ": " in text
                  else f"bench: {text}", file=sys.stderr, flush=True)

    def step(self, r: dict[str, Any]) -> None:
        """One scenario done: the bar advances; its figures are printed once, in the table."""
        self.done += 1
        if self._rich is not None:
            self._rich.update(self._task, advance=1)
