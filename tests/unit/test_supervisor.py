"""Supervisor logic on a fake kernel and a virtual clock: reaping, backoff, the stop checklist."""

from __future__ import annotations

import errno
import logging
import signal
import socket
from collections.abc import Iterator

import pytest

from forkserve.apps.exec import Program
from forkserve.config import Config
from forkserve.kernel import Exited, reap
from forkserve.master.accepting import FORK_PAUSE_SECONDS
from forkserve.master.signals import SIGNALS, Intent
from forkserve.master.supervisor import Supervisor
from forkserve.models import Serving
from forkserve.models.fork import ForkModel
from forkserve.serving.accept import ACCEPT_PAUSE_SECONDS
from forkserve.serving.child import STOP_REMINDER
from tests.unit.conftest import never_called
from tests.unit.fakes import FakeKernel


@pytest.fixture
def sup(kernel: FakeKernel) -> Iterator[Supervisor]:
    config = Config(model="fork", max_children=3, graceful_timeout=10)
    supervisor = Supervisor(Serving(config, never_called), [], kernel=kernel)
    yield supervisor
    supervisor._close()


def spawn(sup: Supervisor) -> int:
    """A child forked by the master on the fake kernel (``_fork_here``: exec's path; the fork
    model's children come from its zygote, a real process: tests/integration/test_zygote*)."""
    a, b = socket.socketpair()
    b.close()
    model = sup.model
    assert isinstance(model, ForkModel)
    assert model._fork_here(a, ("127.0.0.1", 4000))
    assert a.fileno() == -1, "the master closes its copy of the connection"
    return max(model.children)


def test_reap_loops_until_nothing_is_left_and_decodes(kernel: FakeKernel) -> None:
    for pid in (5, 6, 7):
        kernel.live.add(pid)
    kernel.exit(5, 0)
    kernel.exit(6, 1)
    kernel.die(7, signal.SIGKILL)
    assert reap(kernel) == [Exited(5, 0), Exited(6, 1), Exited(7, -signal.SIGKILL)]
    assert reap(kernel) == []  # no children at all: ChildProcessError ends the loop
    assert Exited(7, -9).signal == 9
    assert Exited(6, 1).signal is None


def test_fork_failure_closes_that_client_and_pauses_accepting(
        sup: Supervisor, kernel: FakeKernel, caplog: pytest.LogCaptureFixture) -> None:
    sup.update_accepting()
    assert sup.accepting.active
    kernel.fork_error = OSError(errno.EAGAIN, "Resource temporarily unavailable")
    a, b = socket.socketpair()
    model = sup.model
    assert isinstance(model, ForkModel)
    with caplog.at_level(logging.ERROR, logger="forkserve"):
        assert not model._fork_here(a, ("127.0.0.1", 1))
        assert a.fileno() == -1
        assert b.recv(1) == b"", "the refused client sees its connection closed"
        assert not sup.accepting.active
        assert sup._timeout() == pytest.approx(FORK_PAUSE_SECONDS)
        c, d = socket.socketpair()
        assert not model._fork_here(c, ("127.0.0.1", 2))  # a second failure within the second
    reports = [r for r in caplog.records if "fork failed" in r.getMessage()]
    assert len(reports) == 1, "reported at most once a second"
    assert "EAGAIN" in reports[0].getMessage()
    assert model._free_slots == [2, 1, 0], "a failed fork gives its slot back"
    kernel.now += FORK_PAUSE_SECONDS
    kernel.fork_error = None
    sup.update_accepting()
    assert sup.accepting.active
    for s in (b, d):
        s.close()


def test_accept_errors_capacity_pauses_transient_skips(sup: Supervisor,
                                                       kernel: FakeKernel) -> None:
    sup.update_accepting()
    assert sup.accept_failed(OSError(errno.ECONNABORTED, "aborted")) is False
    assert sup.accepting.active
    assert sup.accept_failed(OSError(errno.EMFILE, "Too many open files")) is True
    assert not sup.accepting.active
    kernel.now += ACCEPT_PAUSE_SECONDS / 2
    sup.update_accepting()
    assert not sup.accepting.active
    kernel.now += ACCEPT_PAUSE_SECONDS
    sup.update_accepting()
    assert sup.accepting.active


def test_at_max_children_accepting_stops_until_a_child_is_reaped(sup: Supervisor,
                                                                 kernel: FakeKernel) -> None:
    sup.update_accepting()
    pids = [spawn(sup) for _ in range(3)]
    sup.update_accepting()
    assert not sup.accepting.active, "at max_children the listeners are not watched"
    kernel.exit(pids[0])
    sup._reap()
    assert sup.accepting.active


def test_graceful_stop_terms_waits_then_kills_at_the_deadline(sup: Supervisor,
                                                              kernel: FakeKernel) -> None:
    pids = [spawn(sup) for _ in range(2)]
    sup._begin_stop(fast=False)
    assert kernel.killed == [(p, signal.SIGTERM) for p in pids]
    kernel.exit(pids[0])
    sup._reap()
    kernel.now += 9.9
    sup.checklist.advance()
    assert not sup._finished()
    assert sup._timeout() == pytest.approx(0.1)
    kernel.now += 0.1
    sup.checklist.advance()
    assert kernel.killed[-1] == (pids[1], signal.SIGKILL)
    assert sup._timeout() is None, "after the kill, only SIGCHLD can wake the loop"
    kernel.die(pids[1], signal.SIGKILL)
    sup._reap()
    assert sup._finished()
    assert sup.checklist.killed, "exit status 1: something had to be killed"


def test_graceful_stop_tells_what_is_left_once_more_after_a_second(
        sup: Supervisor, kernel: FakeKernel) -> None:
    pids = [spawn(sup) for _ in range(2)]
    sup._begin_stop(fast=False)
    assert sup._timeout() == pytest.approx(STOP_REMINDER)
    kernel.exit(pids[0])
    sup._reap()
    kernel.now += STOP_REMINDER
    sup.checklist.advance()
    assert kernel.killed == [(pids[0], signal.SIGTERM), (pids[1], signal.SIGTERM),
                             (pids[1], signal.SIGTERM)]
    assert sup._timeout() == pytest.approx(10 - STOP_REMINDER), "then only the deadline"
    kernel.now += 5
    sup.checklist.advance()
    assert len(kernel.killed) == 3
    kernel.exit(pids[1])
    sup._reap()
    assert sup._finished()
    assert not sup.checklist.killed


def test_exec_programs_get_one_sigterm_as_inetd_sends(kernel: FakeKernel) -> None:
    config = Config(model="fork", graceful_timeout=10)
    sup = Supervisor(Serving(config, Program("/bin/cat", ("cat",), {})), [], kernel=kernel)
    try:
        pid = spawn(sup)
        sup._begin_stop(fast=False)
        for _ in range(3):
            kernel.now += STOP_REMINDER
            sup.checklist.advance()
        assert kernel.killed == [(pid, signal.SIGTERM)]
        assert sup._timeout() == pytest.approx(10 - 3 * STOP_REMINDER)
    finally:
        sup._close()


def test_graceful_stop_without_stragglers_exits_0(sup: Supervisor, kernel: FakeKernel) -> None:
    pid = spawn(sup)
    sup._begin_stop(fast=False)
    kernel.exit(pid)
    sup._reap()
    assert sup._finished()
    assert not sup.checklist.killed


def test_quit_during_a_graceful_stop_kills_at_once(sup: Supervisor, kernel: FakeKernel) -> None:
    pid = spawn(sup)
    sup._received.extend([signal.SIGTERM, signal.SIGTERM, signal.SIGQUIT])
    sup._act_on_signals()
    assert kernel.killed == [(pid, signal.SIGTERM), (pid, signal.SIGKILL)]


def test_the_signal_table_covers_every_intent() -> None:
    assert {route.intent for route in SIGNALS} == set(Intent)
    assert len({route.signal for route in SIGNALS}) == len(SIGNALS)
    verbs = [route.verb for route in SIGNALS if route.verb]
    assert len(verbs) == len(set(verbs))


def test_every_intent_but_reaping_has_a_step_in_the_loop(sup: Supervisor) -> None:
    assert set(sup._steps) == set(Intent) - {Intent.REAP}, "SIGCHLD: the loop reaps every turn"
