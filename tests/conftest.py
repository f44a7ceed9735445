"""Shared fixtures. Every server a test starts is stopped as an operator would stop it, and the
test fails if the server ignores the stop, exits with a status the test did not declare, or
leaves a process behind."""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.harness import Server, start

_PR_SET_CHILD_SUBREAPER = 36


def pytest_configure(config: pytest.Config) -> None:
    # Orphans of a killed master are re-parented to this process, so tests can watch them exit
    # and reap them, instead of losing them to init.
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def label(server: Server) -> str:
    return " ".join(server.argv[2:8])


def check_stopped(server: Server) -> list[str]:
    """Stop ``server`` (SIGTERM, bounded wait, leftovers SIGKILLed) and say what was wrong."""
    try:
        status = server.stop()
    except AssertionError as exc:
        return [f"{label(server)}: {exc}"]
    problems = []
    if status != server.expect_exit:
        problems.append(f"{label(server)}: exit status {status}, expected "
                        f"{server.expect_exit}\n{server.log_tail()}")
    if not server.traceback_expected and "Traceback" in server.log():
        problems.append(f"{label(server)}: a traceback in the log\n{server.log_tail()}")
    return problems


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    started: list[Server] = []

    def factory(*args: str, **kwargs: Any) -> Server:
        server = start(list(args), tmp_path, **kwargs)
        started.append(server)
        return server

    yield factory
    problems = [problem for server in started for problem in check_stopped(server)]
    assert not problems, "\n\n".join(problems)
