"""``forkserve bench`` and ``forkserve demo`` as a user runs them: short, bounded, on loopback.

Every run gets a marker in its environment; afterwards no process carrying it may be left
(servers run in their own sessions, so the test's own session does not cover them).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from forkserve.tools.bench import runner
from forkserve.tools.bench.servers import open_connections

from .harness import wait_until

MARK = "FORKSERVE_BENCH_TEST_MARK"
ROW = re.compile(r"^(\S+)\s+(persist_c10|connect_c10)\s+([\d,]+)\s+(\S+)\s+(\S+)\s+(\S+)"
                 r"\s+(\d+)\s+(\d+)\s")
DEMO_ROW = re.compile(r"^(single|fork|prefork|hybrid)\s+done\s+(\d+)\s+(\S+)\s+(\S+)\s")
FIELDS = {"server", "scenario", "mode", "conns", "slow", "ok", "rps", "p50_us", "p99_us",
          "p999_us", "errors", "timeouts", "mem", "mem_per_conn_kb", "client_cpu",
          "client_bound", "server_alive_after", "mem_idle", "cmd"}

HELLO_SERVER = """\
import socket, sys, threading
def serve(conn):
    with conn, conn.makefile("rb") as lines:
        for _ in lines:
            conn.sendall(b"Hello from server!\\n")
with socket.create_server(("127.0.0.1", int(sys.argv[1]))) as s:
    while True:
        threading.Thread(target=serve, args=(s.accept()[0],), daemon=True).start()
"""


def marked_pids(mark: str) -> list[int]:
    """Live processes whose environment carries ``mark`` (what a run may have left behind)."""
    found = []
    needle = f"{MARK}={mark}".encode()
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                if needle in Path(f"/proc/{entry}/environ").read_bytes():
                    stat = Path(f"/proc/{entry}/stat").read_text()
                    if stat[stat.rindex(")") + 2] != "Z":
                        found.append(int(entry))
            except OSError:
                continue
    return found


def run(args: list[str], timeout: float) -> tuple[subprocess.CompletedProcess[str], str]:
    mark = uuid.uuid4().hex
    proc = subprocess.run([sys.executable, "-m", "forkserve", *args], capture_output=True,
                          text=True, timeout=timeout, check=False, start_new_session=True,
                          env={**os.environ, MARK: mark})
    return proc, mark


def assert_nothing_left(mark: str) -> None:
    assert wait_until(lambda: not marked_pids(mark), 5.0), marked_pids(mark)


@pytest.mark.timeout(90)
def test_bench_two_models_two_scenarios(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    proc, mark = run(["bench", "--models", "fork,prefork", "--scenarios",
                      "persist_c10,connect_c10", "--duration", "1", "--json", str(out)], 60)
    assert proc.returncode == 0, proc.stderr
    rows = [m.groups() for line in proc.stdout.splitlines() if (m := ROW.match(line))]
    assert {(r[0], r[1]) for r in rows} == {(m, s) for m in ("fork", "prefork")
                                            for s in ("persist_c10", "connect_c10")}
    assert all(int(r[2].replace(",", "")) > 0 for r in rows), proc.stdout
    data = json.loads(out.read_text())
    assert data["duration_s"] == 1.0
    assert data["client_processes"] == 2
    assert len(data["results"]) == 4
    for r in data["results"]:
        assert set(r) >= FIELDS
        assert r["ok"] > 0
        assert r["server_alive_after"]
        assert (r["mem_per_conn_kb"] is None) == (r["mode"] == "connect")
    assert_nothing_left(mark)


@pytest.mark.timeout(60)
def test_bench_own_server(tmp_path: Path) -> None:
    script = tmp_path / "hello_server.py"
    script.write_text(HELLO_SERVER)
    proc, mark = run(["bench", "--models", "", "--server",
                      f"seed={sys.executable} {script} {{port}}", "--scenarios",
                      "persist_c10", "--duration", "1"], 45)
    assert proc.returncode == 0, proc.stderr
    rows = [m.groups() for line in proc.stdout.splitlines() if (m := ROW.match(line))]
    assert [r[:2] for r in rows] == [("seed", "persist_c10")]
    assert int(rows[0][2].replace(",", "")) > 0
    assert_nothing_left(mark)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("spec", "says"), [
    ("seed", "expected NAME=COMMAND"),
    ("seed=python3 -m http.server", "must contain {port}"),
    ("=python3 x.py {port}", "NAME must be"),
    ("s='unclosed {port}", "No closing quotation"),
])
def test_bench_bad_server_spec(spec: str, says: str) -> None:
    proc, _ = run(["bench", "--models", "", "--server", spec], 20)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert says in lines[0]


@pytest.mark.timeout(30)
def test_bench_unknown_model_and_dead_server() -> None:
    proc, _ = run(["bench", "--models", "fork,threads"], 20)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "forkserve: bench: unknown model 'threads' (choose from fork, prefork, single, hybrid)"]
    proc, mark = run(["bench", "--models", "", "--server", "dead=false {port}",
                      "--scenarios", "persist_c1", "--duration", "1"], 25)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("forkserve:")]
    assert len(errors) == 1
    assert "dead: exited with status 1 before accepting" in errors[0]
    assert "Traceback" not in proc.stderr
    assert_nothing_left(mark)


@pytest.mark.timeout(45)
def test_demo_shows_the_queue_form_and_vanish() -> None:
    proc, mark = run(["demo", "--duration", "1"], 40)
    assert proc.returncode == 0, proc.stderr
    rows = {m.group(1): m.groups()[1:] for line in proc.stdout.splitlines()
            if (m := DEMO_ROW.match(line))}
    assert set(rows) == {"single", "fork", "prefork", "hybrid"}, proc.stdout
    answered = {model: int(r[0]) for model, r in rows.items()}
    # The slow client holds single's only connection for the whole window: at most the ten
    # queued requests are answered once it leaves, after waiting about the whole window.
    assert answered["single"] <= 10
    assert answered["fork"] > 5 * max(answered["single"], 1)
    assert answered["prefork"] > 5 * max(answered["single"], 1)
    assert answered["hybrid"] > 5 * max(answered["single"], 1)
    if answered["single"]:
        assert float(rows["single"][2]) > 500.0  # p99 in ms: waited for the slow client
    assert len(proc.stdout.strip().splitlines()[-3:]) == 3
    assert proc.stdout.strip().splitlines()[-4].startswith("single:")
    assert_nothing_left(mark)


@pytest.mark.timeout(10)
def test_open_connections_counts_what_the_server_still_holds() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        assert open_connections(port) == 0, "a listening socket holds no connection"
        with socket.create_connection(("127.0.0.1", port)):
            assert wait_until(lambda: open_connections(port) == 1, 2.0), "queued, not accepted"
            server_end, _ = listener.accept()
        assert open_connections(port) == 1, "the client left; the server's end is open"
        server_end.close()
        assert wait_until(lambda: open_connections(port) == 0, 2.0)


class SteadyServer:
    """What ``settle`` looks at: a live server whose process count stays above idle (a pool
    that grew for the load)."""

    def __init__(self, port: int) -> None:
        self.port = port

    def alive(self) -> bool:
        return True

    def nprocs(self) -> int:
        return 5


@pytest.mark.timeout(20)
def test_settle_waits_for_the_last_connection_not_for_a_grown_pool_to_shrink(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "SETTLE_TIMEOUT", 1.5)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        server = SteadyServer(listener.getsockname()[1])
        start = time.monotonic()
        runner.settle(server, idle_procs=3)  # type: ignore[arg-type]
        assert time.monotonic() - start < 1.5, "steady, nothing held: settled"
        with socket.create_connection(("127.0.0.1", server.port)):
            server_end, _ = listener.accept()
            with server_end:
                start = time.monotonic()
                runner.settle(server, idle_procs=3)  # type: ignore[arg-type]
                assert time.monotonic() - start >= 1.5, "a connection still held: not settled"
