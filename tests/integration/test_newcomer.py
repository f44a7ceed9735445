"""Issue 13, the newcomer's first hour: a safe ``signal``, every address printed, logs with
time, ``check``, no socket file left by an upgrade, messages that say what to do."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import socket
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.harness import Server, proc_info, recv_all, run_cli, wait_until
from tests.integration.test_upgrade import stop_orphan

Factory = Callable[..., Server]


@contextlib.contextmanager
def bystander() -> Iterator[subprocess.Popen[bytes]]:
    """A process that is not forkserve, for ``signal`` to be pointed at by mistake."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                            start_new_session=True)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait(10)


def one_line(result: subprocess.CompletedProcess[bytes], status: int, text: str) -> None:
    err = result.stderr.decode()
    assert result.returncode == status, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert text in err, err


# ---------------------------------------------------------------- 1. a safe `signal`

def test_signal_refuses_a_pid_that_is_not_a_forkserve_master(tmp_path: Path) -> None:
    with bystander() as other:
        result = run_cli(["signal", "stop", "--pid", str(other.pid)])
        one_line(result, 1, f"process {other.pid} is not a forkserve master")
        stale = tmp_path / "stale.pid"
        stale.write_text(f"{other.pid}\n")  # an old-style file, its pid since reused
        one_line(run_cli(["signal", "quit", "--pid-file", str(stale)]), 1,
                 "is not a forkserve master")
        assert other.poll() is None, "the bystander was signalled"


def test_signal_refuses_a_pid_file_that_its_master_did_not_write(server_factory: Factory,
                                                                 tmp_path: Path) -> None:
    pid_file = tmp_path / "fs.pid"
    server = server_factory("--pid-file", str(pid_file))
    first, start = pid_file.read_text().splitlines()
    assert first == str(server.pid)
    assert start.startswith("start=")
    stale = tmp_path / "stale.pid"
    stale.write_text(f"{server.pid}\nstart=1\n")  # as if written by an earlier holder
    one_line(run_cli(["signal", "stop", "--pid-file", str(stale)]), 1,
             f"process {server.pid} is not the master that wrote {stale}")
    assert server.proc.poll() is None
    result = run_cli(["signal", "stop", "--pid-file", str(pid_file)])
    assert result.returncode == 0, result.stderr
    assert server.wait() == 0


# ---------------------------------------------------------------- 2. no socket file left

def test_an_upgrade_leaves_no_unix_socket_file_behind(server_factory: Factory,
                                                      tmp_path: Path) -> None:
    sock, ctl = tmp_path / "fs.sock", tmp_path / "fs.ctl"
    server = server_factory("--control", f"unix:{ctl}", bind=[f"unix:{sock}"])
    server.signal(signal.SIGUSR2)
    handed = server.wait_for_log(r"upgrade: the new master \(pid (\d+)\) serves", 20)
    assert server.wait(20) == 0, server.log_tail()
    assert sock.exists(), "the new master serves on it"
    assert ctl.exists()
    assert stop_orphan(int(handed.group(1))) == 0
    assert not sock.exists(), "the master that ended last removes the files it was handed"
    assert not ctl.exists()


# ---------------------------------------------------------------- 3. every address printed

def test_the_ready_output_names_the_control_socket_and_the_metrics_url(
        server_factory: Factory, tmp_path: Path) -> None:
    ctl = tmp_path / "fs.ctl"
    server = server_factory("--control", f"unix:{ctl}", "--metrics-bind", "127.0.0.1:0")
    server.wait_for_log(rf"^forkserve: control socket on unix:{ctl} ")
    url = server.wait_for_log(r"^forkserve: metrics on http://127\.0\.0\.1:(\d+)/metrics$")
    with socket.create_connection(("127.0.0.1", int(url.group(1))), timeout=10) as s:
        s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        assert b"forkserve_busy" in recv_all(s)
    server.signal(signal.SIGTERM)
    assert server.wait() == 0
    server.wait_for_log(r"stopped \(graceful stop\): exit status 0, 0 connection\(s\) cut$")


# ---------------------------------------------------------------- 4. logs with time

LOG_LINE = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} \[\d+\] \[INFO\] "


def test_a_hooks_log_lines_have_the_servers_format(server_factory: Factory,
                                                  tmp_path: Path) -> None:
    (tmp_path / "loghooks.py").write_text(
        "import logging\n"
        "def on_starting(config):\n"
        "    logging.getLogger(__name__).info('the hook ran')\n")
    server = server_factory("--on-starting", "loghooks:on_starting", cwd=tmp_path)
    server.wait_for_log(LOG_LINE + "the hook ran$")


def test_log_file_beside_stderr_is_reopened_on_usr1(server_factory: Factory,
                                                    tmp_path: Path) -> None:
    path = tmp_path / "forkserve.log"
    server = server_factory("--log-file", str(path))
    path.rename(tmp_path / "forkserve.log.1")  # what logrotate does
    server.signal(signal.SIGUSR1)
    server.wait_for_log(rf"reopened the log file {path}$")
    server.signal(signal.SIGTERM)
    assert server.wait() == 0
    text = path.read_text()
    assert re.search(LOG_LINE + rf"reopened the log file {path}$", text, re.M), text
    assert "stopped (graceful stop): exit status 0, 0 connection(s) cut" in text
    server.wait_for_log("stopped \\(graceful stop\\)")  # and on standard error too


# ---------------------------------------------------------------- 5. forkserve check

def test_check_loads_what_serve_would_binds_nothing_and_prints_the_settings(
        tmp_path: Path) -> None:
    config = tmp_path / "fs.toml"
    config.write_text('model = "prefork"\nworkers = 3\n')
    with socket.socket() as taken:  # serve could not bind it: check does not try
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = ["check", "echo", "--config", str(config), "--bind", f"127.0.0.1:{port}"]
        result = run_cli(args)
        as_json = run_cli([*args, "--json"])
    assert result.returncode == 0, result.stderr
    assert "the configuration is valid (app echo, model prefork)" in result.stderr.decode()
    settings = tomllib.loads(result.stdout.decode())  # a file --config would read
    assert settings["workers"] == 3
    assert settings["bind"] == [f"127.0.0.1:{port}"]
    assert json.loads(as_json.stdout)["app"] == "echo"
    one_line(run_cli(["check", "nosuchmodule:handle"]), 2, "invalid app: cannot import")
    one_line(run_cli(["check", "--max-line", "-1"]), 2, "invalid --max-line")


# ---------------------------------------------------------------- 7. messages

def test_options_cannot_be_abbreviated_and_usage_is_the_commands() -> None:
    result = run_cli(["serve", "--bind", "127.0.0.1:0", "--max-chil", "3"])
    err = result.stderr.decode()
    assert result.returncode == 2, err
    assert "unrecognized arguments: --max-chil" in err
    assert "usage: forkserve serve" in err
    bogus = run_cli(["serve", "--bogus"])
    assert bogus.returncode == 2
    assert "usage: forkserve serve" in bogus.stderr.decode()


def test_messages_suggest_and_show_no_python_repr(tmp_path: Path) -> None:
    config = tmp_path / "fs.toml"
    config.write_text("max_childs = 3\n")
    one_line(run_cli(["check", "--config", str(config)]), 2,
             f"invalid max_childs in {config}: unknown setting; did you mean max_children?")
    config.write_text('control = "127.0.0.1:9000"\n')
    result = run_cli(["check", "--config", str(config)])
    one_line(result, 2, "got 127.0.0.1:9000")
    assert "Address(" not in result.stderr.decode()
    one_line(run_cli(["status", "--control", "127.0.0.1:9000"]), 2,
             "invalid --control: must be unix:PATH")
    one_line(run_cli(["client", "nowhere"]), 2, "bad address 'nowhere'")


def test_a_setting_the_model_ignores_gets_a_warning(server_factory: Factory) -> None:
    server = server_factory("--model", "fork", "--workers", "3")
    server.wait_for_log(r"^forkserve: warning: --workers \(workers\) applies to the prefork "
                        "and hybrid models only; the fork model ignores it$")


# ---------------------------------------------------------------- 6. --reload

APP_SOURCE = """
def handle(conn):
    for line in conn.lines():
        conn.write(b"VERSION\\n")
"""


@pytest.mark.parametrize("model", ["fork", "prefork"])
def test_reload_serves_the_new_code_once_a_source_file_changes(
        server_factory: Factory, tmp_path: Path, model: str) -> None:
    app = tmp_path / "devapp.py"
    app.write_text(APP_SOURCE.replace("VERSION", "v1"))
    server = server_factory("devapp:handle", "--reload", "--model", model, cwd=tmp_path)
    server.wait_for_log(rf"reload: watching {tmp_path} for changes")
    assert ask(server) == b"v1\n"
    app.write_text(APP_SOURCE.replace("VERSION", "v2"))
    server.wait_for_log(rf"reload: {app} changed", 20)
    server.wait_for_log(r"re-imported devapp:handle", 20)
    assert wait_until(lambda: ask(server) == b"v2\n", 20), "the new code serves"
    watcher = int(server.wait_for_log(r"for changes \(pid (\d+)\)").group(1))
    server.signal(signal.SIGTERM)
    assert server.wait() == 0
    assert wait_until(lambda: (p := proc_info(watcher)) is None or p.state == "Z", 10), \
        "the watcher ends with the master"


def ask(server: Server) -> bytes:
    with server.connect() as s:
        s.sendall(b"x\n")
        return s.recv(100)


def test_reload_is_refused_with_user_and_with_exec() -> None:
    one_line(run_cli(["serve", "--reload", "--user", "nobody"]), 2,
             "a development reload is not for a server that changes user")
    one_line(run_cli(["exec", "--reload", "--bind", "127.0.0.1:0", "--", "cat"]), 2,
             "invalid reload: exec runs the program afresh")


# ---------------------------------------------------------------- 9. the bench

@pytest.mark.timeout(90)
def test_bench_names_each_scenario_once_and_memory_only_where_it_means_that(
        tmp_path: Path) -> None:
    out, png = tmp_path / "out.json", tmp_path / "out.png"
    result = run_cli(["bench", "--models", "single", "--scenarios", "persist_c1,persist_c10",
                      "--duration", "0.5", "--warmup", "0", "--json", str(out),
                      "--plot", str(png)], timeout=80)
    assert result.returncode == 0, result.stderr
    err = result.stderr.decode()
    assert err.count("persist_c10") == 1, err
    assert result.stdout.decode().count("persist_c10") == 1
    records = {r["scenario"]: r for r in json.loads(out.read_text())["results"]}
    assert records["persist_c1"]["mem_per_conn_kb"] is None, "not the server over 1 client"
    assert records["persist_c10"]["mem_per_conn_kb"] is not None
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_reload_dir_watches_another_directory_too(server_factory: Factory,
                                                  tmp_path: Path) -> None:
    app = tmp_path / "devapp.py"
    app.write_text(APP_SOURCE.replace("VERSION", "v1"))
    shared = tmp_path / "shared"  # a library of the app's, outside its directory
    shared.mkdir()
    server = server_factory("devapp:handle", "--reload", "--reload-dir", str(shared),
                            cwd=tmp_path)
    server.wait_for_log(rf"reload: watching .*{shared}")
    (shared / "helpers.py").write_text("ANSWER = 2\n")
    server.wait_for_log(rf"reload: {shared / 'helpers.py'} changed", 20)
    server.wait_for_log(r"re-imported devapp:handle", 20)
