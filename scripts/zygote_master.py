"""zygote_master.py - the real zygote (src/forkserve/serving/zygote.py) behind the least master
that can drive it: bind, start the zygote by exec, accept, pass each accepted socket with a
``Conn`` record (one ``sendmsg`` per accept batch), free the slot on ``Ended``. No admission,
no stop, no reload: it measures what the zygote and forkserve's child path cost (issue 16)
before the fork model runs through it.

    .venv/bin/python scripts/zygote_master.py PORT [--max-children N] [--app NAME] [--spares N]

``--spares N`` starts scripts/zygote_spares.py instead: the same zygote, with ``N`` children
forked ahead of need (issue 16, step 3).
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import socket
import subprocess
import sys

from forkserve.config import from_mapping
from forkserve.ops.scoreboard import Scoreboard
from forkserve.protocol import zygote as wire
from forkserve.serving.zygote import Settings, setup_record

BATCH = 32


def start_zygote(config: object, ours: socket.socket, theirs: socket.socket,
                 spares: int = 0) -> subprocess.Popen[bytes]:
    """Exec the zygote on ``theirs`` and send it its Setup (with a memfd scoreboard)."""
    board, memfd = Scoreboard.in_memfd(config.max_children)  # type: ignore[attr-defined]
    board.close()
    command = ([os.path.join(os.path.dirname(os.path.abspath(__file__)), "zygote_spares.py"),
                str(theirs.fileno()), str(spares)] if spares
               else ["-m", "forkserve.serving.zygote", str(theirs.fileno())])
    zygote = subprocess.Popen([sys.executable, *command], pass_fds=[theirs.fileno()])
    theirs.close()
    socket.send_fds(ours, [setup_record(Settings(config, os.getpid()))],  # type: ignore[arg-type]
                    [memfd])
    os.close(memfd)
    return zygote


def pass_batch(listener: socket.socket, ours: socket.socket, free: list[int]) -> None:
    """Accept up to BATCH connections and send them to the zygote in one packet."""
    taken: list[tuple[socket.socket, wire.Conn]] = []
    while len(taken) < BATCH and free:
        try:
            sock, addr = listener.accept()
        except BlockingIOError:
            break
        taken.append((sock, wire.Conn(free.pop(), wire.Address.of(addr, sock.family))))
    if taken:
        socket.send_fds(ours, [b"".join(wire.encode(c) for _, c in taken)],
                        [s.fileno() for s, _ in taken])
        for sock, _ in taken:
            sock.close()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("--max-children", type=int, default=1024)
    parser.add_argument("--app", default="hello")
    parser.add_argument("--spares", type=int, default=0)
    args = parser.parse_args()
    config = from_mapping({"app": args.app, "max_children": args.max_children})
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", args.port))
    listener.listen(1024)
    listener.setblocking(False)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    zygote = start_zygote(config, ours, theirs, args.spares)

    def stop(signum: int, frame: object) -> None:
        zygote.kill()
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    free = list(range(config.max_children - 1, -1, -1))
    decoder = wire.Decoder()
    poller = select.epoll()
    poller.register(ours.fileno(), select.EPOLLIN)
    watching = False
    while True:
        if bool(free) != watching:
            if free:
                poller.register(listener.fileno(), select.EPOLLIN)
            else:
                poller.unregister(listener.fileno())
            watching = bool(free)
        for fd, _ in poller.poll():
            if fd == listener.fileno():
                pass_batch(listener, ours, free)
                continue
            data = ours.recv(65536)
            if not data:
                print("zygote_master: the zygote is gone", file=sys.stderr)
                return 1
            for record in decoder.feed(data):
                if isinstance(record, wire.Ended | wire.ForkFailed):
                    free.append(record.slot)
                elif isinstance(record, wire.Failed):
                    print(f"zygote_master: {record.reason}", file=sys.stderr)
                    return 3


if __name__ == "__main__":
    sys.exit(main())
