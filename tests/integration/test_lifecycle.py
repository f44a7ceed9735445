"""Stopping: graceful with work in flight, graceful with a stuck client, fast, and master death."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.harness import (
    Server,
    access_line,
    assert_took,
    fd_count,
    proc_info,
    recv_all,
    recv_exactly,
    run_cli,
    session_procs,
    signal_pending,
    wait_until,
)

HELLO = b"Hello from server!\n"
Factory = Callable[..., Server]
MODELS = ["fork", "single"]


#: What the README promises a silent client at a stop: "waits up to a second" (STOP_GRACE).
SILENT_GRACE = 1.0
#: "Closes at once": well under SILENT_GRACE, so a stop that made it wait would fail.
AT_ONCE = 0.9


def states(control: Path) -> list[str]:
    """The state of each process on the scoreboard (``forkserve status --json``)."""
    result = run_cli(["status", "--control", f"unix:{control}", "--json"])
    return [p["state"] for p in json.loads(result.stdout)["processes"]]


def refused(server: Server) -> bool:
    try:
        server.connect(timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.mark.parametrize("model", MODELS)
def test_graceful_stop_answers_what_was_received_then_exits_0(server_factory: Factory,
                                                              model: str) -> None:
    server = server_factory("--model", model)
    with server.connect() as s:
        s.sendall(b"ping\n")
        assert recv_exactly(s, len(HELLO)) == HELLO
        s.sendall(b"ping\n" * 1000 + b"partial")  # in flight when the stop begins
        server.signal(signal.SIGTERM)
        # every complete line received is answered, then the server closes (an unfinished
        # line is not a request); the close is clean, never a reset
        assert recv_all(s) == HELLO * 1000
    assert server.wait() == 0
    server.wait_for_log(r"graceful stop")


@pytest.mark.parametrize("model", MODELS)
def test_graceful_stop_closes_idle_connections_at_once(server_factory: Factory,
                                                       model: str) -> None:
    server = server_factory("--model", model, "--graceful-timeout", "30", "--access-log", "-")
    with server.connect() as s:
        port = s.getsockname()[1]
        s.sendall(b"hi\n")
        assert recv_exactly(s, len(HELLO)) == HELLO
        start = time.monotonic()
        server.signal(signal.SIGTERM)
        assert recv_all(s) == b""
        closed = time.monotonic() - start
    assert closed < AT_ONCE, f"an idle connection closes at once, not after {closed:.2f}s"
    assert server.wait() == 0
    assert access_line(server, port)[1] == "0"


#: A handler that never finishes once it has a line: what a stop must be able to end.
STUCK_APP = """
import sys, time
import forkserve

def handle(conn):
    for line in conn.lines():
        conn.write(b"working\\n")
        time.sleep(3600)

sys.exit(forkserve.serve(handle, bind=["127.0.0.1:0"], model=sys.argv[1],
                         graceful_timeout=float(sys.argv[2])))
"""


def stuck_client(server: Server) -> socket.socket:
    s = server.connect()
    s.sendall(b"work\n")
    assert recv_exactly(s, 8) == b"working\n"
    return s


@pytest.mark.parametrize("model", [*MODELS, "prefork"])
def test_graceful_stop_kills_what_outlives_the_timeout_and_exits_1(server_factory: Factory,
                                                                   model: str) -> None:
    server = server_factory(model, "2", script=STUCK_APP)
    server.expect_exit = 1  # the stop had to kill the stuck connection
    with stuck_client(server) as s:
        start = time.monotonic()
        server.signal(signal.SIGTERM)
        if model != "single":  # (the single model is inside the handler until it ends)
            server.wait_for_log(r"graceful stop")
            assert wait_until(lambda: refused(server), 3.0), "listeners close before the drain"
        assert server.wait() == 1
        elapsed = time.monotonic() - start
        assert 1.9 < elapsed < 8.0, elapsed
        assert recv_all(s) == b"", "the killed connection is closed"
    server.wait_for_log(r"graceful timeout|outlived the stop deadline")


@pytest.mark.parametrize("model", [*MODELS, "prefork"])
def test_fast_stop_does_not_wait(server_factory: Factory, model: str) -> None:
    server = server_factory(model, "60", script=STUCK_APP)
    with stuck_client(server) as s:
        start = time.monotonic()
        server.signal(signal.SIGQUIT)
        assert server.wait() == 0
        assert time.monotonic() - start < 5.0
        assert recv_all(s) == b""


def test_sigint_is_a_graceful_stop(server_factory: Factory) -> None:
    server = server_factory()
    with server.connect() as s:
        s.sendall(b"hi\n")
        assert recv_exactly(s, len(HELLO)) == HELLO
        server.signal(signal.SIGINT)
        assert recv_all(s) == b""
    assert server.wait() == 0


def test_killing_the_master_makes_every_child_exit(server_factory: Factory) -> None:
    server = server_factory()
    socks = [server.connect() for _ in range(5)]
    for s in socks:
        s.sendall(b"hi\n")
        assert recv_exactly(s, len(HELLO)) == HELLO
    kids = [k.pid for k in server.children()]
    assert len(kids) == 5
    server.expect_exit = -signal.SIGKILL
    server.signal(signal.SIGKILL)
    server.wait()
    for s in socks:  # each orphan finishes: its client sees a clean end, then closes too
        s.settimeout(5)
        assert recv_all(s) == b""
        s.close()

    def all_gone() -> bool:
        return all((p := proc_info(pid)) is None or p.state == "Z" for pid in kids)

    assert wait_until(all_gone, 2.0), "children outlived their master"


def test_stop_leaves_no_child_and_no_zombie(server_factory: Factory) -> None:
    server = server_factory()
    socks = [server.connect() for _ in range(10)]
    for s in socks:
        s.sendall(b"hi\n")
    for s in socks:
        assert recv_exactly(s, len(HELLO)) == HELLO
    server.signal(signal.SIGTERM)
    assert server.wait() == 0
    # the master waited for its children: none of its session may be left, not even a zombie
    # re-parented to this test process (the subreaper)
    assert session_procs(server.pid) == []
    for s in socks:
        s.close()


def test_group_signals_meant_for_the_master_do_not_kill_children(server_factory: Factory,
                                                                  tmp_path: Path) -> None:
    log_path = tmp_path / "access.log"
    server = server_factory("--access-log", str(log_path))
    with server.connect() as s:
        s.sendall(b"hi\n")
        assert recv_exactly(s, len(HELLO)) == HELLO
        os.killpg(server.pid, signal.SIGUSR1)  # what `pkill -USR1 -g` or a shell would do
        os.killpg(server.pid, signal.SIGHUP)
        server.wait_for_log("reopened the access log")
        server.wait_for_log("reload: hello is built in: nothing to re-import; new children use it")
        s.sendall(b"still served\n")
        assert recv_exactly(s, len(HELLO)) == HELLO
    assert server.proc.poll() is None


@pytest.mark.parametrize("model", ["fork", "prefork"])
def test_a_stop_still_answers_a_connection_whose_request_is_on_its_way(
        server_factory: Factory, tmp_path: Path, model: str) -> None:
    control = tmp_path / "control.sock"
    server = server_factory("--model", model, "--workers", "1", "--control", f"unix:{control}")
    if model == "prefork":
        assert wait_until(lambda: states(control) == ["idle"], 10)
    with server.connect() as s:  # accepted, but its request has not been sent yet
        assert wait_until(lambda: states(control) == ["reading"], 10), "a process has taken it"
        server.signal(signal.SIGTERM)
        server.wait_for_log(r"graceful stop")
        s.sendall(b"late\n")
        assert recv_all(s) == HELLO, "an accepted client gets its first request answered"
    assert server.wait() == 0


@pytest.mark.parametrize("model", ["fork", "prefork", "single"])
def test_a_client_that_says_nothing_does_not_hold_a_stop(server_factory: Factory,
                                                          tmp_path: Path, model: str) -> None:
    control = tmp_path / "control.sock"
    server = server_factory("--model", model, "--workers", "1", "--graceful-timeout", "20",
                            "--control", f"unix:{control}", "--access-log", "-")
    fds = fd_count(server.pid)
    with server.connect() as silent:  # a health check, a pre-opened pool connection ...
        port = silent.getsockname()[1]
        if model == "single":  # the master is in the connection: it has one more fd
            assert wait_until(lambda: fd_count(server.pid) > fds, 10), "the master took it"
        else:
            assert wait_until(lambda: states(control) == ["reading"], 10), "a process took it"
        start = time.monotonic()
        server.signal(signal.SIGTERM)
        assert recv_all(silent) == b""
        assert_took(time.monotonic() - start, SILENT_GRACE, "a silent client at a stop")
        assert server.wait() == 0, "nothing had to be killed"
    assert access_line(server, port)[1] == "0"


@pytest.mark.parametrize("model", ["fork", "prefork", "single"])
def test_a_first_request_split_across_the_stop_is_answered(server_factory: Factory,
                                                           tmp_path: Path, model: str) -> None:
    control = tmp_path / "control.sock"
    server = server_factory("--model", model, "--workers", "1", "--app", "echo",
                            "--control", f"unix:{control}")
    fds = fd_count(server.pid)
    with server.connect() as s:
        s.sendall(b"hel")
        if model == "single":  # the master is in the connection: it has one more fd
            assert wait_until(lambda: fd_count(server.pid) > fds, 10), "the master took it"
        else:
            assert wait_until(lambda: states(control) == ["reading"], 10), "a process took it"
        server.signal(signal.SIGTERM)
        if model == "single":  # its master logs the stop only once the connection is over:
            # the signal has reached it (no longer pending) and woken its wait on the client
            assert wait_until(lambda: not signal_pending(server.pid, signal.SIGTERM), 10)
        else:
            server.wait_for_log(r"graceful stop")
        s.sendall(b"lo\n")
        assert recv_all(s) == b"hello\n"
    assert server.wait() == 0


@pytest.mark.parametrize("model", ["fork", "prefork", "single"])
def test_max_connection_time_ends_a_busy_connection(server_factory: Factory,
                                                    model: str) -> None:
    server = server_factory("--model", model, "--workers", "1", "--max-connection-time", "1.5",
                            "--idle-timeout", "60")
    with server.connect() as s:
        start = time.monotonic()
        answered = 0
        try:
            while time.monotonic() - start < 8:  # an active client: idle never fires
                s.sendall(b"hi\n")
                if recv_exactly(s, len(HELLO)) != HELLO:
                    break
                answered += 1
                time.sleep(0.1)  # the client's pace: active, never idle
        except ConnectionError:
            pass
        assert answered >= 5
        assert 1.4 < time.monotonic() - start < 6, "ended at max_connection_time"
    with server.connect() as s:  # the server goes on
        s.sendall(b"hi\n")
        assert recv_exactly(s, len(HELLO)) == HELLO


def queued_at_a_stop(server: Server, clients: int, request: bytes) -> list[socket.socket]:
    """``clients`` connected while the master is stopped (SIGSTOP: they wait in the kernel
    backlog), each having sent ``request``; then SIGTERM, and the master goes on."""
    server.signal(signal.SIGSTOP)
    try:
        queued = [server.connect() for _ in range(clients)]
        for s in queued:
            s.sendall(request)
        server.signal(signal.SIGTERM)
    finally:
        server.signal(signal.SIGCONT)
    return queued


@pytest.mark.parametrize("model", ["fork", "single"])
def test_a_graceful_stop_serves_the_clients_already_queued(server_factory: Factory,
                                                          model: str) -> None:
    server = server_factory("--model", model)
    queued = queued_at_a_stop(server, 5, b"hi\n")
    for s in queued:  # accepted before the listener closed, answered, not reset
        with s:
            assert recv_all(s) == HELLO
    assert server.wait() == 0


@pytest.mark.parametrize("model", ["fork", "single"])
def test_a_graceful_stop_serves_queued_clients_behind_a_proxy(server_factory: Factory,
                                                             model: str) -> None:
    server = server_factory("--model", model, "--proxy-protocol", "--trusted-proxy",
                            "127.0.0.1")
    # the proxy's header, then the client's request
    queued = queued_at_a_stop(server, 3, b"PROXY TCP4 203.0.113.7 192.0.2.1 40000 443\r\nhi\n")
    for s in queued:
        with s:
            assert recv_all(s) == HELLO
    assert server.wait() == 0


def test_a_full_fork_model_serves_the_queued_clients_as_its_children_end(
        server_factory: Factory) -> None:
    server = server_factory("--max-children", "2")
    held = [server.connect() for _ in range(2)]  # every child taken, by idle clients
    for s in held:
        s.sendall(b"hi\n")
        assert recv_exactly(s, len(HELLO)) == HELLO
    queued = queued_at_a_stop(server, 3, b"hi\n")
    for s in [*queued, *held]:  # (before: the three were reset by the close)
        with s:
            assert recv_all(s) == (HELLO if s in queued else b"")
    assert server.wait() == 0


def test_the_clients_a_single_stop_serves_share_its_deadline(server_factory: Factory) -> None:
    # four silent clients queued: each is owed a second (STOP_GRACE) for its request, the stop
    # has 1.5 s for all of them: the second is cut at the deadline, and the rest are not
    # served, each with a deadline of its own
    server = server_factory("--model", "single", "--graceful-timeout", "1.5")
    server.expect_exit = 1
    queued = queued_at_a_stop(server, 4, b"")  # (silent)
    assert server.wait() == 1, "a client had to be cut to stop: exit 1"
    log = server.log()
    assert log.count("outlived the stop deadline") == 1, server.log_tail()
    closed = re.search(r"(\d+) queued client\(s\) not served", log)
    assert closed, server.log_tail()
    left = int(closed.group(1))  # (2, unless the machine stalled the first one past 1.5 s)
    assert f"exit status 1, {left + 1} connection(s) cut" in log, server.log_tail()
    for s in queued:
        s.close()


def test_max_connection_time_bounds_a_slow_reader(server_factory: Factory,
                                                 tmp_path: Path) -> None:
    (tmp_path / "flood.py").write_text(
        "def handle(conn):\n    conn.readline()\n    conn.write(b'x' * (32 << 20))\n")
    server = server_factory("flood:handle", "--chdir", str(tmp_path),
                            "--max-connection-time", "1.5", "--write-timeout", "60")
    with server.connect() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        s.sendall(b"go\n")
        start = time.monotonic()
        assert wait_until(lambda: len(server.children()) == 1, 5)
        while server.children() and time.monotonic() - start < 20:
            with contextlib.suppress(OSError):
                s.recv(16384)  # takes a little, often: progress, but slow
            time.sleep(0.05)  # a slow reader's pace: under test
        # (what the kernel buffered still trickles in after the child is gone)
        assert time.monotonic() - start < 6, "the child ended near max_connection_time"


@pytest.mark.parametrize("model", ["fork", "prefork"])
def test_max_connection_time_has_a_hard_backstop(server_factory: Factory, tmp_path: Path,
                                                 model: str) -> None:
    (tmp_path / "stuck.py").write_text(
        "import time\n\ndef handle(conn):\n    conn.readline()\n    time.sleep(60)\n")
    server = server_factory("stuck:handle", "--chdir", str(tmp_path), "--model", model,
                            "--workers", "1", "--max-connection-time", "1")
    with server.connect() as s:
        s.sendall(b"go\n")
        start = time.monotonic()
        with contextlib.suppress(ConnectionError):
            assert recv_all(s) == b""  # never reads or writes again: the timer ends it
        assert time.monotonic() - start < 15
    server.wait_for_log(r"was killed by SIGALRM")


def test_the_stop_reminder_does_not_cut_a_lingering_close_short(server_factory: Factory) -> None:
    # the master sends SIGTERM once more a second after the stop (child.STOP_REMINDER); it
    # must not end the child's lingering close, or what the client sends after its answer
    # would be met by a reset (RFC 1122 4.2.2.13) instead of being drained
    server = server_factory("--model", "fork")
    with server.connect() as s:
        s.sendall(b"hi\n")
        assert recv_exactly(s, len(HELLO)) == HELLO
        server.signal(signal.SIGTERM)
        assert s.recv(1) == b"", "idle between requests: the input ends, the close lingers"
        time.sleep(1.3)  # past the reminder (1 s), within the linger (2 s): under test
        s.sendall(b"late\n")
        s.shutdown(socket.SHUT_WR)
        assert s.recv(1) == b"", "drained, not reset"
    assert server.wait() == 0
