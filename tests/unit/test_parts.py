"""Small parts: the rate limiter and the scoreboard."""

from __future__ import annotations

from forkserve.logs import RateLimiter
from forkserve.scoreboard import Scoreboard, SlotState


def test_rate_limiter_allows_one_report_per_interval_and_counts_the_rest() -> None:
    limiter = RateLimiter(1.0)
    assert limiter.allow("emfile", 10.0) == 0
    assert limiter.allow("emfile", 10.5) is None
    assert limiter.allow("emfile", 10.9) is None
    assert limiter.allow("other", 10.9) == 0
    assert limiter.allow("emfile", 11.0) == 2


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
