"""The defences that count unproven connections, for hybrid workers: ``sourceguard``'s
per-source cap and early drop (sshd's MaxStartups), counted across the whole server.

Theory of operation
-------------------
``SourceGuard`` counts unproven clients in the scoreboard's unproven columns, one entry per
slot, and a slot is one serving process: right for a fork child or a prefork worker (one
client each), wrong for a hybrid worker (up to ``worker_connections``). The shape chosen: a
second ``Scoreboard``, the *places board*, made by the hybrid master before it forks, whose
slots are connection places. Worker slot ``i`` owns places ``[i * per, (i + 1) * per)``; a
place holds its worker's pid, its connection's start (the displacement picks the oldest) and
the unproven columns. Each worker writes only its own places, so the scoreboard's rule (one
writer per slot) holds, and ``SourceGuard`` runs unchanged over the whole board: every
worker's accept counts every worker's unproven clients.

Rejected: one slot per connection in the main scoreboard (status, metrics and the watchdog
read every slot: 256 workers x 1000); a per-worker total in the worker's slot (the
per-source cap needs every unproven client's source, not a sum).

Size: ``per = worker_connections`` places for each of the first ``regions`` worker slots:
twice the pool it starts with (a reload's two generations), plus ``SPARE_REGIONS`` for
respawns; at the defaults (2 workers x 1000) 6,000 places, so an accept copies and counts
6 KB of flags in C, and under attack the per-source count reads 48 KB of tags. A worker
whose slot has no region (TTIN past that, or a reload to more workers) counts its own
unproven clients only, as before (``LocalGuard``); its log says so once.

A place is taken at accept and given back at the client's proof or at the end of its
connection. The displacement (FULL, a newcomer): ``SourceGuard`` signals the oldest
unproven client's process with ``DROP_UNPROVEN``; a hybrid worker that receives it ends the
input of each of its clients whose place was cleared that way (``given_way``). When the
oldest is the accepting worker's own, this module makes it give way at once.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import Counter
from collections.abc import Callable

from ..ops.scoreboard import Scoreboard, SlotState
from ..protocol.admission import Reason, source_tag
from ..protocol.defence import Startups
from .signals import DROP_UNPROVEN
from .sourceguard import SourceGuard

#: Regions beyond twice the starting pool: a respawned worker waits a second for its old
#: slot (prefork's ``RESPAWN_INTERVAL``) and takes the next free one meanwhile.
SPARE_REGIONS = 2


def places_board(start_workers: int, worker_connections: int) -> tuple[Scoreboard, int, int]:
    """In the hybrid master, before any fork: the places board, its regions and the places
    per region."""
    regions = 2 * max(start_workers, 1) + SPARE_REGIONS
    return Scoreboard(regions * worker_connections), regions, worker_connections


class _PlacesGuard(SourceGuard):
    """``SourceGuard`` over the places board, displacing in this worker without a signal."""

    def __init__(self, board: Scoreboard, limit: int, startups: Startups | None,
                 give_way: Callable[[int], None]) -> None:
        super().__init__(board, limit, startups)
        self.pid = os.getpid()
        self._give_way = give_way

    def _displace_oldest(self, newcomer: int) -> int | None:
        board = self.board
        oldest = None
        for index in board.unproven_slots():  # (only the unproven: not the board's size)
            if index != newcomer:
                slot = board.read(index)
                if slot.pid and (oldest is None or slot.conn_start < oldest.conn_start):
                    oldest = slot
        if oldest is None:
            return None
        board.mark_proven(oldest.index)  # it gives way: count it no more
        if oldest.pid == self.pid:
            self._give_way(oldest.index)
            return None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(oldest.pid, DROP_UNPROVEN)
        return oldest.pid


class PlacesGuard:
    """One hybrid worker's unproven clients, on its region of the places board. Runs in
    the worker, on its loop."""

    def __init__(self, board: Scoreboard, first: int, per: int, *, limit: int,
                 startups: Startups | None, give_way: Callable[[int], None]) -> None:
        self.board = board
        self.guard = _PlacesGuard(board, limit, startups, give_way)
        self.pid = os.getpid()
        self._free = list(range(first + per - 1, first - 1, -1))
        #: Places held by this worker's unproven clients.
        self.held: set[int] = set()

    @property
    def active(self) -> bool:
        return self.guard.active

    def enter(self, ip: str) -> tuple[int, Reason | None]:
        """A client from ``ip`` was accepted: its place (-1: none, uncounted) and None to
        serve it, or why it is refused."""
        if not self._free:
            # every place holds an unproven client of this worker (more than
            # worker_connections only after a reload that raised it): uncounted
            return -1, None
        place = self._free.pop()
        self.board.write(place, pid=self.pid, state=SlotState.READING,
                         conn_start=time.monotonic())
        refused = self.guard.admit(place, ip)
        if refused is not None:
            self._free.append(place)
            return -1, refused
        self.held.add(place)
        return place, None

    def leave(self, place: int) -> None:
        """The client on ``place`` proved itself, or its connection ended (either first)."""
        if place in self.held:
            self.held.discard(place)
            self.guard.leave(place)
            self._free.append(place)

    def given_way(self) -> list[int]:
        """After ``DROP_UNPROVEN``: this worker's places another worker cleared."""
        return [place for place in self.held if not self.board.unproven(place)]


class LocalGuard:
    """The fallback of a worker whose slot has no region: its own unproven clients only,
    the per-source cap counted in this worker (no early drop)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held: dict[int, int] = {}
        self._tags: Counter[int] = Counter()
        self._next = 0

    @property
    def active(self) -> bool:
        return bool(self.limit)

    def enter(self, ip: str) -> tuple[int, Reason | None]:
        tag = source_tag(ip)
        if self._tags[tag] >= self.limit:
            return -1, Reason.STARTUPS
        self._next += 1
        self._tags[tag] += 1
        self.held[self._next] = tag
        return self._next, None

    def leave(self, place: int) -> None:
        tag = self.held.pop(place, None)
        if tag is not None:
            self._tags[tag] -= 1
            if not self._tags[tag]:
                del self._tags[tag]

    def given_way(self) -> list[int]:
        return []
