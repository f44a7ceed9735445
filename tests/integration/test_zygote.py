"""The zygote as a real process (issue 16): started by exec, it forks one child per socket the
master passes, reports each child's start and end with its bytes, holds nothing of the master's,
and leaves nothing behind when the master or the zygote dies."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from forkserve.protocol import zygote as wire

from .harness import cmdline, proc_info, recv_all, wait_until
from .zygote_driver import Driver

ROOT = Path(__file__).resolve().parents[2]
HELLO = b"Hello from server!\n"


@pytest.fixture
def driver() -> Iterator[Driver]:
    d = Driver()
    try:
        d.expect(wire.Ready)
        yield d
    finally:
        d.close()


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = socket.create_server(("127.0.0.1", 0))
    sock.settimeout(10)
    yield sock
    sock.close()


def connect(listener: socket.socket) -> tuple[socket.socket, socket.socket, object]:
    client = socket.create_connection(listener.getsockname(), timeout=10)
    served, addr = listener.accept()
    return client, served, addr


def gone(pid: int) -> bool:
    info = proc_info(pid)
    return info is None or info.state == "Z"


def reap(pids: list[int]) -> None:
    """Reap those of ``pids`` that were re-parented to this process (the tests' subreaper)."""
    for pid in pids:
        with contextlib.suppress(ChildProcessError):
            wait_until(lambda p=pid: os.waitpid(p, os.WNOHANG)[0] == p, 5.0)


def sockets_of(pid: int) -> dict[int, str]:
    return {int(fd): os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}


@pytest.mark.timeout(30)
def test_a_child_serves_one_connection_and_its_end_is_reported(
        driver: Driver, listener: socket.socket) -> None:
    client, served, addr = connect(listener)
    slot = driver.pass_conn(served, addr)
    started = driver.expect(wire.Started)
    assert isinstance(started, wire.Started)
    assert started.slot == slot
    assert proc_info(started.pid) is not None
    assert proc_info(started.pid).ppid == driver.proc.pid  # type: ignore[union-attr]
    client.sendall(b"one\ntwo\n")
    client.shutdown(socket.SHUT_WR)
    assert recv_all(client) == HELLO * 2
    client.close()
    ended = driver.expect(wire.Ended)
    assert ended == wire.Ended(slot, started.pid, 0, 8, 2 * len(HELLO))


@pytest.mark.timeout(30)
def test_a_child_holds_only_its_connection_and_the_std_streams(
        driver: Driver, listener: socket.socket) -> None:
    client, served, addr = connect(listener)
    inode = os.fstat(served.fileno()).st_ino
    driver.pass_conn(served, addr)
    started = driver.expect(wire.Started)
    assert isinstance(started, wire.Started)
    client.sendall(b"hi\n")
    assert client.recv(100) == HELLO  # (the child is past its hygiene)
    fds = sockets_of(started.pid)
    # the std streams, the connection, and the stop pipe the child made itself (stopsignal)
    assert f"socket:[{inode}]" in fds.values()
    ours = {fd for fd, what in fds.items() if what == f"socket:[{inode}]"}
    pipes = {fd for fd, what in fds.items() if what.startswith("pipe:") and fd > 2}
    assert len(ours) == 1
    assert len(pipes) == 2
    assert set(fds) == {0, 1, 2} | ours | pipes, sorted(fds.items())
    assert len({fds[fd] for fd in pipes}) == 1  # both ends of one pipe: its own
    # the zygote: no listener, no client; its wire, the scoreboard, its poll and wake pipe
    zygote = sockets_of(driver.proc.pid)
    kinds = sorted(what.split(":")[0].split("[")[0] for fd, what in zygote.items() if fd > 2)
    assert kinds == ["/memfd", "anon_inode", "pipe", "pipe", "socket"], zygote
    assert f"socket:[{inode}]" not in zygote.values()
    client.close()
    driver.expect(wire.Ended)


@pytest.mark.timeout(30)
def test_children_of_one_packet_hold_only_their_own_connection(
        driver: Driver, listener: socket.socket) -> None:
    pairs = [connect(listener) for _ in range(3)]
    inodes = [os.fstat(served.fileno()).st_ino for _, served, _ in pairs]
    driver.pass_batch([(served, addr) for _, served, addr in pairs])
    pids = []
    for _ in pairs:
        started = driver.expect(wire.Started)
        assert isinstance(started, wire.Started)
        pids.append(started.pid)
    for client, _, _ in pairs:
        client.sendall(b"hi\n")
        assert client.recv(100) == HELLO
    for pid, inode in zip(pids, inodes, strict=True):
        held = {what for what in sockets_of(pid).values() if what.startswith("socket:")}
        assert held == {f"socket:[{inode}]"}, (pid, held, inodes)
    # so a client that closes sees its own child end, whatever its siblings do
    first = pairs[1][0]
    first.shutdown(socket.SHUT_WR)
    assert recv_all(first) == b""
    for client, _, _ in pairs:
        client.close()
    for _ in pairs:
        driver.expect(wire.Ended)


@pytest.mark.timeout(30)
def test_retire_waits_for_the_last_child(driver: Driver, listener: socket.socket) -> None:
    client, served, addr = connect(listener)
    driver.pass_conn(served, addr)
    driver.expect(wire.Started)
    driver.send(wire.Retire())
    time.sleep(0.3)
    assert driver.proc.poll() is None  # its child still serves
    client.sendall(b"x\n")
    assert client.recv(100) == HELLO
    client.close()
    driver.expect(wire.Ended)
    assert driver.proc.wait(10) == 0


@pytest.mark.timeout(30)
def test_counters_on_query(driver: Driver) -> None:
    driver.send(wire.Query())
    assert driver.expect(wire.Counters) == wire.Counters(0, 0, 0)


@pytest.mark.timeout(30)
def test_an_app_that_does_not_import_fails_the_boot_with_one_line() -> None:
    d = Driver(app="tests.integration.broken_app:handle")
    try:
        failed = d.expect(wire.Failed)
        assert isinstance(failed, wire.Failed)
        assert "this module is broken on purpose" in failed.reason
        assert "\n" not in failed.reason
        assert d.proc.wait(10) == 3
        with pytest.raises(EOFError):
            d.read()
    finally:
        d.close()


@pytest.mark.timeout(30)
def test_a_killed_zygote_takes_its_children(driver: Driver, listener: socket.socket) -> None:
    client, served, addr = connect(listener)
    driver.pass_conn(served, addr)
    started = driver.expect(wire.Started)
    assert isinstance(started, wire.Started)
    os.kill(driver.proc.pid, signal.SIGKILL)
    driver.proc.wait(10)
    # the orphan is reparented (to init or a subreaper), which reaps it: gone, not a zombie
    assert wait_until(lambda: gone(started.pid), 1.0), "the child outlived its zygote by 1 s"
    with pytest.raises(EOFError):
        driver.read()
    client.close()
    reap([started.pid])


@pytest.mark.timeout(30)
def test_the_operators_signals_are_the_masters(driver: Driver) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2,
                signal.SIGQUIT):
        os.kill(driver.proc.pid, sig)
    driver.send(wire.Query())
    assert isinstance(driver.expect(wire.Counters), wire.Counters)
    assert driver.proc.poll() is None


@pytest.mark.timeout(30)
def test_sigkill_of_the_master_takes_every_process_within_a_second() -> None:
    master = subprocess.Popen([sys.executable, str(ROOT / "tests/integration/zygote_driver.py")],
                              stdout=subprocess.PIPE, cwd=ROOT, text=True)
    try:
        assert master.stdout is not None
        _, _, zygote, port = master.stdout.readline().split()
        clients = [socket.create_connection(("127.0.0.1", int(port)), timeout=10)
                   for _ in range(3)]
        children = [int(master.stdout.readline().split()[1]) for _ in clients]
        clients[0].sendall(b"busy\n")
        assert clients[0].recv(100) == HELLO
        master.kill()
        killed = time.monotonic()
        master.wait(10)
        for client in clients:  # as a client does: read to the end, then close
            assert recv_all(client) == b""
            client.close()
        pids = [int(zygote), *children]
        assert wait_until(lambda: all(gone(p) for p in pids), 1.0), \
            [(p, proc_info(p), cmdline(p)) for p in pids if not gone(p)]
        assert time.monotonic() - killed < 1.0 * 2.5  # (harness.LATE_FACTOR: a loaded box)
        reap(pids)
    finally:
        master.kill()
        master.wait(10)
        if master.stdout is not None:
            master.stdout.close()


def test_the_zygote_imports_nothing_of_the_master() -> None:
    """What the zygote imports to boot (``serving.zygote`` and ``load_app``'s), checked in a
    fresh interpreter: none of the master's loop, models, operator servers or CLI."""
    code = ("import sys, forkserve.serving.zygote, forkserve.ops.logs, "
            "forkserve.serving.handlers, forkserve.serving.tls, forkserve.apps.hello; "
            "print(' '.join(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=30).stdout.split()
    forbidden = ("forkserve.master.supervisor", "forkserve.models", "forkserve.server",
                 "forkserve.cli", "forkserve.ops.status", "forkserve.ops.metrics", "ssl",
                 "forkserve.master.gate", "forkserve.tools")
    assert [m for m in out if m.startswith(forbidden)] == []


@pytest.mark.timeout(30)
def test_a_child_of_the_zygote_runs_no_after_fork_work(listener: socket.socket) -> None:
    """The zygote imports neither ``threading`` nor ``logging`` (nor ``setproctitle``'s
    package, ``socketserver``, ``traceback``, which import them), so CPython has no after-fork
    handler to run in its children (docs/benchmarks.md, issue 16: a third of a child's page
    faults); a child imports them only to write a log line (``serving.lazylog``)."""
    d = Driver(app="tests.integration.modules_app:handle")
    try:
        d.expect(wire.Ready)
        client, served, addr = connect(listener)
        d.pass_conn(served, addr)
        d.expect(wire.Started)
        assert recv_all(client) == b"\n"  # none of them
        client.close()
        d.expect(wire.Ended)
    finally:
        d.close()
