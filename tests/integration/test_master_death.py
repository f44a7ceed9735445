"""Master death: after SIGKILL of the master, every process it forked is gone within a second.

Each try starts a server, holds connections in every state a serving process can wait in
(idle: connected, silent; busy: a client streaming requests; mid-handshake: a TLS client that
never sends its ClientHello), kills the master with SIGKILL and times how long its orphans
live. A stop signal that lands just before a blocking wait starts must still end the wait
(DESIGN decision 7; issue 11); the kernel's PR_SET_PDEATHSIG sends it once, and no master is
left to send it again. ``FORKSERVE_DEATH_TRIES`` repeats each case (the issue's bar is 50 of
50 tries; the suite runs a few).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.harness import (
    HELLO,
    Server,
    reap_orphans,
    recv_exactly,
    session_procs,
    wait_until,
)
from tests.integration.test_tls import Pki, make_pki, tls_args

Factory = Callable[..., Server]
TRIES = int(os.environ.get("FORKSERVE_DEATH_TRIES", "3"))
#: The bar: every orphan gone this long after the master's SIGKILL.
ORPHANS_GONE_WITHIN = 1.0


def live(server: Server) -> list[int]:
    return [p.pid for p in session_procs(server.pid) if p.state != "Z"]


class Busy(threading.Thread):
    """A client that streams requests and reads each answer until the server ends it."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.answers = 0
        self.first = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + 20  # bounded even if the server never ends it
        with contextlib.suppress(OSError):
            while time.monotonic() < deadline:
                self.sock.sendall(b"ping\n")
                if recv_exactly(self.sock, len(HELLO)) != HELLO:
                    break  # the server ended the connection
                self.answers += 1
                self.first.set()
        self.sock.close()


@contextlib.contextmanager
def clients(server: Server, pki: Pki | None) -> Iterator[None]:
    """Two idle clients, one busy one and (with TLS) one stuck before its ClientHello."""
    context = pki.client() if pki is not None else None

    def connect() -> socket.socket:
        raw = server.connect(timeout=10)
        if context is None:
            return raw
        return context.wrap_socket(raw, server_hostname="127.0.0.1")

    held = [connect(), connect()]
    busy = Busy(connect())
    busy.start()
    if pki is not None:
        held.append(server.connect(timeout=10))  # the TLS handshake never starts
    try:
        assert busy.first.wait(10), "the busy client got no answer"
        # each connection has its process by now (prefork: its worker took it)
        assert wait_until(lambda: len(live(server)) >= 1 + len(held) + 1, 10)
        yield
    finally:
        for s in held:
            s.close()
        busy.join(25)


def kill_master_and_time_orphans(server: Server) -> float:
    server.expect_exit = -signal.SIGKILL
    os.kill(server.pid, signal.SIGKILL)
    killed = time.monotonic()
    server.wait()
    while live(server) and time.monotonic() - killed < 10:
        time.sleep(0.005)
    took = time.monotonic() - killed
    reap_orphans(server.pid)
    return took


def run_tries(server_factory: Factory, tmp_path: Path, model: str, tls: bool,
              user: list[str]) -> None:
    pki = make_pki(tmp_path) if tls else None
    if pki is not None and user:
        for path in (pki.cert, pki.key):
            path.chmod(0o644)  # loaded before the drop; readable either way
    args = ["--model", model, "--workers", "6", *user, *(tls_args(pki) if pki else [])]
    slow = []
    for _ in range(TRIES):
        server = server_factory(*args)
        with clients(server, pki):
            took = kill_master_and_time_orphans(server)
        print(f"orphans gone after {took:.3f} s")
        if took > ORPHANS_GONE_WITHIN:
            slow.append(round(took, 3))
    assert not slow, (f"orphans outlived their master by more than {ORPHANS_GONE_WITHIN} s "
                      f"in {len(slow)} of {TRIES} tries: {slow}")


@pytest.mark.timeout(60 + 10 * TRIES)
@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
@pytest.mark.parametrize("model", ["fork", "prefork"])
def test_orphans_are_gone_within_a_second(server_factory: Factory, tmp_path: Path,
                                          model: str, tls: bool) -> None:
    run_tries(server_factory, tmp_path, model, tls, [])


@pytest.mark.skipif(os.geteuid() != 0, reason="--user needs root")
@pytest.mark.timeout(60 + 10 * TRIES)
@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
@pytest.mark.parametrize("model", ["fork", "prefork"])
def test_orphans_are_gone_within_a_second_after_a_privilege_drop(
        server_factory: Factory, tmp_path: Path, model: str, tls: bool) -> None:
    # the kernel clears PR_SET_PDEATHSIG on every credential change: it must be set after
    # the drop (the master drops before it forks anything)
    run_tries(server_factory, tmp_path, model, tls, ["--user", "nobody"])


def test_a_prefork_port_is_free_at_once_after_the_masters_death(server_factory: Factory,
                                                                 tmp_path: Path) -> None:
    # a supervisor that restarts a crashed server at once must be able to bind again
    server = server_factory("--model", "prefork", "--workers", "4")
    port = server.port
    held = [server.connect() for _ in range(2)]
    assert wait_until(lambda: len(live(server)) == 5, 10)
    server.expect_exit = -signal.SIGKILL
    os.kill(server.pid, signal.SIGKILL)
    server.wait()
    killed = time.monotonic()

    def bindable() -> bool:
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                return False
            return True

    assert wait_until(bindable, 5.0)
    assert time.monotonic() - killed < ORPHANS_GONE_WITHIN
    for s in held:
        s.close()
