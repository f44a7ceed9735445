"""The harness's teardown can fail: a server that ignores SIGTERM, exits with a status the test
did not declare, or leaves a process of its session behind is reported (and still cleaned up).

The servers here are small scripts that print forkserve's ready line, so each misbehaviour is
exact; the same checks run on every real server through the ``server_factory`` fixture."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import check_stopped
from tests.integration.harness import Leftover, session_procs, start

READY_LINE = """
import os, signal, sys, time
def ready():
    print(f"forkserve: listening on 127.0.0.1:1 (model=fork, pid={os.getpid()})",
          file=sys.stderr, flush=True)
"""

IGNORES_SIGTERM = READY_LINE + """
signal.signal(signal.SIGTERM, signal.SIG_IGN)
ready()
time.sleep(60)
"""

LEAVES_A_CHILD = READY_LINE + """
if os.fork() == 0:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(60)
    os._exit(0)
signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
ready()
time.sleep(60)
"""

EXITS_1 = READY_LINE + """
signal.signal(signal.SIGTERM, lambda *_: os._exit(1))
ready()
time.sleep(60)
"""


def test_a_server_that_ignores_sigterm_fails_and_is_killed(tmp_path: Path) -> None:
    server = start([], tmp_path, script=IGNORES_SIGTERM)
    server.stop_timeout = 1.0
    with pytest.raises(Leftover, match=r"still running 1\.0s after SIGTERM"):
        server.stop()
    assert server.proc.returncode == -9
    assert session_procs(server.pid) == []


def test_a_server_that_leaves_a_process_behind_fails_and_it_is_killed(tmp_path: Path) -> None:
    server = start([], tmp_path, script=LEAVES_A_CHILD)
    with pytest.raises(Leftover, match="processes of the session left"):
        server.stop()
    assert session_procs(server.pid) == []


def test_an_undeclared_exit_status_fails_teardown(tmp_path: Path) -> None:
    server = start([], tmp_path, script=EXITS_1)
    (problem,) = check_stopped(server)
    assert "exit status 1, expected 0" in problem
    declared = start([], tmp_path, script=EXITS_1)
    declared.expect_exit = 1
    assert check_stopped(declared) == []
