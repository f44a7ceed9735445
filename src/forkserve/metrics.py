"""Prometheus metrics, served from the master's own loop: no threads in the master.

Theory of operation
-------------------
``--metrics-bind ADDR`` opens one more listener in the master. Each scraper connection is
non-blocking and watched by the master's selector: its request is read (at most
``MAX_REQUEST`` bytes, within ``READ_TIMEOUT``), then the answer is sent in one non-blocking
``send`` (a few kilobytes, far below a socket buffer), the write side is shut down and the
socket closed, having read the whole request, so the close sends no reset. At most
``MAX_PENDING`` scrapers are held at once; more are closed at once. Nothing a scraper sends
can block the master or make it hold memory beyond those bounds.

The figures are the status snapshot's (``Supervisor.snapshot``), rendered by
``prometheus_client`` (an optional extra, ``forkserve[metrics]``).
"""

from __future__ import annotations

import contextlib
import functools
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from .errors import ConfigError
from .listeners import Listener

#: Scraper connections held at once; more are closed at once.
MAX_PENDING = 32
#: Bytes of request read at most: a scrape is one short GET.
MAX_REQUEST = 8192
#: A scraper that has not sent its whole request by then is closed.
READ_TIMEOUT = 5.0
#: Counter kinds of the supervisor, with the label each is keyed by and its help text.
COUNTERS = {
    "accept_pauses": ("errno", "Times accepting paused after an accept() error, by errno."),
    "fork_failures": ("errno", "fork() failures, by errno."),
    "refused": ("reason", "Connections closed without being served, by reason."),
    "errors": ("kind", "Connections that ended in an error, by kind (handler: it raised)."),
    "worker_exits": ("reason", "prefork: worker exits, by reason (recycled, crashed, "
                               "watchdog, boot_error, retired)."),
}


class Host(Protocol):
    """What the metrics server needs from the master."""

    def watch(self, fd: int, callback: Callable[[], None]) -> None: ...
    def unwatch(self, fd: int) -> None: ...
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


@dataclass
class _Scrape:
    sock: socket.socket
    deadline: float
    request: bytearray = field(default_factory=bytearray)


class MetricsServer:
    """Answers scrapers on ``listener`` from the master's loop."""

    def __init__(self, listener: Listener, host: Host, clock: Callable[[], float]) -> None:
        self.listener = listener
        self._host = host
        self._clock = clock
        self._pending: dict[int, _Scrape] = {}

    def start(self) -> None:
        self._host.watch(self.listener.fileno(), self._accept)

    def _accept(self) -> None:
        for _ in range(MAX_PENDING):
            try:
                sock, _ = self.listener.sock.accept()
            except OSError:  # EAGAIN, or any accept error: nothing to take now
                return
            if len(self._pending) >= MAX_PENDING:
                sock.close()
                continue
            sock.setblocking(False)
            fd = sock.fileno()
            self._pending[fd] = _Scrape(sock, self._clock() + READ_TIMEOUT)
            self._host.watch(fd, functools.partial(self._read, fd))

    def _read(self, fd: int) -> None:
        scrape = self._pending[fd]
        try:
            chunk = scrape.sock.recv(MAX_REQUEST)
        except BlockingIOError:
            return
        except OSError:
            self._drop(fd)
            return
        scrape.request += chunk
        if not chunk or b"\r\n\r\n" in scrape.request or len(scrape.request) >= MAX_REQUEST:
            self._answer(fd)

    def _answer(self, fd: int) -> None:
        scrape = self._pending[fd]
        line = bytes(scrape.request.split(b"\r\n", 1)[0])
        parts = line.split()
        if len(parts) >= 2 and parts[0] == b"GET" and parts[1] in (b"/metrics", b"/"):
            body = render(self._host.snapshot())
            head = (b"HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4; "
                    b"charset=utf-8\r\n")
        else:
            body, head = b"not found: GET /metrics\n", b"HTTP/1.0 404 Not Found\r\n"
        head += b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
        with contextlib.suppress(OSError):
            scrape.sock.send(head + body)
            scrape.sock.shutdown(socket.SHUT_WR)
        self._drop(fd)

    def _drop(self, fd: int) -> None:
        scrape = self._pending.pop(fd)
        self._host.unwatch(fd)
        scrape.sock.close()

    def next_deadline(self) -> float | None:
        return min((s.deadline for s in self._pending.values()), default=None)

    def tick(self, now: float) -> None:
        for fd in [fd for fd, s in self._pending.items() if s.deadline <= now]:
            self._drop(fd)

    def close_in_child(self) -> None:
        for scrape in self._pending.values():
            scrape.sock.close()
        self.listener.sock.close()

    def close(self) -> None:
        for fd in list(self._pending):
            self._drop(fd)
        self._host.unwatch(self.listener.fileno())
        self.listener.close()
