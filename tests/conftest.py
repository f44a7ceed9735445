"""Shared fixtures. Every server a test starts is stopped and checked for leftovers."""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.harness import Server, session_procs, start

_PR_SET_CHILD_SUBREAPER = 36


def pytest_configure(config: pytest.Config) -> None:
    # Orphans of a killed master are re-parented to this process, so tests can watch them exit
    # and reap them, instead of losing them to init.
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    started: list[Server] = []

    def factory(*args: str, **kwargs: Any) -> Server:
        server = start(list(args), tmp_path, **kwargs)
        started.append(server)
        return server

    yield factory
    leftovers = []
    for server in started:
        server.stop()
        leftovers += [(p.pid, p.state) for p in session_procs(server.pid)]
        if not server.traceback_expected:
            assert "Traceback" not in server.log(), server.log_tail()
    assert not leftovers, f"processes left behind: {leftovers}"
