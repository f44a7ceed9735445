"""A graceful stop refuses new clients before it takes what is queued, so that the close that
follows resets no one it let in (``Listener.refuse_new``); and it leaves sockets that others
hold (systemd's, an upgrade's) as they were."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from forkserve.config import Address
from forkserve.master.listeners import bind_all
from tests.integration.harness import (
    Load,
    Server,
    children_of,
    proc_info,
    recv_all,
    recv_exactly,
    wait_until,
)

HELLO = b"Hello from server!\n"
Factory = Callable[..., Server]
#: Long enough for a handshake on loopback to complete many times over; a client that gets
#: nothing within it was not let in (its SYN was dropped: it would retry after 1 s).
NOT_LET_IN = 0.5


def lets_in(host: str, port: int, family: int = socket.AF_INET) -> bool | None:
    """True: the handshake completed (the client is queued); False: not within NOT_LET_IN;
    None: refused."""
    with socket.socket(family) as s:
        s.settimeout(NOT_LET_IN)
        try:
            s.connect((host, port))
        except TimeoutError:
            return False
        except ConnectionRefusedError:
            return None
        return True


# ------------------------------------------------------------------ the listener itself


@pytest.mark.timeout(30)
@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_a_sealed_listener_lets_no_one_new_in_and_keeps_those_queued(host: str) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    (listener,) = bind_all((Address("tcp", host, 0),), 16)
    port = listener.sock.getsockname()[1]
    try:
        queued = socket.create_connection((host, port), timeout=5)
        listener.refuse_new()
        assert lets_in(host, port, family) is False, "a new client is let in"
        listener.sock.setblocking(True)
        conn, _ = listener.sock.accept()  # the one queued before is still there
        with conn, queued:
            queued.sendall(b"x")
            assert conn.recv(1) == b"x", "an accepted connection is untouched by the filter"
    finally:
        listener.close()
    assert lets_in(host, port, family) is None, "closed: refused"


@pytest.mark.timeout(30)
def test_a_sealed_unix_listener_loses_its_file_at_once(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    (listener,) = bind_all((Address("unix", path=str(path)),), 16)
    listener.refuse_new()
    assert not path.exists()
    listener.close()  # (idempotent about the file)


@pytest.mark.timeout(30)
def test_a_socket_someone_else_holds_is_never_sealed() -> None:
    (listener,) = bind_all((Address("tcp", "127.0.0.1", 0),), 16)
    listener.ours = False  # as for systemd's sockets, and an upgrade's before it serves
    port = listener.sock.getsockname()[1]
    try:
        listener.refuse_new()
        assert lets_in("127.0.0.1", port) is True
    finally:
        listener.close()


# ------------------------------------------------------------------ a server's stop


def serving_processes(server: Server) -> list[int]:
    return [p.pid for p in server.children() if p.pid not in server.zygotes()]


@contextlib.contextmanager
def frozen(pids: list[int]) -> Iterator[None]:
    """The processes stopped (SIGSTOP) for the block, so they hold what they hold."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("model", ["prefork", "hybrid"])
def test_a_client_that_comes_once_a_stop_began_is_refused_not_queued(
        server_factory: Factory, model: str) -> None:
    # the workers hold the listener until each has drained it; one is frozen, so it holds it
    # for as long as the test likes: a client coming then must not join the queue, where the
    # last close would reset it (before: it was let in, and reset or served by chance)
    server = server_factory("--model", model, "--workers", "1")
    assert wait_until(lambda: len(serving_processes(server)) == 1, 10), server.log_tail()
    (worker,) = serving_processes(server)
    with frozen([worker]):
        queued = server.connect()
        queued.sendall(b"hi\n")
        server.signal(signal.SIGTERM)
        server.wait_for_log("graceful stop")
        assert lets_in(server.host, server.port) is False, "a new client joined the queue"
    with queued:  # let in before the stop: answered, not reset
        assert recv_all(queued) == HELLO
    assert server.wait() == 0
    assert lets_in(server.host, server.port) is None


@pytest.mark.timeout(90)
@pytest.mark.parametrize("model", ["fork", "prefork", "hybrid", "single"])
def test_a_stop_under_load_resets_no_one(server_factory: Factory, model: str) -> None:
    pool = model in ("prefork", "hybrid")
    server = server_factory("--model", model, *(["--workers", "2"] if pool else []))
    assert wait_until(lambda: len(serving_processes(server)) >= pool * 2, 10)
    with Load(server, 6, seconds=30) as load:
        assert wait_until(lambda: load.ok >= 100, 30), load.failures[:5]
        server.signal(signal.SIGTERM)
        assert server.wait() == 0
    # refused connects (the listener closed) fail, as they must; none let in is lost
    lost = [f for _, f in load.failures if "Refused" not in f]
    assert lost == [], lost


# ------------------------------------------------------------------ sockets others hold

#: systemd's part: bind and listen, keep a copy (in a child that outlives the service: the
#: teardown reaps it, as any process of the server's session),
#: put the socket on fd 3 and exec the service with LISTEN_PID/LISTEN_FDS. The copy's holder
#: waits for the service to end, then says whether its socket still lets a client in.
LAUNCHER = """
import os, socket, sys, time
report, args = sys.argv[1], sys.argv[2:]
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen(16)
service = os.getpid()
if os.fork() == 0:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(service, 0)
        except ProcessLookupError:
            break
        time.sleep(0.02)
    c = socket.socket()
    c.settimeout(0.5)
    try:
        c.connect(s.getsockname())
        verdict = "lets in"
    except OSError as exc:
        verdict = repr(exc)
    with open(report + ".tmp", "w") as f:
        f.write(verdict)
    os.rename(report + ".tmp", report)
    os._exit(0)
if s.fileno() != 3:
    os.dup2(s.fileno(), 3)
os.set_inheritable(3, True)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1", LISTEN_FDNAMES="web")
os.execv(sys.executable, [sys.executable, "-m", "forkserve", "serve", *args])
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("model", ["fork", "prefork"])
def test_a_stop_leaves_systemds_socket_open_to_new_clients(server_factory: Factory,
                                                            tmp_path: Path, model: str) -> None:
    report = tmp_path / "holder.txt"
    server = server_factory(str(report), "--model", model, "--workers", "1", script=LAUNCHER)
    server.signal(signal.SIGTERM)
    assert server.wait() == 0
    assert wait_until(report.exists, 20), "systemd's stand-in never reported"
    assert report.read_text() == "lets in", "the service sealed a socket systemd keeps"


@pytest.mark.timeout(90)
def test_the_master_an_upgrade_started_seals_the_sockets_it_took_over(
        server_factory: Factory, tmp_path: Path) -> None:
    pid_file = tmp_path / "fs.pid"
    server = server_factory("--model", "prefork", "--workers", "1", "--pid-file", str(pid_file))
    server.signal(signal.SIGUSR2)
    assert server.wait(20) == 0, server.log_tail()
    new = int(pid_file.read_text().splitlines()[0])
    assert wait_until(lambda: len(children_of(new)) == 1, 10)
    (worker,) = (p.pid for p in children_of(new))
    try:
        with frozen([worker]):
            os.kill(new, signal.SIGTERM)
            # (its log goes where the old master's went: its own "graceful stop" is the second)
            assert wait_until(lambda: server.log().count("graceful stop:") >= 2, 10)
            assert lets_in(server.host, server.port) is False, "not sealed: not its own"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(new, signal.SIGTERM)
        assert wait_until(lambda: (p := proc_info(new)) is None or p.state == "Z", 15)
        _, status = os.waitpid(new, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.timeout(90)
def test_a_stop_while_an_upgrade_is_pending_leaves_the_new_master_an_open_socket(
        server_factory: Factory) -> None:
    # the new master holds the sockets from its exec on and goes on when the old one stops
    # before it said it serves: sealing them then would leave it a socket that drops SYNs
    server = server_factory()
    server.signal(signal.SIGUSR2)
    new = int(server.wait_for_log(r"upgrade: started a new master, pid (\d+)").group(1))
    try:
        server.signal(signal.SIGTERM)  # (the new master is still importing: not ready)
        assert server.wait() == 0
        assert "upgrade: the new master" not in server.log(), "it was ready first: no test"
        # (a client queued before the new master accepts waits in the backlog: let in)
        with socket.create_connection((server.host, server.port), timeout=20) as s:
            s.sendall(b"hi\n")
            s.settimeout(20)
            assert recv_exactly(s, len(HELLO)) == HELLO
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(new, signal.SIGTERM)
        assert wait_until(lambda: (p := proc_info(new)) is None or p.state == "Z", 15)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(new, 0)
