"""How long silent clients hold a prefork pool (issue 11, item 4).

Starts ``forkserve serve --model prefork --workers 4 --idle-timeout 2``, connects 8 clients
that say nothing, then a ninth that sends one line, and prints how long the ninth waited for
its answer: each silent client holds its worker for the idle timeout (and, before issue 11,
for a 2 s linger on top). Loopback only; the server is stopped before the script ends.

    .venv/bin/python scripts/silent_clients.py [SRC_DIR]    (SRC_DIR: another checkout's src)
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time


def main() -> None:
    env = dict(os.environ)
    if len(sys.argv) > 1:
        env["PYTHONPATH"] = sys.argv[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "forkserve", "serve", "--bind", "127.0.0.1:0", "--model",
         "prefork", "--workers", "4", "--idle-timeout", "2"],
        stderr=subprocess.PIPE, env=env, start_new_session=True)
    try:
        assert server.stderr is not None
        ready = re.search(r"listening on 127\.0\.0\.1:(\d+) ", server.stderr.readline().decode())
        assert ready is not None, "no ready line"
        port = int(ready.group(1))
        time.sleep(0.5)  # the workers are up
        silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(8)]
        time.sleep(0.1)
        began = time.monotonic()
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(b"hi\n")
            s.recv(100)
        print(f"the ninth client got its answer after {time.monotonic() - began:.2f} s")
        for s in silent:
            s.close()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)


if __name__ == "__main__":
    main()
