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

So a thread (``ListenerWaiter``) waits in the private set; when a listener is ready it takes
the listeners out of the set (``EPOLL_CTL_DEL``) and hands them to the loop
(``call_soon_threadsafe``); the loop accepts its batch, then puts them back (``rearm``:
``EPOLL_CTL_ADD``, which queues this worker behind the others, so the workers take turns).
While they are out (the loop has not finished with the last hand-off: a busy worker), the
kernel skips this worker and wakes another: the busier a worker, the fewer new connections
it is offered. At ``worker_connections`` (or an accept pause, or a stop) they stay out (a
closed fd whose file other processes still hold would stay registered: out before a close).

The worst case: a hand-off that the loop drops because it has just reached its cap leaves
that one connection in the backlog until another worker's next wake-up (the old herd woke
every worker for it). ``SO_REUSEPORT`` is not used: each socket would have its own queue,
and a worker that exits drops its queue (DESIGN decision 6).

Cost: one thread parked in ``epoll_wait`` per worker (no GIL held while it waits); per
wake-up, one ``call_soon_threadsafe`` (a write to the loop's self-pipe) and an
``epoll_ctl`` out and in per listener (an earlier form parked the thread on a
``threading.Event`` between hand-offs: the loop's ``set`` was 5% of its time at c=10
connect, py-spy ``--gil``).
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
        #: The loop wants connections (``watch``).
        self._watching = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="forkserve-accept",
                                        daemon=True)
        self._thread.start()

    def watch(self, on: bool) -> None:
        """Put the listeners in the private set (``on``) or take them out."""
        if self._closed:
            return
        self._watching = on
        if on:
            self.rearm()
        else:
            self._leave()

    def rearm(self) -> None:
        """The loop is done with the last hand-off: the listeners join the set again, at the
        back of their wait queues (see ``_run``)."""
        if not self._watching or self._closed:
            return
        for fd in self._fds:
            with contextlib.suppress(OSError):  # (there already; a listener closed by a stop)
                self._epoll.register(fd, select.EPOLLIN | select.EPOLLEXCLUSIVE)

    def close(self) -> None:
        """Out of the set for good; the thread ends."""
        self._watching = False
        self._leave()
        self._closed = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"\0")

    def _leave(self) -> None:
        for fd in self._fds:
            with contextlib.suppress(OSError):  # (not there; a listener closed by a stop)
                self._epoll.unregister(fd)

    def _run(self) -> None:
        """In the waiter thread: wait in the private set; on a new connection, take the
        listeners out of it and hand them to the loop, which puts them back once it has
        taken its batch (``rearm``). Out of the set, this worker is not offered the next
        connections: the kernel wakes the first exclusive waiter in a listener's wait queue
        that waits, and skips the others. Back in, it joins the queue at its back: the
        workers take turns (left in place, the worker registered first took every
        connection while it was idle: 383 to 401 of 400 sequential clients on one of two).
        Nothing is lost meanwhile: a registration looks at the listener's state at once."""
        while True:
            ready = [fd for fd, _ in self._epoll.poll() if fd != self._wake_r]
            if self._closed:
                return
            if not ready:
                with contextlib.suppress(OSError):
                    os.read(self._wake_r, 64)
                continue
            self._leave()
            with contextlib.suppress(RuntimeError):  # (the loop is closed: the worker ends)
                self._loop.call_soon_threadsafe(self._ready, ready)
