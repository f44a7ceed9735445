"""Shared fixtures. Every server a test starts is stopped as an operator would stop it, and the
test fails if the server ignores the stop, exits with a status the test did not declare, or
leaves a process behind."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.harness import Server, start

_PR_SET_CHILD_SUBREAPER = 36
#: Skips that CI (``CI=true``) accepts: what these machines cannot provide, whatever we install.
#: Any other skip in CI (a missing package, a test that needs root run without it) fails.
CI_ALLOWED_SKIPS = ("no IPv6 loopback on this machine",)
IN_CI = os.environ.get("CI", "").lower() == "true"


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


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item,
                              call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    """In CI, a skip whose reason is not in ``CI_ALLOWED_SKIPS`` is a failure."""
    report = yield
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if not any(allowed in reason for allowed in CI_ALLOWED_SKIPS):
            report.outcome = "failed"
            report.longrepr = f"skipped in CI (CI=true), which allows no skip but " \
                              f"{CI_ALLOWED_SKIPS}: {reason}"
    return report


def pytest_terminal_summary(terminalreporter: Any) -> None:
    skipped = terminalreporter.stats.get("skipped", [])
    reasons = sorted({r.longrepr[2] if isinstance(r.longrepr, tuple) else str(r.longrepr)
                      for r in skipped})
    terminalreporter.write_line(f"skips: {len(skipped)}" + "".join(f"\n  {r}" for r in reasons)
                                + ("  (CI=true: each fails unless allowed)" if IN_CI else ""))


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
