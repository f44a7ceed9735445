"""systemd: a socket passed as socket activation passes it, and sd_notify's messages."""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.harness import Server

Factory = Callable[..., Server]

# What systemd does for a .socket unit: bind and listen, put the socket on fd 3, say so in
# LISTEN_PID/LISTEN_FDS/LISTEN_FDNAMES, and exec the service (same pid).
LAUNCHER = """
import os, socket, sys
notify, args = sys.argv[1], sys.argv[2:]
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 0))
s.listen(128)
if s.fileno() != 3:
    os.dup2(s.fileno(), 3)
os.set_inheritable(3, True)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1", LISTEN_FDNAMES="web",
                  NOTIFY_SOCKET=notify, FORKSERVE_TEST_MARK="1")
os.execv(sys.executable, [sys.executable, "-m", "forkserve", "serve", *args])
"""


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(10)
    yield sock
    sock.close()


def messages(sock: socket.socket, until: str) -> list[dict[str, str]]:
    """Datagrams as dicts, up to the first that has the field ``until``."""
    out = []
    while True:
        fields = dict(line.split("=", 1) for line in sock.recv(4096).decode().splitlines())
        out.append(fields)
        if until in fields:
            return out


def test_an_activated_socket_is_served_and_systemd_is_told(server_factory: Factory,
                                                           notify: socket.socket,
                                                           tmp_path: Path) -> None:
    config = tmp_path / "forkserve.toml"
    config.write_text('app = "envapp:handle"\n')
    (tmp_path / "envapp.py").write_text(
        "import os\n\ndef handle(conn):\n    conn.readline()\n"
        "    conn.write((' '.join(sorted(os.environ)) + '\\n').encode())\n")
    server = server_factory(str(tmp_path / "notify"), "--config", str(config), "--chdir",
                            str(tmp_path), script=LAUNCHER)
    ready = messages(notify, "READY")[-1]
    assert ready["READY"] == "1"
    assert "serving 127.0.0.1:" in ready["STATUS"]
    assert os.readlink(f"/proc/{server.pid}/fd/3").startswith("socket:"), "still fd 3"
    with server.connect() as s:  # what a handler (and any program it runs) sees
        s.sendall(b"hi\n")
        names = set(s.makefile("rb").readline().decode().split())
    assert "FORKSERVE_TEST_MARK" in names, "(the environment was read)"
    assert not names & {"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "NOTIFY_SOCKET"}
    server.signal(signal.SIGHUP)
    reload = messages(notify, "READY")
    assert reload[0]["RELOADING"] == "1"
    assert int(reload[0]["MONOTONIC_USEC"]) > 0
    assert reload[-1]["STATUS"] == "reloaded the config"
    server.signal(signal.SIGTERM)
    assert messages(notify, "STOPPING")[-1]["STOPPING"] == "1"
    assert server.wait() == 0

