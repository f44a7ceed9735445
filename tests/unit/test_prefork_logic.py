"""Pre-fork pool logic on the fake kernel: boot failures halt, crashes are paced, reloads roll."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import pytest

from forkserve.config import Config
from forkserve.errors import ExitCode, HaltServer, WorkerExit
from forkserve.models.prefork import BOOT_FAILURES_TO_HALT, RESPAWN_INTERVAL, PreforkModel
from forkserve.supervisor import Supervisor
from forkserve.worker import READY
from tests.unit.conftest import never_called
from tests.unit.fakes import FakeKernel


@pytest.fixture
def sup(kernel: FakeKernel) -> Iterator[Supervisor]:
    config = Config(model="prefork", workers=3, max_workers=4)
    supervisor = Supervisor(config, never_called, [], kernel=kernel)
    supervisor.model.start()
    yield supervisor
    supervisor._close()


def pool(sup: Supervisor) -> PreforkModel:
    assert isinstance(sup.model, PreforkModel)
    return sup.model


def ready(sup: Supervisor, *pids: int) -> None:
    model = pool(sup)
    for pid in pids:
        os.write(model._ready_w, READY.pack(model.workers[pid].slot))
    model._on_ready()


def test_start_forks_the_pool(sup: Supervisor, kernel: FakeKernel) -> None:
    assert len(pool(sup).workers) == 3
    assert kernel.live == set(pool(sup).workers)


def test_workers_failing_at_boot_stop_the_master_with_status_3(sup: Supervisor,
                                                               kernel: FakeKernel) -> None:
    def fail_at_boot_again_and_again() -> None:
        for _ in range(10):
            kernel.exit(next(iter(pool(sup).workers)), WorkerExit.BOOT_ERROR)
            sup._reap()
            kernel.now += RESPAWN_INTERVAL
            sup.model.manage()

    with pytest.raises(HaltServer) as halt:
        fail_at_boot_again_and_again()
    assert halt.value.status == ExitCode.BOOT_ERROR
    assert kernel.next_pid - 100 < 10, "gives up instead of forking forever"
    assert BOOT_FAILURES_TO_HALT <= 3


def test_a_ready_worker_resets_the_boot_failure_count(sup: Supervisor,
                                                      kernel: FakeKernel) -> None:
    for _ in range(5):
        pids = list(pool(sup).workers)
        ready(sup, pids[1])
        kernel.exit(pids[0], WorkerExit.BOOT_ERROR)
        sup._reap()
        kernel.now += RESPAWN_INTERVAL
        sup.model.manage()
    assert len(pool(sup).workers) == 3


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
    sup.model.reconfigure()
    sup.model.manage()
    new = [pid for pid in pool(sup).workers if pid not in old]
    assert len(new) == 3
    assert kernel.killed == [], "nothing retires before a new worker is ready"
    ready(sup, new[0])
    assert [sig for _, sig in kernel.killed] == [signal.SIGTERM]
    ready(sup, new[1], new[2])
    assert sorted(pid for pid, _ in kernel.killed) == sorted(old)


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
    sup = Supervisor(config, never_called, [], kernel=kernel)
    try:
        sup.model.start()
        targets = []
        for _ in range(7):  # no worker ever shows up idle: the pool keeps growing
            ready(sup, *pool(sup).workers)
            kernel.now += 1.0
            sup.model.manage()
            targets.append(pool(sup).pool.target)
        assert targets == [2, 4, 8, 16, 20, 20, 20]
        assert len(pool(sup).workers) == 20
    finally:
        sup._close()
