"""Small parts: the rate limiter, the scoreboard, a listener's queue."""

from __future__ import annotations

import os
import socket
import time

from forkserve.master.traffic import accept_queue
from forkserve.ops.logs import RateLimiter
from forkserve.ops.scoreboard import Scoreboard, SlotState


def test_rate_limiter_allows_one_report_per_interval_and_counts_the_rest() -> None:
    limiter = RateLimiter(1.0)
    assert limiter.allow("emfile", 10.0) == 0
    assert limiter.allow("emfile", 10.5) is None
    assert limiter.allow("emfile", 10.9) is None
    assert limiter.allow("other", 10.9) == 0
    assert limiter.allow("emfile", 11.0) == 2


def test_rate_limiter_counts_each_event_of_a_batch() -> None:
    # (a prefork worker's report of 7 pauses is 7 events, not one)
    limiter = RateLimiter(5.0)
    assert limiter.allow("accept:EMFILE", 10.0, events=3) == 2, "one line for 3 pauses"
    assert limiter.allow("accept:EMFILE", 11.0, events=7) is None
    assert limiter.allow("accept:EMFILE", 12.0) is None
    assert limiter.allow("accept:EMFILE", 15.0, events=10) == 7 + 1 + 9


def test_scoreboard_slots_round_trip_and_truncate_the_peer() -> None:
    board = Scoreboard(4)
    try:
        board.write(2, pid=42, state=SlotState.READING, connections=3, bytes_in=5,
                    bytes_out=7, conn_start=1.5, heartbeat=2.5, peer="x" * 100, errors=4)
        slot = board.read(2)
        assert (slot.pid, slot.state, slot.connections) == (42, SlotState.READING, 3)
        assert slot.errors == 4
        board.mark(2, SlotState.FINISHING)
        assert board.read(2).state is SlotState.FINISHING
        monitor = board.monitor(2)
        monitor.working()
        assert board.read(2).state is SlotState.WRITING
        assert board.read(2).heartbeat > 2.5
        assert board.read(2).peer == "x" * 63, "a monitor touches only state and heartbeat"
        assert (slot.bytes_in, slot.bytes_out, slot.conn_start) == (5, 7, 1.5)
        assert slot.peer == "x" * 63
        assert board.read(1).state is SlotState.FREE
        board.clear(2)
        assert board.read(2).pid == 0
    finally:
        board.close()


def test_a_drain_announced_reaches_a_forked_process_and_leaves_the_slots_alone() -> None:
    board = Scoreboard(2)
    try:
        for i in range(2):
            board.write(i, pid=10 + i, state=SlotState.IDLE)
        pid = os.fork()
        if pid == 0:  # the worker's side: it reads what the master writes after the fork
            deadline = time.monotonic() + 5
            while not board.draining and time.monotonic() < deadline:
                time.sleep(0.01)
            os._exit(0 if board.draining else 1)
        assert not board.draining
        board.announce_drain()
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert [board.read(i).pid for i in range(2)] == [10, 11]
    finally:
        board.close()


def test_accept_queue_counts_the_clients_a_tcp_listener_holds() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        assert accept_queue(listener) == 0
        clients = [socket.create_connection(listener.getsockname()) for _ in range(3)]
        try:
            assert accept_queue(listener) == 3
            listener.accept()[0].close()
            assert accept_queue(listener) == 2
        finally:
            for c in clients:
                c.close()
    a, b = socket.socketpair()
    with a, b:
        assert accept_queue(a) is None, "a unix socket does not say"
