"""Privileges and limits: who children run as, and the limits /proc shows for them."""

from __future__ import annotations

import os
import pwd
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.harness import Server, recv_all, recv_exactly, run_cli, wait_until

HELLO = b"Hello from server!\n"
Factory = Callable[..., Server]


def limits(pid: int) -> dict[str, tuple[str, str]]:
    out = {}
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines()[1:]:
        name, soft, hard = re.split(r"\s{2,}", line.strip())[:3]
        out[name] = (soft, hard)
    return out


def status_field(pid: int, field: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(field)


@pytest.mark.parametrize("model", ["fork", "prefork"])
def test_limits_are_set_in_each_child_and_worker(server_factory: Factory, model: str) -> None:
    server = server_factory("--model", model, "--workers", "1", "--limit-nofile", "64",
                            "--limit-cpu", "30", "--limit-as", "4096")
    master = limits(server.pid)
    with server.connect() as s:
        s.sendall(b"hi\n")
        assert recv_exactly(s, len(HELLO)) == HELLO
        (child,) = (p.pid for p in server.children())
        seen = limits(child)
    assert seen["Max open files"] == ("64", "64")
    assert seen["Max cpu time"] == ("30", "30")
    assert seen["Max address space"] == (str(4096 << 20), str(4096 << 20))
    assert master["Max open files"] != ("64", "64"), "the master keeps its own limits"


def test_limits_are_refused_for_the_single_model() -> None:
    result = run_cli(["serve", "--bind", "127.0.0.1:0", "--model", "single",
                      "--limit-nofile", "64"])
    err = result.stderr.decode()
    assert result.returncode == 2, err
    assert "invalid limit_nofile: limits apply to each child or worker" in err


@pytest.mark.parametrize(("args", "message"), [
    (["--user", "no-such-user-here"], "invalid user: no such user: 'no-such-user-here'"),
    (["--group", "no-such-group-here"], "invalid group: no such group"),
    (["--umask", "999"], "invalid --umask: must be an octal mask"),
])
def test_bad_identities_are_one_line_and_exit_2(args: list[str], message: str) -> None:
    result = run_cli(["serve", "--bind", "127.0.0.1:0", *args])
    err = result.stderr.decode()
    assert result.returncode == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert message in err


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
@pytest.mark.parametrize("model", ["fork", "prefork"])
def test_children_run_as_the_user_without_groups_or_capabilities(server_factory: Factory,
                                                                  model: str) -> None:
    nobody = pwd.getpwnam("nobody")
    server = server_factory("--model", model, "--workers", "1", "--user", "nobody",
                            "--umask", "027")
    assert wait_until(lambda: len(server.children()) == 1 or model == "fork", 10)
    with server.connect() as s:
        s.sendall(b"hi\n")
        assert recv_exactly(s, len(HELLO)) == HELLO
        (child,) = (p.pid for p in server.children())
        for pid in (server.pid, child):
            uids = status_field(pid, "Uid").split()
            gids = status_field(pid, "Gid").split()
            assert set(uids) == {str(nobody.pw_uid)}, (pid, uids)
            assert set(gids) == {str(nobody.pw_gid)}, (pid, gids)
            assert status_field(pid, "Groups") == ""
            assert int(status_field(pid, "CapEff"), 16) == 0
            assert int(status_field(pid, "CapPrm"), 16) == 0
            assert status_field(pid, "Umask") == "0027"


def test_switching_users_without_root_is_refused(tmp_path: Path) -> None:
    # As root (always, in CI), run the CLI as nobody, so the refusal is exercised everywhere.
    as_nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
    argv = [*(as_nobody if os.geteuid() == 0 else []), sys.executable, "-m", "forkserve",
            "serve", "--bind", "127.0.0.1:0", "--user", "root"]
    result = subprocess.run(argv, capture_output=True, timeout=30, cwd=tmp_path, check=False,
                            start_new_session=True, stdin=subprocess.DEVNULL)
    err = result.stderr.decode()
    assert result.returncode == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert "invalid user: switching to root (uid 0, gid 0) needs root" in err
    assert f"this server runs as uid {os.geteuid() or pwd.getpwnam('nobody').pw_uid}" in err


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
def test_the_pid_file_is_written_before_privileges_are_dropped(server_factory: Factory,
                                                               tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir(mode=0o755)  # root's, like /run
    pid_file = run / "forkserve.pid"
    server = server_factory("--user", "nobody", "--pid-file", str(pid_file))
    assert pid_file.read_text().splitlines()[0] == f"{server.pid}"


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
def test_exec_programs_run_as_the_user_without_groups_or_capabilities(
        server_factory: Factory) -> None:
    nobody = pwd.getpwnam("nobody")
    server = server_factory("--bind", "127.0.0.1:0", "--user", "nobody", "--", "sh", "-c",
                            "id -u; id -g; id -G; grep -E '^Cap(Eff|Prm):' /proc/self/status",
                            command="exec")
    with server.connect() as s:
        lines = recv_all(s).decode().split("\n")
    assert lines[0] == str(nobody.pw_uid)
    assert lines[1] == str(nobody.pw_gid)
    assert lines[2] == str(nobody.pw_gid), "no supplementary group"
    assert all(int(line.split()[1], 16) == 0 for line in lines[3:5]), lines
