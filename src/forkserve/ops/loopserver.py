"""Small request/answer servers run from the master's own loop: the status socket and metrics.

Theory of operation
-------------------
The master has no threads, so the servers an operator talks to (``forkserve status`` on the
control socket, a Prometheus scraper on the metrics address) are state machines driven by the
master's selector. Every peer costs the master bounded memory and bounded time:

- Accepting: at most ``MAX_PENDING`` peers are held at once, more are closed at once. An accept
  error that is not one connection's (EMFILE, ENFILE, ENOBUFS ...) leaves the pending connection
  queued, so the listener would stay readable and the loop would spin: the listener is
  unwatched for ``ACCEPT_PAUSE`` instead, and the error logged at most once per pause.
- Reading: a server that wants a request (``wants_request``) reads at most ``MAX_REQUEST``
  bytes until ``request_complete`` says it has it; a peer that has not sent it within
  ``DEADLINE`` is dropped.
- Answering: the answer is built once and written non-blockingly as the peer's socket takes it
  (watched for writing, so an answer larger than a socket buffer, a status of a thousand
  workers, arrives whole); a peer that does not take it within ``DEADLINE`` is dropped. Then
  the write side is shut down, what the peer sent unasked is read (without waiting), and the
  socket closed, so the close sends no reset that could destroy the answer.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from ..master.listeners import Listener
from ..serving.accept import skip

log = logging.getLogger("forkserve")

#: Peers held at once; more are closed at once.
MAX_PENDING = 32
#: Bytes of request read at most.
MAX_REQUEST = 8192
#: A peer must have sent its request and taken its answer within this many seconds.
DEADLINE = 5.0
#: How long the listener is left alone after an accept error that is not one connection's
#: (``serving.accept`` classifies them, for every accepting process): an operator's socket
#: can wait longer than the clients' listeners (``ACCEPT_PAUSE_SECONDS``).
ACCEPT_PAUSE = 0.5


class Host(Protocol):
    """What a loop server needs from the master."""

    def watch(self, fd: int, callback: Callable[[], None], *, write: bool = False) -> None: ...
    def unwatch(self, fd: int) -> None: ...


@dataclass
class _Peer:
    sock: socket.socket
    deadline: float
    request: bytearray = field(default_factory=bytearray)
    answer: memoryview | None = None


class LoopServer:
    """Answers peers on ``listener`` from the master's loop. Subclasses say what to answer."""

    #: Read a request before answering (HTTP), or answer as soon as a peer connects.
    wants_request = True
    #: How the log names this server.
    what = "server"

    def __init__(self, listener: Listener, host: Host, clock: Callable[[], float]) -> None:
        self.listener = listener
        self._host = host
        self._clock = clock
        self._peers: dict[int, _Peer] = {}
        self._paused_until: float | None = None

    # ------------------------------------------------------------------ to override

    def request_complete(self, request: bytes) -> bool:
        return True

    def answer(self, request: bytes) -> bytes:
        raise NotImplementedError

    # ------------------------------------------------------------------ the machine

    def start(self) -> None:
        self._host.watch(self.listener.fileno(), self._accept)

    def _accept(self) -> None:
        for _ in range(MAX_PENDING):
            try:
                sock, _ = self.listener.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if skip(exc):  # that peer is gone: take the next one
                    continue
                self._pause(exc)
                return
            if len(self._peers) >= MAX_PENDING:
                sock.close()
                continue
            sock.setblocking(False)
            fd = sock.fileno()
            self._peers[fd] = _Peer(sock, self._clock() + DEADLINE)
            if self.wants_request:
                self._host.watch(fd, functools.partial(self._read, fd))
            else:
                self._reply(fd)

    def _pause(self, exc: OSError) -> None:
        self._host.unwatch(self.listener.fileno())
        self._paused_until = self._clock() + ACCEPT_PAUSE
        log.warning("%s: accept failed: %s; not accepting for %.1f s", self.what,
                    exc.strerror or exc, ACCEPT_PAUSE)

    def _read(self, fd: int) -> None:
        peer = self._peers[fd]
        try:
            chunk = peer.sock.recv(MAX_REQUEST - len(peer.request))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(fd)
            return
        peer.request += chunk
        if (not chunk or len(peer.request) >= MAX_REQUEST
                or self.request_complete(bytes(peer.request))):
            self._host.unwatch(fd)
            self._reply(fd)

    def _reply(self, fd: int) -> None:
        peer = self._peers[fd]
        peer.answer = memoryview(self.answer(bytes(peer.request)))
        self._write(fd)

    def _write(self, fd: int) -> None:
        peer = self._peers[fd]
        assert peer.answer is not None
        try:
            sent = peer.sock.send(peer.answer)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._drop(fd)
            return
        peer.answer = peer.answer[sent:]
        if peer.answer:
            self._host.unwatch(fd)
            self._host.watch(fd, functools.partial(self._write, fd), write=True)
            return
        with contextlib.suppress(OSError):
            peer.sock.shutdown(socket.SHUT_WR)
            # what the peer sent and nobody read would turn the close into a reset, which
            # can destroy the answer in flight: take it (bounded, without waiting)
            for _ in range(MAX_REQUEST // 1024):
                if not peer.sock.recv(1024):
                    break
        self._drop(fd)

    def _drop(self, fd: int) -> None:
        peer = self._peers.pop(fd)
        self._host.unwatch(fd)
        peer.sock.close()

    # ------------------------------------------------------------------ the master's loop

    def next_deadline(self) -> float | None:
        deadlines = [p.deadline for p in self._peers.values()]
        if self._paused_until is not None:
            deadlines.append(self._paused_until)
        return min(deadlines, default=None)

    def tick(self, now: float) -> None:
        """Drop peers past their deadline; accept again once a pause is over."""
        for fd in [fd for fd, p in self._peers.items() if p.deadline <= now]:
            self._drop(fd)
        if self._paused_until is not None and now >= self._paused_until:
            self._paused_until = None
            self.start()

    def close_in_child(self) -> None:
        for peer in self._peers.values():
            peer.sock.close()
        self.listener.sock.close()

    def close(self) -> None:
        for fd in list(self._peers):
            self._drop(fd)
        self._host.unwatch(self.listener.fileno())
        self.listener.close()
