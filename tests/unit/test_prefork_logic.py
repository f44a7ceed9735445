"""Pre-fork pool logic on the fake kernel: boot failures halt, crashes are paced, reloads roll,
the watchdog and the adaptive pool judge only what they should."""

from __future__ import annotations

import errno
import logging
import os
import signal
from collections.abc import Iterator

import pytest

from forkserve.config import Config
from forkserve.errors import ConfigError, ExitCode, WorkerExit
from forkserve.master.events import REPORT_INTERVAL
from forkserve.master.supervisor import Supervisor
from forkserve.models import Serving
from forkserve.models.adaptive import ADAPT_INTERVAL
from forkserve.models.prefork import BOOT_FAILURES_TO_HALT, RESPAWN_INTERVAL, PreforkModel
from forkserve.models.watchdog import ABORT_GRACE, KILL_RETRY
from forkserve.ops.scoreboard import SlotState
from forkserve.protocol.poolpipe import Kind, Message
from forkserve.serving.child import STOP_REMINDER
from tests.unit.conftest import never_called
from tests.unit.fakes import FakeKernel


@pytest.fixture
def sup(kernel: FakeKernel) -> Iterator[Supervisor]:
    config = Config(model="prefork", workers=3, max_workers=4)
    supervisor = Supervisor(Serving(config, never_called), [], kernel=kernel)
    supervisor.model.start()
    yield supervisor
    supervisor._close()


def pool(sup: Supervisor) -> PreforkModel:
    assert isinstance(sup.model, PreforkModel)
    return sup.model


def ready(sup: Supervisor, *pids: int) -> None:
    model = pool(sup)
    for pid in pids:
        os.write(model._ready_w, Message(Kind.READY, model.workers[pid].slot, pid).encode())
    model._on_pipe()


def show(sup: Supervisor, pid: int, state: SlotState, *, beat: float | None = None) -> None:
    """Write worker ``pid``'s slot as the worker itself would."""
    model = pool(sup)
    worker = model.workers[pid]
    model.scoreboard.write(worker.slot, pid=pid, generation=worker.generation, state=state,
                           heartbeat=sup.kernel.monotonic() if beat is None else beat)


def test_start_forks_the_pool(sup: Supervisor, kernel: FakeKernel) -> None:
    assert len(pool(sup).workers) == 3
    assert kernel.live == set(pool(sup).workers)


def test_workers_failing_at_boot_stop_the_master_with_status_3(sup: Supervisor,
                                                               kernel: FakeKernel) -> None:
    for _ in range(10):
        if sup.stopping:
            break
        kernel.exit(next(iter(pool(sup).workers)), WorkerExit.BOOT_ERROR)
        sup._reap()
        kernel.now += RESPAWN_INTERVAL
        sup.model.manage()
    assert sup._halt is not None
    assert sup._halt[1] == ExitCode.BOOT_ERROR
    assert sup.stopping, "a graceful stop, not an abandon"
    assert {sig for _, sig in kernel.killed} == {signal.SIGTERM}
    assert kernel.next_pid - 100 < 10, "gives up instead of forking forever"
    assert BOOT_FAILURES_TO_HALT <= 3


def test_boot_failures_do_not_halt_while_ready_workers_serve(sup: Supervisor,
                                                             kernel: FakeKernel) -> None:
    ready(sup, *pool(sup).workers)
    sup.model.reconfigure(sup.serving)  # a new generation whose workers cannot boot
    sup.model.manage()
    delays = []
    for _ in range(8):
        failing = [pid for pid, w in pool(sup).workers.items()
                   if w.generation == pool(sup).pool.generation]
        if not failing:
            kernel.now = sup.model.next_deadline() or kernel.now + 1
            sup.model.manage()
            continue
        kernel.exit(failing[0], WorkerExit.BOOT_ERROR)
        sup._reap()
        slot = pool(sup).pool.slot_free_at
        delays.append(max(slot.values()) - kernel.now)
        sup.model.manage()
    assert not sup.stopping, "the old generation keeps serving"
    assert kernel.killed == [], "no old worker retired for a new one that never came up"
    assert max(delays) > RESPAWN_INTERVAL, "the failing slots back off"


def test_a_ready_worker_resets_the_boot_failure_count(sup: Supervisor,
                                                      kernel: FakeKernel) -> None:
    for _ in range(5):
        pids = [pid for pid, w in pool(sup).workers.items() if not w.ready]
        kernel.exit(pids[0], WorkerExit.BOOT_ERROR)
        sup._reap()
        assert pool(sup).pool.boot_failures == 1
        ready(sup, pids[1])
        kernel.exit(pids[1], WorkerExit.OK)  # recycled: leaves room for the next round
        sup._reap()
        assert pool(sup).pool.boot_failures == 0
        kernel.now += RESPAWN_INTERVAL
        sup.model.manage()
    assert len(pool(sup).workers) == 3


def test_a_ready_message_read_after_the_exit_is_not_a_boot_failure(sup: Supervisor,
                                                                   kernel: FakeKernel) -> None:
    pid = next(iter(pool(sup).workers))
    model = pool(sup)
    os.write(model._ready_w, Message(Kind.READY, model.workers[pid].slot, pid).encode())
    kernel.exit(pid, WorkerExit.OK)  # recycled at once
    sup._reap()
    assert model.pool.boot_failures == 0
    assert sup.events.counters["worker_exits", "recycled"] == 1


def test_the_watchdog_kills_once_a_second_until_the_worker_is_reaped(
        sup: Supervisor, kernel: FakeKernel) -> None:
    pids = list(pool(sup).workers)
    ready(sup, *pids)
    for pid in pids:
        show(sup, pid, SlotState.IDLE)
    stuck = pids[0]
    kernel.now += sup.config.timeout + 0.1
    for pid in pids[1:]:
        show(sup, pid, SlotState.IDLE)  # the others beat
    sup.model.manage()
    assert kernel.killed == [(stuck, signal.SIGABRT)]
    kernel.now += ABORT_GRACE
    sup.model.manage()
    assert kernel.killed[-1] == (stuck, signal.SIGKILL)
    for _ in range(5):  # in D state: it does not die yet; the master must not spin
        sup.model.manage()
        assert len(kernel.killed) == 2
        deadline = sup.model.next_deadline()
        assert deadline is not None
        assert deadline > kernel.now, "no deadline in the past"
    kernel.now += KILL_RETRY
    sup.model.manage()
    assert kernel.killed[-1] == (stuck, signal.SIGKILL)
    assert len(kernel.killed) == 3
    kernel.die(stuck, signal.SIGKILL)
    sup._reap()
    assert sup.events.counters["worker_exits", "watchdog"] == 1


def test_the_watchdog_uses_the_timeout_each_worker_was_forked_with(
        sup: Supervisor, kernel: FakeKernel) -> None:
    old = list(pool(sup).workers)
    ready(sup, *old)
    model = pool(sup)  # a reload lowers the timeout (the model forks from this config now)
    model.serving = model.serving.with_config(model.config.replace(timeout=1.0))
    for pid in old:
        show(sup, pid, SlotState.WRITING)
    kernel.now += 2.0
    sup.model.manage()
    assert kernel.killed == [], "old workers keep the timeout they were started with"


def test_fewer_retires_an_idle_worker_before_a_busy_one(sup: Supervisor,
                                                        kernel: FakeKernel) -> None:
    pids = sorted(pool(sup).workers)
    ready(sup, *pids)
    show(sup, pids[0], SlotState.IDLE)  # the oldest is the only idle one
    for pid in pids[1:]:
        show(sup, pid, SlotState.READING)
    sup.model.scale(-1)
    assert kernel.killed == [(pids[0], signal.SIGTERM)]


def test_a_worker_not_yet_started_shows_as_starting(sup: Supervisor) -> None:
    status = sup.model.status()
    assert [s.state for s in status.processes] == [SlotState.STARTING] * 3
    assert sorted(s.pid for s in status.processes) == sorted(pool(sup).workers)


def test_the_connections_total_never_goes_backwards(sup: Supervisor,
                                                    kernel: FakeKernel) -> None:
    pids = list(pool(sup).workers)
    ready(sup, *pids)
    show(sup, pids[0], SlotState.WRITING)  # one connection in flight
    before = sup.model.status().connections_total
    assert before == 1
    kernel.die(pids[0], signal.SIGSEGV)  # it dies with it: served nothing to completion
    sup._reap()
    assert sup.model.status().connections_total == before


def test_a_failed_worker_fork_refuses_no_client(sup: Supervisor, kernel: FakeKernel) -> None:
    kernel.fork_error = OSError(11, "Resource temporarily unavailable")
    sup.model.scale(+1)
    sup.model.manage()
    assert sup.events.counters["fork_failures", "EAGAIN"] == 1
    assert sup.events.counters["refused", "fork_failed"] == 0


def test_a_crashing_slot_is_replaced_at_most_once_per_interval(sup: Supervisor,
                                                              kernel: FakeKernel) -> None:
    ready(sup, *pool(sup).workers)
    kernel.now += RESPAWN_INTERVAL  # the workers have been up a while
    victim = next(iter(pool(sup).workers))
    kernel.die(victim, signal.SIGSEGV)
    sup._reap()
    sup.model.manage()
    assert len(pool(sup).workers) == 3, "a crash after boot is replaced"
    forks_before = kernel.next_pid
    for _ in range(20):  # crash loop within one interval: paced, not a fork storm
        if not pool(sup).workers:
            break
        ready(sup, *pool(sup).workers)
        newest = max(pool(sup).workers)
        kernel.die(newest, signal.SIGSEGV)
        sup._reap()
        sup.model.manage()
    target = 3
    assert kernel.next_pid - forks_before <= target, "at most `target` forks per interval"
    deadline = sup.model.next_deadline()
    assert deadline is not None
    assert deadline <= kernel.now + RESPAWN_INTERVAL
    kernel.now = deadline
    sup.model.manage()
    assert pool(sup).workers, "the pool refills once the interval has passed"


def test_reload_retires_old_workers_only_as_new_ones_are_ready(sup: Supervisor,
                                                               kernel: FakeKernel) -> None:
    old = list(pool(sup).workers)
    ready(sup, *old)
    sup.model.reconfigure(sup.serving)
    sup.model.manage()
    new = [pid for pid in pool(sup).workers if pid not in old]
    assert len(new) == 3
    assert kernel.killed == [], "nothing retires before a new worker is ready"
    ready(sup, new[0])
    assert [sig for _, sig in kernel.killed] == [signal.SIGTERM]
    ready(sup, new[1], new[2])
    assert sorted(pid for pid, _ in kernel.killed) == sorted(old)


def test_a_retiring_worker_still_there_after_a_second_is_told_once_more(
        sup: Supervisor, kernel: FakeKernel) -> None:
    # (a SIGTERM landing just before a worker's blocking recv starts runs its handler only
    # when that recv returns: a second one interrupts the recv)
    ready(sup, *pool(sup).workers)
    sup.model.scale(-1)
    sup.model.scale(-1)
    first, second = [pid for pid, _ in kernel.killed]
    assert sup.model.next_deadline() == pytest.approx(kernel.now + STOP_REMINDER)
    kernel.exit(first)
    sup._reap()
    kernel.now += STOP_REMINDER - 0.01
    sup.model.manage()
    assert len(kernel.killed) == 2, "not before the interval"
    kernel.now += 0.01
    sup.model.manage()
    assert kernel.killed[2:] == [(second, signal.SIGTERM)], "only to the one still there"
    kernel.now += 10 * STOP_REMINDER
    sup.model.manage()
    assert len(kernel.killed) == 3, "once: each signal restarts a kernel timeout in progress"
    assert sup.model.next_deadline() is None


def test_scaling_stays_between_one_and_max_workers(sup: Supervisor,
                                                   kernel: FakeKernel) -> None:
    for _ in range(5):
        sup.model.scale(+1)
        sup.model.manage()
    assert pool(sup).pool.target == 4
    assert len(pool(sup).workers) == 4
    for _ in range(6):
        sup.model.scale(-1)
    assert pool(sup).pool.target == 1
    assert len(kernel.killed) == 3


def test_adaptive_pool_grows_1_2_4_a_second_up_to_max_workers(kernel: FakeKernel) -> None:
    config = Config(model="prefork", workers=1, min_spare=5, max_workers=20)
    sup = Supervisor(Serving(config, never_called), [], kernel=kernel)
    try:
        sup.model.start()
        targets = []
        for _ in range(7):  # no worker ever shows up idle: the pool keeps growing
            ready(sup, *pool(sup).workers)
            for pid in pool(sup).workers:
                show(sup, pid, SlotState.READING)
            kernel.now += 1.0
            sup.model.manage()
            targets.append(pool(sup).pool.target)
        assert targets == [2, 4, 8, 16, 20, 20, 20]
        assert len(pool(sup).workers) == 20
    finally:
        sup._close()


def test_adaptive_pool_waits_for_new_workers_to_be_ready(kernel: FakeKernel) -> None:
    config = Config(model="prefork", workers=2, min_spare=1, max_spare=3, max_workers=8)
    sup = Supervisor(Serving(config, never_called), [], kernel=kernel)
    try:
        sup.model.start()
        for _ in range(5):  # forked but not ready: not idle, but not a reason to grow either
            kernel.now += 1.0
            sup.model.manage()
        assert pool(sup).pool.target == 2
        ready(sup, *pool(sup).workers)
        for pid in pool(sup).workers:
            show(sup, pid, SlotState.IDLE)
        kernel.now += 1.0
        sup.model.manage()
        assert pool(sup).pool.target == 2, "2 idle is between min_spare and max_spare"
    finally:
        sup._close()


def test_max_spare_must_be_above_min_spare() -> None:
    with pytest.raises(ConfigError, match="max_spare"):
        Config(model="prefork", min_spare=3, max_spare=3)


def test_the_pools_accept_pauses_are_counted_and_logged_as_one_servers(
        sup: Supervisor, kernel: FakeKernel, caplog: pytest.LogCaptureFixture) -> None:
    model = pool(sup)
    with caplog.at_level(logging.WARNING, logger="forkserve"):
        for _ in range(int(REPORT_INTERVAL) + 1):  # each worker tells of 10 pauses a second
            for pid, worker in model.workers.items():
                os.write(model._ready_w, Message(Kind.ACCEPT_PAUSED, worker.slot, pid,
                                                 errno.EMFILE, 10).encode())
            model._on_pipe()
            kernel.now += 1.0
    lines = [r.getMessage() for r in caplog.records]
    pause = "workers: accept failed: Too many open files (EMFILE); pausing accepts for 0.1 s"
    assert lines == [f"{pause} (9 more since the last report)",
                     f"{pause} ({3 * 10 * 5 - 1} more since the last report)"]
    assert sup.events.counters["accept_pauses", "EMFILE"] == 3 * 10 * 6


@pytest.fixture
def default_pool(kernel: FakeKernel) -> Iterator[Supervisor]:
    """A prefork server with every pool setting at its default."""
    supervisor = Supervisor(Serving(Config(model="prefork"), never_called), [], kernel=kernel)
    supervisor.model.start()
    yield supervisor
    supervisor._close()


def settle(sup: Supervisor, state: SlotState) -> None:
    """Every worker ready and showing ``state``; a second later, the pool is judged."""
    ready(sup, *[pid for pid, w in pool(sup).workers.items() if not w.ready])
    for pid in pool(sup).workers:
        show(sup, pid, state)
    sup.kernel.now += ADAPT_INTERVAL  # type: ignore[attr-defined]
    sup.model.manage()


def test_the_default_pool_grows_past_workers_held_by_silent_clients(
        default_pool: Supervisor) -> None:
    assert len(pool(default_pool).workers) == 5, "Apache's StartServers"
    targets = []
    for _ in range(4):  # every worker holds a client that sends nothing
        settle(default_pool, SlotState.READING)
        targets.append(pool(default_pool).pool.target)
    assert targets == [6, 8, 12, 20]


def test_a_pool_at_rest_sets_no_timer_until_a_worker_takes_a_connection(
        default_pool: Supervisor, kernel: FakeKernel) -> None:
    model = pool(default_pool)
    settle(default_pool, SlotState.IDLE)
    deadline = model.next_deadline()
    assert deadline is not None
    assert deadline - kernel.now > 10 * ADAPT_INTERVAL, "no timer each second at rest"
    taker = min(model.workers)
    show(default_pool, taker, SlotState.READING)  # what the worker does, in its order:
    assert model.scoreboard.take_wake(), "... it marks its slot, then finds the request"
    assert not model.scoreboard.take_wake(), "(which the first one clears)"
    os.write(model._ready_w, Message(Kind.BUSY, model.workers[taker].slot, taker).encode())
    model._on_pipe()
    model.manage()  # at once: 4 idle is fewer than min_spare
    assert model.pool.target == 6
    assert len(model.workers) == 6
    assert model.next_deadline() == pytest.approx(kernel.now + ADAPT_INTERVAL)


def test_a_worker_quicker_than_the_rest_keeps_the_master_looking(
        default_pool: Supervisor, kernel: FakeKernel) -> None:
    model = pool(default_pool)
    settle(default_pool, SlotState.IDLE)
    model.adapter.stir(kernel.now)  # (as if the pool had just changed)
    model.scoreboard.want_wake(False)
    taker = min(model.workers)
    real_want_wake = model.scoreboard.want_wake

    def asked(wanted: bool) -> None:  # a worker takes a connection just as the master asks
        real_want_wake(wanted)
        if wanted:
            show(default_pool, taker, SlotState.READING)

    model.scoreboard.want_wake = asked  # type: ignore[method-assign]
    model.manage()
    assert not model.adapter.resting, "it sees the busy slot when it looks once more"
    assert model.next_deadline() == pytest.approx(kernel.now + ADAPT_INTERVAL)


def test_a_reload_keeps_the_size_the_load_gave_an_adaptive_pool(
        default_pool: Supervisor) -> None:
    model = pool(default_pool)
    settle(default_pool, SlotState.READING)
    settle(default_pool, SlotState.READING)
    assert model.pool.target == 8
    model.reconfigure(model.serving)
    assert model.pool.target == 8, "not back to 5 under the load that made it 8"
    model.reconfigure(model.serving.with_config(model.config.replace(workers=3)))
    assert model.pool.target == 3, "a pool the operator fixes has the size asked for"
    assert not model.adapter.plan.adaptive


def test_a_fixed_pool_at_its_ceiling_enters_the_stress_mode_and_rests_once_idle(
        kernel: FakeKernel) -> None:
    # a fixed pool's master never adapted, so it never judged its stress mode either: a pool of
    # max_workers, every worker held by a silent client, kept first_byte_timeout (10 s)
    config = Config(model="prefork", workers=2, max_workers=2)
    sup = Supervisor(Serving(config, never_called), [], kernel=kernel)
    sup.model.start()
    try:
        model = pool(sup)
        ready(sup, *model.workers)
        model.manage()
        assert model._fixed_stress_look is None, "all idle: no timer"
        assert model.scoreboard.take_wake(), "the first worker to take a connection says so"
        for pid in model.workers:
            show(sup, pid, SlotState.READING)
        taker = min(model.workers)
        os.write(model._ready_w, Message(Kind.BUSY, model.workers[taker].slot, taker).encode())
        model._on_pipe()
        model.manage()
        assert model.stress.active, "2 of 2 busy: the pool is at its capacity"
        assert {(pid, signal.SIGUSR2) for pid in model.workers} <= set(kernel.killed)
        assert model.next_deadline() == pytest.approx(kernel.now + ADAPT_INTERVAL)
        for pid in model.workers:
            show(sup, pid, SlotState.IDLE)
        kernel.now += ADAPT_INTERVAL
        model.manage()
        assert not model.stress.active
        assert model._fixed_stress_look is None, "idle again: it rests"
        assert model.scoreboard.take_wake()
    finally:
        sup._close()


def test_a_fixed_pool_below_its_ceiling_is_never_under_stress(sup: Supervisor,
                                                              kernel: FakeKernel) -> None:
    model = pool(sup)  # 3 workers of max_workers 4
    ready(sup, *model.workers)
    for pid in model.workers:
        show(sup, pid, SlotState.READING)
    model._stir()
    model.manage()
    assert not model.stress.active, "3 of 4 is not the capacity"
    assert model._fixed_stress_look is None, "and no timer for a judgement that cannot change"
    assert not model.scoreboard.take_wake(), "nor a word asked of the workers"


def test_the_watchdog_looks_again_at_a_worker_that_waited_on_its_client(
        sup: Supervisor, kernel: FakeKernel) -> None:
    # Before: a worker waiting on its client when the master looked had no deadline, so a
    # master with nothing else to do set no timer, and never saw that worker stuck once its
    # client had spoken and its handler hung (the worker tells the master nothing).
    model = pool(sup)
    ready(sup, *model.workers)
    for pid in model.workers:
        show(sup, pid, SlotState.READING)
    model.manage()
    timeout = model.config.timeout
    look = model.next_deadline()  # (the master sleeps until then: nothing else wakes it)
    assert look is not None
    assert look == pytest.approx(kernel.now + timeout)
    stuck = min(model.workers)
    kernel.now += 1.0
    show(sup, stuck, SlotState.WRITING)  # its client spoke; its handler hangs from now
    hung_at = kernel.now
    kernel.now = look
    model.manage()
    assert kernel.killed == [], "not stuck for timeout yet"
    assert model.next_deadline() == pytest.approx(hung_at + timeout)
    kernel.now = hung_at + timeout
    model.manage()
    assert kernel.killed == [(stuck, signal.SIGABRT)]
