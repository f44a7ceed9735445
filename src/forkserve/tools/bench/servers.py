"""Servers under measurement: forkserve's own models and any command given with ``--server``.

Theory of operation
-------------------
Every server is a subprocess started in its own session (``start_new_session``), so every
process it forks can be found by session id: that is how memory is measured (PSS summed over
the session, from ``/proc/PID/smaps_rollup``) and how nothing is left behind (SIGTERM to the
process group, SIGKILL ``STOP_GRACE`` later, SIGKILL to anything left in the session, reap).
Its stdout and stderr go to a log file, never a pipe, so a server that logs every connection
can never block on us; the last line of that log is what an error message quotes.

A server is ready when its port accepts a connection (probed every ``PROBE_INTERVAL``, at
most ``START_TIMEOUT``), which works for any server; a server that exits first is reported
with its status. A server that must not be measured twice on one port is refused up front:
if something already accepts on the port, ``start`` fails.

Rejected: ``shell=True`` for ``--server`` commands (the shell would be the session leader,
and quoting would differ from what ``shlex`` shows in the error messages).
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ...errors import ForkserveError

#: forkserve's own models, in the order the bench runs them by default.
MODELS = ("fork", "prefork", "single", "hybrid")
#: A --server name: it becomes a table row and a JSON key.
NAME = re.compile(r"^[A-Za-z0-9_.+-]{1,40}$")
#: How long a server may take to accept its first connection (run.sh waits 15 s too).
START_TIMEOUT = 15.0
PROBE_INTERVAL = 0.05
#: SIGTERM, then this long before SIGKILL (run.sh: 2 s).
STOP_GRACE = 3.0
#: Bound on waiting for the session to empty after SIGKILL.
REAP_TIMEOUT = 5.0
PORT_PLACEHOLDER = "{port}"


#: /proc/net/tcp states of a connection whose local end is not closed yet: ESTABLISHED,
#: SYN_RECV (being set up), CLOSE_WAIT (the peer closed, this end has not).
_HELD = {"01", "03", "08"}


def open_connections(port: int) -> int:
    """Connections on this host whose local end is ``port`` and not closed yet (from
    /proc/net/tcp and tcp6): what a server on ``port`` still holds of its clients."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] in _HELD:
                    count += 1
    return count


class BenchUsage(ForkserveError):
    """The command line cannot work (bad --server, unknown model); exit 2."""


class BenchFailed(ForkserveError):
    """A server could not be measured (never opened its port, died); exit 1."""


@dataclass(frozen=True)
class ServerSpec:
    """A server to start: ``argv`` with ``{port}`` still in it."""

    name: str
    argv: tuple[str, ...]
    #: The forkserve model it runs (None: a --server).
    model: str | None = None

    def command(self, port: int) -> list[str]:
        return [a.replace(PORT_PLACEHOLDER, str(port)) for a in self.argv]


def model_spec(model: str) -> ServerSpec:
    """forkserve itself, serving the hello app with ``model`` (raises BenchUsage)."""
    if model not in MODELS:
        raise BenchUsage(f"unknown model {model!r} (choose from {', '.join(MODELS)})")
    return ServerSpec(model, (sys.executable, "-m", "forkserve", "serve", "--bind",
                              f"127.0.0.1:{PORT_PLACEHOLDER}", "--model", model),
                      model=model)


def parse_server(text: str) -> ServerSpec:
    """``NAME=COMMAND ... {port} ...`` (split as a shell would); raises BenchUsage."""
    name, eq, command = text.partition("=")
    name = name.strip()
    if not eq or not command.strip():
        raise BenchUsage(f"--server {text!r}: expected NAME=COMMAND with {{port}} in COMMAND")
    if not NAME.match(name):
        raise BenchUsage(f"--server {text!r}: NAME must be 1-40 of A-Z a-z 0-9 _ . + -")
    if PORT_PLACEHOLDER not in command:
        raise BenchUsage(f"--server {text!r}: COMMAND must contain {{port}} (where to listen)")
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        raise BenchUsage(f"--server {text!r}: {exc}") from None
    return ServerSpec(name, tuple(argv))


def free_port() -> int:
    """A port nobody listens on right now, on 127.0.0.1 (another program may take it later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


@dataclass
class Mem:
    """One sample of a session's memory: PSS in KiB and how many processes it had."""

    pss_kb: int
    nprocs: int


def session_pids(sid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            raw = Path(f"/proc/{entry}/stat").read_text()
            fields = raw[raw.rindex(")") + 2 :].split()
            if int(fields[3]) == sid and fields[0] != "Z":
                pids.append(int(entry))
    return pids


def session_mem(sid: int) -> Mem:
    """PSS of every live process of session ``sid`` (processes that exit meanwhile: skipped)."""
    total = 0
    pids = session_pids(sid)
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                    break
    return Mem(total, len(pids))


class RunningServer:
    """A started server; ``stop`` is idempotent and always leaves nothing behind."""

    def __init__(self, spec: ServerSpec, port: int, log_path: Path) -> None:
        self.spec = spec
        self.port = port
        self.log_path = log_path
        self.argv = spec.command(port)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start and wait until the port accepts; raises BenchFailed (the server is stopped)."""
        if accepts(self.port):
            raise BenchFailed(f"{self.spec.name}: something already accepts on port {self.port}")
        with open(self.log_path, "wb") as log:
            try:
                self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log,
                                             stderr=subprocess.STDOUT, start_new_session=True)
            except OSError as exc:
                raise BenchFailed(f"{self.spec.name}: cannot run {self.argv[0]!r}: "
                                  f"{exc.strerror}") from None
        self._wait_ready()

    def _wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                raise BenchFailed(f"{self.spec.name}: exited with status {self.proc.returncode} "
                                  f"before accepting on 127.0.0.1:{self.port}{self.last_log()}")
            if accepts(self.port):
                return
            time.sleep(PROBE_INTERVAL)
        self.stop()
        raise BenchFailed(f"{self.spec.name}: port {self.port} did not accept within "
                          f"{START_TIMEOUT:g} s ({shlex.join(self.argv)}){self.last_log()}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def died(self) -> BenchFailed:
        """The error to raise when the server was found dead during a scenario."""
        status = self.proc.poll() if self.proc is not None else None
        return BenchFailed(f"{self.spec.name}: the server died (status {status}) during the "
                           f"run{self.last_log()}")

    def nprocs(self) -> int:
        return len(session_pids(self.proc.pid)) if self.proc is not None else 0

    def mem(self) -> Mem:
        return session_mem(self.proc.pid) if self.proc is not None else Mem(0, 0)

    def last_log(self) -> str:
        with contextlib.suppress(OSError):
            lines = self.log_path.read_bytes().decode(errors="replace").strip().splitlines()
            if lines:
                return f"; its last output: {lines[-1][:200]}"
        return ""

    def stop(self) -> None:
        """SIGTERM the group, SIGKILL after STOP_GRACE, SIGKILL the session's rest, reap."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(STOP_GRACE)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + REAP_TIMEOUT
        while (left := session_pids(proc.pid)) and time.monotonic() < deadline:
            for pid in left:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(PROBE_INTERVAL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(REAP_TIMEOUT)
