"""Slowloris on loopback, against a forkserve with its defaults (issue 12): what a well-behaved
client sees, and what the server's memory becomes.

    .venv/bin/python scripts/attack.py MODEL SOURCES PER_SOURCE [SRC_DIR] [-- SERVE_FLAGS...]

MODEL fork or prefork; SOURCES the attacker's addresses (127.0.0.2 up to 127.0.0.(1+SOURCES));
PER_SOURCE silent connections each (``TRICKLE=1`` in the environment: one byte a second each).
Prints the well-behaved client's answer times (from 127.0.0.200, every 0.2 s for 4 s) and the
server's PSS (all its processes). SRC_DIR: another checkout's ``src``, to compare. Loopback
only; everything is closed and the server stopped before the script ends.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path


def pss_mb(sid: int) -> float:
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = Path(f"/proc/{entry}/stat").read_text()
            if int(stat[stat.rindex(")") + 2:].split()[3]) != sid:
                continue
            for line in Path(f"/proc/{entry}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
    return total / 1024


def answer_time(port: int) -> float:
    began = time.monotonic()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10,
                                      source_address=("127.0.0.200", 0)) as s:
            s.sendall(b"hi\n")
            if not s.recv(100):
                return float("inf")
    except OSError:
        return float("inf")
    return time.monotonic() - began


def main() -> None:
    args = sys.argv[1:]
    flags = args[args.index("--") + 1:] if "--" in args else []
    args = args[:args.index("--")] if "--" in args else args
    model, sources, per_source = args[0], int(args[1]), int(args[2])
    env = dict(os.environ)
    if len(args) > 3:
        env["PYTHONPATH"] = args[3]
    server = subprocess.Popen(
        [sys.executable, "-m", "forkserve", "serve", "--bind", "127.0.0.1:0", "--model", model,
         *flags], stderr=subprocess.PIPE, env=env,
        start_new_session=True)
    socks: list[socket.socket] = []
    done = threading.Event()
    try:
        assert server.stderr is not None
        ready = re.search(r":(\d+) ", server.stderr.readline().decode())
        assert ready is not None, "no ready line"
        port = int(ready.group(1))
        threading.Thread(target=server.stderr.read, daemon=True).start()  # (never a full pipe)
        time.sleep(0.5)
        for n in range(sources):
            for _ in range(per_source):
                s = socket.socket()
                s.bind((f"127.0.0.{2 + n}", 0))
                s.settimeout(10)
                with contextlib.suppress(OSError):
                    s.connect(("127.0.0.1", port))
                socks.append(s)
        if os.environ.get("TRICKLE"):
            def trickle() -> None:
                while not done.wait(1.0):
                    for s in socks:
                        with contextlib.suppress(OSError):
                            s.send(b"x")
            threading.Thread(target=trickle, daemon=True).start()
        time.sleep(1.0)
        times = []
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            times.append(answer_time(port))
            time.sleep(0.2)
        print(f"{model} {sources}x{per_source}: answers in max {max(times):.3f} s, median "
              f"{sorted(times)[len(times) // 2]:.3f} s ({len(times)} tries); server PSS "
              f"{pss_mb(server.pid):.0f} MB")
    finally:
        done.set()
        for s in socks:
            s.close()
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(30)


if __name__ == "__main__":
    main()
