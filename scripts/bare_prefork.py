"""bare_prefork.py - the least a Python pre-fork server can do: N processes blocked in
accept() on one socket, each answering ``Hello from server!`` per line, no timeouts, no
limits, no stop. A calibration anchor for the prefork model's hot path, not a server.

    python scripts/bare_prefork.py PORT [WORKERS]     (default 4 workers; stop: kill -TERM -PGID)
"""

import os
import signal
import socket
import sys

port = int(sys.argv[1])
workers = int(sys.argv[2]) if len(sys.argv) > 2 else 4
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", port))
listener.listen(1024)
for _ in range(workers):
    if os.fork() == 0:
        while True:
            conn, _ = listener.accept()
            pending = b""
            while data := conn.recv(65536):
                pending += data
                lines = pending.count(b"\n")
                pending = pending[pending.rfind(b"\n") + 1:]
                if lines:
                    conn.sendall(b"Hello from server!\n" * lines)
            conn.close()
signal.pause()
