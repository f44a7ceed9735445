"""Waiting on a client without missing a stop: the serving process's wakeup pipe.

Theory of operation
-------------------
A serving process (a fork child, a prefork worker) blocks on its client: for the PROXY header,
the TLS handshake, the next request, the client's end of a lingering close. A stop (SIGTERM
from the master, or from the kernel when the master dies: ``PR_SET_PDEATHSIG``) must end such
a wait at once. A Python signal handler runs between bytecodes, so a signal that lands after
the last check and before a blocking ``recv`` enters the kernel runs its handler only when
that ``recv`` returns, up to ``idle_timeout`` later (PEP 475 retries the call), and after the
master's death nobody sends the signal again.

So every such wait is one ``poll`` of the client's fd together with the read end of the
process's ``signal.set_wakeup_fd`` pipe, which CPython's C-level handler writes the moment the
signal arrives, before any Python code runs: a signal that came before the ``poll`` leaves the
pipe readable, one that comes during it ends it. The signal's Python handler has run by the
time the caller looks again (CPython flags the signal before it writes the pipe, and runs
pending handlers at the next call or loop back-edge). The price is one ``poll`` per read that
may wait (docs/benchmarks.md has the figure).

Rejected: a flag checked before a blocking ``recv`` (the race above); the master repeating
SIGTERM (it still does, for handlers that read the socket themselves, but a dead master
repeats nothing); ``PR_SET_PDEATHSIG`` with SIGKILL (it would cut answers in flight);
``SO_RCVTIMEO`` slices (a wake-up per slice per idle client: polling).

``StopSignal`` also records what the stop handler learnt: when the stop came, and whether the
master is gone. An orphan answers the requests it has received whole but waits for nothing
more (no grace for a request still on its way): no master will tell it again, and the client
would find no server for its next request anyway.
"""

from __future__ import annotations

import contextlib
import enum
import os
import select
import signal
import time

#: How long a request still incomplete at a stop (nothing received yet, or part of a line, or a
#: handshake under way) may take to arrive whole: an accepted client is owed an answer, but a
#: silent one must not hold the stop.
STOP_GRACE = 1.0
#: Timeouts up to this are "do not wait at all" (poll's resolution is a millisecond).
NO_WAIT = 1e-5


class Woke(enum.Enum):
    READY = "ready"
    TIMEOUT = "timeout"
    #: A signal with a Python handler arrived (in a serving process: a stop).
    SIGNAL = "signal"


class StopSignal:
    """The stop of one serving process: its wakeup pipe and what the handler recorded.

    Created in the serving process (child or worker), once; ``install`` makes its pipe the
    signal wakeup fd. ``record`` is called from the stop signal's Python handler.
    """

    def __init__(self, master_pid: int) -> None:
        self.fd, self._write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.master_pid = master_pid
        self.requested = False
        #: The master is gone: nothing incomplete is waited for (see the module doc).
        self.orphaned = False
        self.began = 0.0
        #: The connection's handshake must end now (the early drop needs its room).
        self.gave_way = False

    def install(self) -> None:
        signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)

    def record(self) -> bool:
        """In the stop signal's handler: note the stop; True the first time. One system
        call (``getppid``: after its parent's death a process has another parent)."""
        self.orphaned = self.orphaned or os.getppid() != self.master_pid
        if self.requested:
            return False
        self.requested = True
        self.began = time.monotonic()
        return True

    @property
    def grace(self) -> float:
        """How long an incomplete request may still take after the stop."""
        return 0.0 if self.orphaned else STOP_GRACE

    def cut(self, deadline: float) -> float:
        """``deadline``, brought forward to the end of the grace once a stop has come, or to
        now once the connection must give way (``give_way``)."""
        if self.gave_way:
            return 0.0
        return min(deadline, self.began + self.grace) if self.requested else deadline

    def give_way(self) -> None:
        """In a signal handler: the handshake under way ends now (``sourceguard``)."""
        self.gave_way = True

    def waiter(self, fd: int, events: int = select.POLLIN) -> Waiter:
        return Waiter(fd, self.fd, events)

    def close(self) -> None:
        os.close(self.fd)
        os.close(self._write_fd)


class Waiter:
    """``poll`` on one fd and a stop pipe: the one way a serving process waits on a client."""

    __slots__ = ("_poll", "_stop_fd")

    def __init__(self, fd: int, stop_fd: int, events: int = select.POLLIN) -> None:
        self._poll = select.poll()
        self._poll.register(fd, events)
        self._poll.register(stop_fd, select.POLLIN)
        self._stop_fd = stop_fd

    def wait(self, timeout: float | None) -> Woke:
        """Until the fd is ready (or closed, or in error), ``timeout`` seconds pass (None:
        forever), or a signal arrives; a signal is reported first."""
        ms = None if timeout is None else (timeout * 1000.0 if timeout > NO_WAIT else 0)
        events = self._poll.poll(ms)
        if len(events) == 1 and events[0][0] != self._stop_fd:
            return Woke.READY  # the common case, first (a read on every request)
        woke = Woke.TIMEOUT
        for fd, _ in events:
            if fd == self._stop_fd:
                drain(fd)
                return Woke.SIGNAL
            woke = Woke.READY
        return woke


def ready_by(fd: int, deadline: float, stop: StopSignal | None, *,
             events: int = select.POLLIN) -> bool:
    """Wait until ``fd`` is ready; False once ``deadline`` (monotonic) has passed, or the end
    of a stop's grace (``StopSignal.cut``) if that comes first. For the steps before the
    handler (PROXY header, TLS handshake), which are bounded by one deadline."""
    if stop is None:
        poller = select.poll()
        poller.register(fd, events)
        left = deadline - time.monotonic()
        return left > 0 and bool(poller.poll(left * 1000.0))
    waiter = stop.waiter(fd, events)
    while (left := stop.cut(deadline) - time.monotonic()) > 0:
        if waiter.wait(left) is Woke.READY:
            return True
    return False


def drain(fd: int) -> None:
    """Read a non-blocking pipe empty."""
    with contextlib.suppress(BlockingIOError):
        while os.read(fd, 4096):
            pass
