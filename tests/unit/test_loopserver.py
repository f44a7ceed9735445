"""The operators' loop server on real sockets, driven by a selector as the master drives it."""

from __future__ import annotations

import contextlib
import selectors
import socket
import time
from collections.abc import Callable, Iterator

import pytest

from forkserve.config import Address, OneAddress
from forkserve.master.listeners import bind_all
from forkserve.ops.loopserver import DEADLINE, LoopServer


class Loop:
    """The part of the master a loop server uses: watch/unwatch on a selector."""

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()

    def watch(self, fd: int, callback: Callable[[], None], *, write: bool = False) -> None:
        self.selector.register(fd, selectors.EVENT_WRITE if write else selectors.EVENT_READ,
                               callback)

    def unwatch(self, fd: int) -> None:  # as the supervisor's: a no-op if not watched
        with contextlib.suppress(KeyError):
            self.selector.unregister(fd)

    def turn(self) -> None:
        for key, _ in self.selector.select(0.01):
            key.data()


class Big(LoopServer):
    wants_request = False

    def __init__(self, *args: object, size: int) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.size = size
        self.answers = 0

    def answer(self, request: bytes) -> bytes:
        self.answers += 1
        return bytes(range(256)) * (self.size // 256)


def loopback() -> Address:
    address = OneAddress().convert("127.0.0.1:0")
    assert address is not None
    return address


@pytest.fixture
def loop() -> Iterator[Loop]:
    loop = Loop()
    yield loop
    loop.selector.close()


def test_an_answer_larger_than_the_socket_buffers_arrives_whole(loop: Loop) -> None:
    (listener,) = bind_all((loopback(),), 8)
    server = Big(listener, loop, time.monotonic, size=8 << 20)
    server.start()
    got = bytearray()
    with socket.create_connection(listener.sock.getsockname()[:2], timeout=5) as client:
        client.setblocking(False)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            loop.turn()  # the master never blocks on this reader: it writes what fits
            try:
                chunk = client.recv(1 << 16)
            except BlockingIOError:
                continue
            if not chunk:
                break
            got += chunk
    server.close()
    assert server.answers == 1
    assert len(got) == 8 << 20
    assert bytes(got[:512]) == bytes(range(256)) * 2


def test_a_reader_that_takes_nothing_is_dropped_at_the_deadline(loop: Loop) -> None:
    (listener,) = bind_all((loopback(),), 8)
    now = [1000.0]
    server = Big(listener, loop, lambda: now[0], size=8 << 20)
    server.start()
    with socket.create_connection(listener.sock.getsockname()[:2], timeout=5) as client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        for _ in range(20):
            loop.turn()
        assert server.next_deadline() == 1000.0 + DEADLINE, "held, waiting for room"
        now[0] += DEADLINE
        server.tick(now[0])
        assert server.next_deadline() is None, "dropped: its fd and buffer are freed"
    server.close()
