"""The standard scenarios, and one scenario run against one server.

Theory of operation
-------------------
A scenario is data (``SCENARIOS``: mode, fast connections, slow connections), the same table as
``../shared/bench/run.sh``. ``run_scenario``:

1. opens the slow connections first, from this process, with blocking sockets that send
   nothing (they hold a worker each in the models that serve one connection per process);
2. starts ``client_processes`` load processes (``loadclient``) and waits for each one's
   ``ready`` line, so interpreter start-up never eats into the window;
3. sends each its share of the fast connections and a common start time on the monotonic
   clock (system-wide on Linux), one JSON line on its stdin;
4. samples the server session's PSS at ``MEM_SAMPLE_AT`` fractions of the window;
5. reads one JSON line of results from each, merges them (histograms sum), and checks whether
   each slow connection is still open.

Every wait is bounded: client start-up by ``CLIENT_START_TIMEOUT``, results by the window's
end plus ``RESULT_GRACE``; a process that misses its deadline is killed and reaped, and so is
every process on the way out (``finally``), Ctrl-C included.
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from . import loadclient
from .loadclient import Histogram, Tally
from .servers import BenchFailed, RunningServer, open_connections


@dataclass(frozen=True)
class Scenario:
    name: str
    mode: str
    conns: int
    slow: int = 0
    label: str = ""
    #: Run only when named, after ``many.check`` (what it needs of the machine).
    guarded: bool = False


SCENARIOS = {s.name: s for s in (
    Scenario("persist_c1", "persist", 1, label="1 client, one connection kept open"),
    Scenario("persist_c10", "persist", 10, label="10 clients, each keeps its connection"),
    Scenario("persist_c100", "persist", 100, label="100 clients, each keeps its connection"),
    Scenario("connect_c10", "connect", 10, label="10 clients, a new connection per request"),
    Scenario("hol_c10_s5", "persist", 10, 5,
             label="10 clients beside 5 slow ones that connect and send nothing"),
    Scenario("persist_c1000", "persist", 1000, label="1000 clients, each keeps its connection"),
    Scenario("persist_c10000", "persist", 10000, guarded=True,
             label="10,000 clients, each keeps its connection (hybrid or --server; only when "
                   "named: it checks RLIMIT_NOFILE and somaxconn)"),
)}
#: The scenarios run when none are named: all but the guarded ones.
DEFAULT_SCENARIOS = tuple(name for name, s in SCENARIOS.items() if not s.guarded)
#: Memory per connection is shown only with at least this many connections held: below it,
#: the figure would be the whole server divided by one or two clients.
MIN_CONNS_FOR_MEM = 10
#: Bound on a client process's start (interpreter, imports) before the bench gives up.
CLIENT_START_TIMEOUT = 20.0
#: After the window, how long the client processes may take to close and report.
RESULT_GRACE = 15.0
#: The window starts this long after the start time is sent (a pipe write and a wake-up).
START_LEAD = 0.05
#: Slow clients connect this long before the fast ones, so each is queued or accepted first.
SLOW_HEAD_START = 0.2
#: Where in the window memory is sampled (run.sh samples twice inside the window).
MEM_SAMPLE_AT = (0.5, 0.8)
#: A client process above this share of one core is probably what limits the figures.
CLIENT_BOUND_CPU = 0.9
#: After a scenario, wait at most this long for the server to let go of it (``settle``).
SETTLE_TIMEOUT = 10.0
#: ... and a process count that has not changed this long, with no connection left, is
#: settled: a pool that grew for the load shrinks on its own schedule, not the bench's.
SETTLE_STEADY = 0.5


@dataclass(frozen=True)
class Window:
    warmup: float
    duration: float
    timeout: float
    client_processes: int


def shares(total: int, parts: int) -> list[int]:
    """``total`` split into at most ``parts`` non-zero, near-equal shares."""
    parts = max(1, min(parts, total))
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


@contextlib.contextmanager
def slow_clients(port: int, n: int) -> Iterator[list[socket.socket]]:
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5.0)
            sock.setblocking(True)  # so that MSG_DONTWAIT in still_open() does not wait
            socks.append(sock)
        if n:
            time.sleep(SLOW_HEAD_START)
        yield socks
    finally:
        for s in socks:
            s.close()


def still_open(sock: socket.socket) -> bool:
    """True when the peer has not closed ``sock`` (nothing was sent, so nothing is pending)."""
    try:
        return sock.recv(1, socket.MSG_DONTWAIT) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


def start_clients(n: int) -> list[subprocess.Popen[bytes]]:
    procs = []
    for _ in range(n):
        procs.append(subprocess.Popen(
            # by path, not -m: the package is imported already in the -m case, and runpy warns
            [sys.executable, loadclient.__file__],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE))
    deadline = time.monotonic() + CLIENT_START_TIMEOUT
    for proc in procs:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not ready or proc.stdout.readline() != b"ready\n":
            raise BenchFailed("a bench client process did not start")
    return procs


def stop_clients(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()


def read_results(procs: list[subprocess.Popen[bytes]], deadline: float) -> list[Tally]:
    tallies = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise BenchFailed("a bench client process did not report in time") from None
        if proc.returncode != 0 or not out.strip():
            raise BenchFailed(f"a bench client process failed (status {proc.returncode})")
        tallies.append(Tally.from_json(json.loads(out)))
    return tallies


def sample_mem(server: RunningServer, start: float, w: Window) -> dict[str, Any]:
    best = None
    for at in MEM_SAMPLE_AT:
        time.sleep(max(0.0, start + w.warmup + at * w.duration - time.monotonic()))
        sample = server.mem()
        if best is None or sample.pss_kb > best.pss_kb:
            best = sample
    assert best is not None
    return {"pss_kb": best.pss_kb, "nprocs": best.nprocs}


def run_scenario(server: RunningServer, sc: Scenario, w: Window,
                 idle_kb: int | None = None) -> dict[str, Any]:
    """Measure ``sc`` against the running ``server`` (``idle_kb``: its PSS when idle); the
    result record (JSON-ready)."""
    with slow_clients(server.port, sc.slow) as slow:
        procs = start_clients(len(shares(sc.conns, w.client_processes)))
        try:
            start = time.monotonic() + START_LEAD
            for proc, conns in zip(procs, shares(sc.conns, w.client_processes), strict=True):
                params = {"port": server.port, "conns": conns, "mode": sc.mode,
                          "timeout": w.timeout, "warmup": w.warmup,
                          "duration": w.duration, "start_at": start}
                assert proc.stdin is not None
                proc.stdin.write(json.dumps(params).encode() + b"\n")
                proc.stdin.flush()
            mem = sample_mem(server, start, w)
            tallies = read_results(procs, start + w.warmup + w.duration + RESULT_GRACE)
        finally:
            stop_clients(procs)
        slow_open = sum(still_open(s) for s in slow)
    return record(server, sc, w, tallies, mem=mem, slow_open=slow_open, idle_kb=idle_kb)


def per_conn_kb(sc: Scenario, pss_kb: int | None, idle_kb: int | None) -> int | None:
    """What each connection held adds to the server (PSS under load minus PSS idle, per
    connection); None where that is not what the figure would mean (see MIN_CONNS_FOR_MEM)."""
    held = sc.conns + sc.slow
    if sc.mode != "persist" or held < MIN_CONNS_FOR_MEM or not pss_kb or idle_kb is None:
        return None
    return max(0, round((pss_kb - idle_kb) / held))


def record(server: RunningServer, sc: Scenario, w: Window, tallies: list[Tally], *,
           mem: dict[str, Any], slow_open: int, idle_kb: int | None = None) -> dict[str, Any]:
    total = Tally()
    for t in tallies:
        total.merge(t)
    cpu = [round(t.cpu_s / w.duration, 3) for t in tallies]
    per_conn = per_conn_kb(sc, mem["pss_kb"], idle_kb)
    return {
        "server": server.spec.name, "scenario": sc.name, "mode": sc.mode, "conns": sc.conns,
        "slow": sc.slow, "duration_s": w.duration, "ok": total.ok,
        "rps": round(total.ok / w.duration, 1),
        **{f"{k}_us": _us(total.hist, q)
           for k, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p999", 0.999))},
        "max_us": round(total.hist.max_us) if total.ok else None,
        "errors": total.errors, "timeouts": total.timeouts,
        "error_kinds": dict(total.error_kinds), "slow_open_at_end": slow_open,
        "mem": mem, "mem_per_conn_kb": per_conn,
        "client_cpu": cpu, "client_bound": any(c >= CLIENT_BOUND_CPU for c in cpu),
        "server_alive_after": server.alive(),
    }


def _us(hist: Histogram, q: float) -> float | None:
    value = hist.percentile(q)
    return None if value is None else round(value, 1)


def settle(server: RunningServer, idle_procs: int) -> None:
    """Wait (bounded) until the last scenario has left the server: its process count back to
    idle, or steady for ``SETTLE_STEADY`` with none of its connections left open."""
    now = time.monotonic()
    deadline, last, since = now + SETTLE_TIMEOUT, -1, now
    while now < deadline and server.alive():
        procs = server.nprocs()
        if procs <= idle_procs:
            return
        if procs != last:
            last, since = procs, now
        elif now - since >= SETTLE_STEADY and not open_connections(server.port):
            return
        time.sleep(0.1)
        now = time.monotonic()
