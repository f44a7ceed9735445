"""systemd integration on real sockets: sd_notify datagrams and LISTEN_FDS socket activation.

The notifier talks to an AF_UNIX datagram socket that the test binds, standing in for systemd.
Activation runs in a subprocess that gets real sockets on fds 3, 4, ... the way systemd hands
them over: a wrapper puts them in place, sets LISTEN_PID to its own pid and execs the reporter
(exec keeps the pid), which prints what ``inherited_listeners`` found as JSON.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from forkserve.config import Address
from forkserve.errors import ConfigError
from forkserve.master.systemd import (
    MAX_STATUS_CHARS,
    Heartbeat,
    InheritedSocket,
    Notifier,
    as_listeners,
    inherited_listeners,
)

PID = 4242  # the pid the notifier and activation tests pretend to be

# --------------------------------------------------------------------------- notification


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """systemd's end: a datagram socket bound in tmp_path, and its path."""
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2.0)
    yield sock, path
    sock.close()


@pytest.fixture
def notifier(receiver: tuple[socket.socket, str]) -> Iterator[Notifier]:
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": receiver[1]}, PID)
    yield notifier
    notifier.close()


def _nothing_waiting(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        sock.recv(4096)
    except BlockingIOError:
        return True
    return False


SENDS: list[tuple[str, Callable[[Notifier], None], bytes]] = [
    ("ready", lambda n: n.ready(), b"READY=1"),
    ("ready+status", lambda n: n.ready("serving on 127.0.0.1:8080"),
     b"READY=1\nSTATUS=serving on 127.0.0.1:8080"),
    ("stopping", lambda n: n.stopping(), b"STOPPING=1"),
    ("stopping+status", lambda n: n.stopping("graceful stop"),
     b"STOPPING=1\nSTATUS=graceful stop"),
    ("status", lambda n: n.status("3 busy, 5 idle"), b"STATUS=3 busy, 5 idle"),
    ("watchdog", lambda n: n.watchdog(), b"WATCHDOG=1"),
    ("mainpid", lambda n: n.mainpid(31337), b"MAINPID=31337"),
    ("status one line", lambda n: n.status("bad\nREADY=1\r\0x"), b"STATUS=bad READY=1  x"),
    ("status unencodable", lambda n: n.status("caf\udce9"), b"STATUS=caf?"),
]


@pytest.mark.parametrize(("call", "expected"), [s[1:] for s in SENDS], ids=[s[0] for s in SENDS])
def test_each_call_sends_one_exact_datagram(
        notifier: Notifier, receiver: tuple[socket.socket, str],
        call: Callable[[Notifier], None], expected: bytes) -> None:
    call(notifier)
    assert receiver[0].recv(4096) == expected
    assert _nothing_waiting(receiver[0])
    assert notifier.failures == 0


def test_reloading_carries_the_monotonic_clock_in_microseconds(
        notifier: Notifier, receiver: tuple[socket.socket, str]) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    match = re.fullmatch(rb"RELOADING=1\nMONOTONIC_USEC=(\d+)", receiver[0].recv(4096))
    assert match is not None
    assert before <= int(match[1]) <= after


def test_a_long_status_is_capped(notifier: Notifier, receiver: tuple[socket.socket, str]) -> None:
    notifier.status("x" * 10_000)
    assert receiver[0].recv(65536) == b"STATUS=" + b"x" * MAX_STATUS_CHARS


def test_abstract_socket_address() -> None:
    name = f"forkserve-test-{os.getpid()}-{secrets.token_hex(4)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(2.0)
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": "@" + name}, PID)
        try:
            notifier.ready()
            assert sock.recv(4096) == b"READY=1"
        finally:
            notifier.close()


def test_without_notify_socket_every_call_is_a_no_op() -> None:
    notifier = Notifier.from_environ({}, PID)
    assert not notifier.enabled
    notifier.ready("x")
    notifier.reloading()
    notifier.stopping()
    notifier.status("x")
    notifier.watchdog()
    notifier.mainpid(1)
    assert not notifier.send("READY=1")
    assert notifier.failures == 0
    notifier.close()


@pytest.mark.parametrize("address", ["relative/notify", "vsock:2:1234", "@", ""])
def test_an_unsupported_address_is_a_logged_no_op(
        address: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="forkserve"):
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": address}, PID)
    assert not notifier.enabled
    notifier.ready()
    assert notifier.failures == 0
    assert "systemd will not be notified" in caplog.text


@pytest.mark.parametrize("unlink", [True, False], ids=["ENOENT", "ECONNREFUSED"])
def test_a_vanished_socket_never_raises_and_is_logged_once(
        tmp_path: Path, unlink: bool, caplog: pytest.LogCaptureFixture) -> None:
    path = str(tmp_path / "gone")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": path}, PID)
    if unlink:
        os.unlink(path)
    with caplog.at_level(logging.WARNING, logger="forkserve"):
        notifier.ready()
        notifier.watchdog()
        notifier.stopping()
    notifier.close()
    assert notifier.failures == 3
    assert len(caplog.records) == 1
    assert "sd_notify failed" in caplog.records[0].getMessage()


def test_a_full_queue_never_blocks(notifier: Notifier) -> None:
    # Nobody reads: the receiver's queue fills (net.unix.max_dgram_qlen) and sendto must
    # report EAGAIN at once. A blocking socket would hang here until the test timeout.
    started = time.monotonic()
    for _ in range(10_000):
        if not notifier.send("WATCHDOG=1"):
            break
    assert notifier.failures == 1
    assert time.monotonic() - started < 2.0


def test_the_variables_are_unset_after_reading() -> None:
    env = {"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "1000000",
           "WATCHDOG_PID": str(PID), "PATH": "/usr/bin"}
    Notifier.from_environ(env, PID).close()
    assert env == {"PATH": "/usr/bin"}


@pytest.mark.parametrize(("usec", "owner", "expected"), [
    ("4000000", None, 4.0),
    ("4000000", str(PID), 4.0),
    ("4000000", "1", None),        # for another process
    ("1500", None, 0.0015),
    (None, None, None),
    (None, str(PID), None),
    ("0", None, None),
    ("-5", None, None),
    ("soon", None, None),
    ("", None, None),
])
def test_watchdog_interval(usec: str | None, owner: str | None, expected: float | None) -> None:
    env = {k: v for k, v in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", owner)) if v is not None}
    notifier = Notifier.from_environ(env, PID)
    assert notifier.watchdog_interval() == expected
    assert env == {}


def test_close_in_child_silences_the_notifier(
        notifier: Notifier, receiver: tuple[socket.socket, str]) -> None:
    notifier.close_in_child()
    notifier.ready()
    notifier.watchdog()
    assert not notifier.enabled
    assert notifier.watchdog_interval() is None
    assert _nothing_waiting(receiver[0])
    notifier.close()  # idempotent


def test_heartbeat_pings_every_half_interval_on_the_loop_clock(
        receiver: tuple[socket.socket, str]) -> None:
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": receiver[1],
                                      "WATCHDOG_USEC": "2000000"}, PID)
    try:
        beat = Heartbeat(notifier, now=100.0)
        assert beat.period == 1.0
        assert beat.next_deadline() == 101.0
        beat.tick(100.9)
        assert _nothing_waiting(receiver[0])
        beat.tick(101.5)  # late: the next ping is a period from now, not a catch-up burst
        receiver[0].setblocking(True)
        assert receiver[0].recv(4096) == b"WATCHDOG=1"
        assert beat.next_deadline() == 102.5
        beat.tick(102.0)
        assert _nothing_waiting(receiver[0])
    finally:
        notifier.close()


@pytest.mark.parametrize("env", [{"NOTIFY_SOCKET": "/nonexistent/notify"},
                                 {"WATCHDOG_USEC": "2000000"}], ids=["no watchdog", "no socket"])
def test_heartbeat_is_idle_without_a_watchdog_to_ping(env: dict[str, str]) -> None:
    notifier = Notifier.from_environ(env, PID)
    beat = Heartbeat(notifier, now=0.0)
    assert beat.period is None
    assert beat.next_deadline() is None
    beat.tick(1e9)
    assert notifier.failures == 0
    notifier.close()


# --------------------------------------------------------------------------- activation, in-process


def test_variables_for_another_pid_are_ignored_and_unset() -> None:
    # libsystemd unsets them on every path; they describe fds that are not ours (module doc).
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b", "PATH": "/usr/bin"}
    assert inherited_listeners(env, PID) == []
    assert env == {"PATH": "/usr/bin"}


@pytest.mark.parametrize("env", [
    {},
    {"LISTEN_FDS": "2"},                            # no LISTEN_PID: not activated
    {"LISTEN_PID": str(PID)},                       # no LISTEN_FDS
    {"LISTEN_PID": str(PID), "LISTEN_FDS": "0"},
])
def test_nothing_passed_means_no_sockets(env: dict[str, str]) -> None:
    assert inherited_listeners(env, PID) == []
    assert env == {}


@pytest.mark.parametrize(("env", "setting"), [
    ({"LISTEN_FDS": "two"}, "LISTEN_FDS"),
    ({"LISTEN_FDS": "-1"}, "LISTEN_FDS"),
    ({"LISTEN_FDS": ""}, "LISTEN_FDS"),
    ({"LISTEN_FDS": "\u0663"}, "LISTEN_FDS"),        # ARABIC-INDIC DIGIT THREE: isdigit()
    ({"LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b:c"}, "LISTEN_FDNAMES"),
    ({"LISTEN_FDS": "2", "LISTEN_FDNAMES": "web"}, "LISTEN_FDNAMES"),
    ({"LISTEN_PID": "self", "LISTEN_FDS": "1"}, "LISTEN_PID"),
])
def test_malformed_variables_are_config_errors(env: dict[str, str], setting: str) -> None:
    # All of these fail before any fd is looked at, so fd 3 of the test process is safe.
    env = {"LISTEN_PID": str(PID), **env}
    with pytest.raises(ConfigError) as raised:
        inherited_listeners(env, PID)
    assert raised.value.setting == setting
    assert "\n" not in str(raised.value)
    assert env == {}


def test_as_listeners_never_unlinks_the_socket_file(tmp_path: Path) -> None:
    path = str(tmp_path / "systemd.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen()
    [listener] = as_listeners([InheritedSocket(sock, "web", f"unix:{path}")])
    assert listener.address == Address("unix", path=path)
    assert listener.name == f"unix:{path}"
    assert listener.unix_inode is None
    listener.close()
    assert sock.fileno() == -1
    assert os.path.exists(path)


def test_as_listeners_tcp_address() -> None:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        port = sock.getsockname()[1]
        [listener] = as_listeners([InheritedSocket(sock, None, f"127.0.0.1:{port}")])
        assert listener.address == Address("tcp", host="127.0.0.1", port=port)
        assert str(listener.address) == listener.name


# --------------------------------------------------------------------------- activation, real fds

#: Puts the fds named in argv[1] on 3, 4, ... and execs the reporter as systemd would: same
#: pid (LISTEN_PID), fds inheritable, nothing else open beyond them.
WRAPPER = """
import fcntl, os, sys
sources = [int(fd) for fd in sys.argv[1].split(",")]
parked = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in sources]
for fd in sources:
    os.close(fd)
for i, fd in enumerate(parked):
    os.dup2(fd, 3 + i)
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.executable, [sys.executable, "-c", sys.argv[2]])
"""

REPORTER = """
import fcntl, json, os
from forkserve.errors import ConfigError
from forkserve.master.systemd import as_listeners, inherited_listeners

def state(fd):
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    except OSError:
        return None
    return {"inheritable": os.get_inheritable(fd), "nonblocking": bool(flags & os.O_NONBLOCK)}

env = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
try:
    found = inherited_listeners()
except ConfigError as exc:
    report = {"error": str(exc), "setting": exc.setting, "fds": [state(3), state(4)]}
else:
    report = {"sockets": [{"name": s.name, "address": s.address, "fd": s.sock.fileno(),
                           "inheritable": s.sock.get_inheritable(),
                           "blocking": s.sock.getblocking()} for s in found]}
    listeners = as_listeners(found)
    report["listener_names"] = [listener.name for listener in listeners]
    for listener in listeners:
        listener.close()
report["env"] = {key: os.environ.get(key) for key in env}
print(json.dumps(report))
"""


def activated(fds: list[int], **env: str) -> dict[str, Any]:
    """Run the reporter with ``fds`` on 3, 4, ... and ``env``; return its JSON report."""
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("LISTEN_", "NOTIFY_SOCKET", "WATCHDOG_"))}
    proc = subprocess.run([sys.executable, "-c", WRAPPER, ",".join(map(str, fds)), REPORTER],
                          pass_fds=fds, env={**clean, **env}, capture_output=True, timeout=30,
                          check=False)
    assert proc.returncode == 0, proc.stderr.decode()
    report: dict[str, Any] = json.loads(proc.stdout)
    return report


def test_two_real_sockets_and_an_abstract_one_are_taken_over(tmp_path: Path) -> None:
    path = str(tmp_path / "app.sock")
    abstract = f"forkserve-test-{os.getpid()}-{secrets.token_hex(4)}"
    with contextlib.ExitStack() as stack:
        tcp = stack.enter_context(socket.create_server(("127.0.0.1", 0)))
        unix = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
        unix.bind(path)
        unix.listen()
        hidden = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
        hidden.bind(b"\0" + abstract.encode())
        hidden.listen()
        report = activated([tcp.fileno(), unix.fileno(), hidden.fileno()],
                           LISTEN_FDS="3", LISTEN_FDNAMES="web:admin:")
        port = tcp.getsockname()[1]
    addresses = [f"127.0.0.1:{port}", f"unix:{path}", f"unix:@{abstract}"]
    assert report["sockets"] == [
        {"name": name, "address": address, "fd": fd, "inheritable": False, "blocking": False}
        for name, address, fd in zip(["web", "admin", None], addresses, [3, 4, 5], strict=True)
    ]
    assert report["listener_names"] == addresses
    assert report["env"] == {"LISTEN_PID": None, "LISTEN_FDS": None, "LISTEN_FDNAMES": None}
    assert os.path.exists(path)  # the child closed its Listener; systemd's file stays


@contextlib.contextmanager
def _fd_of(kind: str) -> Iterator[int]:
    if kind == "pipe":
        r, w = os.pipe()
        try:
            yield r
        finally:
            os.close(r)
            os.close(w)
        return
    sock_type = socket.SOCK_DGRAM if kind == "udp" else socket.SOCK_STREAM
    with socket.socket(socket.AF_INET, sock_type) as sock:
        sock.bind(("127.0.0.1", 0))
        if kind == "listening":
            sock.listen()
        yield sock.fileno()


@pytest.mark.parametrize(("kinds", "count", "message"), [
    (["bound"], "1", "fd 3 is not listening"),
    (["udp"], "1", "fd 3 is a datagram socket"),
    (["pipe"], "1", "fd 3 is not a socket"),
    (["listening", "udp"], "2", "fd 4 is a datagram socket"),
    (["listening"], "2", "fd 4 is not open"),
])
def test_an_unusable_fd_is_a_config_error_and_changes_nothing(
        kinds: list[str], count: str, message: str) -> None:
    with contextlib.ExitStack() as stack:
        fds = [stack.enter_context(_fd_of(kind)) for kind in kinds]
        report = activated(fds, LISTEN_FDS=count)
    assert report["setting"] == "LISTEN_FDS"
    assert message in report["error"]
    assert report["error"].startswith("invalid LISTEN_FDS: ")
    # nothing was closed or altered: every passed fd is still open, inheritable and blocking
    untouched = {"inheritable": True, "nonblocking": False}
    assert report["fds"] == [untouched if i < len(kinds) else None for i in range(2)]
    assert report["env"] == {"LISTEN_PID": None, "LISTEN_FDS": None, "LISTEN_FDNAMES": None}


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None,
                    reason="systemd-socket-activate is not installed")
def test_sockets_from_systemd_socket_activate(tmp_path: Path) -> None:
    # The real thing: systemd's own tool binds, sets LISTEN_* and execs on the first client.
    path = str(tmp_path / "activated.sock")
    proc = subprocess.Popen(
        ["systemd-socket-activate", "-l", path, "--fdname=admin", sys.executable, "-c",
         REPORTER], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stderr is not None
        assert f"Listening on {path} as 3." in proc.stderr.readline().decode()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(path)  # wakes the tool up; the reporter never accepts it
            out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err.decode()
    report = json.loads(out)
    assert report["sockets"] == [{"name": "admin", "address": f"unix:{path}", "fd": 3,
                                  "inheritable": False, "blocking": False}]
    assert report["env"] == {"LISTEN_PID": None, "LISTEN_FDS": None, "LISTEN_FDNAMES": None}


def test_the_environment_for_a_new_main_process_keeps_the_watchdog() -> None:
    from forkserve.master.systemd import Notifier  # noqa: PLC0415

    env = {"NOTIFY_SOCKET": "@forkserve-test", "WATCHDOG_USEC": "30000000"}
    notifier = Notifier.from_environ(env, pid=os.getpid())
    try:
        assert notifier.environment() == {"NOTIFY_SOCKET": "@forkserve-test",
                                          "WATCHDOG_USEC": "30000000"}
    finally:
        notifier.close()
    assert Notifier(None).environment() == {}
