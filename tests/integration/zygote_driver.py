"""The master's side of the zygote's wire, for tests (issue 16): start a real zygote by exec,
send it its Setup, pass it accepted sockets, read what it reports.

Run as a script it is a master that serves one listener until killed, printing ``PIDS
master zygote`` and then ``CHILD pid`` for each child (the master-death test SIGKILLs it):

    python tests/integration/zygote_driver.py [APP]
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

from forkserve.config import Config, from_mapping
from forkserve.ops.scoreboard import Scoreboard
from forkserve.protocol import zygote as wire
from forkserve.serving.zygote import Settings, setup_record


class Driver:
    """One zygote and the master's end of its socketpair (blocking, with timeouts)."""

    def __init__(self, config: Config | None = None, **settings: object) -> None:
        self.config = config or from_mapping({"app": "hello", **settings})
        self.board, memfd = Scoreboard.in_memfd(self.config.max_children)
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.settimeout(10)
        self.proc = subprocess.Popen([sys.executable, "-m", "forkserve.serving.zygote",
                                      str(theirs.fileno())], pass_fds=[theirs.fileno()],
                                     stderr=subprocess.PIPE)
        theirs.close()
        socket.send_fds(self.sock, [setup_record(Settings(self.config, os.getpid()))],
                        [memfd])
        os.close(memfd)
        self.decoder = wire.Decoder()
        self.pending: list[wire.Record] = []
        self.next_slot = 0

    def read(self) -> wire.Record:
        """The next record (raises TimeoutError after 10 s, EOFError at the end)."""
        while not self.pending:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("the zygote closed its end")
            self.pending += self.decoder.feed(data)
        return self.pending.pop(0)

    def expect(self, kind: type) -> wire.Record:
        record = self.read()
        assert isinstance(record, kind), f"expected {kind.__name__}, got {record!r}"
        return record

    def pass_conn(self, sock: socket.socket, addr: object) -> int:
        """Send ``sock`` (then closed here) for a child; its slot."""
        slot = self.next_slot
        self.next_slot += 1
        record = wire.Conn(slot, wire.Address.of(addr, sock.family))
        socket.send_fds(self.sock, [wire.encode(record)], [sock.fileno()])
        sock.close()
        return slot

    def pass_batch(self, conns: list[tuple[socket.socket, object]]) -> list[int]:
        """Send several sockets in one packet (as the master does per accept batch)."""
        records = []
        for sock, addr in conns:
            records.append(wire.Conn(self.next_slot, wire.Address.of(addr, sock.family)))
            self.next_slot += 1
        socket.send_fds(self.sock, [b"".join(wire.encode(r) for r in records)],
                        [sock.fileno() for sock, _ in conns])
        for sock, _ in conns:
            sock.close()
        return [r.slot for r in records]

    def send(self, record: wire.Record) -> None:
        self.sock.sendall(wire.encode(record))

    def close(self) -> None:
        self.sock.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        self.board.close()


def main() -> int:
    driver = Driver(app=sys.argv[1] if len(sys.argv) > 1 else "hello")
    driver.expect(wire.Ready)
    listener = socket.create_server(("127.0.0.1", 0))
    print(f"PIDS {os.getpid()} {driver.proc.pid} {listener.getsockname()[1]}", flush=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        listener.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            sock, addr = listener.accept()
        except TimeoutError:
            break
        driver.pass_conn(sock, addr)
        started = driver.expect(wire.Started)
        assert isinstance(started, wire.Started)
        print(f"CHILD {started.pid}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
