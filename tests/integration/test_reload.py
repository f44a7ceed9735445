"""SIGHUP loads the app's current code, with or without a config file, in every model; a broken
new version keeps the running one serving (DESIGN decision 16)."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.harness import Server, proc_info, recv_exactly, wait_until

Factory = Callable[..., Server]
#: The app's modules are rewritten within a second, at the same size: with bytecode files,
#: Python could take a stale .pyc (its check is the source's mtime in seconds, and its size).
NO_PYC = {"PYTHONDONTWRITEBYTECODE": "1"}


def app_source(version: str) -> str:
    return ("def handle(conn):\n"
            "    for _ in conn.lines():\n"
            f"        conn.write(b'{version}\\n')\n")


def ask(server: Server) -> bytes:
    with server.connect() as s:
        s.sendall(b"which?\n")
        return recv_exactly(s, 3)


def worker_pids(server: Server) -> set[int]:
    """The master's live workers at one instant: its children as the kernel lists them in one
    read, zombies left out. (A scan of /proc lists the pids first and reads each one after:
    a roll that forks a new worker and retires an old one between the two showed one worker
    where there were always two.)"""
    with open(f"/proc/{server.pid}/task/{server.pid}/children") as fh:
        listed = [int(pid) for pid in fh.read().split()]
    return {pid for pid in listed if (info := proc_info(pid)) is not None and info.state != "Z"}


def roll(server: Server, size: int) -> tuple[set[int], int]:
    """HUP, and wait for a pool of ``size`` with none of the workers before it; return the
    new pids and the fewest live workers seen meanwhile."""
    before = worker_pids(server)
    fewest = size
    server.signal(signal.SIGHUP)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        now = worker_pids(server)
        fewest = min(fewest, len(now))
        if len(now) == size and not now & before:
            return now, fewest
        time.sleep(0.005)  # (polling /proc for the roll)
    raise AssertionError(f"the pool did not roll\n{server.log_tail()}")


def test_hup_rolls_the_pool_onto_new_code_and_a_broken_version_keeps_it(
        server_factory: Factory, tmp_path: Path) -> None:
    app = tmp_path / "myapp.py"
    app.write_text(app_source("v1"))
    server = server_factory("myapp:handle", "--model", "prefork", "--workers", "2",
                            "--chdir", str(tmp_path), env=NO_PYC)
    assert wait_until(lambda: len(worker_pids(server)) == 2, 10)
    assert ask(server) == b"v1\n"

    app.write_text(app_source("v2"))  # no config file: HUP still re-imports and rolls
    new, fewest = roll(server, 2)
    server.wait_for_log(r"reload: re-imported myapp:handle; starting worker generation 1$")
    assert fewest >= 2, "old workers leave only once new ones are ready"
    assert ask(server) == b"v2\n"

    app.write_text("def handle(conn):\n    pass\ndef broken(:\n")
    server.signal(signal.SIGHUP)
    server.wait_for_log(r"reload failed, still serving with the running code and config: "
                        r"invalid app: importing 'myapp' failed: SyntaxError: .*"
                        r"\(myapp.py, line 3\)$")
    time.sleep(0.5)  # a window for a wrong roll to show: nothing may change in it
    assert worker_pids(server) == new, "the v2 workers keep serving"
    assert ask(server) == b"v2\n"
    assert server.proc.poll() is None
    assert server.log().count("reload failed") == 1, server.log_tail()

    app.write_text(app_source("v4"))  # the failed attempt left nothing half-imported behind
    roll(server, 2)
    assert ask(server) == b"v4\n"


REPLY = """import sys

TEXT = b"{version}\\n"

def on_reload(config):
    print("on_reload hook of {version}", file=sys.stderr, flush=True)
"""


@pytest.mark.parametrize("model", ["fork", "single"])
def test_hup_gives_the_next_connections_new_code_of_every_module_in_the_app_dir(
        server_factory: Factory, tmp_path: Path, model: str) -> None:
    (tmp_path / "myapp.py").write_text(
        "from reply import TEXT\n\n"
        "def handle(conn):\n    for _ in conn.lines():\n        conn.write(TEXT)\n")
    reply = tmp_path / "reply.py"  # a sibling module the app imports
    reply.write_text(REPLY.format(version="v1"))
    server = server_factory("myapp:handle", "--model", model, "--chdir", str(tmp_path),
                            "--on-reload", "reply:on_reload", env=NO_PYC)
    in_flight = server.connect() if model == "fork" else None
    try:
        if in_flight is not None:
            in_flight.sendall(b"before\n")
            assert recv_exactly(in_flight, 3) == b"v1\n"
        reply.write_text(REPLY.format(version="v2"))
        server.signal(signal.SIGHUP)
        assert wait_until(lambda: ask(server) == b"v2\n", 10), server.log_tail()
        server.wait_for_log(r"reload: re-imported myapp:handle; ")
        server.wait_for_log("on_reload hook of v2")  # hooks named MODULE:ATTR are re-imported
        if in_flight is not None:  # a child keeps the code it was forked with
            in_flight.sendall(b"after\n")
            assert recv_exactly(in_flight, 3) == b"v1\n"
    finally:
        if in_flight is not None:
            in_flight.close()
