"""The seed's behaviour, byte for byte, with its framing bug fixed (fork and single models)."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.harness import Server, access_line, assert_took, recv_all, recv_exactly

HELLO = b"Hello from server!\n"
MODELS = ["fork", "single"]

Factory = Callable[..., Server]


@pytest.mark.parametrize("model", MODELS)
def test_one_answer_per_line_however_split_or_merged(server_factory: Factory, model: str) -> None:
    server = server_factory("--model", model)
    with server.connect() as s:
        s.sendall(b"one\n")
        assert recv_exactly(s, len(HELLO)) == HELLO
        for piece in (b"tw", b"o\nthr", b"ee", b"\n"):  # split across reads
            s.sendall(piece)
            time.sleep(0.02)  # (so the pieces arrive in separate reads: under test)
        assert recv_exactly(s, 2 * len(HELLO)) == 2 * HELLO
        s.sendall(b"a\nb\r\nc\n")  # merged into one read
        assert recv_exactly(s, 3 * len(HELLO)) == 3 * HELLO
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == b"", "one answer per line, and nothing else"


@pytest.mark.parametrize("model", MODELS)
def test_half_closed_client_still_gets_its_answers(server_factory: Factory, model: str) -> None:
    server = server_factory("--model", model)
    with server.connect() as s:
        s.sendall(b"x\ny\nlast line without newline")
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == 3 * HELLO


def test_received_lines_go_to_the_log_not_stdout(server_factory: Factory) -> None:
    server = server_factory("--log-level", "debug")
    with server.connect() as s:
        s.sendall("héllo wörld\r\n".encode())
        assert recv_exactly(s, len(HELLO)) == HELLO
    server.wait_for_log(r"Received: héllo wörld$")
    server.stop()
    assert server.stdout() == b""


@pytest.mark.parametrize("model", MODELS)
def test_echo_app_answers_each_line_with_itself(server_factory: Factory, model: str) -> None:
    server = server_factory("--model", model, "--app", "echo")
    with server.connect() as s:
        s.sendall(b"abc\nd")
        s.sendall(b"ef\r\n\n")
        assert recv_exactly(s, 10) == b"abc\ndef\r\n\n"
        s.sendall(b"tail")
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == b"tail\n"


@pytest.mark.parametrize("model", MODELS)
def test_over_long_line_gets_an_error_and_the_connection_closes(server_factory: Factory,
                                                                 model: str) -> None:
    server = server_factory("--model", model, "--max-line", "10")
    with server.connect() as s:
        s.sendall(b"ok\n" + b"x" * 11 + b"\nnever answered\n")
        assert recv_all(s) == HELLO + b"ERR line too long\n"
    with server.connect() as s:  # no newline at all: caught while buffering, not at the end
        s.sendall(b"y" * 1000)
        assert recv_all(s) == b"ERR line too long\n"
    with server.connect() as s:  # a line of exactly max_line bytes is fine
        s.sendall(b"z" * 10 + b"\n")
        assert recv_exactly(s, len(HELLO)) == HELLO


@pytest.mark.parametrize("model", MODELS)
def test_idle_client_is_disconnected(server_factory: Factory, model: str) -> None:
    server = server_factory("--model", model, "--idle-timeout", "0.5", "--log-level", "debug",
                            "--access-log", "-")
    with server.connect() as s:
        port = s.getsockname()[1]
        s.sendall(b"hi\n")
        assert recv_exactly(s, len(HELLO)) == HELLO
        start = time.monotonic()
        assert recv_all(s) == b""  # closed by the server
        assert_took(time.monotonic() - start, 0.5, "idle timeout")
    server.wait_for_log(rf"127\.0\.0\.1:{port}: closed: client sent nothing within the idle "
                        "timeout")
    assert access_line(server, port)[1] == "0"


@pytest.mark.parametrize("model", MODELS)
def test_client_reset_costs_only_its_own_connection(server_factory: Factory, model: str) -> None:
    server = server_factory("--model", model)
    for _ in range(5):
        s = server.connect()
        s.sendall(b"ping\n" * 100)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.close()  # RST with answers unread
    with server.connect() as s:
        s.sendall(b"still there?\n")
        assert recv_exactly(s, len(HELLO)) == HELLO
    assert server.proc.poll() is None


def test_unix_socket_listener(server_factory: Factory, tmp_path: Path) -> None:
    path = tmp_path / "fs.sock"
    path_str = str(path)
    # a stale socket file left by a dead server is replaced, not an error
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path_str)
    stale.close()
    server = server_factory(bind=[f"unix:{path_str}"])
    assert server.addresses == [f"unix:{path_str}"]
    with server.connect() as s:
        s.sendall(b"hi\n")
        assert recv_exactly(s, len(HELLO)) == HELLO
    assert server.stop() == 0
    assert not path.exists(), "the socket file is removed on stop"


def test_ipv6_loopback_and_several_listeners(server_factory: Factory) -> None:
    probe = socket.socket(socket.AF_INET6)
    try:
        probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    finally:
        probe.close()
    server = server_factory(bind=["[::1]:0", "127.0.0.1:0"], ready=2)
    assert server.addresses[0].startswith("[::1]:")
    assert server.addresses[1].startswith("127.0.0.1:")
    for address in server.addresses:
        host, _, port = address.rpartition(":")
        with socket.create_connection((host.strip("[]"), int(port)), timeout=10) as s:
            s.sendall(b"hi\n")
            assert recv_exactly(s, len(HELLO)) == HELLO


@pytest.mark.parametrize("model", MODELS)
def test_a_client_that_stops_reading_is_dropped_after_the_write_timeout(
        server_factory: Factory, model: str) -> None:
    server = server_factory("--model", model, "--app", "echo", "--write-timeout", "0.5",
                            "--access-log", "-", "--log-level", "debug")
    with server.connect() as s:
        port = s.getsockname()[1]
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        line = b"x" * 60000 + b"\n"
        s.settimeout(0.2)
        start = moved = time.monotonic()
        left = b""
        # echoed back, never read: until both ways are full and the server is stuck, which
        # its write timeout then ends. A server slowed by a busy machine still takes bytes:
        # only a second without progress is stuck (the server's send buffer, autotuned to
        # megabytes, may have taken all that a first stall of 0.2 s left it)
        with contextlib.suppress(OSError):
            while time.monotonic() - start < 10 and time.monotonic() - moved < 1.0:
                try:
                    sent = s.send(left or line)
                except TimeoutError:
                    continue
                left, moved = (left or line)[sent:], time.monotonic()
        server.wait_for_log(rf"127\.0\.0\.1:{port}: closed: client stopped reading "
                            r"\(write timeout\)", timeout=10)
        duration, status = access_line(server, port)
    assert status == "0", "a client's trouble is not the handler's failure"
    # the connection lasted the time to fill the buffers (a few ms here), then the timeout
    assert_took(duration, 0.5, "write timeout")
    with server.connect() as s:  # the server is free again (the single model proves it)
        s.sendall(b"next\n")
        assert recv_exactly(s, 5) == b"next\n"
