"""zygote_burst.py - issue 16's target 5: a server's idle CPU (master and zygote), then a
burst of connections while it is at ``max_children``: are they all absorbed by the backlog
and served once room comes back, none refused?

    .venv/bin/python scripts/zygote_burst.py PORT BURST CMD [ARG...]   (PORT in ARGs replaced)

Holds ``--max-children`` worth of connections open (it reads the number from the command
line, default 10), measures the CPU of the server's processes over 5 idle seconds, opens
BURST more connections at once (each sends one line), then closes the held ones and counts
the burst's answers within 60 s.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

TICKS = os.sysconf("SC_CLK_TCK")
HELLO = b"Hello from server!\n"


def cpu(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICKS


def tree(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as fh:
        return [pid] + [int(p) for p in fh.read().split()]


def main() -> int:
    port, burst = sys.argv[1], int(sys.argv[2])
    cmd = [arg.replace("PORT", port) for arg in sys.argv[3:]]
    held_n = int(cmd[cmd.index("--max-children") + 1]) if "--max-children" in cmd else 10
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    addr = ("127.0.0.1", int(port))
    try:
        for _ in range(200):
            try:
                socket.create_connection(addr, timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        time.sleep(1.5)
        idle = tree(server.pid)
        before = [cpu(p) for p in idle]
        time.sleep(5)
        used = [cpu(p) - b for p, b in zip(idle, before, strict=True)]
        print(f"idle 5 s: CPU seconds by process (master first): {used}")
        held = []
        for _ in range(held_n):
            s = socket.create_connection(addr, timeout=10)
            s.sendall(b"hold\n")
            assert s.recv(100) == HELLO
            held.append(s)
        waiting = []
        for _ in range(burst):
            s = socket.socket()
            s.settimeout(60)
            s.connect(addr)  # completes in the kernel backlog: nobody accepts now
            s.sendall(b"queued\n")
            waiting.append(s)
        time.sleep(0.5)
        for s in held:
            s.close()
        answered = refused = 0
        deadline = time.monotonic() + 60
        for s in waiting:
            s.settimeout(max(deadline - time.monotonic(), 0.1))
            try:
                if s.recv(100) == HELLO:
                    answered += 1
                else:
                    refused += 1
            except OSError:
                refused += 1
            s.close()
        print(f"burst of {burst} at max_children {held_n}: {answered} answered, "
              f"{refused} refused or reset")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
