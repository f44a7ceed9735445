"""`forkserve status`: the control socket reports what the test set up."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.integration.harness import (
    Server,
    cpu_seconds,
    recv_all,
    recv_exactly,
    run_cli,
    wait_until,
)

HELLO = b"Hello from server!\n"
Factory = Callable[..., Server]


def status(control: Path) -> dict:  # type: ignore[type-arg]
    result = run_cli(["status", "--control", f"unix:{control}", "--json"])
    assert result.returncode == 0, result.stderr
    snapshot: dict = json.loads(result.stdout)  # type: ignore[type-arg]
    return snapshot


def test_prefork_status_counts_busy_and_idle_workers(server_factory: Factory,
                                                     tmp_path: Path) -> None:
    control = tmp_path / "fs.ctl"
    server = server_factory("--model", "prefork", "--workers", "3", "--control",
                            f"unix:{control}")
    assert wait_until(lambda: status(control)["idle"] == 3, 10)
    with server.connect() as a, server.connect() as b:
        for s in (a, b):
            s.sendall(b"hi\n")
            assert recv_exactly(s, len(HELLO)) == HELLO
        def counts() -> tuple[int, int, int]:
            snap = status(control)
            return snap["busy"], snap["idle"], snap["capacity"]

        # (a worker writes its own slot while the master reads it: allow a moment to settle)
        assert wait_until(lambda: counts() == (2, 1, 3), 5), status(control)
        snap = status(control)
        assert snap["model"] == "prefork"
        assert snap["pid"] == server.pid
        peers = {p["peer"] for p in snap["processes"] if p["peer"]}
        assert peers == {f"127.0.0.1:{s.getsockname()[1]}" for s in (a, b)}
        busy = [p for p in snap["processes"] if p["peer"]]
        # waiting on its client (R), or between its answer and its next read (W)
        assert all(p["letter"] in "RW" and p["in_request_s"] >= 0 for p in busy)
        text = run_cli(["status", "--control", f"unix:{control}", "--once"])
        assert text.returncode == 0
        out = text.stdout.decode()
        assert "busy 2, idle 1, capacity 3" in out
        for p in busy:
            assert str(p["pid"]) in out
            assert p["peer"] in out
    assert wait_until(lambda: status(control)["idle"] == 3, 10)
    assert wait_until(lambda: status(control)["connections_total"] == 2, 5), status(control)
    snap = status(control)
    assert sum(p["bytes_out"] for p in snap["processes"]) == 2 * len(HELLO), snap


def test_fork_status_and_counters(server_factory: Factory, tmp_path: Path) -> None:
    control = tmp_path / "fs.ctl"
    server = server_factory("--control", f"unix:{control}", "--max-children", "10")
    with server.connect() as s:
        s.sendall(b"hi\n")
        assert recv_exactly(s, len(HELLO)) == HELLO
        snap = status(control)
        assert (snap["busy"], snap["idle"], snap["capacity"]) == (1, None, 10)
        assert snap["processes"][0]["peer"] == f"127.0.0.1:{s.getsockname()[1]}"
    server.signal(signal.SIGTERM)
    assert server.wait() == 0
    assert not control.exists(), "the control socket is removed on stop"


def test_status_errors_are_one_line(tmp_path: Path) -> None:
    result = run_cli(["status", "--control", f"unix:{tmp_path}/none.ctl", "--once"])
    assert result.returncode == 1
    assert result.stderr.decode().strip() == (
        f"forkserve: cannot read the status from unix:{tmp_path}/none.ctl: "
        "no such file or directory")
    bad = run_cli(["status", "--control", "127.0.0.1:80"])
    assert bad.returncode == 2, "a usage error"
    assert "must be unix:PATH, the path of the server's --control socket" in bad.stderr.decode()


def scrape(port: int, path: str = "/metrics") -> tuple[str, dict[str, float]]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        raw = recv_all(s).decode()
    head, _, body = raw.partition("\r\n\r\n")
    values: dict[str, float] = {}
    if " 200 " not in head.splitlines()[0]:
        return head.splitlines()[0], values
    for line in body.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return head.splitlines()[0], values


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def with_metrics_port(factory: Factory, *args: str, **kwargs: Any) -> tuple[int, Server]:
    """A server with ``--metrics-bind 127.0.0.1:PORT`` on a port picked free; the port is
    released before the server binds it, so another process may take it first: try again."""
    for _ in range(5):
        port = free_port()
        try:
            return port, factory(*args, "--metrics-bind", f"127.0.0.1:{port}", **kwargs)
        except AssertionError as exc:
            if "address already in use" not in str(exc):
                raise
    raise AssertionError("no free port for the metrics in 5 tries")


def test_metrics_report_what_the_test_set_up(server_factory: Factory) -> None:
    port, server = with_metrics_port(server_factory, "--model", "prefork", "--workers", "2")
    assert wait_until(lambda: scrape(port)[1].get("forkserve_idle") == 2.0, 10)
    silent = socket.create_connection(("127.0.0.1", port), timeout=10)  # never asks
    with server.connect() as s:
        s.sendall(b"hi\n")
        assert recv_exactly(s, len(HELLO)) == HELLO
        status_line, values = scrape(port)  # answered although a scraper sits silent
        assert status_line == "HTTP/1.0 200 OK"
        assert values["forkserve_busy"] == 1.0
        assert values["forkserve_idle"] == 1.0
        assert values["forkserve_capacity"] == 2.0
        assert values['forkserve_info{model="prefork",version="0.1.0"}'] == 1.0
    silent.close()
    server.signal(signal.SIGTTOU)
    assert wait_until(lambda: scrape(port)[1].get(
        'forkserve_worker_exits_total{reason="retired"}') == 1.0, 10)
    assert wait_until(lambda: scrape(port)[1]["forkserve_connections_total"] == 1.0, 10)
    assert scrape(port, "/other")[0] == "HTTP/1.0 404 Not Found"


def test_metrics_for_the_fork_model(server_factory: Factory) -> None:
    port, server = with_metrics_port(server_factory)
    with server.connect() as s:
        s.sendall(b"hi\n")
        assert recv_exactly(s, len(HELLO)) == HELLO
        values = scrape(port)[1]
        assert values["forkserve_busy"] == 1.0
        assert "forkserve_idle" not in values
        assert values["forkserve_connections_total"] == 1.0
        assert server.children(), "the scrape was answered by the master, not a child"


CRASHING_PREFORK = """
import sys
import forkserve

def handle(conn):
    for line in conn.lines():
        if line.startswith(b"crash"):
            raise RuntimeError("on purpose")
        conn.write(b"ok\\n")

sys.exit(forkserve.serve(handle, bind=["127.0.0.1:0"], model="prefork", workers=2,
                         control=sys.argv[1]))
"""


def test_handler_errors_are_counted_per_worker(server_factory: Factory, tmp_path: Path) -> None:
    control = tmp_path / "fs.ctl"
    server = server_factory(f"unix:{control}", script=CRASHING_PREFORK)
    server.traceback_expected = True
    for _ in range(3):
        with server.connect() as s:
            s.sendall(b"crash\n")
            assert recv_all(s) == b""
    assert wait_until(lambda: status(control)["counters"]["errors"]["handler"] == 3, 10)
    snap = status(control)
    assert sum(p["errors"] for p in snap["processes"]) == 3
    assert snap["idle"] == 2, "a handler error costs its connection, not its worker"


def test_fd_exhaustion_on_the_operators_sockets_does_not_spin_the_master(
        server_factory: Factory, tmp_path: Path) -> None:
    control = tmp_path / "control.sock"
    port, server = with_metrics_port(server_factory, "--model", "single",
                                     "--control", f"unix:{control}")
    assert scrape(port)[0] == "HTTP/1.0 200 OK"  # (imports what rendering needs, fds free)
    # Allow the master no fd number beyond those it has: its next accept() gets EMFILE.
    limit = max(int(fd) for fd in os.listdir(f"/proc/{server.pid}/fd")) + 1
    old = resource.prlimit(server.pid, resource.RLIMIT_NOFILE)
    resource.prlimit(server.pid, resource.RLIMIT_NOFILE, (limit, old[1]))
    try:
        scraper = socket.create_connection(("127.0.0.1", port), timeout=10)
        scraper.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        reader = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        reader.settimeout(10)
        reader.connect(str(control))
        server.wait_for_log(r"metrics: accept failed: Too many open files")
        server.wait_for_log(r"control socket: accept failed: Too many open files")
        cpu0 = cpu_seconds(server.pid)
        time.sleep(1.5)  # a window to measure the master's CPU in: under test
        assert cpu_seconds(server.pid) - cpu0 < 0.5, "the master spins on EMFILE"
        reports = [line for line in server.lines if "accept failed" in line]
        assert len(reports) <= 2 * 4, "reported once per pause, not once per wake-up"
    finally:
        resource.prlimit(server.pid, resource.RLIMIT_NOFILE, old)
    with scraper, reader:  # both are served once fds are free again
        assert recv_all(scraper).startswith(b"HTTP/1.0 200 OK")
        assert json.loads(recv_all(reader))["model"] == "single"
    with server.connect() as s:
        s.sendall(b"hi\n")
        assert recv_exactly(s, len(HELLO)) == HELLO



def test_a_status_reader_that_sends_something_still_gets_the_whole_answer(
        server_factory: Factory, tmp_path: Path) -> None:
    control = tmp_path / "control.sock"
    server_factory("--control", f"unix:{control}")
    for _ in range(3):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(str(control))
            # as `socat - UNIX:...` would; the master answers on connect and may have closed
            # already, which a unix socket reports as EPIPE: the answer is still there whole
            with contextlib.suppress(BrokenPipeError):
                s.sendall(b"status\n")
            time.sleep(0.1)  # the master has answered and closed first: the case under test
            assert json.loads(recv_all(s))["model"] == "fork"
