"""bare_fork.py - the least a Python fork-per-connection server can do: one process accepts,
forks a child per connection that answers ``Hello from server!`` per line and ``_exit``s, and
reaps its children when SIGCHLD wakes its loop (``signal.set_wakeup_fd``); ``gc.freeze()``
before every fork. No timeouts, no limits, no stop. A calibration anchor for the fork model's
hot path (issue 16), not a server.

    python scripts/bare_fork.py PORT        (stop: kill -TERM -PGID)
"""

import gc
import os
import select
import signal
import socket
import sys

REPLY = b"Hello from server!\n"


def serve(conn: socket.socket) -> None:
    """The child: answer each line, then exit without returning into the loop."""
    try:
        pending = b""
        while data := conn.recv(65536):
            pending += data
            lines = pending.count(b"\n")
            pending = pending[pending.rfind(b"\n") + 1:]
            if lines:
                conn.sendall(REPLY * lines)
    finally:
        os._exit(0)


def main() -> None:
    port = int(sys.argv[1])
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(1024)
    listener.setblocking(False)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    poller = select.epoll()
    poller.register(listener.fileno(), select.EPOLLIN)
    poller.register(wake_r, select.EPOLLIN)
    lfd = listener.fileno()
    gc.freeze()
    while True:
        for fd, _ in poller.poll():
            if fd == lfd:
                for _ in range(32):
                    try:
                        conn, _ = listener.accept()
                    except BlockingIOError:
                        break
                    if os.fork() == 0:
                        poller.close()
                        listener.close()
                        signal.set_wakeup_fd(-1)
                        conn.setblocking(True)
                        serve(conn)
                    conn.close()
                    gc.freeze()
            else:
                while True:
                    try:
                        os.read(wake_r, 4096)
                    except BlockingIOError:
                        break
                while True:
                    try:
                        pid, _ = os.waitpid(-1, os.WNOHANG)
                    except ChildProcessError:
                        break
                    if pid == 0:
                        break


if __name__ == "__main__":
    main()
