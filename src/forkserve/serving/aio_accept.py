"""One new connection wakes one hybrid worker: the listeners in a private epoll set with
``EPOLLEXCLUSIVE``, waited on by one thread of the worker.

Theory of operation
-------------------
A loop that watches a shared listener (``add_reader``) is woken for every new connection, in
every worker: all but one get EAGAIN. ``EPOLLEXCLUSIVE`` wakes one waiter, but the kernel
counts a wake-up as delivered only to an epoll set that a thread is *waiting in*
(``epoll_wait``); the loop's own epoll set is asyncio's or libuv's, and neither lets a caller
add that flag. Nesting does not help: a private epoll set registered exclusively and watched
by the loop (``add_reader`` on its fd) is not waited in, so the kernel goes on to the next
waiter, and every worker's loop still wakes (measured: more wake-ups per connection than
without it, docs/benchmarks.md, issue 17).

So a thread (``ListenerWaiter``) waits in the private set and hands the ready listeners to
the loop (``call_soon_threadsafe``); the loop accepts its batch, then re-arms the thread. While
the thread is not waiting (the loop has not finished with the last hand-off: a busy worker),
the kernel skips this worker and wakes another: the busier a worker, the fewer new
connections it is offered. At ``worker_connections`` (or an accept pause, or a stop) the
listeners leave the set (``EPOLL_CTL_DEL``: a closed fd whose file other processes still
hold would stay registered) and the thread waits for a re-arm.

The worst case: a hand-off that the loop drops because it has just reached its cap leaves
that one connection in the backlog until another worker's next wake-up (the old herd woke
every worker for it). ``SO_REUSEPORT`` is not used: each socket would have its own queue,
and a worker that exits drops its queue (DESIGN decision 6).

Cost: one thread parked in ``epoll_wait`` per worker (no GIL held while it waits), one
``call_soon_threadsafe`` (a write to the loop's self-pipe) per wake-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import threading
from collections.abc import Callable, Sequence


class ListenerWaiter:
    """The thread that waits for new connections on ``fds`` for one worker's loop, and
    calls ``ready(fds)`` on that loop. Made and driven from the loop's thread."""

    def __init__(self, fds: Sequence[int], loop: asyncio.AbstractEventLoop,
                 ready: Callable[[list[int]], None]) -> None:
        self._fds = list(fds)
        self._loop = loop
        self._ready = ready
        self._epoll = select.epoll()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._epoll.register(self._wake_r, select.EPOLLIN)
        self._registered = False
        self._armed = threading.Event()
        self._closed = False
        #: The thread is waiting for a re-arm (it handed off, or has not started).
        self.parked = True
        self._thread = threading.Thread(target=self._run, name="forkserve-accept",
                                        daemon=True)
        self._thread.start()

    def watch(self, on: bool) -> None:
        """Put the listeners in the private set (``on``) or take them out."""
        if on == self._registered or self._closed:
            return
        self._registered = on
        for fd in self._fds:
            with contextlib.suppress(OSError):  # (a listener closed by a stop)
                if on:
                    self._epoll.register(fd, select.EPOLLIN | select.EPOLLEXCLUSIVE)
                else:
                    self._epoll.unregister(fd)
        if on and self.parked:
            self.rearm()

    def rearm(self) -> None:
        """The loop is done with the last hand-off: wait for the next one, behind the other
        workers (see ``_to_the_back``)."""
        self._to_the_back()
        self.parked = False
        self._armed.set()

    def _to_the_back(self) -> None:
        """Register the listeners again: the kernel wakes the first exclusive waiter in a
        listener's wait queue that is waiting, and an entry joins the queue at its back
        when registered. Left in place, the worker registered first takes every connection
        while it is idle (measured: 383 to 401 of 400 sequential clients on one of two
        workers); moved back after each hand-off, the workers take turns. Nothing is lost
        meanwhile: a registration looks at the listener's state at once."""
        if not self._registered or self._closed:
            return
        for fd in self._fds:
            with contextlib.suppress(OSError):  # (a listener closed by a stop)
                self._epoll.unregister(fd)
                self._epoll.register(fd, select.EPOLLIN | select.EPOLLEXCLUSIVE)

    def close(self) -> None:
        """Out of the set for good; the thread ends."""
        self.watch(False)
        self._closed = True
        self._armed.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"\0")

    def _run(self) -> None:
        """In the waiter thread: park in the private set, hand off, wait for the re-arm."""
        while True:
            self._armed.wait()
            self._armed.clear()
            ready: list[int] = []
            while not ready and not self._closed:
                ready = [fd for fd, _ in self._epoll.poll() if fd != self._wake_r]
            if self._closed:
                return
            with contextlib.suppress(RuntimeError):  # (the loop is closed: the worker ends)
                self._loop.call_soon_threadsafe(self._hand_off, ready)

    def _hand_off(self, ready: list[int]) -> None:
        self.parked = True
        self._ready(ready)
