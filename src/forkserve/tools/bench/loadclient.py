"""The bench client: one event loop driving many connections, run in one or more processes.

Theory of operation
-------------------
A ``LoadLoop`` owns ``conns`` slots on one ``selectors`` selector with non-blocking sockets.
Each slot has one request in flight at a time (``ping\\n``, answered by one line):

- ``persist``: connect once, then send, read the line, send again; latency is send -> line.
- ``connect``: connect, send, read the line, close, repeat; latency is the whole cycle.

A request older than ``timeout`` counts as a timeout; its slot closes and reconnects at once.
An error (refused, reset, end of stream before the line, a wrong line) closes the slot and
reconnects after ``ERROR_BACKOFF`` (so a dead server does not become a spin loop). Only
completions inside ``[record_from, record_until)`` count, as in ``loadgen``; requests still in
flight at the end are dropped. Latencies go into a log-linear histogram (``Histogram``) whose
buckets are what crosses the pipe, so merging processes is a sum and costs no precision.

One process of Python tops out at a few tens of thousands of requests a second, far less than
the C ``loadgen``; that is why the bench runs several (``main`` below is one of them) and why
each reports its CPU time inside the window: a process near a full core measured itself.

Rejected: threads (one per connection is 1000 threads at c=1000, and the GIL serialises them
anyway); asyncio (its per-event overhead is several times a bare selector's).

Process protocol (``python -m forkserve.bench.loadclient``): the process writes ``ready``,
reads one JSON line of parameters from stdin (its start time on the shared monotonic clock),
runs, and writes one JSON line of results to stdout. Worst case: it ends by its own deadline,
``start_at + warmup + duration``, whatever the server does.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import json
import math
import resource
import selectors
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

REQUEST = b"ping\n"
REPLY = b"Hello from server!\n"
#: A reply longer than this without a newline is garbage (the hello reply is 19 bytes).
MAX_REPLY = 4096
#: After an error a slot waits this long before reconnecting (loadgen's ``-B 10``).
ERROR_BACKOFF = 0.010
#: How often in-flight requests are checked against the timeout (a scan of every slot).
TIMEOUT_SCAN = 0.050
#: Sub-buckets per power of two: 32 gives at most about 1 % error on any percentile.
BUCKETS_PER_OCTAVE = 32
#: Connect errors that mean "still connecting" on a non-blocking socket.
IN_PROGRESS = {0, errno.EINPROGRESS, errno.EAGAIN}


class Histogram:
    """Latencies in microseconds, bucketed log-linearly; mergeable by summing buckets."""

    def __init__(self, buckets: dict[int, int] | None = None) -> None:
        self.buckets: dict[int, int] = dict(buckets or {})
        self.max_us = 0.0

    def add(self, us: float) -> None:
        index = int(math.log2(max(us, 1.0)) * BUCKETS_PER_OCTAVE)
        self.buckets[index] = self.buckets.get(index, 0) + 1
        self.max_us = max(self.max_us, us)

    def merge(self, other: Histogram) -> None:
        for index, n in other.buckets.items():
            self.buckets[index] = self.buckets.get(index, 0) + n
        self.max_us = max(self.max_us, other.max_us)

    def count(self) -> int:
        return sum(self.buckets.values())

    def percentile(self, q: float) -> float | None:
        """The value below which a fraction ``q`` of the samples lie (None when empty)."""
        total = self.count()
        if total == 0:
            return None
        rank = max(1, math.ceil(q * total))
        seen = 0
        for index in sorted(self.buckets):
            seen += self.buckets[index]
            if seen >= rank:
                return min(float(2.0 ** ((index + 0.5) / BUCKETS_PER_OCTAVE)), self.max_us)
        return self.max_us

    def to_json(self) -> dict[str, Any]:
        return {"buckets": {str(k): v for k, v in self.buckets.items()}, "max_us": self.max_us}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Histogram:
        hist = cls({int(k): int(v) for k, v in data["buckets"].items()})
        hist.max_us = float(data["max_us"])
        return hist


@dataclass
class Tally:
    """What one loop (or several, merged) counted inside the window."""

    ok: int = 0
    errors: int = 0
    timeouts: int = 0
    error_kinds: Counter[str] = field(default_factory=Counter)
    hist: Histogram = field(default_factory=Histogram)
    cpu_s: float = 0.0

    def merge(self, other: Tally) -> None:
        self.ok += other.ok
        self.errors += other.errors
        self.timeouts += other.timeouts
        self.error_kinds.update(other.error_kinds)
        self.hist.merge(other.hist)

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "errors": self.errors, "timeouts": self.timeouts,
                "error_kinds": dict(self.error_kinds), "hist": self.hist.to_json(),
                "cpu_s": self.cpu_s}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Tally:
        return cls(int(data["ok"]), int(data["errors"]), int(data["timeouts"]),
                   Counter(data["error_kinds"]), Histogram.from_json(data["hist"]),
                   float(data["cpu_s"]))


class State(enum.Enum):
    IDLE = "idle"            # no socket; (re)connects at ``Slot.wake_at``
    CONNECTING = "connecting"
    WAITING = "waiting"      # request sent, reading the reply line


@dataclass
class Slot:
    state: State = State.IDLE
    sock: socket.socket | None = None
    started: float = 0.0     # when the request (persist) or the cycle (connect) began
    wake_at: float = 0.0
    buf: bytes = b""


class LoadLoop:
    """``conns`` client slots against ``127.0.0.1:port``; runs in the calling process.

    ``run`` may be called more than once (the demo drains in a second call with
    ``new_requests=False``). Raises nothing on server misbehaviour: it is counted.
    """

    def __init__(self, port: int, conns: int, mode: str, *, timeout: float,
                 record_from: float, record_until: float) -> None:
        if mode not in ("persist", "connect"):
            raise ValueError(f"unknown mode {mode!r}")
        self.address = ("127.0.0.1", port)
        self.mode = mode
        self.timeout = timeout
        self.record_from = record_from
        self.record_until = record_until
        self.slots = [Slot() for _ in range(conns)]
        self.tally = Tally()
        self.new_requests = True
        self._sel = selectors.DefaultSelector()

    # ------------------------------------------------------------- the loop

    def run(self, until: float, tick: Callable[[], None] | None = None,
            tick_every: float = 0.25) -> None:
        """Drive every slot until ``until`` (monotonic), calling ``tick`` now and then.

        With ``new_requests`` false it returns as soon as nothing is in flight.
        """
        next_scan = next_tick = time.monotonic()
        while (now := time.monotonic()) < until:
            if not self.new_requests and not self.in_flight():
                return
            if now >= next_scan:
                self._expire(now)
                self._wake(now)
                next_scan = now + min(TIMEOUT_SCAN, ERROR_BACKOFF)
            if tick is not None and now >= next_tick:
                tick()
                next_tick = now + tick_every
            for key, events in self._sel.select(max(0.0, min(next_scan, until) - now)):
                self._event(key.data, events, time.monotonic())

    def close(self) -> None:
        for slot in self.slots:
            self._drop(slot)
        self._sel.close()

    def in_flight(self) -> list[Slot]:
        return [s for s in self.slots if s.state is not State.IDLE]

    # ------------------------------------------------------------- steps

    def _wake(self, now: float) -> None:
        if not self.new_requests:
            return
        for slot in self.slots:
            if slot.state is State.IDLE and slot.wake_at <= now:
                self._open(slot, now)

    def _expire(self, now: float) -> None:
        for slot in self.slots:
            if slot.state is not State.IDLE and now - slot.started > self.timeout:
                if self._recording(now):
                    self.tally.timeouts += 1
                self._reopen(slot, now)

    def _open(self, slot: Slot, now: float) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        slot.sock, slot.state, slot.started, slot.buf = sock, State.CONNECTING, now, b""
        code = sock.connect_ex(self.address)
        if code not in IN_PROGRESS:
            self._fail(slot, errno.errorcode.get(code, str(code)).lower(), now)
            return
        self._sel.register(sock, selectors.EVENT_WRITE, slot)

    def _event(self, slot: Slot, events: int, now: float) -> None:
        if slot.sock is None:
            return
        if slot.state is State.CONNECTING:
            code = slot.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                self._fail(slot, errno.errorcode.get(code, str(code)).lower(), now)
                return
            self._sel.modify(slot.sock, selectors.EVENT_READ, slot)
            self._send(slot, now)
        elif events & selectors.EVENT_READ:
            self._read(slot, now)

    def _send(self, slot: Slot, now: float) -> None:
        assert slot.sock is not None
        try:
            slot.sock.send(REQUEST)  # 5 bytes into an empty send buffer: never partial
        except OSError as exc:
            self._fail(slot, _kind(exc), now)
            return
        if self.mode == "persist":
            slot.started = now
        slot.state = State.WAITING

    def _read(self, slot: Slot, now: float) -> None:
        assert slot.sock is not None
        try:
            data = slot.sock.recv(MAX_REPLY)
        except BlockingIOError:
            return
        except OSError as exc:
            self._fail(slot, _kind(exc), now)
            return
        if not data:
            self._fail(slot, "eof", now)
            return
        slot.buf += data
        line, newline, rest = slot.buf.partition(b"\n")
        if not newline:
            if len(slot.buf) > MAX_REPLY:
                self._fail(slot, "bad_reply", now)
            return
        if line + newline != REPLY:
            self._fail(slot, "bad_reply", now)
            return
        self._done(slot, rest, now)

    def _done(self, slot: Slot, rest: bytes, now: float) -> None:
        if self._recording(now):
            self.tally.ok += 1
            self.tally.hist.add((now - slot.started) * 1e6)
        if self.mode == "connect" or not self.new_requests:
            self._reopen(slot, now)
            return
        slot.buf = rest
        self._send(slot, now)

    def _reopen(self, slot: Slot, now: float) -> None:
        """Close the slot and start its next cycle at once (unless the loop is draining)."""
        self._drop(slot)
        slot.wake_at = now
        if self.new_requests:
            self._open(slot, now)

    def _fail(self, slot: Slot, kind: str, now: float) -> None:
        if self._recording(now):
            self.tally.errors += 1
            self.tally.error_kinds[kind] += 1
        self._drop(slot)
        slot.wake_at = now + ERROR_BACKOFF

    def _drop(self, slot: Slot) -> None:
        if slot.sock is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(slot.sock)
            slot.sock.close()
        slot.sock, slot.state, slot.buf = None, State.IDLE, b""

    def _recording(self, now: float) -> bool:
        return self.record_from <= now < self.record_until


def _kind(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, type(exc).__name__).lower()


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def raise_fd_limit() -> None:
    """Raise this process's open-file limit to the hard limit (c=1000 needs ~1000 fds)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def run_window(params: dict[str, Any]) -> Tally:
    """Run one window as ``params`` says; the CPU time counts the window only."""
    start = float(params["start_at"])
    record_from = start + float(params["warmup"])
    record_until = record_from + float(params["duration"])
    loop = LoadLoop(int(params["port"]), int(params["conns"]), str(params["mode"]),
                    timeout=float(params["timeout"]), record_from=record_from,
                    record_until=record_until)
    try:
        time.sleep(max(0.0, start - time.monotonic()))
        loop.run(record_from)
        cpu_before = cpu_seconds()
        loop.run(record_until)
        loop.tally.cpu_s = cpu_seconds() - cpu_before
    finally:
        loop.close()
    return loop.tally


def main() -> int:
    """One client process: ``ready`` out, parameters in, one JSON line of results out."""
    try:
        raise_fd_limit()
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:
            return 1  # the bench went away before starting us
        tally = run_window(json.loads(line))
        sys.stdout.write(json.dumps(tally.to_json()) + "\n")
        sys.stdout.flush()
        return 0
    except KeyboardInterrupt:
        return 130  # Ctrl-C reached the whole process group; the bench reports it


if __name__ == "__main__":
    sys.exit(main())
