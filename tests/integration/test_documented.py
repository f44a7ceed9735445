"""A real-process test for each documented flag, verb and API that had none (issue 14, item 5).

scripts/check_coverage.py names any flag of the README's settings table or verb of its signal
table that no test under tests/integration uses; these close the gaps it found."""

from __future__ import annotations

import grp
import os
import pty
import pwd
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.harness import (
    HELLO,
    TEARDOWN_STOP,
    Server,
    assert_took,
    proc_info,
    recv_all,
    recv_exactly,
    run_cli,
    wait_until,
)
from tests.integration.test_privileges import limits
from tests.integration.test_tls import make_pki, tls_args, tls_connect
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


@pytest.mark.parametrize("model", ["fork", "prefork"])
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
    new = int(pid_file.read_text().split()[0])  # (line 2: the start time)
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
    assert not [p for p in server.children() if p.state != "Z"]


CRASHING = """
def handle(conn):
    for line in conn.lines():
        if line.startswith(b"crash"):
            raise RuntimeError("on purpose")
        conn.write(b"ok\\n")
"""


def scrape_unix(path: Path) -> dict[str, float]:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(path))
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        head, _, body = recv_all(s).decode().partition("\r\n\r\n")
    assert " 200 " in head.splitlines()[0], head
    values: dict[str, float] = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


@pytest.mark.skipif(os.geteuid() != 0, reason="--user needs root")
def test_metrics_on_a_unix_socket_count_refusals_errors_and_fork_failures(
        server_factory: Factory, tmp_path: Path) -> None:
    (tmp_path / "crashing.py").write_text(CRASHING)
    metrics = tmp_path / "metrics.sock"
    server = server_factory("--chdir", str(tmp_path), "--app", "crashing:handle",
                            "--deny", "127.0.0.2/32", "--user", "nobody",
                            "--metrics-bind", f"unix:{metrics}")
    server.traceback_expected = True
    with server.connect(source="127.0.0.2") as s:
        assert recv_all(s) == b""
    with server.connect() as s:
        s.sendall(b"crash\n")
        assert recv_all(s) == b""
    # the client sees the end before the master has reaped the child and counted its status
    handler_errors = 'forkserve_errors_total{kind="handler"}'
    assert wait_until(lambda: scrape_unix(metrics).get(handler_errors) == 1.0, 10)
    # the master runs as nobody: a process limit of 1 makes its next fork fail (EAGAIN); set,
    # then lifted, by nobody (its own process; the soft limit only, as nobody cannot raise
    # a hard one)
    # (the process that forks: the fork model's zygote, issue 16)
    forker = (server.zygotes() or [server.pid])[0]
    as_nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "prlimit",
                 f"--pid={forker}"]
    subprocess.run([*as_nobody, "--nproc=1:"], check=True, timeout=10)
    try:
        with server.connect() as s:
            assert recv_all(s) == b"", "no process to serve it: closed"
        server.wait_for_log(r"fork failed: .* \(EAGAIN\); closed that connection, pausing "
                            r"accepts")
    finally:
        hard = limits(forker)["Max processes"][1]
        subprocess.run([*as_nobody, f"--nproc={hard}:"], check=True, timeout=10)
    values = scrape_unix(metrics)
    assert values['forkserve_refused_total{reason="denied"}'] == 1.0
    assert values['forkserve_errors_total{kind="handler"}'] == 1.0
    assert values['forkserve_fork_failures_total{errno="EAGAIN"}'] == 1.0
    assert values['forkserve_refused_total{reason="fork_failed"}'] == 1.0
    assert 0 < values["forkserve_uptime_seconds"] < 60
    # (the socket file stays: nobody cannot remove it from root's directory, as the README
    # says of the pid file)


def test_backlog_reaches_the_listening_socket(server_factory: Factory) -> None:
    server = server_factory("--backlog", "7")
    out = subprocess.run(["ss", "-ltnH", f"sport = :{server.port}"], capture_output=True,
                         check=True, timeout=10).stdout.decode().split()
    assert out[:3] == ["LISTEN", "0", "7"], out  # Send-Q of a listener: its backlog


@pytest.mark.skipif(os.geteuid() != 0, reason="--user needs root")
def test_group_is_the_group_children_run_as(server_factory: Factory) -> None:
    daemon = grp.getgrnam("daemon").gr_gid
    server = server_factory("--user", "nobody", "--group", "daemon")
    with server.connect() as s:
        s.sendall(b"hi\n")
        assert recv_exactly(s, len(HELLO)) == HELLO
        (child,) = server.children()
        status = Path(f"/proc/{child.pid}/status").read_text()
    gids = next(line for line in status.splitlines() if line.startswith("Gid:")).split()[1:]
    uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
    assert set(gids) == {str(daemon)}
    assert set(uids) == {str(pwd.getpwnam("nobody").pw_uid)}


@pytest.mark.parametrize("idle", ["2", "300"])
def test_exec_kills_a_program_whose_client_stops_reading(server_factory: Factory,
                                                         idle: str) -> None:
    server = server_factory("--bind", "127.0.0.1:0", "--write-timeout", "1", "--idle-timeout",
                            idle, "--", "yes", command="exec")
    with server.connect() as s:  # never read: yes fills the buffers, then waits on us
        port = s.getsockname()[1]
        server.wait_for_log(rf"end pid \d+ peer 127\.0\.0\.1:{port} status SIGKILL "
                            r"\(write timeout\)", timeout=8)


def test_exec_limits_other_than_nofile_reach_the_program(server_factory: Factory) -> None:
    server = server_factory("--bind", "127.0.0.1:0", "--limit-cpu", "20", "--limit-nproc",
                            "3000", "--limit-as", "1024", "--", "cat", "/proc/self/limits",
                            command="exec")
    with server.connect() as s:
        seen = recv_all(s).decode()
    rows = {line[:26].strip(): line[26:].split()[:2] for line in seen.splitlines()[1:]}
    assert rows["Max cpu time"] == ["20", "20"]
    assert rows["Max processes"] == ["3000", "3000"]
    assert rows["Max address space"] == [str(1024 << 20)] * 2


def test_the_installed_entry_point_serves(tmp_path: Path) -> None:
    entry = Path(sys.executable).parent / "forkserve"
    assert entry.exists(), "pip install puts the forkserve command next to python"
    proc = subprocess.Popen([str(entry), "serve", "--bind", "127.0.0.1:0"],
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            start_new_session=True, cwd=tmp_path)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline().decode()
        assert line.startswith("forkserve: listening on 127.0.0.1:"), line
        port = int(line.split()[3].rpartition(":")[2])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"hi\n")
            assert recv_exactly(s, len(HELLO)) == HELLO
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(TEARDOWN_STOP) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        proc.stderr.close()  # type: ignore[union-attr]


def test_exec_programs_end_when_the_master_dies(server_factory: Factory) -> None:
    server = server_factory("--bind", "127.0.0.1:0", "--", "sh", "-c", "echo up; exec sleep 60",
                            command="exec")
    with server.connect() as s:
        assert recv_exactly(s, 3) == b"up\n"
        (program,) = server.children()
        server.expect_exit = -signal.SIGKILL
        server.signal(signal.SIGKILL)
        server.wait()
        # the kernel sends the program SIGTERM (PR_SET_PDEATHSIG); we are its subreaper now
        assert wait_until(lambda: (p := proc_info(program.pid)) is None or p.state == "Z", 2.0)
        assert recv_all(s) == b""


def test_upgrade_with_tls_serves_tls_from_the_new_master(server_factory: Factory,
                                                         tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    pid_file = tmp_path / "fs.pid"
    server = server_factory(*tls_args(pki), "--pid-file", str(pid_file))
    assert run_cli(["signal", "upgrade", "--pid-file", str(pid_file)]).returncode == 0
    assert server.wait(20) == 0, server.log_tail()
    new = int(pid_file.read_text().split()[0])  # (line 2: the start time)
    with tls_connect(server, pki.client()) as s:
        s.sendall(b"hi\n")
        assert recv_exactly(s, len(HELLO)) == HELLO
    assert stop_orphan(new) == 0


def test_status_live_view_refreshes_on_a_terminal(server_factory: Factory,
                                                  tmp_path: Path) -> None:
    control = tmp_path / "fs.ctl"
    server = server_factory("--control", f"unix:{control}")
    main, sub = pty.openpty()
    view = subprocess.Popen([sys.executable, "-m", "forkserve", "status", "--control",
                             f"unix:{control}", "--interval", "0.2"], stdin=subprocess.DEVNULL,
                            stdout=sub, stderr=subprocess.PIPE, start_new_session=True)
    os.close(sub)
    seen = b""

    def shows(text: bytes) -> bool:
        nonlocal seen
        while select.select([main], [], [], 0.1)[0]:
            try:
                seen += os.read(main, 65536)
            except OSError:  # the view has exited: the pty is closed
                break
        return text in seen

    try:
        assert wait_until(lambda: shows(b"0 connections"), 10), seen[-500:]
        with server.connect() as s:
            s.sendall(b"hi\n")
            assert recv_exactly(s, len(HELLO)) == HELLO
        assert wait_until(lambda: shows(b"1 connections"), 10), "the view refreshes"
        view.send_signal(signal.SIGINT)
        assert view.wait(10) == 0
    finally:
        if view.poll() is None:
            view.kill()
            view.wait(10)
        os.close(main)
        assert view.stderr is not None
        view.stderr.close()
