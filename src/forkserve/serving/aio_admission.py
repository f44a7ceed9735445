"""Who gets in, on a hybrid worker's loop: the PROXY header, the admission rules (the gate),
the sources the master publishes as penalised, and the count of unproven clients (the
per-source cap and the early drop, ``aio_guard``), with the places their clients hold.

A connection's task asks ``admit`` once (after ``header`` behind a proxy); a refused client
gets ``refuse_message`` and its socket is closed here. An admitted client that holds a place
gives it back through its ``releaser`` (at its proof, or at its end); while it holds it,
``hold`` says how it gives way when a newcomer displaces it (``give_way``, or the master's
``DROP_UNPROVEN`` for another worker's newcomer: ``given_way``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import PeerGone
from ..protocol.admission import ClientKey, source_tag
from ..protocol.proxyproto import ProxyParser
from .aio_guard import LocalGuard, PlacesGuard
from .preamble import Proxied, check_trusted, proxied

if TYPE_CHECKING:
    from ..ops.scoreboard import Scoreboard
    from .worker import WorkerContext

log = logging.getLogger("forkserve")

#: The places board (``aio_guard.places_board``): the board, its regions, places per region.
Places = tuple["Scoreboard", int, int]

#: A worker logs its refusals at most once per reason this often.
REFUSAL_REPORT_INTERVAL = 5.0


class LoopAdmission:
    """One hybrid worker's admission. Runs in the worker process, on its loop."""

    def __init__(self, ctx: WorkerContext, slot: int, places: Places | None) -> None:
        self.ctx = ctx
        self.config = ctx.config
        self.pid = os.getpid()
        self.guard = self._guard(slot, places)
        #: How each held place's client gives way (``DROP_UNPROVEN``, ``aio_guard``).
        self._yield_to: dict[int, Callable[[], None]] = {}
        self._refusals: dict[str, float] = {}

    def _guard(self, slot: int, places: Places | None) -> PlacesGuard | LocalGuard:
        limit, startups = self.ctx.source_limit, self.ctx.startups
        if places is not None and slot < places[1]:
            board, _, per = places
            return PlacesGuard(board, slot * per, per, limit=limit, startups=startups,
                               give_way=self.give_way)
        if limit or startups is not None:
            log.info("worker %d: slot %d has no places on the board: its unproven clients "
                     "are counted in this worker only (no early drop)", self.pid, slot)
        return LocalGuard(limit)

    # ------------------------------------------------------------------ before the handler

    async def header(self, sock: socket.socket, addr: object, deadline: float) -> Proxied:
        """The PROXY header, from a trusted peer, by ``deadline``. Raises ``ClientError``,
        ``TimeoutError`` (late: the caller penalises) or ``OSError``."""
        check_trusted(sock, addr, self.config)
        loop = asyncio.get_running_loop()
        parser = ProxyParser()
        async with asyncio.timeout_at(loop.time() + deadline - time.monotonic()):
            while True:
                data = await loop.sock_recv(sock, parser.wanted)
                if not data:
                    raise PeerGone("closed before its PROXY header was complete")
                header = parser.feed(data)
                if header is not None:
                    return proxied(header, sock, addr)

    def admit(self, sock: socket.socket, addr: object) -> tuple[bool, ClientKey | None, int]:
        """Rules, penalties, the per-source cap and the early drop: admitted (if not, the
        socket is closed), the gate's key (None: no gate; give it back with ``leave``) and
        the place that counts the client as unproven (-1: none)."""
        gate = self.ctx.gate
        key: ClientKey | None = None
        if gate is not None:
            gate.tick(time.monotonic())
            admitted, key = gate.admit(sock, addr)  # (a refusal closes the socket)
            if not admitted:
                return False, None, 0
        if not isinstance(addr, tuple):
            return True, key, -1  # a unix-socket peer has no source
        board = self.ctx.scoreboard
        if self.config.penalties != "off" and board.penalised(source_tag(addr[0])):
            self._refuse(sock, "penalty", addr[0], key)
            return False, None, -1
        if not self.guard.active:
            return True, key, -1
        place, refused = self.guard.enter(addr[0])
        if refused is not None:
            self._refuse(sock, str(refused), addr[0], key)
            return False, None, -1
        return True, key, place

    def leave(self, key: ClientKey | None) -> None:
        """The admitted client's connection ended: its count in the gate goes."""
        if key is not None and self.ctx.gate is not None:
            self.ctx.gate.release(key)

    def _refuse(self, sock: socket.socket, reason: str, who: str,
                key: ClientKey | None) -> None:
        with contextlib.suppress(OSError):
            message = self.config.refuse_message
            if message is not None:
                sock.send(message.encode() + b"\n")
        sock.close()
        self.leave(key)
        now = time.monotonic()
        if now - self._refusals.get(reason, -REFUSAL_REPORT_INTERVAL) >= REFUSAL_REPORT_INTERVAL:
            self._refusals[reason] = now
            log.info("worker %d: refused %s: %s", self.pid, who, reason)

    # ------------------------------------------------------------------ places

    def releaser(self, place: int) -> Callable[[], None]:
        """Gives ``place`` back, once: at the client's proof or at its end, whichever first
        (the place may serve another client by the second; a proven client never gives way,
        so its ``hold`` entry goes too)."""
        if place < 0:
            return _nothing
        held = [place]

        def release() -> None:
            if held:
                self._yield_to.pop(place, None)
                self.guard.leave(held.pop())
        return release

    def hold(self, place: int, give_way: Callable[[], None]) -> None:
        """How the client on ``place`` gives way to a newcomer, from now on."""
        if place >= 0:
            self._yield_to[place] = give_way

    def give_way(self, place: int) -> None:
        """The unproven client on ``place`` makes room for a newcomer: its input ends."""
        give_way = self._yield_to.get(place)
        if give_way is not None:
            give_way()

    def given_way(self) -> None:
        """``DROP_UNPROVEN``: another worker's newcomer took the place of some of ours."""
        for place in self.guard.given_way():
            self.give_way(place)


def _nothing() -> None:
    pass
