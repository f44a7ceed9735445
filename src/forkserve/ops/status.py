"""The status view: what Apache's server-status shows, for forkserve.

The master serves a JSON snapshot on its control socket (``--control unix:PATH``): a client
connects and reads until the master closes; there is no request to parse, so nothing a client
sends can reach the master's loop. ``forkserve status`` reads it and shows it once (``--once``),
as JSON (``--json``), or as a live view that refreshes (rich, when installed).

Snapshot fields: ``pid``, ``model``, ``version``, ``uptime_s``, ``generation``, ``listeners``,
``connections_total`` (served or being served since start), ``busy``, ``idle`` (prefork;
``null`` for models without idle processes), ``capacity``, ``counters`` (kind -> label ->
count: ``accept_pauses`` and ``fork_failures`` by errno, ``refused`` and ``worker_exits`` by
reason), and ``processes``: one row per worker or child with its
``slot``, ``pid``, ``generation``, ``state`` (name) and ``letter`` (Apache's), ``connections``,
``bytes_in``, ``bytes_out``, ``errors`` (handler exceptions), ``peer``, ``in_request_s`` and
``heartbeat_age_s``; ``stress`` (true in stress mode) and ``penalised``: the sources
refused for a penalty now (``source``, ``left_s``, ``causes``: cause -> count), the most recent
first, at most 20.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ..errors import ForkserveError
from ..master.listeners import Listener
from . import loopserver
from .loopserver import LoopServer
from .scoreboard import Slot, SlotState

#: Bytes of snapshot the client accepts at most (a few thousand workers' rows).
MAX_SNAPSHOT = 4 << 20
#: Letters of the view's legend, Apache style.
LEGEND = "  ".join(f"{s.value} {s.name.lower()}" for s in SlotState)


class StatusFailed(ForkserveError):
    """The status could not be read; the message says why in one line."""


def process_row(slot: Slot, now: float) -> dict[str, Any]:
    """One scoreboard slot as a row of the snapshot."""
    busy = slot.state not in (SlotState.IDLE, SlotState.FREE, SlotState.STARTING)
    return {
        "slot": slot.index, "pid": slot.pid, "generation": slot.generation,
        "state": slot.state.name.lower(), "letter": slot.state.value,
        "connections": slot.connections, "bytes_in": slot.bytes_in,
        "bytes_out": slot.bytes_out, "errors": slot.errors, "peer": slot.peer if busy else "",
        "in_request_s": round(now - slot.conn_start, 3) if busy and slot.conn_start else None,
        "heartbeat_age_s": round(now - slot.heartbeat, 3) if slot.heartbeat else None,
    }


class StatusServer(LoopServer):
    """Serves the snapshot on the control socket, from the master's loop (``loopserver``):
    one JSON document per connection, written as fast as the reader takes it."""

    wants_request = False
    what = "control socket"

    def __init__(self, listener: Listener, snapshot: Callable[[], dict[str, Any]],
                 host: loopserver.Host, clock: Callable[[], float]) -> None:
        super().__init__(listener, host, clock)
        self._snapshot = snapshot

    def answer(self, request: bytes) -> bytes:
        return json.dumps(self._snapshot()).encode()


def fetch(path: str, timeout: float = 5.0) -> dict[str, Any]:
    """Read one snapshot from the control socket at ``path``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    chunks: list[bytes] = []
    try:
        sock.connect(path)
        size = 0
        while chunk := sock.recv(65536):
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_SNAPSHOT:
                raise StatusFailed(f"the status from {path} is larger than {MAX_SNAPSHOT} bytes")
    except OSError as exc:
        reason = (exc.strerror or str(exc) or type(exc).__name__).lower()
        raise StatusFailed(f"cannot read the status from unix:{path}: {reason}") from None
    finally:
        sock.close()
    try:
        snapshot: dict[str, Any] = json.loads(b"".join(chunks))
    except ValueError:
        raise StatusFailed(f"unix:{path} did not answer with a forkserve status") from None
    return snapshot


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def summary_lines(snap: Mapping[str, Any], rate: float | None = None) -> list[str]:
    idle = snap["idle"]
    per_second = rate if rate is not None else (
        snap["connections_total"] / snap["uptime_s"] if snap["uptime_s"] else 0.0)
    counters = "; ".join(  # what happened: a counter still at 0 is not an event
        f"{kind} " + ", ".join(f"{label}={n}" for label, n in labels.items() if n)
        for kind, labels in snap["counters"].items() if any(labels.values())) or "none"
    return [
        f"forkserve {snap['version']}  model={snap['model']}  pid={snap['pid']}  "
        f"generation={snap['generation']}  up {_duration(snap['uptime_s'])}",
        f"listening on {', '.join(snap['listeners']) or '(closed)'}",
        f"{snap['connections_total']} connections, {per_second:.1f}/s"
        f"{' (recent)' if rate is not None else ' (average)'}; "
        f"busy {snap['busy']}" + (f", idle {idle}" if idle is not None else "")
        + f", capacity {snap['capacity']}",
        f"events: {counters}",
        *(["stress mode: on (shorter deadlines at capacity)"] if snap.get("stress") else []),
        *(["penalised: " + ", ".join(
            f"{p['source']} ({p['left_s']:g}s left: "
            + ", ".join(f"{c}={n}" for c, n in p["causes"].items()) + ")"
            for p in snap["penalised"])] if snap.get("penalised") else []),
    ]


COLUMNS = ("slot", "state", "pid", "gen", "served", "in", "out", "peer", "in request")


def table_rows(processes: Iterable[Mapping[str, Any]]) -> list[tuple[str, ...]]:
    return [(str(p["slot"]), p["letter"], str(p["pid"]), str(p["generation"]),
             str(p["connections"]), str(p["bytes_in"]), str(p["bytes_out"]), p["peer"],
             _duration(p["in_request_s"])) for p in processes]


def render_text(snap: Mapping[str, Any], rate: float | None = None) -> str:
    """The snapshot as plain text: a summary and one row per process."""
    rows = [COLUMNS, *table_rows(snap["processes"])]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = [*summary_lines(snap, rate), ""]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
              for row in rows]
    lines += ["", f"states: {LEGEND}"]
    return "\n".join(lines) + "\n"


def render_rich(snap: Mapping[str, Any], rate: float | None = None) -> Any:
    """The snapshot as a rich renderable (rich must be installed)."""
    # rich is an optional extra: imported only when the view is drawn
    from rich.console import Group  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415
    from rich.text import Text  # noqa: PLC0415

    table = Table(*COLUMNS, box=None, header_style="bold")
    for row in table_rows(snap["processes"]):
        table.add_row(*row)
    return Group(Text("\n".join(summary_lines(snap, rate))), table,
                 Text(f"states: {LEGEND}", style="dim"))


def live(path: str, interval: float) -> int:
    """Refresh the view every ``interval`` seconds until interrupted (needs rich)."""
    from rich.live import Live  # noqa: PLC0415  (optional extra)

    previous: tuple[float, int] | None = None
    snap = fetch(path)
    with Live(render_rich(snap), refresh_per_second=4, screen=False) as view:
        try:
            while True:
                now = time.monotonic()
                total = snap["connections_total"]
                rate = None
                if previous is not None and now > previous[0]:
                    rate = (total - previous[1]) / (now - previous[0])
                previous = (now, total)
                view.update(render_rich(snap, rate))
                time.sleep(interval)
                snap = fetch(path)
        except KeyboardInterrupt:
            return 0


def run(path: str, *, as_json: bool, once: bool, interval: float) -> int:
    """The ``forkserve status`` command."""
    if as_json:
        sys.stdout.write(json.dumps(fetch(path), indent=2) + "\n")
        return 0
    if not once and sys.stdout.isatty():
        try:
            return live(path, interval)
        except ImportError:
            print("forkserve: install rich for the live view (pip install "
                  "'forkserve[status]'); showing it once", file=sys.stderr)
    sys.stdout.write(render_text(fetch(path)))
    return 0
