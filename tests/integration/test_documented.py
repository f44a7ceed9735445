"""A real-process test for each documented flag, verb and API that had none (issue 14, item 5).

scripts/check_coverage.py names any flag of the README's settings table or verb of its signal
table that no test under tests/integration uses; these close the gaps it found."""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.harness import (
    HELLO,
    Server,
    assert_took,
    children_of,
    proc_info,
    recv_all,
    recv_exactly,
    run_cli,
    wait_until,
)
from tests.integration.test_privileges import limits
from tests.integration.test_upgrade import stop_orphan

Factory = Callable[..., Server]

#: conn.readline(), conn.readexactly(), conn.read() and conn.settings in a real server; each
#: answer names the pid that served it. "grow" makes the process hold 80 MB more.
APP = """
import os

held = []

def handle(conn):
    header = conn.readline()
    if header == b"grow\\n":
        held.append(bytearray(80 << 20))
    n = int(header.split()[-1]) if header.startswith(b"LEN") else 0
    body = conn.readexactly(n) if n else b""
    tail = conn.read(3) if n else b""
    conn.write(b"%d %d %s %s\\n" % (os.getpid(), conn.settings.max_line, body, tail))
"""


def app(tmp_path: Path) -> list[str]:
    (tmp_path / "docapp.py").write_text(APP)
    return ["--chdir", str(tmp_path), "--app", "docapp:handle"]


def ask(server: Server, request: bytes = b"hi\n") -> list[bytes]:
    with server.connect() as s:
        s.sendall(request)
        s.shutdown(socket.SHUT_WR)
        return recv_all(s).split()


def workers(server: Server) -> set[int]:
    return {p.pid for p in server.children()}


def test_connection_api_in_a_real_server(server_factory: Factory, tmp_path: Path) -> None:
    server = server_factory(*app(tmp_path), "--max-line", "1000")
    pid, max_line, body, tail = ask(server, b"LEN 5\nhelloabc")
    assert (max_line, body, tail) == (b"1000", b"hello", b"abc")
    assert int(pid) != server.pid


def test_max_requests_jitter_spreads_the_recycling(server_factory: Factory,
                                                   tmp_path: Path) -> None:
    server = server_factory(*app(tmp_path), "--model", "prefork", "--workers", "1",
                            "--max-requests", "2", "--max-requests-jitter", "3")
    first = int(ask(server)[0])
    served_by_first = 1
    for _ in range(8):  # bounded: recycled after 2 + 0..3 connections
        if int(ask(server)[0]) != first:
            break
        served_by_first += 1
    assert 2 <= served_by_first <= 5, served_by_first
    server.wait_for_log(rf"worker {first}: served {served_by_first} connections, recycling")


def test_max_worker_memory_replaces_a_grown_worker(server_factory: Factory,
                                                   tmp_path: Path) -> None:
    server = server_factory(*app(tmp_path), "--model", "prefork", "--workers", "1",
                            "--max-worker-memory", "60")
    first = int(ask(server)[0])
    assert int(ask(server)[0]) == first, "under the limit: the worker stays"
    assert int(ask(server, b"grow\n")[0]) == first
    server.wait_for_log(rf"worker {first}: resident memory \d+ MB is over max_worker_memory "
                        "60 MB, recycling")
    assert int(ask(server)[0]) != first


def test_allow_admits_only_its_network(server_factory: Factory) -> None:
    server = server_factory("--allow", "127.0.0.2/32", "--refuse-message", "NO")
    with server.connect(source="127.0.0.2") as s:
        s.sendall(b"hi\n")
        assert recv_exactly(s, len(HELLO)) == HELLO
    with server.connect(source="127.0.0.3") as s:
        assert recv_all(s) == b"NO\n"
    server.wait_for_log(r"refused 127\.0\.0\.3: denied")


def test_limit_nproc_and_limit_as_reach_the_child(server_factory: Factory) -> None:
    server = server_factory("--limit-nproc", "4000", "--limit-as", "2048")
    with server.connect() as s:
        s.sendall(b"hi\n")
        assert recv_exactly(s, len(HELLO)) == HELLO
        (child,) = server.children()
        seen = limits(child.pid)
    assert seen["Max processes"] == ("4000", "4000")
    assert seen["Max address space"] == (str(2048 << 20),) * 2
    assert limits(server.pid)["Max processes"] != ("4000", "4000")


def test_signal_verbs_more_fewer_quit(server_factory: Factory, tmp_path: Path) -> None:
    pid_file = tmp_path / "fs.pid"
    server = server_factory("--model", "prefork", "--workers", "2", "--max-workers", "3",
                            "--pid-file", str(pid_file))
    by_file = ["--pid-file", str(pid_file)]
    assert wait_until(lambda: len(workers(server)) == 2, 10)
    for _ in range(2):  # the second TTIN meets max_workers
        assert run_cli(["signal", "more", *by_file]).returncode == 0
    assert wait_until(lambda: len(workers(server)) == 3, 10)
    server.wait_for_log(r"workers: staying at 3 \(between 1 and max_workers=3\)")
    assert run_cli(["signal", "fewer", "--pid", str(server.pid)]).returncode == 0
    assert wait_until(lambda: len(workers(server)) == 2, 10)
    assert ask(server) == HELLO.split()
    start = time.monotonic()
    assert run_cli(["signal", "quit", *by_file]).returncode == 0
    assert server.wait() == 0
    assert time.monotonic() - start < 5
    assert not pid_file.exists()


@pytest.mark.parametrize("model", [
    "fork",
    pytest.param("prefork", marks=pytest.mark.xfail(
        strict=True, reason="defect (reported, issue 14): prefork workers write the access log "
        "themselves, ignore SIGUSR1, and keep writing to the rotated file")),
])
def test_signal_reopen_after_rotation(server_factory: Factory, tmp_path: Path,
                                      model: str) -> None:
    pid_file, access = tmp_path / "fs.pid", tmp_path / "access.log"
    server = server_factory("--model", model, "--workers", "1", "--pid-file", str(pid_file),
                            "--access-log", str(access))
    ask(server)
    assert wait_until(lambda: access.read_text().count("\n") == 1, 10)
    access.rename(tmp_path / "access.log.1")
    assert run_cli(["signal", "reopen", "--pid-file", str(pid_file)]).returncode == 0
    server.wait_for_log(r"reopened the access log")
    ask(server)
    assert wait_until(lambda: access.exists() and access.read_text().count("\n") == 1, 5), \
        "the next connection's line goes to the new file"


def test_signal_upgrade_of_the_single_model_on_a_unix_listener(server_factory: Factory,
                                                               tmp_path: Path) -> None:
    pid_file, path = tmp_path / "fs.pid", tmp_path / "fs.sock"
    server = server_factory("--model", "single", "--pid-file", str(pid_file),
                            bind=[f"unix:{path}"])
    assert run_cli(["signal", "upgrade", "--pid-file", str(pid_file)]).returncode == 0
    assert server.wait(20) == 0, server.log_tail()
    new = int(pid_file.read_text())
    assert new != server.pid
    assert proc_info(new) is not None
    assert ask(server) == HELLO.split(), "the new master serves on the same socket"
    assert stop_orphan(new) == 0
    assert not path.exists(), "the new master removed the socket file"


def test_exec_kills_a_program_that_outlives_the_graceful_timeout(server_factory: Factory) -> None:
    server = server_factory("--bind", "127.0.0.1:0", "--graceful-timeout", "1", "--",
                            "sh", "-c", "trap '' TERM; echo up; while :; do sleep 0.1; done",
                            command="exec")
    server.expect_exit = 1  # the stop had to kill it
    with server.connect() as s:
        assert recv_exactly(s, 3) == b"up\n"
        start = time.monotonic()
        server.signal(signal.SIGTERM)
        assert recv_all(s) == b""
        assert_took(time.monotonic() - start, 1.0, "SIGKILL after the graceful timeout")
    assert server.wait() == 1
    assert not [p for p in children_of(server.pid) if p.state != "Z"]
