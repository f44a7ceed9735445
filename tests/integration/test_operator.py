"""What an operator sees: clear one-line errors with exit 2, config files, the access log."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest

from tests.integration.harness import Server, recv_all, recv_exactly, run_cli, wait_until

HELLO = b"Hello from server!\n"
Factory = Callable[..., Server]
#: The time at the start of a text access-log line: the error log's format.
TEXT_TIME = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"


def assert_usage_error(result: object, message: str) -> None:
    assert isinstance(result, subprocess.CompletedProcess)
    err = result.stderr.decode()
    assert result.returncode == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("forkserve: "), err
    assert message in lines[0], err


def test_port_in_use_is_one_clear_line_and_exit_2() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli(["serve", "--bind", f"127.0.0.1:{port}"])
    assert_usage_error(result, f"cannot listen on 127.0.0.1:{port}: address already in use")


def test_nothing_is_left_bound_when_a_later_listener_fails(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        sock_path = tmp_path / "a.sock"
        result = run_cli(["serve", "--bind", f"unix:{sock_path}", "--bind", f"127.0.0.1:{port}"])
    assert_usage_error(result, "address already in use")
    assert not sock_path.exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--bind", "localhost"], "expected HOST:PORT"),
    (["--bind", "127.0.0.1:99999"], "the port must be a number from 0 to 65535"),
    (["--bind", "::1:80"], "write IPv6 addresses in brackets"),
    (["--bind", "[nothex]:80"], "is not an IPv6 address"),
    (["--bind", "unix:"], "needs a path"),
    (["--bind", "no.such.host.invalid:0"], "unknown host"),
    (["--app", "nope"], "invalid app: 'nope' is neither a built-in app (echo, hello) nor"),
    (["--model", "threads"], "invalid --model: must be one of fork, single"),
    (["--max-children", "-3"], "invalid --max-children: must be at least 1, got -3"),
    (["--max-line", "lots"], "invalid --max-line: must be a whole number, got 'lots'"),
    (["--idle-timeout", "0"], "invalid --idle-timeout: must be from 0.001 to 1e+06 seconds"),
    (["--write-timeout", "1e300"], "invalid --write-timeout: must be from 0.001 to 1e+06"),
    (["--graceful-timeout", "1e10"], "invalid --graceful-timeout: must be from 0 to 1e+06"),
    (["--graceful-timeout", "nan"], "invalid --graceful-timeout"),
    (["--backlog", "0"], "invalid --backlog: must be at least 1"),
    (["--log-level", "loud"], "invalid --log-level"),
    (["--access-log", "/nonexistent-dir/x.log"], "cannot open /nonexistent-dir/x.log"),
    (["--config", "/nonexistent/forkserve.toml"], "cannot read /nonexistent/forkserve.toml"),
])
def test_bad_operator_input_is_one_line_and_exit_2(args: list[str], message: str) -> None:
    assert_usage_error(run_cli(["serve", "--bind", "127.0.0.1:0", *args]), message)


@pytest.mark.parametrize(("toml", "message"), [
    ("max_children = -1\n", "invalid max_children in {path}: must be at least 1"),
    ("max_children = 'ten'\n", "invalid max_children in {path}: must be a whole number"),
    ("bogus = 1\n", "invalid bogus in {path}: unknown setting"),
    ("bind = [1, 2]\n", "invalid bind in {path}"),
    ("model = \n", "is not valid TOML"),
])
def test_bad_config_file_names_the_setting_and_the_file(tmp_path: Path, toml: str,
                                                        message: str) -> None:
    path = tmp_path / "forkserve.toml"
    path.write_text(toml)
    assert_usage_error(run_cli(["serve", "--config", str(path)]), message.format(path=path))


def test_config_file_applies_and_flags_win(server_factory: Factory, tmp_path: Path) -> None:
    path = tmp_path / "forkserve.toml"
    path.write_text('app = "echo"\nmax-line = 4\nmodel = "fork"\nbind = ["127.0.0.1:1"]\n')
    server = server_factory("--config", str(path), "--max-line", "8")
    assert server.port != 1, "--bind on the command line wins over the file"
    with server.connect() as s:
        s.sendall(b"12345678\n")  # echo from the file, max-line 8 from the flag
        assert recv_exactly(s, 9) == b"12345678\n"


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_access_log_has_one_line_per_connection(server_factory: Factory, tmp_path: Path,
                                                fmt: str) -> None:
    log_path = tmp_path / "access.log"
    server = server_factory("--access-log", str(log_path), "--access-log-format", fmt)
    with server.connect() as s:
        s.sendall(b"ping\nping\n")
        assert recv_exactly(s, 2 * len(HELLO)) == 2 * HELLO
        peer = f"127.0.0.1:{s.getsockname()[1]}"
    assert wait_until(lambda: log_path.exists() and log_path.read_text().count("\n") == 1, 5)
    line = log_path.read_text().strip()
    if fmt == "json":
        record = json.loads(line)
        assert record["peer"] == peer
        assert record["bytes_in"] == 10
        assert record["bytes_out"] == 2 * len(HELLO)
        assert record["status"] == "0"
        assert record["pid"] != server.pid
        assert record["duration_s"] >= 0
        assert datetime.fromisoformat(record["time"]).tzinfo is not None
    else:
        assert re.match(TEXT_TIME + f" {peer} pid=", line), line
        assert f"in=10 out={2 * len(HELLO)} status=0" in line


def test_access_log_is_reopened_on_usr1(server_factory: Factory, tmp_path: Path) -> None:
    log_path = tmp_path / "access.log"
    server = server_factory("--access-log", str(log_path))
    with server.connect() as s:
        s.sendall(b"a\n")
        recv_exactly(s, len(HELLO))
    assert wait_until(lambda: log_path.exists() and log_path.read_text().count("\n") == 1, 5)
    log_path.rename(tmp_path / "access.log.1")  # what logrotate does
    server.signal(signal.SIGUSR1)
    server.wait_for_log("reopened the access log")
    with server.connect() as s:
        s.sendall(b"b\n")
        recv_exactly(s, len(HELLO))
    assert wait_until(lambda: log_path.exists() and log_path.read_text().count("\n") == 1, 5)


CRASHING_APP = """
import sys
import forkserve

def handle(conn):
    for line in conn.lines():
        if line.startswith(b"crash"):
            raise RuntimeError("the handler broke on purpose")
        conn.write(b"ok\\n")

sys.exit(forkserve.serve(handle, bind=["127.0.0.1:0"], model=sys.argv[1], access_log="-"))
"""


@pytest.mark.parametrize("model", ["fork", "single"])
def test_handler_exception_is_logged_and_costs_only_its_connection(server_factory: Factory,
                                                                   model: str) -> None:
    server = server_factory(model, script=CRASHING_APP)
    server.traceback_expected = True
    with server.connect() as other:
        other.sendall(b"hi\n")
        assert recv_exactly(other, 3) == b"ok\n"
        if model == "single":
            other.close()  # the single model serves one connection at a time
        with server.connect() as s:
            s.sendall(b"crash\n")
            assert s.recv(100) == b""
        server.wait_for_log(r"RuntimeError: the handler broke on purpose")
        server.wait_for_log(r"handler failed on the connection from 127\.0\.0\.1:\d+")
        server.wait_for_log(r"status=1$")
        if model == "fork":
            other.sendall(b"still here\n")
            assert recv_exactly(other, 3) == b"ok\n"
    with server.connect() as s:
        s.sendall(b"next\n")
        assert recv_exactly(s, 3) == b"ok\n"
    assert server.proc.poll() is None


def test_settings_command_prints_the_table() -> None:
    result = run_cli(["settings"])
    assert result.returncode == 0
    out = result.stdout.decode()
    assert "| `max_children` | `--max-children N` | `512` |" in out
    signals = run_cli(["settings", "--signals"]).stdout.decode()
    assert "| `SIGTERM` | `stop` | Graceful stop" in signals


def test_hup_reloads_the_config_file_and_a_broken_one_changes_nothing(
        server_factory: Factory, tmp_path: Path) -> None:
    path = tmp_path / "forkserve.toml"
    path.write_text('app = "hello"\n')
    server = server_factory("--config", str(path), "--chdir", str(tmp_path))
    with server.connect() as before:  # in flight across the reload: keeps the old app
        before.sendall(b"x\n")
        assert recv_exactly(before, len(HELLO)) == HELLO
        path.write_text('app = "echo"\nmax_line = 4\nmodel = "single"\n')
        server.signal(signal.SIGHUP)
        server.wait_for_log("reloaded the config")
        server.wait_for_log(r"reload: model can only change with a restart")
        with server.connect() as after:
            after.sendall(b"abcd\nabcde\n")
            assert recv_all(after) == b"abcd\nERR line too long\n"
        before.sendall(b"y\n")
        assert recv_exactly(before, len(HELLO)) == HELLO
    path.write_text("max_line = -1\n")
    server.signal(signal.SIGHUP)
    server.wait_for_log(r"reload failed, still serving with the running code and config: "
                        r"invalid max_line in .*: must be at least 1")
    (tmp_path / "quitter.py").write_text("import sys\nsys.exit('no config here')\n")
    path.write_text('app = "quitter:handle"\n')
    server.signal(signal.SIGHUP)  # an app that exits while importing: not the master's exit
    server.wait_for_log(r"reload failed, still serving with the running code and config: .*"
                        r"importing 'quitter' failed: SystemExit: no config here")
    with server.connect() as s:
        s.sendall(b"echo\n")
        assert recv_exactly(s, 5) == b"echo\n"


def test_pid_file_and_signals_by_name(server_factory: Factory, tmp_path: Path) -> None:
    pid_file = tmp_path / "forkserve.pid"
    config = tmp_path / "forkserve.toml"
    config.write_text('app = "hello"\n')
    server = server_factory("--config", str(config), "--pid-file", str(pid_file))
    assert pid_file.read_text().splitlines()[0] == f"{server.pid}"
    config.write_text('app = "echo"\n')
    result = run_cli(["signal", "reload", "--pid-file", str(pid_file)])
    assert result.returncode == 0, result.stderr
    assert result.stderr.decode().strip() == f"forkserve: sent SIGHUP to {server.pid}"
    server.wait_for_log("reloaded the config")
    with server.connect() as s:
        s.sendall(b"echoed\n")
        assert recv_exactly(s, 7) == b"echoed\n"
    assert run_cli(["signal", "stop", "--pid-file", str(pid_file)]).returncode == 0
    assert server.wait() == 0
    assert not pid_file.exists(), "the pid file is removed on exit"


def test_signal_command_errors_are_one_line(tmp_path: Path) -> None:
    missing = run_cli(["signal", "stop", "--pid-file", str(tmp_path / "none.pid")])
    assert missing.returncode == 1
    assert "cannot read the pid file" in missing.stderr.decode()
    stale = tmp_path / "stale.pid"
    stale.write_text("999999999\n")
    result = run_cli(["signal", "reload", "--pid-file", str(stale)])
    assert result.returncode == 1
    assert result.stderr.decode().strip() == (
        f"forkserve: no process 999999999 (stale pid file {stale}?)")
    garbage = tmp_path / "garbage.pid"
    for text in ("hello\n", "\u00b2\n", "\u0663\n", "1\n", "\n"):  # ² and Arabic 3: isdigit()
        garbage.write_text(text, encoding="utf-8")
        result = run_cli(["signal", "reload", "--pid-file", str(garbage)])
        assert result.returncode == 1, text
        assert "does not hold a pid" in result.stderr.decode()
        assert "Traceback" not in result.stderr.decode()
    bad_verb = run_cli(["signal", "explode", "--pid", "1"])
    assert bad_verb.returncode == 2
    assert "Traceback" not in bad_verb.stderr.decode()


def test_unwritable_pid_file_is_an_operator_error(tmp_path: Path) -> None:
    result = run_cli(["serve", "--bind", "127.0.0.1:0", "--pid-file",
                      str(tmp_path / "missing-dir" / "x.pid")])
    assert_usage_error(result, "invalid pid_file: cannot write")
