"""Supervisor logic on a fake kernel and a virtual clock: reaping, backoff, the stop checklist."""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
from collections.abc import Iterator

import pytest

from forkserve.apps.exec import Program
from forkserve.config import Config
from forkserve.config.kinds import Address
from forkserve.kernel import Exited, reap
from forkserve.master.accepting import FORK_PAUSE_SECONDS
from forkserve.master.listeners import bind_all
from forkserve.master.signals import SIGNALS, Intent
from forkserve.master.stopping import QUEUE_HOLD
from forkserve.master.supervisor import Supervisor
from forkserve.models import Serving
from forkserve.models.fork import ForkModel, Zygote
from forkserve.ops.scoreboard import SlotState
from forkserve.protocol import zygote as wire
from forkserve.serving.accept import ACCEPT_PAUSE_SECONDS
from forkserve.serving.child import STOP_REMINDER
from tests.unit.conftest import never_called
from tests.unit.fakes import FakeKernel


class FakeZygote:
    """The zygote's side of the wire, played on the fake kernel: the model's real records go
    out over a real socketpair; each ``Conn`` gets a pid from the fake kernel's ``fork`` (or
    ``ForkFailed`` from its ``fork_error``), reported as the real zygote reports it. Children
    of the real zygote are real processes: tests/integration/test_zygote*."""

    def __init__(self, sup: Supervisor, kernel: FakeKernel) -> None:
        model = sup.model
        assert isinstance(model, ForkModel)
        self.sup, self.model, self.kernel = sup, model, kernel
        booted = model.zygote  # (spawned on the fake kernel: no process, and no one on its wire)
        if booted is not None:
            model._hang_up(booted)
            kernel.live.discard(booted.pid)
        ours, self.wire = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)
        self.pid = kernel.fork()
        self.zygote = model.zygote = Zygote(self.pid, ours, 0, ready=True)
        self.slots: dict[int, int] = {}  # pid -> slot
        self.retired = False
        self.fds_received = 0

    def fork(self, *, heard: bool = True, said: bool = True) -> list[int]:
        """Take what the master sent: a child per Conn (its fds closed, as the zygote's
        children are the only holders); the pids, once the master has read the reports
        (``heard=False``: they wait unread in the wire; ``said=False``: the zygote dies
        before it sends them)."""
        records: list[wire.Record] = []
        pids: list[int] = []
        self.wire.setblocking(False)
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(self.wire, 65536, 64)
            except BlockingIOError:
                break
            self.fds_received += len(fds)
            for fd in fds:
                os.close(fd)
            records += wire.Decoder().feed(data)
        reports: list[wire.Record] = []
        for record in records:
            if isinstance(record, wire.Retire):
                self.retired = True
            elif isinstance(record, wire.Conn):
                try:
                    pid = self.kernel.fork()
                except OSError as exc:
                    reports.append(wire.ForkFailed(record.slot, exc.errno or 0))
                    continue
                self.slots[pid] = record.slot
                pids.append(pid)
                reports.append(wire.Started(record.slot, pid))
        if said:
            self._say(reports, heard=heard)
        return pids

    def end(self, pid: int, code: int = 0, sig: int = 0) -> None:
        """The child ``pid`` ended: reaped and reported by the zygote."""
        self.kernel.live.discard(pid)
        self._say([wire.Ended(self.slots.pop(pid), pid, sig or code << 8)])

    def leave(self) -> None:
        """The zygote exits (retired and its children gone), reaped by the master."""
        self.kernel.exit(self.pid)
        self.sup._reap()

    def _say(self, reports: list[wire.Record], *, heard: bool = True) -> None:
        if reports:
            self.wire.sendall(b"".join(wire.encode(r) for r in reports))
            while heard and self.model._on_zygote(self.zygote):
                pass


@pytest.fixture
def sup(kernel: FakeKernel) -> Iterator[Supervisor]:
    config = Config(model="fork", max_children=3, graceful_timeout=10)
    supervisor = Supervisor(Serving(config, never_called), [], kernel=kernel)
    yield supervisor
    supervisor._close()


@pytest.fixture
def zygote(sup: Supervisor, kernel: FakeKernel) -> Iterator[FakeZygote]:
    fake = FakeZygote(sup, kernel)
    yield fake
    fake.wire.close()


def spawn(zygote: FakeZygote) -> int:
    """A child of the zygote for a new connection: the master passes the socket, the zygote
    forks and reports; the child's pid."""
    a, b = socket.socketpair()
    b.close()
    assert zygote.model._spawn(a, ("127.0.0.1", 4000))
    assert a.fileno() == -1, "the master closes its copy of the connection"
    (pid,) = zygote.fork()
    assert pid in zygote.model.children
    return pid


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
        sup: Supervisor, zygote: FakeZygote, kernel: FakeKernel,
        caplog: pytest.LogCaptureFixture) -> None:
    sup.update_accepting()
    assert sup.accepting.active
    kernel.fork_error = OSError(errno.EAGAIN, "Resource temporarily unavailable")
    a, b = socket.socketpair()
    model = zygote.model
    with caplog.at_level(logging.ERROR, logger="forkserve"):
        assert model._spawn(a, ("127.0.0.1", 1))
        assert a.fileno() == -1
        assert zygote.fork() == []
        assert b.recv(1) == b"", "the refused client sees its connection closed"
        assert not sup.accepting.active
        assert sup._timeout() == pytest.approx(FORK_PAUSE_SECONDS)
        c, d = socket.socketpair()
        assert model._spawn(c, ("127.0.0.1", 2))
        assert zygote.fork() == []  # a second failure within the second
    reports = [r for r in caplog.records if "fork failed" in r.getMessage()]
    assert len(reports) == 1, "reported at most once a second"
    assert "EAGAIN" in reports[0].getMessage()
    assert model._free_slots == [2, 1, 0], "a failed fork gives its slot back"
    assert not model.children
    assert not zygote.zygote.booting
    kernel.now += FORK_PAUSE_SECONDS
    kernel.fork_error = None
    sup.update_accepting()
    assert sup.accepting.active
    for s in (b, d):
        s.close()


def test_without_a_zygote_the_client_is_refused_and_accepting_pauses(
        sup: Supervisor, zygote: FakeZygote) -> None:
    sup.update_accepting()
    zygote.model._hang_up(zygote.zygote)  # (its wire closed: it is being replaced)
    a, b = socket.socketpair()
    assert zygote.model._spawn(a, ("127.0.0.1", 1)) is None
    assert b.recv(1) == b""
    assert not sup.accepting.active
    assert zygote.model._free_slots == [2, 1, 0]
    b.close()


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


def test_at_max_children_accepting_stops_until_a_child_ends(sup: Supervisor,
                                                            zygote: FakeZygote) -> None:
    sup.update_accepting()
    pids = [spawn(zygote) for _ in range(2)]
    a, b = socket.socketpair()
    b.close()
    assert zygote.model._spawn(a, ("127.0.0.1", 4000))
    sup.update_accepting()
    assert not sup.accepting.active, "a connection passed and not forked yet holds its room"
    pids += zygote.fork()
    zygote.end(pids[0])
    assert sup.accepting.active
    assert zygote.fds_received == 3


def test_a_dead_zygotes_orphans_are_reaped_by_the_master(sup: Supervisor, zygote: FakeZygote,
                                                         kernel: FakeKernel) -> None:
    pid = spawn(zygote)
    zygote.leave()  # its children are re-parented to the master (the subreaper)
    assert pid in zygote.model.children
    kernel.exit(pid)
    sup._reap()
    assert not zygote.model.children
    assert zygote.model._free_slots == [2, 1, 0]


def test_a_child_its_dead_zygote_reaped_without_a_word_ends_unseen(
        sup: Supervisor, zygote: FakeZygote, kernel: FakeKernel,
        caplog: pytest.LogCaptureFixture) -> None:
    # a fast stop's SIGKILLs: the zygote reaps its child, then dies before its Ended goes out
    pid = spawn(zygote)
    sup._begin_stop(fast=True)
    kernel.live.discard(pid)  # (reaped by the zygote: not the master's to wait for)
    kernel.die(zygote.pid, signal.SIGKILL)
    with caplog.at_level(logging.INFO, logger="forkserve"):
        sup._reap()
        assert pid in zygote.model.children, "settled after the round of reaping"
        zygote.model.manage()
    assert not zygote.model.children
    assert zygote.model._free_slots == [2, 1, 0]
    assert sup._finished(), "the stop does not wait for it for ever"
    assert any(f"pid {pid} (connection from " in r.getMessage() and "ended unseen" in r.getMessage()
               and r.levelno == logging.INFO for r in caplog.records), "expected in a stop"


@pytest.mark.parametrize("zygote_first", [False, True])
def test_a_child_reaped_before_its_started_is_read_ends_with_its_status(
        sup: Supervisor, zygote: FakeZygote, kernel: FakeKernel, zygote_first: bool,
        caplog: pytest.LogCaptureFixture) -> None:
    # the zygote died: its child, re-parented, is reaped in the same round as the zygote,
    # in either order, while the child's Started still waits unread in the dead zygote's wire
    a, b = socket.socketpair()
    b.close()
    assert zygote.model._spawn(a, ("127.0.0.1", 4000))
    (pid,) = zygote.fork(heard=False)
    assert pid not in zygote.model.children
    ends = [(zygote.pid, signal.SIGKILL), (pid, signal.SIGKILL)]
    for dead, sig in ends[::1 if zygote_first else -1]:
        kernel.die(dead, sig)
    with caplog.at_level(logging.INFO, logger="forkserve"):
        sup._reap()
        zygote.model.manage()
    assert not zygote.model.children
    assert zygote.model._free_slots == [2, 1, 0]
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "not one of ours" in m or "unseen" in m], messages
    assert any(f"pid {pid} (connection from " in m and "killed by SIGKILL" in m
               for m in messages), messages


def test_a_child_whose_started_died_with_its_zygote_is_adopted_by_its_slot(
        sup: Supervisor, zygote: FakeZygote, kernel: FakeKernel) -> None:
    a, b = socket.socketpair()
    b.close()
    model = zygote.model
    assert model._spawn(a, ("127.0.0.1", 4000))
    (slot,) = zygote.zygote.booting
    (pid,) = zygote.fork(said=False)  # (the zygote is killed before it reports the fork)
    model.scoreboard.write(slot, pid=pid, state=SlotState.READING)  # a child's first write
    kernel.die(zygote.pid, signal.SIGKILL)
    sup._reap()
    model.manage()
    assert model.children[pid].slot == slot, "adopted: a stop waits for it, and signals it"
    assert model.zygote is not None
    replacement = model.zygote.pid
    sup._begin_stop(fast=True)
    assert kernel.killed == [(pid, signal.SIGKILL), (replacement, signal.SIGKILL)]
    kernel.die(pid, signal.SIGKILL)
    kernel.die(replacement, signal.SIGKILL)
    sup._reap()
    assert sup._finished()
    assert sorted(model._free_slots) == [0, 1, 2]


@pytest.mark.parametrize("fast_after", [False, True])
def test_a_full_fork_model_keeps_its_listener_for_the_queue_a_while(
        kernel: FakeKernel, fast_after: bool) -> None:
    config = Config(model="fork", max_children=1, graceful_timeout=10)
    listeners = bind_all((Address.parse("127.0.0.1:0"),), 16)
    sup = Supervisor(Serving(config, never_called), listeners, kernel=kernel)
    zygote = FakeZygote(sup, kernel)
    (listener,) = listeners
    try:
        spawn(zygote)  # full
        queued = socket.create_connection(listener.sock.getsockname())
        sup._begin_stop(fast=False)
        assert listener.sock.fileno() >= 0, "kept: the model was full, a client may wait"
        zygote.fork()
        assert not zygote.retired, "the zygote forks for what the kept listener gives"
        assert kernel.now + QUEUE_HOLD in sup.checklist.deadlines(), "the loop wakes for it"
        kernel.now += 1
        sup.checklist.advance()
        assert listener.sock.fileno() >= 0
        assert not sup._finished()
        if fast_after:
            sup._begin_stop(fast=True)
        else:
            kernel.now += QUEUE_HOLD
            sup.checklist.advance()
        assert listener.sock.fileno() < 0, "closed at the hold's end, or by a fast stop"
        zygote.fork()
        assert zygote.retired
        queued.close()
    finally:
        sup._close()
        zygote.wire.close()


def test_graceful_stop_terms_waits_then_kills_at_the_deadline(
        sup: Supervisor, zygote: FakeZygote, kernel: FakeKernel) -> None:
    pids = [spawn(zygote) for _ in range(2)]
    sup._begin_stop(fast=False)
    assert kernel.killed == [(p, signal.SIGTERM) for p in pids]
    zygote.fork()
    assert zygote.retired, "the zygote is retired, not signalled: it exits after its children"
    zygote.end(pids[0])
    kernel.now += 9.9
    sup.checklist.advance()
    assert not sup._finished()
    assert sup._timeout() == pytest.approx(0.1)
    kernel.now += 0.1
    sup.checklist.advance()
    assert kernel.killed[-2:] == [(pids[1], signal.SIGKILL), (zygote.pid, signal.SIGKILL)]
    assert sup._timeout() is None, "after the kill, only SIGCHLD can wake the loop"
    kernel.die(pids[1], signal.SIGKILL)
    kernel.die(zygote.pid, signal.SIGKILL)
    sup._reap()
    assert sup._finished()
    assert sup.checklist.killed, "exit status 1: something had to be killed"


def test_graceful_stop_tells_what_is_left_once_more_after_a_second(
        sup: Supervisor, zygote: FakeZygote, kernel: FakeKernel) -> None:
    pids = [spawn(zygote) for _ in range(2)]
    sup._begin_stop(fast=False)
    assert sup._timeout() == pytest.approx(STOP_REMINDER)
    zygote.end(pids[0])
    kernel.now += STOP_REMINDER
    sup.checklist.advance()
    assert kernel.killed == [(pids[0], signal.SIGTERM), (pids[1], signal.SIGTERM),
                             (pids[1], signal.SIGTERM)]
    assert sup._timeout() == pytest.approx(10 - STOP_REMINDER), "then only the deadline"
    kernel.now += 5
    sup.checklist.advance()
    assert len(kernel.killed) == 3
    zygote.end(pids[1])
    assert not sup._finished(), "the zygote is still there"
    zygote.leave()
    assert sup._finished()
    assert not sup.checklist.killed


def test_exec_programs_get_one_sigterm_as_inetd_sends(kernel: FakeKernel) -> None:
    config = Config(model="fork", graceful_timeout=10)
    sup = Supervisor(Serving(config, Program("/bin/cat", ("cat",), {})), [], kernel=kernel)
    zygote = FakeZygote(sup, kernel)
    try:
        pid = spawn(zygote)
        assert zygote.fds_received == 2, "the socket and the program's stderr pipe"
        sup._begin_stop(fast=False)
        for _ in range(3):
            kernel.now += STOP_REMINDER
            sup.checklist.advance()
        assert kernel.killed == [(pid, signal.SIGTERM)]
        assert sup._timeout() == pytest.approx(10 - 3 * STOP_REMINDER)
    finally:
        sup._close()
        zygote.wire.close()


@pytest.mark.parametrize(("fast", "expected"), [
    ((False,), signal.SIGTERM), ((False, True), signal.SIGKILL), ((True,), signal.SIGKILL)])
def test_a_child_that_starts_during_a_stop_is_told_what_the_others_were(
        sup: Supervisor, zygote: FakeZygote, kernel: FakeKernel, fast: tuple[bool, ...],
        expected: signal.Signals) -> None:
    first = spawn(zygote)
    a, b = socket.socketpair()
    b.close()
    assert zygote.model._spawn(a, ("127.0.0.1", 4001))  # passed; its Started not read yet
    for each in fast:  # (a graceful stop, maybe overtaken by a fast one)
        sup._begin_stop(fast=each)
    (late,) = zygote.fork()
    assert zygote.retired, "no connection will come: the zygote retires"
    assert (first, expected) in kernel.killed
    assert kernel.killed[-1] == (late, expected)


def test_an_upgrade_hands_exec_programs_over_unsignalled_even_late_ones(
        kernel: FakeKernel) -> None:
    config = Config(model="fork", graceful_timeout=10)
    sup = Supervisor(Serving(config, Program("/bin/cat", ("cat",), {})), [], kernel=kernel)
    zygote = FakeZygote(sup, kernel)
    try:
        first = spawn(zygote)
        a, b = socket.socketpair()
        b.close()
        assert zygote.model._spawn(a, ("127.0.0.1", 4001))
        sup.begin_graceful_stop(handover=True)
        (late,) = zygote.fork()
        assert zygote.retired, "the zygote still retires: no connection will come"
        assert kernel.killed == [], "SIGTERM would cut the programs short"
        zygote.end(first)
        zygote.end(late)
        zygote.leave()
        assert sup._finished()
    finally:
        sup._close()
        zygote.wire.close()


def test_graceful_stop_without_stragglers_exits_0(sup: Supervisor, zygote: FakeZygote) -> None:
    pid = spawn(zygote)
    sup._begin_stop(fast=False)
    zygote.end(pid)
    zygote.fork()
    assert zygote.retired
    zygote.leave()
    assert sup._finished()
    assert not sup.checklist.killed


def test_quit_during_a_graceful_stop_kills_at_once(sup: Supervisor, zygote: FakeZygote,
                                                   kernel: FakeKernel) -> None:
    pid = spawn(zygote)
    sup._received.extend([signal.SIGTERM, signal.SIGTERM, signal.SIGQUIT])
    sup._act_on_signals()
    assert kernel.killed == [(pid, signal.SIGTERM), (pid, signal.SIGKILL),
                             (zygote.pid, signal.SIGKILL)]
    kernel.now += 60  # (past every deadline: a process SIGKILL has not ended yet)
    assert sup._timeout() is None, "nothing to do but reap: the loop must not spin"


def test_the_signal_table_covers_every_intent() -> None:
    assert {route.intent for route in SIGNALS} == set(Intent)
    assert len({route.signal for route in SIGNALS}) == len(SIGNALS)
    verbs = [route.verb for route in SIGNALS if route.verb]
    assert len(verbs) == len(set(verbs))


def test_every_intent_but_reaping_has_a_step_in_the_loop(sup: Supervisor) -> None:
    assert set(sup._steps) == set(Intent) - {Intent.REAP}, "SIGCHLD: the loop reaps every turn"
