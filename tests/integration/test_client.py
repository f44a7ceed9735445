"""``forkserve client``: the tutorial's client, scripted and interactive."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from tests.integration.harness import Server, run_cli

Factory = Callable[..., Server]


def test_scripted_mode_prints_each_answer(server_factory: Factory) -> None:
    server = server_factory()
    result = run_cli(["client", f"127.0.0.1:{server.port}", "--message", "hi", "--count", "3"])
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"Hello from server!\n" * 3


def test_interactive_mode_sends_each_stdin_line(server_factory: Factory) -> None:
    server = server_factory("--app", "echo")
    result = run_cli(["client", f"127.0.0.1:{server.port}"], input=b"one\ntwo\nthree")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"one\ntwo\nthree\n"


def test_cannot_connect_is_one_line_and_nonzero() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        result = run_cli(["client", f"127.0.0.1:{port}", "--message", "hi"])
    assert result.returncode == 1
    assert result.stderr.decode().strip() == (
        f"forkserve: cannot connect to 127.0.0.1:{port}: connection refused")


def test_server_closing_early_is_reported(server_factory: Factory) -> None:
    server = server_factory("--max-line", "4")
    result = run_cli(["client", f"127.0.0.1:{server.port}", "--message", "too long",
                      "--count", "3"])
    assert result.returncode == 1
    assert result.stdout == b"ERR line too long\n"
    assert result.stderr.decode().strip() == (
        "forkserve: the server closed the connection after 1 of 3 answers")


def test_interactive_mode_half_closes_at_end_of_input(server_factory: Factory) -> None:
    server = server_factory()
    result = run_cli(["client", f"127.0.0.1:{server.port}"], input=b"")
    # stdin is empty (EOF at once): the client half-closes, the server closes, exit 0
    assert result.returncode == 0, result.stderr
    assert result.stdout == b""


def test_interactive_mode_reports_a_server_that_closes_first(server_factory: Factory) -> None:
    server = server_factory("--idle-timeout", "0.3")
    proc = subprocess.Popen([sys.executable, "-m", "forkserve", "client",
                             f"127.0.0.1:{server.port}"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin is not None
    assert proc.stdout is not None
    assert proc.stderr is not None
    try:
        proc.stdin.write(b"hi\n")
        proc.stdin.flush()  # input stays open: the server's idle timeout closes first
        proc.wait(timeout=30)
        out, err = proc.stdout.read(), proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            pipe.close()
    assert proc.returncode == 1
    assert out == b"Hello from server!\n"
    assert err.decode().strip() == "forkserve: the server closed the connection"


def test_interactive_mode_reads_stdin_from_a_file(server_factory: Factory,
                                                 tmp_path: Path) -> None:
    server = server_factory("--app", "echo")
    lines = tmp_path / "lines.txt"
    lines.write_bytes(b"a\nb\n")
    with open(lines, "rb") as stdin:
        result = subprocess.run([sys.executable, "-m", "forkserve", "client",
                                 f"127.0.0.1:{server.port}"], stdin=stdin, capture_output=True,
                                timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"a\nb\n"


def test_bad_address_is_one_line() -> None:
    result = run_cli(["client", "nowhere", "--message", "x"])
    assert result.returncode == 2, "a usage error"
    assert "bad address" in result.stderr.decode()
    assert "Traceback" not in result.stderr.decode()
