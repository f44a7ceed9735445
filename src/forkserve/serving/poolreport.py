"""What a pool worker (prefork or hybrid) tells its master through the pool pipe
(``protocol.poolpipe``): that it is ready, that it is busy while the master rests, the
accept errors it met (counted here, told at most once per errno per interval, so that the
master logs them at the rate of the whole pool), and a client that ended badly (the master
keeps the penalties of the whole pool, ``protocol.defence``).

The pipe is non-blocking: a full pipe (a master behind) loses a message, except READY, which
waits for room, and the accept pauses, which are kept for the next turn. Once the master is
gone the writes raise ``BrokenPipeError``: READY passes it on (the worker cannot boot), the
rest stay quiet (PR_SET_PDEATHSIG stops the worker).
"""

from __future__ import annotations

import contextlib
import os
import select

from ..protocol.admission import source_tag
from ..protocol.defence import CAUSES, Cause
from ..protocol.poolpipe import Kind, Message, PauseTally


class PoolReport:
    """One worker's side of the pool pipe ``fd``. Runs in the worker process."""

    def __init__(self, fd: int, slot: int, pid: int) -> None:
        self._fd = fd
        self._slot = slot
        self._pid = pid
        #: The accept errors not told yet (``ACCEPT_PAUSED``).
        self.pauses = PauseTally()

    def tell(self, message: Message) -> bool:
        """Write one message to the master; False if the pipe is full (the master is behind).
        Raises ``BrokenPipeError`` once the master is gone."""
        try:
            os.write(self._fd, message.encode())
        except BlockingIOError:
            return False
        return True

    def ready(self) -> None:
        """READY, waiting for room in the pipe. Raises ``BrokenPipeError`` (the master died
        while this worker booted)."""
        ready = Message(Kind.READY, self._slot, self._pid)
        while not self.tell(ready):
            room = select.poll()  # (not select(): the fd may be above FD_SETSIZE)
            room.register(self._fd, select.POLLOUT)
            room.poll()

    def busy(self) -> None:
        """BUSY: this worker took a connection (or reached its cap) while the master rests (a
        full pipe wakes the master anyway: any message ends its rest)."""
        with contextlib.suppress(BrokenPipeError):
            self.tell(Message(Kind.BUSY, self._slot, self._pid))

    def ended_badly(self, addr: object, cause: Cause) -> None:
        """The client at ``addr`` ended badly (best effort: a full pipe loses it)."""
        if not isinstance(addr, tuple):
            return  # a unix-socket peer has no source
        message = Message(Kind.ENDED_BADLY, self._slot, self._pid, CAUSES.index(cause),
                          tag=source_tag(addr[0]))
        with contextlib.suppress(BrokenPipeError):
            self.tell(message)

    def pause(self, code: int, now: float) -> None:
        """An accept failed with ``code`` (EMFILE and kin): counted, told when due."""
        self.pauses.add(code)
        self.tell_pauses(now)

    def tell_pauses(self, now: float) -> None:
        """Tell the master of the accept pauses due: one message per errno per interval."""
        for err, count in self.pauses.due(now):
            try:
                told = self.tell(Message(Kind.ACCEPT_PAUSED, self._slot, self._pid, err,
                                         count))
            except BrokenPipeError:
                return
            if not told:
                self.pauses.keep(err, count)
