"""protocol.address spells addresses without importing socket: its family numbers must be the
kernel's, and every shape of address is written one way."""

from __future__ import annotations

import socket

import pytest

from forkserve.protocol import address
from forkserve.protocol.address import format_address


def test_the_family_numbers_are_the_socket_modules() -> None:
    assert address.AF_UNIX == socket.AF_UNIX
    assert address.AF_INET6 == socket.AF_INET6


@pytest.mark.parametrize(("addr", "family", "text"), [
    (("127.0.0.1", 8080), socket.AF_INET, "127.0.0.1:8080"),
    (("::1", 8080, 0, 0), socket.AF_INET6, "[::1]:8080"),
    ("/run/app.sock", socket.AF_UNIX, "unix:/run/app.sock"),
    ("", socket.AF_UNIX, "unix"),
    ("something else", socket.AF_INET, "something else"),
])
def test_each_shape_is_spelled_one_way(addr: object, family: int, text: str) -> None:
    assert format_address(addr, family) == text
