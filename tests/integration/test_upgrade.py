"""SIGUSR2: a new master on the same sockets, nothing refused or reset during the switch."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.harness import Load, Server, proc_info, recv_exactly, wait_until

HELLO = b"Hello from server!\n"
Factory = Callable[..., Server]


def listening_inode(pid: int, port: int) -> int:
    """The inode of the socket listening on ``port`` that ``pid`` holds."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and int(fields[1].split(":")[1], 16) == port:
            inodes.add(int(fields[9]))
    held = {int(os.readlink(f"/proc/{pid}/fd/{fd}")[8:-1])
            for fd in os.listdir(f"/proc/{pid}/fd")
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:[")}
    (inode,) = inodes & held
    return inode


def stop_orphan(pid: int) -> int:
    """SIGTERM a master this test did not start directly, then reap it (we are its
    subreaper once the master that forked it has exited); return its exit status."""
    os.kill(pid, signal.SIGTERM)
    assert wait_until(lambda: (p := proc_info(pid)) is None or p.state == "Z", 15)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.mark.parametrize("model", ["fork", "prefork"])
def test_usr2_under_load_refuses_and_resets_nothing(server_factory: Factory, tmp_path: Path,
                                                    model: str) -> None:
    pid_file = tmp_path / "fs.pid"
    control = tmp_path / "fs.ctl"
    server = server_factory("--model", model, "--workers", "2", "--pid-file", str(pid_file),
                            "--control", f"unix:{control}")
    before = listening_inode(server.pid, server.port)
    with Load(server, 4) as load:  # about 200 connections a second here, each checked
        assert wait_until(lambda: load.ok > 50, 20), "the load is under way"
        server.signal(signal.SIGUSR2)
        assert server.wait(20) == 0, server.log_tail()
        new = int(pid_file.read_text().splitlines()[0])
        assert new != server.pid
        ok_at_switch = load.ok
        assert wait_until(lambda: load.ok > ok_at_switch + 50, 20), "the new master serves"
    assert load.failures == [], load.failures[:5]
    assert load.ok > ok_at_switch > 50
    assert listening_inode(new, server.port) == before, "the very same socket"
    assert control.exists(), "the control socket file is the new master's now"
    server.wait_for_log(rf"upgrade: the new master \(pid {new}\) serves")
    assert stop_orphan(new) == 0
    assert not pid_file.exists()
    assert not control.exists(), "the new master removes the socket files it took over"


def test_a_new_master_that_cannot_start_leaves_the_old_one_serving(server_factory: Factory,
                                                                   tmp_path: Path) -> None:
    config = tmp_path / "forkserve.toml"
    config.write_text('app = "hello"\n')
    pid_file = tmp_path / "fs.pid"
    server = server_factory("--config", str(config), "--pid-file", str(pid_file))
    config.write_text("max_line = -1\n")  # the new master will refuse to start
    server.signal(signal.SIGUSR2)
    server.wait_for_log(r"upgrade failed: the new master .* before it served")
    assert server.proc.poll() is None
    assert pid_file.read_text().splitlines()[0] == f"{server.pid}", "the master serving"
    with server.connect() as s:
        s.sendall(b"hi\n")
        assert recv_exactly(s, len(HELLO)) == HELLO
