"""request_cost.py - what a kept connection's request costs in forkserve's ``Connection``
against a bare ``recv``/``sendall``, in one process (issue 16, phase 4): a ``Connection`` made
as a fork-model child makes it (``open_connection`` with the child's ``Patience`` and stop
pipe) on a socketpair, N round trips of ``ping\\n`` / ``Hello from server!\\n``.

    .venv/bin/python scripts/request_cost.py [N] [--profile]

Prints microseconds per round trip for both loops, twice each (the client's side is in both);
``--profile`` adds cProfile's top functions of the ``Connection`` loop.
"""

from __future__ import annotations

import cProfile
import os
import pstats
import socket
import sys
import time

from forkserve.config import Config
from forkserve.ops.scoreboard import Scoreboard
from forkserve.serving.child import patience_for
from forkserve.serving.preamble import open_connection
from forkserve.serving.stopsignal import StopSignal

ANSWER = b"Hello from server!\n"


def main(argv: list[str]) -> int:
    n = int(argv[0]) if argv and argv[0].isdigit() else 100_000
    config = Config()
    board, memfd = Scoreboard.in_memfd(4)
    os.close(memfd)
    server, client = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    stop = StopSignal(os.getpid())
    stop.install()
    conn = open_connection(server, "", config, None, stop=stop,
                           patience=patience_for(config, board, 0))

    def with_connection() -> None:
        for _ in range(n):
            client.send(b"ping\n")
            conn.readline()
            conn.write(ANSWER)
            client.recv(100)

    def bare() -> None:
        for _ in range(n):
            client.send(b"ping\n")
            server.recv(4096)
            server.sendall(ANSWER)
            client.recv(100)

    for loop in (bare, with_connection, bare, with_connection):
        began = time.perf_counter()
        loop()
        print(f"{loop.__name__}: {(time.perf_counter() - began) / n * 1e6:.2f} us a round trip")
    if "--profile" in argv:
        profile = cProfile.Profile()
        profile.runcall(with_connection)
        pstats.Stats(profile).sort_stats("tottime").print_stats(12)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
