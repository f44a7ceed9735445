"""The master's accept control: when its listeners are watched, and the pauses after errors.

Backpressure (DESIGN decision 4): the listeners are registered in the master's selector
exactly while the model has room, no stop has begun and no pause runs; otherwise clients wait
in the kernel backlog. Errors (decision 5, never spin): an accept() error is classified once,
in ``serving.accept`` (the prefork workers use the same classification and pause), and a
fork() that fails for lack of resources pauses accepting too. Each pause is counted and
reported through the master's one rate limiter (``events``). Runs in the master.
"""

from __future__ import annotations

import errno
import logging
import os
import selectors
from collections.abc import Callable, Sequence

from ..serving.accept import ACCEPT_PAUSE_SECONDS, is_capacity, skip
from .events import Events
from .listeners import Listener

#: How long accepting pauses after fork() failed for lack of resources (EAGAIN, ENOMEM):
#: the client is refused, and the next one would meet the same shortage.
FORK_PAUSE_SECONDS = 0.1


class Accepting:
    """Whether the master watches its listeners now, and until when it pauses."""

    def __init__(self, selector: selectors.BaseSelector, listeners: Sequence[Listener],
                 clock: Callable[[], float], events: Events) -> None:
        self._selector = selector
        self._listeners = listeners
        self._clock = clock
        self._events = events
        #: The listeners are registered in the selector.
        self.active = False
        #: Monotonic time at which a pause ends; 0.0: no pause.
        self.paused_until = 0.0

    def update(self, room: bool) -> None:
        """Watch the listeners exactly when ``room`` (the model has room, no stop) and no
        pause runs."""
        if self.paused_until and self._clock() >= self.paused_until:
            self.paused_until = 0.0
        want = room and not self.paused_until
        if want == self.active:
            return
        self.active = want
        for listener in self._listeners:
            if want:
                self._selector.register(listener.sock, selectors.EVENT_READ, listener)
            else:
                self._selector.unregister(listener.sock)

    def deadline(self) -> float | None:
        """When the pause ends (the loop wakes then to accept again), if one runs."""
        return self.paused_until or None

    def pause(self, seconds: float) -> None:
        self.paused_until = self._clock() + seconds
        self.update(False)

    def failed(self, exc: OSError) -> bool:
        """An accept() error in the master; True if the model should stop taking for now."""
        if skip(exc):
            return False
        self.pause(ACCEPT_PAUSE_SECONDS)
        self.paused(exc.errno or 0)
        return True

    def paused(self, code: int, pauses: int = 1, *, by: str = "",
               pause: float = ACCEPT_PAUSE_SECONDS) -> None:
        """Count ``pauses`` pauses of ``pause`` seconds after accept() failed with errno
        ``code``, and report them. ``by``: who paused, when not the master (prefork workers
        tell theirs through the pool pipe)."""
        name = errno.errorcode.get(code, str(code))
        self._events.count("accept_pauses", name, pauses)
        level = logging.WARNING if is_capacity(code) else logging.ERROR
        self._events.report(f"accept:{name}", level,
                            "%saccept failed: %s (%s); pausing accepts for %.1f s",
                            by, os.strerror(code), name, pause, events=pauses)

    def fork_failed(self, exc: OSError, *, refused: bool = True) -> None:
        """fork() failed; report it (rate-limited). ``refused``: a client was closed for it,
        and accepting pauses; otherwise (a pool's worker) the model retries later itself."""
        name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        self._events.count("fork_failures", name)
        if not refused:
            self._events.report(f"fork:{name}", logging.ERROR, "fork failed: %s (%s); retrying",
                                exc.strerror, name)
            return
        self._events.count("refused", "fork_failed")
        self.pause(FORK_PAUSE_SECONDS)
        self._events.report(f"fork:{name}", logging.ERROR, "fork failed: %s (%s); closed "
                            "that connection, pausing accepts for %.1f s", exc.strerror, name,
                            FORK_PAUSE_SECONDS)
