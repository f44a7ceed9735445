"""The pool pipe: messages cut whatever the reads, and a worker's pauses told in batches."""

from __future__ import annotations

import errno
import math

import pytest

from forkserve.protocol.poolpipe import MESSAGE, TELL_INTERVAL, Inbox, Kind, Message, PauseTally

MESSAGES = [
    Message(Kind.READY, 3, 4001),
    Message(Kind.ACCEPT_PAUSED, 3, 4001, errno.EMFILE, 9),
    Message(Kind.BUSY, 130, 4002),
]
WIRE = b"".join(m.encode() for m in MESSAGES)


def test_messages_fed_whole() -> None:
    assert Inbox().feed(WIRE) == MESSAGES


def test_messages_fed_byte_by_byte() -> None:
    inbox = Inbox()
    got = [m for i in range(len(WIRE)) for m in inbox.feed(WIRE[i : i + 1])]
    assert got == MESSAGES


@pytest.mark.parametrize("cut", [1, MESSAGE.size - 1, MESSAGE.size + 7])
def test_a_partial_message_waits_for_the_next_read(cut: int) -> None:
    inbox = Inbox()
    assert inbox.feed(WIRE[:cut]) == MESSAGES[: cut // MESSAGE.size]
    assert inbox.feed(WIRE[cut:]) == MESSAGES[cut // MESSAGE.size :]


def test_an_unknown_kind_is_skipped() -> None:
    stranger = MESSAGE.pack(99, 0, 1, 0, 0, 0)
    assert Inbox().feed(stranger + WIRE) == MESSAGES


def test_the_first_pause_is_told_at_once_the_rest_once_an_interval() -> None:
    tally = PauseTally()
    tally.add(errno.EMFILE)
    assert tally.due(10.0) == [(errno.EMFILE, 1)], "the master hears of it at once"
    for _ in range(9):  # ten pauses a second
        tally.add(errno.EMFILE)
    assert tally.due(10.5) == []
    assert tally.wait(15.0, 10.5) == pytest.approx(TELL_INTERVAL - 0.5)
    tally.add(errno.ENFILE)  # another kind has its own interval
    assert tally.due(10.6) == [(errno.ENFILE, 1)]
    assert tally.due(10.0 + TELL_INTERVAL) == [(errno.EMFILE, 9)]
    assert tally.wait(15.0, 11.0) == 15.0, "nothing untold: wait for connections only"


def test_a_report_the_pipe_had_no_room_for_goes_with_the_next() -> None:
    tally = PauseTally()
    tally.add(errno.EMFILE)
    ((err, count),) = tally.due(10.0)
    tally.keep(err, count)  # the write found the pipe full
    tally.add(errno.EMFILE)
    assert tally.due(10.0 + TELL_INTERVAL) == [(errno.EMFILE, 2)]


def test_a_leaving_worker_tells_everything() -> None:
    tally = PauseTally()
    tally.add(errno.EMFILE)
    tally.due(10.0)
    tally.add(errno.EMFILE)
    assert tally.due(math.inf) == [(errno.EMFILE, 1)]
