"""User code behind forkserve: functions, handler classes and unchanged socketserver handlers."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.harness import Server, recv_all, recv_exactly, run_cli

ROOT = Path(__file__).resolve().parents[2]
MODELS = ["fork", "single", "prefork"]
Factory = Callable[..., Server]


@pytest.mark.parametrize("model", MODELS)
def test_function_handler_by_module_and_attribute(server_factory: Factory, model: str) -> None:
    server = server_factory("examples.upper:handle", "--model", model, "--workers", "2",
                            cwd=ROOT)
    with server.connect() as s:
        s.sendall(b"hello\nworld\n")
        assert recv_exactly(s, 12) == b"HELLO\nWORLD\n"


@pytest.mark.parametrize("model", MODELS)
def test_class_handler_with_setup_and_finish(server_factory: Factory, model: str) -> None:
    server = server_factory("--app", "examples.kvstore:KeyValue", "--model", model,
                            "--workers", "2", cwd=ROOT)
    with server.connect() as s:
        s.sendall(b"SET a 1\nGET a\nGET b\n")
        assert recv_exactly(s, 11) == b"OK\n1\n(nil)\n"


@pytest.mark.parametrize("model", MODELS)
def test_socketserver_handler_runs_unchanged(server_factory: Factory, model: str) -> None:
    server = server_factory("examples.socketserver_echo:MyTCPHandler", "--model", model,
                            "--workers", "2", cwd=ROOT)
    with server.connect() as s:
        s.sendall(b"shout this\n")
        assert recv_all(s) == b"SHOUT THIS\n"
    server.stop()
    assert b"127.0.0.1 wrote: b'shout this'" in server.stdout()


def test_one_crash_does_not_touch_the_other_connections(server_factory: Factory) -> None:
    server = server_factory("examples.kvstore:KeyValue", "--model", "prefork", "--workers",
                            "3", cwd=ROOT)
    server.traceback_expected = True
    with server.connect() as keeper:
        keeper.sendall(b"SET k v\n")
        assert recv_exactly(keeper, 3) == b"OK\n"
        with server.connect() as crasher:
            crasher.sendall(b"CRASH\n")
            assert recv_all(crasher) == b""
        keeper.sendall(b"GET k\n")
        assert recv_exactly(keeper, 2) == b"v\n"
    server.wait_for_log("RuntimeError: CRASH asked for")


@pytest.mark.parametrize(("spec", "message"), [
    ("nosuchmodule:handle", "invalid app: cannot import 'nosuchmodule'"),
    ("examples.upper:nothing", "invalid app: 'examples.upper' has no attribute 'nothing'"),
    ("examples.upper", "is neither a built-in app"),
    ("examples.upper:forkserve", "is not a handler"),
    ("socketserver:DatagramRequestHandler", "datagram handlers are not supported"),
    ("os:getcwd", "must take one argument, the connection"),
    ("tests.integration.broken_app:handle", "importing 'tests.integration.broken_app' failed: "
     "RuntimeError: this module is broken on purpose (tests/integration/broken_app.py, line 3)"),
])
def test_bad_app_names_fail_before_binding(spec: str, message: str) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = run_cli(["serve", spec, "--bind", f"127.0.0.1:{port}"], cwd=ROOT)
    err = result.stderr.decode()
    assert result.returncode == 2, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert message in err
