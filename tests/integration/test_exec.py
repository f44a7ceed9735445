"""forkserve exec: a real program per connection, with tcpserver's environment and hygiene."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.harness import (
    LATE_FACTOR,
    LATE_SLACK,
    Server,
    assert_took,
    cmdline,
    recv_all,
    recv_exactly,
    run_cli,
    session_procs,
    wait_until,
)

Factory = Callable[..., Server]
SECRET = "FORKSERVE_TEST_SECRET"
BIND = ["--bind", "127.0.0.1:0"]
END = r"end pid (\d+) peer 127\.0\.0\.1:{port} status {status} duration \d+\.\d+s"

pytestmark = pytest.mark.timeout(30)


def exec_server(factory: Factory, *args: str, **kwargs: object) -> Server:
    return factory(*args, command="exec", **kwargs)


def ask(server: Server, data: bytes = b"") -> tuple[bytes, int]:
    """Send ``data``, end the input, read to EOF; return the answer and the local port."""
    with server.connect() as s:
        port = s.getsockname()[1]
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        return recv_all(s), port


def end_line(server: Server, port: int, status: str) -> int:
    """Wait for the program's ``end`` line; return its pid."""
    return int(server.wait_for_log(END.format(port=port, status=status)).group(1))


def test_cat_echoes_and_its_end_is_logged(server_factory: Factory) -> None:
    server = exec_server(server_factory, *BIND, "--", "cat")
    data = b"one\ntwo\n" + bytes(range(256)) * 64
    answer, port = ask(server, data)
    assert answer == data
    end_line(server, port, "0")
    assert not server.children()


@pytest.mark.parametrize("program", [["env"], ["sh", "-c", "env"]])
def test_environment_is_exactly_the_tcpserver_one(server_factory: Factory,
                                                  program: list[str]) -> None:
    server = exec_server(server_factory, *BIND, "--env", "GREETING=hello world=1",
                         "--pass-env", "PASSED", "--pass-env", "NOT_SET_IN_MASTER",
                         "--", *program,
                         env={SECRET: "do-not-leak", "PASSED": "yes", "PATH": os.environ["PATH"]})
    answer, port = ask(server)
    env = dict(line.split("=", 1) for line in answer.decode().splitlines())
    if program[0] == "sh":
        env.pop("PWD")  # the shell itself sets PWD; nothing else
    assert env == {
        "PATH": os.environ["PATH"], "GREETING": "hello world=1", "PASSED": "yes",
        "PROTO": "TCP", "TCPLOCALIP": "127.0.0.1", "TCPLOCALPORT": str(server.port),
        "TCPREMOTEIP": "127.0.0.1", "TCPREMOTEPORT": str(port),
    }
    assert SECRET not in answer.decode()


def test_unix_listener_sets_proto_unix(server_factory: Factory, tmp_path: Path) -> None:
    path = tmp_path / "exec.sock"
    server = exec_server(server_factory, "--bind", f"unix:{path}", "--", "env")
    with server.connect() as s:
        s.shutdown(socket.SHUT_WR)
        env = dict(line.split("=", 1) for line in recv_all(s).decode().splitlines())
    assert env["PROTO"] == "UNIX"
    assert env["UNIXLOCALPATH"] == str(path)
    assert env["UNIXREMOTEPID"] == str(os.getpid())
    assert env["UNIXREMOTEUID"] == str(os.getuid())
    assert not any(name.startswith("TCP") for name in env)


def test_only_fds_0_1_2_are_inherited(server_factory: Factory) -> None:
    # `; true` keeps sh from exec'ing ls in its place: ls runs as the shell's child and lists
    # the *shell's* fds, which are exactly what the program inherited (ls's own directory fd
    # is in ls's table, not the shell's).
    script = "ls /proc/$$/fd; readlink /proc/$$/fd/0 /proc/$$/fd/1 /proc/$$/fd/2; true"
    server = exec_server(server_factory, *BIND, "--", "sh", "-c", script)
    answer, _ = ask(server)
    lines = answer.decode().splitlines()
    assert lines[:3] == ["0", "1", "2"], answer
    fd0, fd1, fd2 = lines[3:]
    assert fd0 == fd1
    assert fd0.startswith("socket:")
    assert fd2.startswith("pipe:")


def test_signals_at_default_and_mask_empty(server_factory: Factory) -> None:
    # a single command: sh execs grep in its place, so /proc/self is the program itself
    server = exec_server(server_factory, *BIND, "--", "sh", "-c",
                         "grep -E '^Sig(Ign|Blk):' /proc/self/status")
    answer, _ = ask(server)
    assert answer.decode().split() == ["SigBlk:", "0" * 16, "SigIgn:", "0" * 16]


def test_yes_into_head_finishes_with_sigpipe_at_default(server_factory: Factory) -> None:
    server = exec_server(server_factory, *BIND, "--", "sh", "-c", "yes | head -1")
    answer, port = ask(server)
    assert answer == b"y\n"
    end_line(server, port, "0")
    # with SIGPIPE ignored, yes would have ended on EPIPE and said so on stderr
    assert "Broken pipe" not in server.log()


def test_nonzero_exit_and_stderr_are_logged_with_the_pid(server_factory: Factory) -> None:
    server = exec_server(server_factory, *BIND, "--", "sh", "-c",
                         "echo to the client; echo 'to the log' >&2; exit 3")
    answer, port = ask(server)
    assert answer == b"to the client\n"
    pid = end_line(server, port, "3")
    lines = server.log().splitlines()
    stderr_at = next(i for i, line in enumerate(lines) if line.endswith(f"[{pid}] to the log"))
    end_at = next(i for i, line in enumerate(lines) if f"end pid {pid} " in line)
    assert stderr_at < end_at, "a program's last stderr lines come before its end line"


def test_silent_program_is_killed_at_the_idle_timeout(server_factory: Factory) -> None:
    server = exec_server(server_factory, *BIND, "--idle-timeout", "1", "--",
                         "sh", "-c", "cat | cat")
    with server.connect() as s:
        port = s.getsockname()[1]
        for i in range(4):  # 1.6 s of traffic: longer than the timeout, never idle for it
            s.sendall(b"%d\n" % i)
            assert recv_exactly(s, 2) == b"%d\n" % i
            time.sleep(0.4)  # the client's pace, never idle for the timeout: under test
        quiet_since = time.monotonic()
        assert recv_all(s) == b""  # the whole pipeline was killed: EOF
        quiet_for = time.monotonic() - quiet_since
    # TCP_INFO is read at most once a second: the kill comes 1 to 2 s after the last byte
    assert_took(quiet_for, 1.0, "exec idle timeout")
    assert quiet_for < 2 * LATE_FACTOR + LATE_SLACK
    end_line(server, port, r"SIGKILL \(idle timeout\)")
    assert not server.children()


def test_programs_come_from_the_zygote_and_the_master_keeps_only_their_stderr(
        server_factory: Factory) -> None:
    server = exec_server(server_factory, *BIND, "--", "sh", "-c",
                         "echo started >&2; exec cat")
    with server.connect() as s:
        port = s.getsockname()[1]
        s.sendall(b"ping\n")
        assert recv_exactly(s, 5) == b"ping\n"
        (zygote,) = server.zygotes()
        (program,) = server.children()
        assert program.ppid == zygote, "the master forks nothing per connection"
        server.wait_for_log(rf"\[{program.pid}\] started")
        pipes = [os.readlink(f"/proc/{server.pid}/fd/{fd}")
                 for fd in os.listdir(f"/proc/{server.pid}/fd")]
        program_stderr = os.readlink(f"/proc/{program.pid}/fd/2")
        assert pipes.count(program_stderr) == 1, "the read end; the write end is the program's"
        zygote_fds = [os.readlink(f"/proc/{zygote}/fd/{fd}")
                      for fd in os.listdir(f"/proc/{zygote}/fd")]
        assert program_stderr not in zygote_fds, "passed on, not kept"
    assert end_line(server, port, "0") == program.pid


@pytest.mark.timeout(60)
def test_a_killed_zygote_is_replaced_and_its_programs_end_on_their_sigterm(
        server_factory: Factory) -> None:
    server = exec_server(server_factory, *BIND, "--", "cat")
    with server.connect() as s:
        port = s.getsockname()[1]
        s.sendall(b"ping\n")
        assert recv_exactly(s, 5) == b"ping\n"
        (zygote,) = server.zygotes()
        os.kill(zygote, signal.SIGKILL)
        s.settimeout(5)
        assert recv_all(s) == b"", "cat ended on its PDEATHSIG (SIGTERM): the client sees EOF"
    # reaped by the master (its subreaper), which still writes its end line
    end_line(server, port, "SIGTERM")
    server.wait_for_log(r"\(the zygote\) was killed by SIGKILL")
    assert wait_until(lambda: len(server.zygotes()) == 1 and server.zygotes() != [zygote], 5)
    answer, _ = ask(server, b"again\n")
    assert answer == b"again\n"


@pytest.mark.parametrize("model", ["prefork", "single"])
def test_models_without_a_process_per_connection_are_refused(model: str) -> None:
    result = run_cli(["exec", *BIND, "--model", model, "--", "cat"])
    err = result.stderr.decode()
    assert result.returncode == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert f"exec cannot run under the {model} model" in err
    assert "listening" not in err


@pytest.mark.parametrize(("args", "message"), [
    (["--", "fs-no-such-program"], "'fs-no-such-program' is not an executable on PATH"),
    (["--", "./no/such/file"], "'./no/such/file' is not an executable file"),
    (["--env", "NOVALUE", "--", "cat"], "invalid --env: 'NOVALUE': expected NAME=VALUE"),
    (["--env", "1X=y", "--", "cat"], "'1X' is not a variable name"),
    (["--env", "TCPREMOTEIP=1.2.3.4", "--", "cat"], "TCPREMOTEIP is set by forkserve"),
    (["--pass-env", "PROTO", "--", "cat"], "invalid --pass-env: PROTO is set by forkserve"),
])
def test_unusable_command_lines_fail_before_binding(args: list[str], message: str) -> None:
    result = run_cli(["exec", *BIND, *args])
    err = result.stderr.decode()
    assert result.returncode == 2, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert message in err


def test_serve_points_exec_to_its_command() -> None:
    result = run_cli(["serve", "exec", *BIND])
    assert result.returncode == 2
    assert "forkserve exec [OPTIONS] -- PROGRAM" in result.stderr.decode()


def test_program_gone_after_start_is_logged_and_exits_127(server_factory: Factory,
                                                          tmp_path: Path) -> None:
    program = tmp_path / "vanishing"
    program.write_text("#!/bin/sh\necho never\n")
    program.chmod(0o755)
    server = exec_server(server_factory, *BIND, "--", str(program))
    program.unlink()
    answer, port = ask(server)
    assert answer == b""
    pid = end_line(server, port, "127")
    server.wait_for_log(rf"\[{pid}\] forkserve: cannot run {program}: No such file or directory")


def test_graceful_stop_ends_a_running_program(server_factory: Factory) -> None:
    server = exec_server(server_factory, *BIND, "--", "sleep", "60")
    with server.connect() as s:
        assert wait_until(lambda: any("sleep" in cmdline(p.pid) for p in server.children()),
                          10.0)
        port = s.getsockname()[1]
        started = time.monotonic()
        assert server.stop() == 0  # SIGTERM reaches sleep at its default action
        assert time.monotonic() - started < 2.0, "the program ends at once on SIGTERM"
        assert recv_all(s) == b""
    end_line(server, port, "SIGTERM")
    assert not [p for p in session_procs(server.pid) if p.state != "Z"]


def test_clients_queued_at_a_stop_get_programs_that_are_not_signalled(
        server_factory: Factory) -> None:
    server = exec_server(server_factory, *BIND, "--", "sh", "-c",
                         'read line; sleep 0.5; echo "answer $line"')
    running = server.connect()  # its program starts before the stop: the stop ends it
    running.sendall(b"early\n")
    assert wait_until(lambda: any("answer" in cmdline(p.pid) for p in server.children()), 10.0)
    os.kill(server.pid, signal.SIGSTOP)  # (the master takes nothing: the next ones queue)
    try:
        queued = [server.connect() for _ in range(3)]
        for s in queued:
            s.sendall(b"queued\n")
        os.kill(server.pid, signal.SIGTERM)  # seen first when it runs again: the drain
    finally:
        os.kill(server.pid, signal.SIGCONT)
    for s in queued:
        with s:
            s.settimeout(10)
            assert recv_all(s) == b"answer queued\n", "a drained client is answered"
    with running:
        running.settimeout(10)
        try:
            cut = recv_all(running)
        except ConnectionResetError:  # (its end may come as a reset: either way, cut short)
            cut = b""
        assert cut == b"", f"a program started before the stop gets SIGTERM\n{server.log_tail()}"
    assert server.wait() == 0


def test_limits_apply_to_the_program(server_factory: Factory) -> None:
    server = exec_server(server_factory, *BIND, "--limit-nofile", "32", "--",
                         "sh", "-c", "ulimit -n; ulimit -Hn")
    assert ask(server)[0] == b"32\n32\n"


def test_max_connection_time_kills_a_busy_program(server_factory: Factory) -> None:
    server = exec_server(server_factory, *BIND, "--max-connection-time", "1", "--",
                         "sh", "-c", "while true; do echo tick; sleep 0.1; done")
    with server.connect() as s:
        start = time.monotonic()
        got = recv_all(s)
        assert got.startswith(b"tick\n")
        assert_took(time.monotonic() - start, 1.0, "exec max connection time")
    server.wait_for_log(r"status SIGKILL \(max connection time\)")
