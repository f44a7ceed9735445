"""zygote_spares.py - the real zygote with children forked ahead of need (issue 16, step 3):
a measuring stick, not a server.

``scripts/zygote_master.py PORT --spares N`` starts this file instead of
``python -m forkserve.serving.zygote``. It is the real zygote (``serving/zygote.py``) and
forkserve's real child path, with one change: the zygote keeps ``N`` **spares**, children
forked before any connection, each of which has already done what does not depend on its
connection (the zygote's fds closed, rlimits, the signal table, the stop pipe, PDEATHSIG) and
waits on a ``SOCK_SEQPACKET`` pair of its own for one ``Conn`` record and its socket. A
``Conn`` goes to an idle spare if there is one (one ``sendmsg``; ``Started`` is reported at
once), else a child is forked for it as usual; each spare serves exactly one connection and
exits (Apache prefork with ``MaxConnectionsPerChild 1``); after every turn of its loop the
zygote forks the spares it lacks, back to back. No PROXY, no stop for the waiting spares
(they end when the zygote's end of their pair closes): what is measured is where the fork
and the child's set-up happen, on the client's path or before it.

    python scripts/zygote_spares.py FD SPARES      (started by zygote_master.py)
"""

from __future__ import annotations

import gc
import os
import signal
import socket
import sys
import time
from typing import NoReturn

from forkserve.errors import ChildExit
from forkserve.kernel import pthread_sigmask
from forkserve.ops.scoreboard import SlotState
from forkserve.protocol import zygote as wire
from forkserve.protocol.address import format_address
from forkserve.serving import child
from forkserve.serving import zygote as real
from forkserve.serving.limits import apply_limits
from forkserve.serving.preamble import open_connection


class SpareZygote(real.Zygote):
    """The real zygote, with ``want`` children forked ahead of need."""

    want = 0

    def setup_spares(self, want: int) -> None:
        self.want = want
        #: Idle spares: pid, the zygote's end of its pair.
        self.idle: list[tuple[int, socket.socket]] = []
        #: The zygote's ends of the pairs (every child closes them).
        self.spare_fds: list[int] = []

    def _close_in_child(self) -> None:
        super()._close_in_child()
        for fd in self.spare_fds:
            os.close(fd)

    def run(self) -> int:
        signal.set_wakeup_fd(self._wake_w)
        signal.signal(signal.SIGCHLD, real._nothing)
        self._report(wire.Ready(os.getpid(), self.settings.generation))
        self._flush()
        while not (self.retiring and not self.children):
            self.top_up()
            for fd, _ in self._poller.poll():
                if fd == self._wake_r:
                    self._reap()
                elif not self._read_master():
                    return 0
            self._flush()
        return 0

    def top_up(self) -> None:
        """Fork the spares missing, back to back."""
        missing = self.want - len(self.idle)
        if missing <= 0 or self.retiring:
            return
        gc.freeze()
        pthread_sigmask(signal.SIG_BLOCK, real.BLOCKED)
        try:
            for _ in range(missing):
                ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                self.spare_fds.append(ours.fileno())
                try:
                    pid = os.fork()
                except OSError:
                    self.spare_fds.pop()
                    ours.close()
                    theirs.close()
                    return
                if pid == 0:
                    self.spare(theirs)  # never returns
                theirs.close()
                self.idle.append((pid, ours))
        finally:
            pthread_sigmask(signal.SIG_UNBLOCK, real.BLOCKED)

    def _fork_run(self, run: list[tuple[wire.Conn, int, int]], fds: list[int], done: int,
                  owned: int) -> int:
        handed = 0
        for conn, fd, _ in run:  # (the fork model's Conn: one fd each, no stderr pipe)
            if not self.idle:
                break
            pid, ours = self.idle.pop()
            try:
                socket.send_fds(ours, [wire.encode(conn)], [fd])
            except OSError:
                break  # (a spare gone: the rest is forked for)
            finally:
                self.spare_fds.remove(ours.fileno())
                ours.close()
            os.close(fd)
            handed += 1
            self.forks += 1
            self.children[pid] = conn.slot
            self._report(wire.Started(conn.slot, pid))
        return super()._fork_run(run[handed:], fds, done + handed, owned - handed)

    def spare(self, theirs: socket.socket) -> NoReturn:
        """A spare's life: the set-up that needs no connection, the wait, then the rest of
        ``child._serve_in_child``; never returns."""
        ctx = self._context
        status: int = ChildExit.HANDLER_ERROR
        try:
            ctx.close_master_fds()
            if ctx.limited:
                apply_limits(ctx.config)
            finish = child._reset_signals(ctx)
            data, fds, _, _ = socket.recv_fds(theirs, 4096, 1)
            status = self.serve(finish, data, fds) if fds else ChildExit.OK  # (none: EOF)
        finally:
            child.exit_process(status)

    def serve(self, finish: child._Finish, data: bytes, fds: list[int]) -> int:
        """The rest of ``child._serve_in_child``, once the spare has its connection."""
        ctx = self._context
        conn_record = wire.Decoder().feed(data)[0]
        assert isinstance(conn_record, wire.Conn)
        sock = socket.socket(fileno=fds[0])
        addr = conn_record.peer.as_addr(int(socket.AF_UNIX))
        slot = conn_record.slot
        pid, start = os.getpid(), time.monotonic()
        peer = format_address(addr, sock.family)
        board = ctx.scoreboard
        board.write(slot, pid=pid, state=SlotState.READING, conn_start=start, heartbeat=start,
                    peer=peer)
        child.arm_connection_timer(ctx.config, start)
        conn = open_connection(sock, addr, ctx.config, ctx.tls, stop=finish.stop,
                               patience=child.patience_for(ctx.config, board, slot))
        finish.serving(conn)
        child.set_title(f"forkserve: conn {conn.peer}")
        status = child.serve_one(ctx.app, conn)
        board.write(slot, pid=pid, state=SlotState.CLOSING, connections=1,
                    bytes_in=conn.bytes_in, bytes_out=conn.bytes_out, conn_start=start,
                    heartbeat=time.monotonic(), peer=conn.peer)
        return status


def main(argv: list[str]) -> int:
    for sig in real.IGNORED:
        signal.signal(sig, signal.SIG_IGN)
    ctl = socket.socket(fileno=int(argv[0]))
    settings, board, board_fds = real.boot(ctl)
    child.set_parent_death_signal(signal.SIGKILL)
    app, tls = real.load_app(settings)
    gc.collect()
    gc.freeze()
    zygote = SpareZygote(ctl, settings, board, app, tls, board_fds=board_fds)
    zygote.setup_spares(int(argv[1]))
    return zygote.run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
