"""Connection over a real socket pair: lines and raw reads mixed, bounds, end of input."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from forkserve.errors import IdleTimeout, LineTooLong, PeerGone
from forkserve.serving.connection import Connection


@pytest.fixture
def pair() -> Iterator[tuple[Connection, socket.socket]]:
    server, client = socket.socketpair()
    conn = Connection(server, max_line=8, idle_timeout=0.2, peer="test", local="test")
    yield conn, client
    client.close()  # first, so that the server's lingering close sees the end at once
    conn.close()


def test_lines_and_raw_reads_mix_in_order() -> None:
    server, client = socket.socketpair()
    conn = Connection(server, max_line=64, idle_timeout=0.2, peer="test", local="test")
    client.sendall(b"HEAD 5\nhelloTAIL\nrest")
    assert conn.readline() == b"HEAD 5\n"
    assert conn.readexactly(5) == b"hello"
    assert conn.readline() == b"TAIL\n"
    assert conn.read(2) == b"re"
    assert conn.read() == b"st"
    client.close()
    conn.close()


def test_raw_reads_are_not_bounded_by_max_line(pair: tuple[Connection, socket.socket]) -> None:
    conn, client = pair
    client.sendall(b"x" * 100)
    assert conn.readexactly(100) == b"x" * 100
    client.sendall(b"y" * 100 + b"\n")
    with pytest.raises(LineTooLong):
        conn.readline()


def test_readexactly_raises_when_the_client_ends_early(
        pair: tuple[Connection, socket.socket]) -> None:
    conn, client = pair
    client.sendall(b"abc")
    client.shutdown(socket.SHUT_WR)
    with pytest.raises(PeerGone, match="after 3 of 10 bytes"):
        conn.readexactly(10)
    assert conn.read() == b""


def test_idle_timeout_and_interrupt(pair: tuple[Connection, socket.socket]) -> None:
    conn, client = pair
    with pytest.raises(IdleTimeout):
        conn.read()
    client.sendall(b"queued\n")
    conn.interrupt()  # a stop: what was sent is still read, then the input ends
    assert conn.readline() == b"queued\n"
    assert conn.readline() == b""
    assert conn.read() == b""
