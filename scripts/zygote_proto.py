"""zygote_proto.py - the four shapes of issue 16's zygote, small enough to measure side by side.

A master binds the listener and starts a zygote: a fresh interpreter (``subprocess`` runs
this file again, so nothing of the master is copied), which forks the processes that serve.
Each serving child answers ``Hello from server!`` per line, serves exactly one connection and
``_exit``s; the zygote reaps them (SIGCHLD through a wakeup fd) and reports every exit to the
master (12 bytes a child: kind, pid, status) over one SOCK_SEQPACKET socketpair, as the real
zygote must. What differs:

``zaccept``  the zygote accepts on the listener itself and forks on demand (the master only
             reads the reports);
``mpass``    the master accepts, and passes each accepted socket to the zygote over the
             socketpair (``socket.send_fds``, SCM_RIGHTS, up to 32 sockets a message: one
             ``sendmsg`` per accept batch), which forks on demand;
``zspare``   the zygote keeps ``--spares`` children forked ahead of need, each blocked in
             ``accept()`` on the listener; a child that took a connection says so on a pipe,
             and the zygote forks its replacement (Apache prefork, MaxConnectionsPerChild 1);
``mspare``   the master accepts and sends each socket, one a message, on a second
             SOCK_SEQPACKET pair whose other end the spare children block on in ``recvmsg``;
             the zygote keeps ``--spares`` of them, as in ``zspare``.

At most ``--max-children`` connections are served at once (then the accepting process stops
accepting: the kernel backlog holds the rest). ``gc.freeze()`` before every fork. No timeouts,
no stop: a measuring stick (docs/benchmarks.md, "Issue 16"), not a server.

    python scripts/zygote_proto.py VARIANT PORT [--spares N] [--max-children N]
"""

from __future__ import annotations

import gc
import os
import select
import signal
import socket
import struct
import sys

REPLY = b"Hello from server!\n"
RECORD = struct.Struct("=BIi")  # kind, pid, status
STARTED, ENDED = 1, 2
BATCH = 32


def serve(conn: socket.socket) -> None:
    """A child's whole life after it has its connection: answer each line, exit."""
    try:
        conn.setblocking(True)
        pending = b""
        while data := conn.recv(65536):
            pending += data
            lines = pending.count(b"\n")
            pending = pending[pending.rfind(b"\n") + 1:]
            if lines:
                conn.sendall(REPLY * lines)
    finally:
        os._exit(0)


def drain(fd: int) -> None:
    while True:
        try:
            if not os.read(fd, 4096):
                return
        except BlockingIOError:
            return


class Zygote:
    def __init__(self, argv: list[str]) -> None:
        # (argv by hand: the zygote imports nothing it does not need, not even argparse)
        variant, spares, max_children, ctl_fd, listen_fd, handoff_fd = argv
        self.variant = variant
        self.spares = int(spares)
        self.max_children = int(max_children)
        self.ctl = socket.socket(fileno=int(ctl_fd))
        self.listener = socket.socket(fileno=int(listen_fd)) if int(listen_fd) >= 0 else None
        self.handoff = socket.socket(fileno=int(handoff_fd)) if int(handoff_fd) >= 0 else None
        self.children: set[int] = set()
        self.idle = 0  # spares forked and not yet holding a connection
        self.took_r, self.took_w = os.pipe2(os.O_NONBLOCK)
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        self.poller = select.epoll()
        self.poller.register(self.wake_r, select.EPOLLIN)
        self.poller.register(self.ctl.fileno(), select.EPOLLIN)
        self.poller.register(self.took_r, select.EPOLLIN)
        self.watching = False
        self.reports: list[bytes] = []

    def _child_setup(self) -> None:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        self.poller.close()
        self.ctl.close()
        os.close(self.wake_r)
        os.close(self.wake_w)
        os.close(self.took_r)

    def fork_for(self, conn: socket.socket) -> None:
        gc.freeze()
        pid = os.fork()
        if pid == 0:
            self._child_setup()
            if self.listener is not None:
                self.listener.close()
            serve(conn)
        conn.close()
        self.children.add(pid)

    def fork_spare(self) -> None:
        gc.freeze()
        pid = os.fork()
        if pid == 0:
            self._child_setup()
            if self.variant == "zspare":
                assert self.listener is not None
                self.listener.setblocking(True)
                conn, _ = self.listener.accept()
                self.listener.close()
            else:
                assert self.handoff is not None
                _, fds, _, _ = socket.recv_fds(self.handoff, 1, 1)
                self.handoff.close()
                conn = socket.socket(fileno=fds[0])
            os.write(self.took_w, b"a")
            os.close(self.took_w)
            serve(conn)
        self.children.add(pid)
        self.idle += 1

    def top_up(self) -> None:
        while self.idle < self.spares and len(self.children) < self.max_children:
            self.fork_spare()

    def update_watch(self) -> None:
        if self.listener is None or self.variant != "zaccept":
            return
        want = len(self.children) < self.max_children
        if want != self.watching:
            if want:
                self.poller.register(self.listener.fileno(), select.EPOLLIN)
            else:
                self.poller.unregister(self.listener.fileno())
            self.watching = want

    def reap(self) -> None:
        drain(self.wake_r)
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            self.children.discard(pid)
            self.reports.append(RECORD.pack(ENDED, pid, status))

    def on_event(self, fd: int, lfd: int) -> None:
        if fd == self.wake_r:
            self.reap()
        elif fd == self.took_r:
            self.idle -= len(os.read(self.took_r, 4096))
        elif fd == lfd:
            assert self.listener is not None
            for _ in range(BATCH):
                if len(self.children) >= self.max_children:
                    break
                try:
                    conn, _ = self.listener.accept()
                except BlockingIOError:
                    break
                self.fork_for(conn)
        elif fd == self.ctl.fileno():
            try:
                _, fds, _, _ = socket.recv_fds(self.ctl, 64, BATCH)
            except BlockingIOError:
                return
            for cfd in fds:
                self.fork_for(socket.socket(fileno=cfd))

    def run(self) -> None:
        spares = self.variant in ("zspare", "mspare")
        if self.variant == "zaccept" and self.listener is not None:
            self.listener.setblocking(False)
        if spares:
            self.top_up()
        self.update_watch()
        lfd = self.listener.fileno() if self.listener is not None else -1
        while True:
            for fd, _ in self.poller.poll():
                self.on_event(fd, lfd)
            if spares:
                self.top_up()
            self.update_watch()
            if self.reports:
                self.ctl.send(b"".join(self.reports))
                self.reports.clear()


class Master:
    """Binds, starts the zygote, and (mpass, mspare) accepts and passes the sockets."""

    def __init__(self, variant: str, port: int, spares: int, max_children: int) -> None:
        import subprocess  # noqa: PLC0415  (here, not at the top: the zygote must not import it)

        self.variant = variant
        self.max_children = max_children
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", port))
        self.listener.listen(1024)
        self.ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.handoff: socket.socket | None = None
        handoff_theirs = None
        if variant == "mspare":
            self.handoff, handoff_theirs = socket.socketpair(socket.AF_UNIX,
                                                             socket.SOCK_SEQPACKET)
        self.passes = variant in ("mpass", "mspare")
        fds = [theirs.fileno()]
        if not self.passes:
            fds.append(self.listener.fileno())
        if handoff_theirs is not None:
            fds.append(handoff_theirs.fileno())
        argv = [sys.executable, os.path.abspath(__file__), "--zygote", variant, str(spares),
                str(max_children), str(theirs.fileno()),
                str(-1 if self.passes else self.listener.fileno()),
                str(handoff_theirs.fileno() if handoff_theirs is not None else -1)]
        zygote = subprocess.Popen(argv, pass_fds=fds)
        theirs.close()
        if handoff_theirs is not None:
            handoff_theirs.close()
        def stop(signum: int, frame: object) -> None:
            zygote.kill()
            os._exit(0)

        signal.signal(signal.SIGTERM, stop)
        if not self.passes:
            self.listener.close()
        else:
            self.listener.setblocking(False)
        self.busy = 0

    def accept_batch(self) -> None:
        taken = []
        for _ in range(min(BATCH, self.max_children - self.busy)):
            try:
                conn, _ = self.listener.accept()
            except BlockingIOError:
                break
            taken.append(conn)
        if not taken:
            return
        if self.handoff is not None:  # mspare: one socket a message, whichever spare waits
            for conn in taken:
                socket.send_fds(self.handoff, [b"c"], [conn.fileno()])
        else:
            socket.send_fds(self.ours, [b"c" * len(taken)], [c.fileno() for c in taken])
        self.busy += len(taken)
        for conn in taken:
            conn.close()

    def run(self) -> None:
        poller = select.epoll()
        poller.register(self.ours.fileno(), select.EPOLLIN)
        lfd = self.listener.fileno() if self.passes else -2
        watching = False
        gc.freeze()
        while True:
            want = self.passes and self.busy < self.max_children
            if want != watching:
                if want:
                    poller.register(lfd, select.EPOLLIN)
                else:
                    poller.unregister(lfd)
                watching = want
            for fd, _ in poller.poll():
                if fd == lfd:
                    self.accept_batch()
                    continue
                data = self.ours.recv(65536)
                if not data:
                    sys.exit("zygote gone")
                if self.passes:
                    self.busy -= sum(kind == ENDED for kind, _, _ in RECORD.iter_unpack(data))


def master() -> None:
    import argparse  # noqa: PLC0415  (here, not at the top: the zygote must not import it)

    parser = argparse.ArgumentParser()
    parser.add_argument("variant", choices=["zaccept", "mpass", "zspare", "mspare"])
    parser.add_argument("port", type=int)
    parser.add_argument("--spares", type=int, default=10)
    parser.add_argument("--max-children", type=int, default=1024)
    args = parser.parse_args()
    Master(args.variant, args.port, args.spares, args.max_children).run()


def main() -> None:
    if sys.argv[1:2] == ["--zygote"]:
        Zygote(sys.argv[2:]).run()
    else:
        master()


if __name__ == "__main__":
    main()
