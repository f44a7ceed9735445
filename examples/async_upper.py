"""Async handlers for the hybrid model: one worker's event loop serves many connections.

    forkserve serve examples.async_upper:handle --model hybrid --bind 127.0.0.1:9000
    forkserve serve examples.async_upper:Session --model hybrid --bind 127.0.0.1:9000

Every await is a point where the loop serves the other connections: a handler must never
block (no time.sleep, no blocking socket or file I/O). A handler that blocks the loop longer
than --timeout gets its worker's stacks logged and the worker replaced.
"""

import asyncio

import forkserve


async def handle(conn: forkserve.AsyncConnection) -> None:
    """Every line comes back in capitals; ``SLEEP n`` waits n seconds first (without
    blocking the loop); ``WHO`` answers the addresses; ``READ n`` reads n raw bytes."""
    async for line in conn.lines():  # bounded by --max-line; --idle-timeout applies
        word, _, arg = line.strip().partition(b" ")
        if word == b"SLEEP":
            await asyncio.sleep(float(arg))
            await conn.write(b"SLEPT\n")
        elif word == b"WHO":
            await conn.write(f"{conn.peer} {conn.local}\n".encode())
        elif word == b"READ":
            data = await conn.readexactly(int(arg))
            await conn.write(data[::-1] + b"\n")
        else:
            await conn.write(line.upper())  # waits while the client does not read


class Session:
    """One instance per connection; ``setup`` and ``finish`` are async too."""

    async def setup(self, conn: forkserve.AsyncConnection) -> None:
        self.count = 0
        await conn.write(b"WELCOME\n")

    async def handle(self, conn: forkserve.AsyncConnection) -> None:
        async for line in conn.lines():
            self.count += 1
            await conn.write(b"%d %s" % (self.count, line))

    async def finish(self, conn: forkserve.AsyncConnection) -> None:
        await conn.write(b"BYE %d\n" % self.count)
