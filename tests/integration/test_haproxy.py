"""HAProxy in front of two forkserve instances: a rolling restart under load loses nothing, and
the handlers see the real client (PROXY v2).

This is the procedure of docs/deploy/haproxy.md, run on loopback with Debian's ``haproxy``
(scripts/ci-system-packages.sh installs it; the test is skipped where it is missing):

- instances A on 127.0.0.2 and B on 127.0.0.3, ``--proxy-protocol --trusted-proxy 127.0.0.1``;
- HAProxy on 127.0.0.1 connects to them from 127.0.0.1 (``source``), sends PROXY v2, checks each
  one every 200 ms with a LOCAL header (``fall 1 rise 1``), and retries a refused connection on
  the other instance (``retries 3``, ``option redispatch 1``);
- the clients connect from 127.0.0.9, so an answer that names 127.0.0.9 and the client's own
  port can only come from the PROXY header: the socket's peer is HAProxy (127.0.0.1).

While four client threads keep connecting, each instance in turn is drained on HAProxy's runtime
API (``set server forkserve/a state drain``), stopped gracefully (SIGTERM, exit 0) once its accept
queue is empty and while a one-second request is in flight on it (which must be answered),
started again on the same address and port, and put back (``state ready``); the next one goes
only when HAProxy's check says UP and the new instance has served. The clients must see 0
failures, and every generation of both instances must have served.

The same roll with SIGTERM alone (no drain) must lose nothing too. When this test was written,
most such runs lost 1 to 3 connections over their two stops, at ~300 connections a second in
all, logged ``SD`` with 0 bytes by HAProxy and never seen by forkserve: they were in the
kernel's accept queue when the listener closed, and HAProxy retries connections that fail to
open, never open ones that are then reset. A stop now serves what is queued and refuses new
clients before it closes (a SYN filter, README "Signals"): a connection HAProxy opens during
the stop fails to open and is retried on the other instance. (At this rate the race is rare
now even without the filter: 0 lost in 3 runs with it disabled. tests/integration/
test_stop_refuses.py pins the filter itself.)

Worst case about 10 s; every wait is bounded, and every process (HAProxy, each forkserve
session) is reaped and checked gone on the way out.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import pytest

from tests.integration.harness import (
    ClientThreads,
    Server,
    accept_queue,
    recv_all,
    session_procs,
    wait_until,
)

Factory = Callable[..., Server]

#: Debian installs it in /usr/sbin, which a non-root PATH may lack.
HAPROXY = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")
pytestmark = [
    pytest.mark.skipif(HAPROXY is None, reason="haproxy is not on PATH (Debian package "
                       "'haproxy'; scripts/ci-system-packages.sh installs it)"),
    pytest.mark.timeout(30),
]

PROXY_HOST = "127.0.0.1"  # HAProxy's frontend, and the source of its connections to forkserve
CLIENT_HOST = "127.0.0.9"  # the clients' source: not HAProxy's, so a match proves the header
INSTANCES = {"a": "127.0.0.2", "b": "127.0.0.3"}
#: Client threads, each doing connect, one line, the answer, close: ~300 connections a second.
CLIENTS = 4
#: The load stops by itself after this long ...
LOAD_SECONDS = 25.0
#: ... or after this many connections per thread, whatever the test does.
LOAD_MAX_PER_CLIENT = 20_000
#: A client's whole exchange; far above the milliseconds it takes, even when HAProxy retries.
CLIENT_TIMEOUT = 5.0
#: HAProxy's check period: a stopped instance is DOWN, a started one UP, within about this long.
CHECK_INTER_MS = 200
#: Bound of every wait on HAProxy: start, a state change seen by its checks, a drain, a stop.
HAPROXY_WAIT = 10.0
#: Each generation serves this many clients before the next step: the load is real at every
#: stop (a run does about 1,400 connections in 5 s here).
PHASE_ANSWERS = 100
#: A slow request lands on the instance about to stop in 1 try of 2 (round robin): bound.
SLOW_TRIES = 20

#: How long the handler takes over a ``slow`` request: the stop of its instance begins meanwhile.
SLOW_SECONDS = 1.0

HANDLER = f"""\
import os
import time

INSTANCE = os.environ["FS_INSTANCE"]


def handle(conn):
    for line in conn.lines():
        if line == b"slow\\n":
            conn.write(f"{{INSTANCE}} started\\n".encode())
            time.sleep({SLOW_SECONDS})
        conn.write(f"{{INSTANCE}} {{conn.peer}}\\n".encode())
"""

HAPROXY_CFG = """\
global
    # The runtime API: `show stat` for the servers' states, `set server` to drain.
    stats socket {api} mode 600 level admin

defaults
    mode tcp
    # One line per connection on standard output (a file of the test); nothing to syslog.
    log stdout format raw daemon
    option tcplog
    timeout connect 1s
    timeout client 10s
    timeout server 10s
    # A connection that an instance refuses (stopped, not yet seen DOWN by the check) is tried
    # again up to 3 times, each time on the other instance.
    retries 3
    option redispatch 1

frontend front
    bind {front}
    default_backend forkserve

backend forkserve
    balance roundrobin
    # HAProxy's address toward the instances: the one they trust (--trusted-proxy).
    source {source}
    # send-proxy-v2: each connection starts with a PROXY v2 header naming the client.
    # check-send-proxy: so does each health check (a LOCAL header: forkserve reads a header on
    # every connection). A refused check takes the instance out, one good check puts it back.
    default-server send-proxy-v2 check check-send-proxy inter {inter}ms fall 1 rise 1
{servers}
"""


#: A port picked free is released before its user binds it: another process may take it first.
PORT_TRIES = 5


def free_port(host: str) -> int:
    """A port free on ``host`` now; forkserve binds it with SO_REUSEADDR, so the TIME_WAIT
    connections of a stopped instance do not stop its successor from binding it again."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------ HAProxy


@dataclass
class Haproxy:
    proc: subprocess.Popen[bytes]
    api_path: Path
    log_path: Path
    front_port: int

    def api(self, command: str) -> str:
        """One command on the runtime API (HAProxy answers, then closes)."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(HAPROXY_WAIT)
            s.connect(str(self.api_path))
            s.sendall(command.encode() + b"\n")
            return recv_all(s).decode()

    def servers(self) -> dict[str, dict[str, str]]:
        """``show stat`` rows of the backend's servers by name (``status``, ``scur`` ...)."""
        lines = self.api("show stat").splitlines()
        header = lines[0].lstrip("# ").split(",")
        rows = [dict(zip(header, line.split(","), strict=False)) for line in lines[1:] if line]
        return {r["svname"]: r for r in rows
                if r["pxname"] == "forkserve" and r["svname"] not in ("FRONTEND", "BACKEND")}

    def status(self, name: str) -> str:
        return self.servers()[name]["status"]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def api_answers(api_path: Path) -> bool:
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
        s.connect(str(api_path))
        return True
    return False


@contextlib.contextmanager
def haproxy(tmp_path: Path, ports: dict[str, int]) -> Iterator[Haproxy]:
    """HAProxy in the foreground (``-db``) and its own session, ready once its runtime API
    answers; on the way out soft-stopped (SIGUSR1), killed if it lingers, reaped, checked gone."""
    assert HAPROXY is not None
    api_path, log_path, cfg = (tmp_path / n for n in ("haproxy.sock", "haproxy.log",
                                                      "haproxy.cfg"))
    servers = "\n".join(f"    server {name} {INSTANCES[name]}:{port}"
                        for name, port in ports.items())
    for _ in range(PORT_TRIES):  # the front port is released before HAProxy binds it
        front_port = free_port(PROXY_HOST)
        cfg.write_text(HAPROXY_CFG.format(api=api_path, front=f"{PROXY_HOST}:{front_port}",
                                          source=PROXY_HOST, inter=CHECK_INTER_MS,
                                          servers=servers))
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([HAPROXY, "-db", "-f", str(cfg)], stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(lambda p=proc: p.poll() is not None or api_answers(api_path), HAPROXY_WAIT)
        if proc.poll() is None or "Address already in use" not in log_path.read_text():
            break
    try:
        assert proc.poll() is None, log_path.read_text()
        assert api_answers(api_path), log_path.read_text()
        yield Haproxy(proc, api_path, log_path, front_port)
    finally:
        stop_haproxy(proc)


def stop_haproxy(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGUSR1)  # soft stop: close the frontend, finish what runs
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(HAPROXY_WAIT)
    if proc.poll() is None or session_procs(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(HAPROXY_WAIT)
    assert proc.returncode == 0, f"haproxy exited {proc.returncode}"
    assert not session_procs(proc.pid), "haproxy left processes behind"


# ------------------------------------------------------------------ clients


@dataclass
class Answer:
    instance: str  # the generation that served it: "a1", "a2", "b1", "b2"
    peer: str  # conn.peer, as the handler saw it
    client: str  # the client socket's own address


@dataclass
class Failure:
    client: str  # the client socket's own address ("" if it never connected)
    error: str


class ProxiedLoad(ClientThreads):
    """Client threads doing connect, one line, the whole answer, close, through HAProxy, until
    stopped (or LOAD_SECONDS, or LOAD_MAX_PER_CLIENT each); every failure is kept."""

    def __init__(self, front: tuple[str, int]) -> None:
        self.front = front
        self.answers: list[Answer] = []
        self.failures: list[Failure] = []
        super().__init__(CLIENTS, join_timeout=CLIENT_TIMEOUT * 2)

    def served(self) -> Counter[str]:
        with self._lock:
            return Counter(a.instance for a in self.answers)

    def _run(self) -> None:
        deadline = time.monotonic() + LOAD_SECONDS
        for _ in range(LOAD_MAX_PER_CLIENT):
            if self._stop.is_set() or time.monotonic() > deadline:
                return
            self._one()

    def _one(self) -> None:
        client = ""
        try:
            with socket.create_connection(self.front, timeout=CLIENT_TIMEOUT,
                                          source_address=(CLIENT_HOST, 0)) as s:
                client = "{}:{}".format(*s.getsockname())
                s.sendall(b"ping\n")
                s.shutdown(socket.SHUT_WR)
                raw = recv_all(s)
            instance, _, peer = raw.decode().removesuffix("\n").partition(" ")
            if not raw.endswith(b"\n") or raw.count(b"\n") != 1 or not peer:
                raise ValueError(f"bad answer {raw!r}")
        except (OSError, ValueError) as exc:
            with self._lock:
                self.failures.append(Failure(client, repr(exc)))
            return
        with self._lock:
            self.answers.append(Answer(instance, peer, client))


# ------------------------------------------------------------------ forkserve instances


@dataclass
class Fleet:
    """The forkserve instances behind HAProxy, each name on its fixed address and port, one
    generation after another; each generation writes its own access log."""

    factory: Factory
    tmp_path: Path
    ports: dict[str, int]
    generation: Counter[str] = field(default_factory=Counter)
    current: dict[str, Server] = field(default_factory=dict)

    def start(self, name: str) -> str:
        self.generation[name] += 1
        label = f"{name}{self.generation[name]}"
        for _ in range(PORT_TRIES if self.generation[name] == 1 else 1):
            try:
                self.current[name] = self.factory(
                    "who:handle", "--chdir", str(self.tmp_path), "--model", "fork",
                    "--proxy-protocol", "--trusted-proxy", PROXY_HOST,
                    "--access-log", str(self.access_log(label)),
                    bind=[f"{INSTANCES[name]}:{self.ports[name]}"], env={"FS_INSTANCE": label})
                return label
            except AssertionError as exc:  # the port picked free was taken before the bind
                if "address already in use" not in str(exc):  # (a later generation keeps it)
                    raise
                self.ports[name] = free_port(INSTANCES[name])
        raise AssertionError(f"no free port for instance {name} in {PORT_TRIES} tries")

    def access_log(self, label: str) -> Path:
        return self.tmp_path / f"access-{label}.log"

    def access_logs(self) -> str:
        return "".join(p.read_text() for p in sorted(self.tmp_path.glob("access-*.log")))


@dataclass
class SlowRequest:
    """A ``slow`` request through HAProxy that has reached instance ``name``'s handler and is
    not answered yet (the handler said ``started``)."""

    sock: socket.socket
    reader: BinaryIO
    client: str
    instance: str

    @classmethod
    def open(cls, front: tuple[str, int], name: str) -> SlowRequest:
        for _ in range(SLOW_TRIES):
            sock = socket.create_connection(front, timeout=CLIENT_TIMEOUT,
                                            source_address=(CLIENT_HOST, 0))
            sock.sendall(b"slow\n")
            sock.shutdown(socket.SHUT_WR)
            reader = sock.makefile("rb")
            instance, _, word = reader.readline().decode().partition(" ")
            assert word == "started\n", word
            if instance.startswith(name):
                return cls(sock, reader, "{}:{}".format(*sock.getsockname()), instance)
            reader.close()  # on the other instance: that client leaves (quietly, for forkserve)
            sock.close()
        raise AssertionError(f"no slow request reached {name} in {SLOW_TRIES} tries")

    def finish(self) -> str:
        """The rest of the answer, up to the server's close."""
        with self.sock, self.reader:
            return self.reader.read().decode()


def roll(fleet: Fleet, proxy: Haproxy, load: ProxiedLoad, name: str, *,
         drain: bool = True) -> None:
    """docs/deploy/haproxy.md, "Rolling restart", for instance ``name``, with a request in
    flight on it: drain (unless not ``drain``), stop gracefully, start again, put back;
    return once HAProxy says UP and the new generation has served PHASE_ANSWERS clients."""
    address = (INSTANCES[name], fleet.ports[name])
    old = fleet.current[name]
    slow = SlowRequest.open((PROXY_HOST, proxy.front_port), name)
    if drain:
        proxy.api(f"set server forkserve/{name} state drain")  # no new connection goes there
        # What HAProxy connected before the drain is accepted before the stop.
        assert wait_until(lambda: accept_queue(*address) == 0, HAPROXY_WAIT)
    old.signal(signal.SIGTERM)  # what `forkserve signal stop --pid-file ...` sends
    assert slow.finish() == f"{slow.instance} {slow.client}\n", "in flight, so answered"
    assert old.wait(HAPROXY_WAIT) == 0, old.log_tail()
    assert wait_until(lambda: proxy.status(name).startswith("DOWN"), HAPROXY_WAIT)
    label = fleet.start(name)
    proxy.api(f"set server forkserve/{name} state ready")
    assert wait_until(lambda: proxy.status(name) == "UP", HAPROXY_WAIT), proxy.servers()[name]
    assert wait_until(lambda: load.served()[label] >= PHASE_ANSWERS, HAPROXY_WAIT), \
        load.served()


def explain(failures: list[Failure], proxy: Haproxy, fleet: Fleet) -> str:
    """Each failure with what HAProxy and forkserve logged for that client (a client absent
    from every access log never reached a handler)."""
    logs = proxy.log().splitlines() + fleet.access_logs().splitlines()
    return "\n".join(f"{f.client or '(no connection)'}: {f.error}\n    "
                     + "\n    ".join(line for line in logs if f.client and f.client in line)
                     for f in failures[:10])


@pytest.mark.parametrize("drain", [True, False], ids=["drained", "sigterm-alone"])
def test_rolling_restart_behind_haproxy_loses_nothing(server_factory: Factory,
                                                      tmp_path: Path, drain: bool) -> None:
    (tmp_path / "who.py").write_text(HANDLER)
    fleet = Fleet(server_factory, tmp_path, {n: free_port(h) for n, h in INSTANCES.items()})
    for name in INSTANCES:
        fleet.start(name)
    with haproxy(tmp_path, fleet.ports) as proxy:
        assert wait_until(lambda: all(proxy.status(n) == "UP" for n in INSTANCES),
                          HAPROXY_WAIT), proxy.log()
        with ProxiedLoad((PROXY_HOST, proxy.front_port)) as load:
            assert wait_until(lambda: min(load.served()[g] for g in ("a1", "b1"))
                              >= PHASE_ANSWERS, HAPROXY_WAIT), load.served()
            for name in INSTANCES:
                roll(fleet, proxy, load, name, drain=drain)
        assert load.failures == [], explain(load.failures, proxy, fleet)
    assert set(load.served()) == {"a1", "a2", "b1", "b2"}, load.served()
    # The real client reached every handler: the clients' address, not HAProxy's, and each
    # client's own port.
    wrong = [a for a in load.answers if a.peer != a.client]
    assert wrong == [], wrong[:5]
    assert all(a.client.startswith(f"{CLIENT_HOST}:") for a in load.answers)
    # HAProxy's checks (a LOCAL header, no request) kept the socket's peer: HAProxy itself.
    assert f" {PROXY_HOST}:" in fleet.access_logs()  # (after the time the line starts with)
