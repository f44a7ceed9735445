"""Lifecycle hooks: each runs in the process its docstring names, and a failing one costs only
what the docs say."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.harness import Server, recv_exactly, run_cli, wait_until

HELLO = b"Hello from server!\n"
Factory = Callable[..., Server]

HOOKS = """
import os

LOG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hooks.log")

def _note(*words):
    with open(LOG, "a") as fh:  # one write per line: safe across processes (O_APPEND)
        fh.write(" ".join(str(w) for w in words) + "\\n")

def on_starting(config):
    _note("on_starting", os.getpid(), config.model)

def post_fork(process):
    _note("post_fork", os.getpid(), process.pid, process.role, os.getppid())

def child_exit(child):
    _note("child_exit", os.getpid(), child.pid, child.status)

def on_reload(config):
    _note("on_reload", os.getpid(), config.max_line)

def on_exit(status):
    _note("on_exit", os.getpid(), status)

def fail(*args):
    raise RuntimeError("hook says no")

def slow_exit(status):
    _note("exiting", os.getpid(), status)
    import time
    time.sleep(1)
"""

ALL = ["--on-starting", "hooks:on_starting", "--post-fork", "hooks:post_fork",
       "--child-exit", "hooks:child_exit", "--on-reload", "hooks:on_reload",
       "--on-exit", "hooks:on_exit"]


def notes(tmp_path: Path) -> list[list[str]]:
    path = tmp_path / "hooks.log"
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.parametrize("model", ["fork", "prefork"])
def test_each_hook_runs_in_its_process(server_factory: Factory, tmp_path: Path,
                                       model: str) -> None:
    (tmp_path / "hooks.py").write_text(HOOKS)
    config = tmp_path / "forkserve.toml"
    config.write_text(f'model = "{model}"\nworkers = 1\n')
    server = server_factory("--config", str(config), "--chdir", str(tmp_path), *ALL)
    master = str(server.pid)
    with server.connect() as s:
        s.sendall(b"hi\n")
        try:
            answer = recv_exactly(s, len(HELLO))
        except OSError as exc:  # (seen once in CI, a reset: the server's log says why)
            raise AssertionError(f"{exc!r}\n{server.log_tail()}\n{notes(tmp_path)}") from exc
        assert answer == HELLO
    # the fork model's children are forked by its zygote (issue 16), the master's child
    parents = {master} if model == "prefork" else {str(p) for p in server.zygotes()}
    config.write_text(f'model = "{model}"\nworkers = 1\nmax_line = 77\n')
    server.signal(signal.SIGHUP)
    assert wait_until(lambda: any(n[0] == "on_reload" for n in notes(tmp_path)), 10)
    if model == "fork":  # the reload's new zygote
        assert wait_until(lambda: any(str(p) not in parents for p in server.zygotes()), 10)
        parents |= {str(p) for p in server.zygotes()}
    if model == "prefork":  # the reload's new worker is up before the stop
        assert wait_until(lambda: sum(n[0] == "post_fork" for n in notes(tmp_path)) == 2, 10)
    server.signal(signal.SIGTERM)
    assert server.wait() == 0
    seen = notes(tmp_path)
    assert seen[0] == ["on_starting", master, model]
    forks = [n for n in seen if n[0] == "post_fork"]
    role = "child" if model == "fork" else "worker"
    assert forks, seen
    for _, pid, reported, got_role, parent in forks:
        assert pid == reported != master, "post_fork runs in the new process"
        assert got_role == role
        assert parent in parents
    exits = [n for n in seen if n[0] == "child_exit"]
    assert {n[1] for n in exits} == {master}, "child_exit runs in the master"
    zygotes = {str(p) for p in parents} - {master}  # (the zygotes end too: once each)
    assert {n[2] for n in exits} - zygotes == {n[1] for n in forks}, "one per process forked"
    assert ["on_reload", master, "77"] in seen
    assert seen[-1] == ["on_exit", master, "0"]


def test_a_failing_on_starting_starts_nothing(tmp_path: Path) -> None:
    (tmp_path / "hooks.py").write_text(HOOKS)
    result = run_cli(["serve", "--bind", "127.0.0.1:0", "--chdir", str(tmp_path),
                      "--on-starting", "hooks:fail"])
    err = result.stderr.decode()
    assert result.returncode == 2, err
    assert "hook says no" in err, "the traceback of the hook is logged"
    assert err.strip().splitlines()[-1].startswith("forkserve: invalid on_starting: the hook "
                                                   "raised"), err
    assert "listening on" not in err


def test_a_failing_post_fork_costs_a_child_its_connection_only(server_factory: Factory,
                                                               tmp_path: Path) -> None:
    (tmp_path / "hooks.py").write_text(HOOKS)
    server = server_factory("--chdir", str(tmp_path), "--post-fork", "hooks:fail",
                            "--child-exit", "hooks:fail")
    server.traceback_expected = True
    for _ in range(2):
        with server.connect() as s:
            s.sendall(b"hi\n")
            assert s.recv(100) == b"", "the child closed without serving"
    server.wait_for_log(r"the post_fork hook hooks:fail raised")
    server.wait_for_log(r"the child_exit hook hooks:fail raised")
    assert server.proc.poll() is None, "the master goes on"


def test_a_failing_post_fork_in_workers_is_a_boot_failure(server_factory: Factory,
                                                          tmp_path: Path) -> None:
    (tmp_path / "hooks.py").write_text(HOOKS)
    server = server_factory("--chdir", str(tmp_path), "--model", "prefork", "--workers", "2",
                            "--post-fork", "hooks:fail")
    server.traceback_expected = True
    server.expect_exit = 3  # workers that keep failing to boot
    assert server.wait(20) == 3
    server.wait_for_log(r"workers keep failing while booting")


@pytest.mark.parametrize(("value", "message"), [
    ("hooks:nothing", "invalid post_fork: 'hooks' has no attribute 'nothing'"),
    ("nohooks:post_fork", "invalid post_fork: cannot import 'nohooks'"),
    ("hooks", "invalid --post-fork: must be MODULE:ATTR"),
    ("hooks:LOG", "invalid post_fork: hooks:LOG is not callable"),
])
def test_bad_hook_names_are_one_line_and_exit_2(tmp_path: Path, value: str,
                                                 message: str) -> None:
    (tmp_path / "hooks.py").write_text(HOOKS)
    result = run_cli(["serve", "--bind", "127.0.0.1:0", "--chdir", str(tmp_path),
                      "--post-fork", value])
    err = result.stderr.decode()
    assert result.returncode == 2, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert message in err


def test_a_post_fork_hook_that_hangs_is_a_boot_failure(server_factory: Factory,
                                                       tmp_path: Path) -> None:
    (tmp_path / "hooks.py").write_text(HOOKS + "\nimport time\n\ndef hang(process):\n"
                                       "    time.sleep(3600)\n")
    server = server_factory("--chdir", str(tmp_path), "--model", "prefork", "--workers", "1",
                            "--post-fork", "hooks:hang", "--timeout", "1")
    server.traceback_expected = True  # the stack of the stuck hook, by faulthandler
    server.wait_for_log(r"is not ready after \d+\.\d s \(a post_fork hook")
    server.wait_for_log(r"line \d+ in hang")
    server.expect_exit = 3
    assert server.wait(30) == 3


@pytest.mark.parametrize("model", ["fork", "single"])
def test_signals_while_the_stopped_master_exits_change_nothing(server_factory: Factory,
                                                               tmp_path: Path,
                                                               model: str) -> None:
    # the on_exit hook holds the master in its exit, after the stop: an operator's repeated
    # TERM (or a TTIN) then must neither kill it (status -15) nor stop it
    (tmp_path / "hooks.py").write_text(HOOKS)
    server = server_factory("--model", model, "--chdir", str(tmp_path),
                            "--on-exit", "hooks:slow_exit")
    server.signal(signal.SIGTERM)
    assert wait_until(lambda: any(n[0] == "exiting" for n in notes(tmp_path)), 10)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGTTIN, signal.SIGTERM):
        server.signal(sig)
    assert server.wait(10) == 0, server.log_tail()
    assert notes(tmp_path) == [["exiting", str(server.pid), "0"]]
