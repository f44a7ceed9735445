"""A small key-value service that shows process isolation.

    forkserve serve examples.kvstore:KeyValue --bind 127.0.0.1:9000 --model prefork

Commands, one per line: ``SET key value``, ``GET key``, ``CRASH`` (the handler raises: only
this connection ends; every other client keeps its session). Each connection has its own
store: processes share nothing unless you give them something to share.
"""

import forkserve


class KeyValue:
    def setup(self, conn: forkserve.Connection) -> None:
        self.store: dict[bytes, bytes] = {}

    def handle(self, conn: forkserve.Connection) -> None:
        for line in conn.lines():
            words = line.split()
            if not words:
                continue
            command = words[0].upper()
            if command == b"SET" and len(words) == 3:
                self.store[words[1]] = words[2]
                conn.write(b"OK\n")
            elif command == b"GET" and len(words) == 2:
                conn.write(self.store.get(words[1], b"(nil)") + b"\n")
            elif command == b"CRASH":
                raise RuntimeError("CRASH asked for: this connection ends, nothing else does")
            else:
                conn.write(b"ERR usage: SET key value | GET key | CRASH\n")

    def finish(self, conn: forkserve.Connection) -> None:
        self.store.clear()
