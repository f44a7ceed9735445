"""Safe by default under attack (issue 12): every test runs with the defaults, unless it names
a setting to make a deadline short enough for a test.

The attacker opens silent (or trickling) connections from 127.0.0.2 (or from 127.0.0.2 to
127.0.0.65); well-behaved clients come from elsewhere on 127/8 and must keep being served.
Loopback only, bounded in count and time; the sockets are closed before the server stops.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.harness import (
    HELLO,
    Server,
    accept_queue,
    recv_exactly,
    run_cli,
    session_procs,
    wait_until,
)

Factory = Callable[..., Server]
#: The issue's bar: a well-behaved client answered within this, for the whole attack.
SERVED_WITHIN = 1.0
SERVED_WITHIN_SPREAD = 2.0
#: And the whole server's memory (PSS) below this while 600 silent connections are held.
MEMORY_BOUND_MB = 250


def pss_mb(server: Server) -> float:
    total = 0
    for proc in session_procs(server.pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{proc.pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
    return total / 1024


def open_silent(server: Server, sources: list[str], per_source: int) -> list[socket.socket]:
    """Connect ``per_source`` clients from each source; they send nothing."""
    socks = []
    for source in sources:
        for _ in range(per_source):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
            s.bind((source, 0))
            s.settimeout(10)
            with contextlib.suppress(OSError):
                s.connect((server.host, server.port))
            socks.append(s)
    return socks


def served_in(server: Server, source: str) -> float:
    """Seconds until a client at ``source`` has its answer (inf if it never comes)."""
    began = time.monotonic()
    try:
        with server.connect(timeout=10, source=source) as s:
            s.sendall(b"hi\n")
            if recv_exactly(s, len(HELLO)) != HELLO:
                return float("inf")
    except OSError:
        return float("inf")
    return time.monotonic() - began


@contextlib.contextmanager
def trickling(socks: list[socket.socket]) -> Iterator[None]:
    """Each socket sends one byte a second (never a newline) while the block runs."""
    done = threading.Event()

    def run() -> None:
        deadline = time.monotonic() + 30
        while not done.wait(1.0) and time.monotonic() < deadline:
            for s in socks:
                with contextlib.suppress(OSError):
                    s.send(b"x")

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(10)


def taken_all(server: Server) -> None:
    """Wait until the server has taken every connection of the attack off its accept queue
    (/proc: refused, dropped or held), so that what follows measures the server under attack,
    not its catching up with the attack's arrival."""
    assert wait_until(lambda: accept_queue(server.host, server.port) == 0, 20), \
        f"connections still queued: {accept_queue(server.host, server.port)}"


def assert_served_throughout(server: Server, source: str, seconds: float,
                             bound: float) -> list[float]:
    times = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        times.append(served_in(server, source))
        time.sleep(0.2)  # (a client every 0.2 s, for ``seconds``: the attack goes on meanwhile)
    assert max(times) < bound, f"well-behaved client waited: {[round(t, 3) for t in times]}"
    return times


@pytest.mark.timeout(120)
@pytest.mark.parametrize("trickle", [False, True], ids=["silent", "trickling"])
@pytest.mark.parametrize("model", ["fork", "prefork"])
def test_one_address_with_600_connections_cannot_take_the_server(
        server_factory: Factory, model: str, trickle: bool) -> None:
    server = server_factory("--model", model)
    attack = open_silent(server, ["127.0.0.2"], 600)
    try:
        with trickling(attack) if trickle else contextlib.nullcontext():
            taken_all(server)
            assert_served_throughout(server, "127.0.0.3", 4.0, SERVED_WITHIN)
            memory = pss_mb(server)
            assert memory < MEMORY_BOUND_MB, f"{memory:.0f} MB"
    finally:
        for s in attack:
            s.close()
    server.wait_for_log(r"refused 127\.0\.0\.2: startups")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("model", ["fork", "prefork"])
def test_an_attack_from_64_addresses_cannot_take_the_server(server_factory: Factory,
                                                             model: str) -> None:
    # 10 silent connections each: under any per-source cap, so the early drop (and its
    # displacing of the oldest unproven connection for a newcomer) has to carry this one
    server = server_factory("--model", model)
    attack = open_silent(server, [f"127.0.0.{n}" for n in range(2, 66)], 10)
    try:
        taken_all(server)
        assert_served_throughout(server, "127.0.0.100", 4.0, SERVED_WITHIN_SPREAD)
    finally:
        for s in attack:
            s.close()


@pytest.mark.parametrize("model", ["fork", "prefork"])
def test_a_source_that_keeps_timing_out_is_refused_before_any_fork_then_served_again(
        server_factory: Factory, tmp_path: Path, model: str) -> None:
    control = tmp_path / "control.sock"
    server = server_factory("--model", model, "--first-byte-timeout", "0.3", "--penalties",
                            "first_byte:1.5 min:2", "--control", f"unix:{control}")
    for _ in range(2):  # one slip costs nothing (min:2); the second timeout does
        assert served_in(server, "127.0.0.4") < 5
        with server.connect(source="127.0.0.4") as silent:
            silent.settimeout(5)
            assert silent.recv(1) == b"", "closed at the first-byte deadline"
    server.wait_for_log(r"penalised 127\.0\.0\.4 for first_byte")
    snap = json.loads(run_cli(["status", "--control", f"unix:{control}", "--json"]).stdout)
    assert [p["source"] for p in snap["penalised"]] == ["127.0.0.4"]
    ends = time.monotonic() + snap["penalised"][0]["left_s"]
    assert snap["counters"]["penalties"] == {"first_byte": 1}
    forked = snap["connections_total"]
    assert served_in(server, "127.0.0.4") == float("inf"), "refused while penalised"
    snap = json.loads(run_cli(["status", "--control", f"unix:{control}", "--json"]).stdout)
    assert snap["connections_total"] == forked, "refused before any fork"
    server.wait_for_log(r"refused 127\.0\.0\.4: penalty")
    assert served_in(server, "127.0.0.5") < 5, "other sources are served meanwhile"
    time.sleep(max(0.0, ends - time.monotonic()) + 0.2)  # the penalty runs out: under test
    assert served_in(server, "127.0.0.4") < 5, "served again once the penalty ended"


def test_first_byte_timeout_closes_a_silent_client_and_not_a_talking_one(
        server_factory: Factory) -> None:
    server = server_factory("--first-byte-timeout", "0.5", "--idle-timeout", "30",
                            "--penalties", "off")
    with server.connect() as silent, server.connect() as talking:
        talking.sendall(b"hi\n")
        assert recv_exactly(talking, len(HELLO)) == HELLO
        began = time.monotonic()
        silent.settimeout(10)
        assert silent.recv(1) == b""
        assert 0.3 < time.monotonic() - began < 3
        time.sleep(0.5)  # past the first-byte deadline: the talking client is idle now
        talking.sendall(b"again\n")
        assert recv_exactly(talking, len(HELLO)) == HELLO


def test_stress_mode_shortens_the_deadlines_of_connections_already_waiting(
        server_factory: Factory) -> None:
    server = server_factory("--max-children", "8", "--max-startups", "off",
                            "--stress-first-byte-timeout", "1", "--penalties", "off")
    socks = open_silent(server, ["127.0.0.2", "127.0.0.3"], 4)  # 8 of 8: at capacity
    try:
        server.wait_for_log(r"entering stress mode")
        began = time.monotonic()
        ended = []
        for s in socks:  # first_byte_timeout (10 s) shrank to 1 s, for those waiting too
            s.settimeout(max(0.1, began + 5 - time.monotonic()))
            with contextlib.suppress(TimeoutError):
                assert s.recv(1) == b""
                ended.append(time.monotonic() - began)
        # at least until the pressure is gone (75 % of max_children), when it ends
        assert len(ended) >= 2, ended
        server.wait_for_log(r"leaving stress mode: 6 of 8")
    finally:
        for s in socks:
            s.close()
    assert wait_until(lambda: not server.children(), 5)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("model", ["fork", "prefork"])
def test_well_behaved_load_from_one_address_loses_nothing(server_factory: Factory,
                                                          model: str) -> None:
    # 120 connections from 127.0.0.1 at once, over the per-source startups cap (64; prefork
    # 32) and the early drop's START: each talks at once, so none of them is refused
    server = server_factory("--model", model)
    socks = []
    try:
        for _ in range(120):
            s = server.connect(timeout=20)
            s.sendall(b"hi\n")
            socks.append(s)
        for s in socks:
            assert recv_exactly(s, len(HELLO)) == HELLO
        for s in socks:  # and they go on being served
            s.sendall(b"again\n")
        for s in socks:
            assert recv_exactly(s, len(HELLO)) == HELLO
    finally:
        for s in socks:
            s.close()
    assert "refused" not in server.log()


def test_a_connection_over_the_startups_cap_that_talks_soon_is_served(
        server_factory: Factory) -> None:
    # the master accepts faster than a client that opens its connections first and talks
    # on them next: over the cap, a connection gets models/fork.py's PROOF_GRACE to send
    # its first line; one that stays silent through it is refused as before
    server = server_factory("--max-startups-per-source", "2")
    silent = open_silent(server, ["127.0.0.2"], 2)
    try:
        assert wait_until(lambda: len(server.children()) == 2, 10)
        with server.connect(source="127.0.0.2") as late, \
                server.connect(source="127.0.0.2") as mute:
            time.sleep(0.05)  # (accepted by now, silent: on probation)
            late.sendall(b"hi\n")
            late.settimeout(10)
            assert recv_exactly(late, len(HELLO)) == HELLO
            mute.settimeout(10)
            assert mute.recv(1) == b"", "refused once its grace is over"
        server.wait_for_log(r"refused 127\.0\.0\.2: startups")
        assert server.log().count("refused 127.0.0.2") == 1
    finally:
        for s in silent:
            s.close()


def test_max_startups_per_source_refuses_the_next_silent_connection(
        server_factory: Factory) -> None:
    server = server_factory("--max-startups-per-source", "2")
    silent = open_silent(server, ["127.0.0.2"], 2)
    try:
        assert wait_until(lambda: len(server.children()) == 2, 10)
        with server.connect(source="127.0.0.2") as third:
            third.settimeout(5)
            assert third.recv(1) == b"", "closed at once, before any fork"
        server.wait_for_log(r"refused 127\.0\.0\.2: startups")
        assert served_in(server, "127.0.0.3") < 5, "another source is not counted with it"
    finally:
        for s in silent:
            s.close()
    # (once the master has reaped their children: a zombie's slot still counts)
    assert wait_until(lambda: served_in(server, "127.0.0.2") < 5, 10), \
        "served again once its silent ones are gone"


def test_penalty_exempt_sources_are_never_penalised(server_factory: Factory) -> None:
    server = server_factory("--first-byte-timeout", "0.3", "--penalties", "first_byte:5 min:1",
                            "--penalty-exempt", "127.0.0.6/32")
    for _ in range(2):
        with server.connect(source="127.0.0.6") as silent:
            silent.settimeout(5)
            assert silent.recv(1) == b""
    assert served_in(server, "127.0.0.6") < 5, "exempt: served after its timeouts"
    assert "penalised" not in server.log()


def test_stress_idle_timeout_shortens_the_wait_of_an_idle_client(
        server_factory: Factory) -> None:
    server = server_factory("--max-children", "4", "--max-startups", "off", "--penalties",
                            "off", "--stress-idle-timeout", "1")
    with server.connect() as talked:
        talked.sendall(b"hi\n")
        assert recv_exactly(talked, len(HELLO)) == HELLO  # proven, now idle (300 s)
        silent = open_silent(server, ["127.0.0.2"], 3)  # 4 of 4: stress
        try:
            server.wait_for_log(r"entering stress mode")
            began = time.monotonic()
            talked.settimeout(10)
            assert talked.recv(1) == b"", "the idle timeout shrank to 1 s"
            assert time.monotonic() - began < 5
        finally:
            for s in silent:
                s.close()
