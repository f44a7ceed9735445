"""What the master prints on standard error when it serves, and the log line when it stopped.

Every address a newcomer needs is in the ready output: one line per client listener (the
line that scripts and the test harness wait for, its format fixed), then the control socket
and the metrics endpoint as a URL, with the real port when port 0 was asked. Each line is
one ``write(2)``, so a child's log line can never land inside it.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .upgrade import CONTROL, METRICS

if TYPE_CHECKING:
    from .listeners import Listener
    from .stopping import Stop

log = logging.getLogger("forkserve")

#: The path the metrics endpoint answers on (``metrics.MetricsServer``).
METRICS_PATH = "/metrics"


def metrics_url(listener: Listener) -> str:
    """``http://HOST:PORT/metrics``; a unix socket's address, for ``curl --unix-socket``."""
    if listener.address.kind == "unix":
        return f"{listener.name} (GET {METRICS_PATH})"
    return f"http://{listener.name}{METRICS_PATH}"


def lines(listeners: Sequence[Listener], operators: Sequence[tuple[str, Listener]],
          model: str, pid: int) -> list[str]:
    """The ready output, a line each (see the module doc)."""
    out = [f"forkserve: listening on {lst.name} (model={model}, pid={pid})"
           for lst in listeners]
    for name, listener in operators:
        if name == CONTROL:
            out.append(f"forkserve: control socket on {listener.name} "
                       f"(forkserve status --control {listener.name})")
        elif name == METRICS:
            out.append(f"forkserve: metrics on {metrics_url(listener)}")
    return out


def announce(listeners: Sequence[Listener], operators: Sequence[tuple[str, Listener]],
             model: str, pid: int) -> None:
    for line in lines(listeners, operators, model, pid):
        sys.stderr.write(line + "\n")
        sys.stderr.flush()


def stopped(stop: Stop | None, status: int, cut: int) -> None:
    """The last log line of a master: how it stopped, its exit status, connections cut."""
    if stop is None:
        how = "stopped"
    elif stop.handover:
        how = "handed over to the new master and stopped"
    else:
        how = "stopped (fast stop)" if stop.fast else "stopped (graceful stop)"
    log.info("%s: exit status %d, %d connection(s) cut", how, status, cut)
