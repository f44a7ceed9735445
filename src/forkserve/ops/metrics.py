"""Prometheus metrics, served from the master's own loop: no threads in the master.

Theory of operation
-------------------
``--metrics-bind ADDR`` opens one more listener in the master, served by a ``LoopServer``
(``loopserver``: non-blocking peers driven by the master's selector, bounded in number, bytes
and time; accept errors pause the listener instead of spinning). A scrape is one short
``GET /metrics``; anything else gets a 404.

The figures are the status snapshot's (``Supervisor.snapshot``), rendered by
``prometheus_client`` (an optional extra, ``forkserve[metrics]``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol

from ..errors import ConfigError
from ..master.listeners import Listener
from . import loopserver
from .loopserver import LoopServer

#: Counter kinds of the supervisor, with the label each is keyed by and its help text.
COUNTERS = {
    "accept_pauses": ("errno", "Times accepting paused after an accept() error, by errno."),
    "fork_failures": ("errno", "fork() failures, by errno."),
    "refused": ("reason", "Connections closed without being served, by reason."),
    "errors": ("kind", "Connections that ended in an error, by kind (handler: it raised)."),
    "worker_exits": ("reason", "prefork: worker exits, by reason (recycled, crashed, "
                               "watchdog, boot_error, retired)."),
    "penalties": ("cause", "Penalties that took effect on a client source, by cause."),
    "stress": ("change", "Times the server entered or left stress mode."),
}


class Host(loopserver.Host, Protocol):
    """What the metrics server needs from the master."""

    def snapshot(self) -> dict[str, Any]: ...


def require_client() -> None:
    """Raise ``ConfigError`` if prometheus_client is not installed."""
    try:
        import prometheus_client  # noqa: F401, PLC0415  (optional extra)
    except ImportError:
        raise ConfigError("metrics_bind", "needs prometheus-client: "
                          "pip install 'forkserve[metrics]'") from None


def render(snap: dict[str, Any]) -> bytes:
    """The snapshot in the Prometheus text format."""
    from prometheus_client import CollectorRegistry, generate_latest  # noqa: PLC0415
    from prometheus_client.core import (  # noqa: PLC0415
        CounterMetricFamily,
        GaugeMetricFamily,
        Metric,
    )

    class Collector:
        def collect(self) -> Iterator[Metric]:
            model = snap["model"]
            yield GaugeMetricFamily("forkserve_busy", "Processes serving a connection now.",
                                    value=snap["busy"])
            if snap["idle"] is not None:
                yield GaugeMetricFamily("forkserve_idle",
                                        "prefork: workers waiting for a connection.",
                                        value=snap["idle"])
            yield GaugeMetricFamily("forkserve_capacity", "max_children, or the pool's target.",
                                    value=snap["capacity"])
            yield GaugeMetricFamily("forkserve_uptime_seconds", "Seconds since the master "
                                    "started.", value=snap["uptime_s"])
            yield GaugeMetricFamily("forkserve_stress", "1 while the server is in stress mode "
                                    "(shorter deadlines at capacity).", value=int(snap["stress"]))
            yield GaugeMetricFamily("forkserve_penalised_sources", "Client sources refused "
                                    "for a penalty now (up to 20).", value=len(snap["penalised"]))
            info = GaugeMetricFamily("forkserve_info", "The server's model and version.",
                                     labels=["model", "version"])
            info.add_metric([model, snap["version"]], 1)
            yield info
            yield CounterMetricFamily("forkserve_connections", "Connections served or being "
                                      "served since start.", value=snap["connections_total"])
            for kind, (label, text) in COUNTERS.items():
                family = CounterMetricFamily(f"forkserve_{kind}", text, labels=[label])
                for value, n in snap["counters"].get(kind, {}).items():
                    family.add_metric([value], n)
                yield family

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector())
    body: bytes = generate_latest(registry)
    return body


class MetricsServer(LoopServer):
    """Answers Prometheus scrapers (``GET /metrics``) from the master's loop."""

    what = "metrics"

    def __init__(self, listener: Listener, host: Host,
                 clock: Callable[[], float]) -> None:
        super().__init__(listener, host, clock)
        self._snapshot = host.snapshot

    def request_complete(self, request: bytes) -> bool:
        return b"\r\n\r\n" in request

    def answer(self, request: bytes) -> bytes:
        parts = request.split(b"\r\n", 1)[0].split()
        if len(parts) >= 2 and parts[0] == b"GET" and parts[1] in (b"/metrics", b"/"):
            body = render(self._snapshot())
            head = (b"HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4; "
                    b"charset=utf-8\r\n")
        else:
            body, head = b"not found: GET /metrics\n", b"HTTP/1.0 404 Not Found\r\n"
        return head + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body
