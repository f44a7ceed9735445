"""The defences that count unproven connections: the early drop and the per-source startups
cap, counted in the scoreboard. Runs where connections are accepted: the fork model's master,
each prefork worker.

Theory of operation
-------------------
A connection is *unproven* until its client has sent a whole first line (``Connection``'s
``on_proven``). Silent connections are the cheapest attack on a process per connection, and
the only ones these defences count: a well-behaved client proves itself within a round trip
and is never refused by them, whatever it holds.

Each scoreboard slot has an entry in two columns: the tag of its client's source
(``admission.source_tag``: the IPv4 address, the IPv6 /64) while that client is unproven (else
0), and a byte, 1 meanwhile, that the accepting process counts in one C call; the tags are
counted (a Python int per slot) only once that total could reach a limit. The fork model's
master writes them when it forks the child, the child clears them on proof; a prefork worker
writes and clears its own. For a new connection from source S on slot ``slot``:

1. The slot is tagged first, then the column counted: two prefork workers that accept from S
   at once both see both, so a cap can be undershot for an instant, never exceeded.
2. Over ``max_startups_per_source`` unproven from S (sshd's PerSourceMaxStartups): refused
   (``startups``).
3. The early drop (``defence.Startups``, sshd's MaxStartups) on the unproven of all sources:
   from START, refused at random (``unproven``), but never when S has no other unproven
   connection: a newcomer is not refused for what others do. At FULL, such a newcomer makes
   the oldest unproven connection give way: its process gets ``DROP_UNPROVEN`` and ends that
   connection's input at once, if its client still has not proven itself (a displaced
   handshake ends too). So a flood of silent connections can neither grow past FULL (plus the
   newcomers of one instant) nor keep a newcomer out.

Cost per accept: a byte per slot copied and counted in C (well under a microsecond at 512
slots); under attack, the tags too (about 5 us); the displacing scan (once per newcomer at
FULL) reads every slot in Python.
"""

from __future__ import annotations

import contextlib
import os
import random

from ..ops.scoreboard import Scoreboard
from ..protocol.admission import Reason, source_tag
from ..protocol.defence import Startups
from ..serving.signals import DROP_UNPROVEN

# (sent to a serving process whose unproven connection must give way, see above; declared
# with the serving processes' signal tables)


class SourceGuard:
    """The startups cap (``limit``, 0: none) and the early drop (``startups``) over ``board``."""

    def __init__(self, board: Scoreboard, limit: int, startups: Startups | None, *,
                 penalties: bool = False) -> None:
        self.board = board
        self.limit = limit
        self.startups = startups
        #: Refuse the sources the master publishes as penalised (prefork: the fork model's
        #: master checks its own table before this).
        self.penalties = penalties
        #: The pid the last ``admit`` made give way, if any.
        self.displaced: int | None = None

    @property
    def active(self) -> bool:
        return bool(self.limit or self.startups is not None or self.penalties)

    def admit(self, slot: int, ip: str) -> Reason | None:
        """A client from ``ip`` is to be served on ``slot``: None to serve it (the slot now
        counts it as unproven, until its proof or ``leave``), or why it is refused."""
        self.displaced = None
        board = self.board
        tag = source_tag(ip)
        if self.penalties and board.penalised(tag):
            return Reason.PENALTY
        board.mark_unproven(slot, tag)
        unproven = board.count_unproven()
        startups = self.startups
        # the per-source count costs ~5 us: only once the total could matter
        matters = (self.limit and unproven > self.limit) or (
            startups is not None and unproven >= startups.start)
        same = board.count_source(tag) if matters else 1
        if self.limit and same > self.limit:
            board.mark_proven(slot)
            return Reason.STARTUPS
        if startups is None or unproven < startups.start:
            return None
        if same > 1:  # not a newcomer: sshd's random early drop
            if startups.drop(unproven, random.random()):
                board.mark_proven(slot)
                return Reason.UNPROVEN
        elif unproven > startups.full:
            self.displaced = self._displace_oldest(slot)
        return None

    def leave(self, slot: int) -> None:
        """The connection on ``slot`` ended: it counts for nothing now."""
        self.board.mark_proven(slot)

    def _displace_oldest(self, newcomer: int) -> int | None:
        board = self.board
        oldest = None
        for index in range(board.size):
            if index != newcomer and board.unproven(index):
                slot = board.read(index)
                if slot.pid and (oldest is None or slot.conn_start < oldest.conn_start):
                    oldest = slot
        if oldest is None or oldest.pid == os.getpid():
            return None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(oldest.pid, DROP_UNPROVEN)
        board.mark_proven(oldest.index)  # it gives way: count it no more
        return oldest.pid
