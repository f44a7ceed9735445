"""The seed tutorial's app, with framing fixed: one ``Hello from server!`` per line received.

The tutorial printed every ``read()`` as if it were a message; here every *line* is one
message, however the bytes were split or merged on the way. Received lines are logged at
debug level (``--log-level debug``), not printed to stdout: a server's stdout is not a log.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..serving.connection import Connection
from ..serving.lazylog import DEBUG, LazyLogger

if TYPE_CHECKING:  # asyncio is loaded only where a loop runs (hybrid workers)
    from ..serving.aio_connection import AsyncConnection

log = LazyLogger("forkserve.app.hello")  # (no logging in a zygote: see lazylog)

ANSWER = b"Hello from server!\n"


def handle(conn: Connection) -> None:
    """Answer each line with ``Hello from server!\\n``."""
    debug = log.isEnabledFor(DEBUG)
    for line in conn.lines():
        if debug:
            log.debug("Received: %s", line.rstrip(b"\r\n").decode("utf-8", "replace"))
        conn.write(ANSWER)


async def handle_async(conn: AsyncConnection) -> None:
    """The same, as async code: the form the hybrid model runs for ``hello``."""
    debug = log.isEnabledFor(DEBUG)
    async for line in conn.lines():
        if debug:
            log.debug("Received: %s", line.rstrip(b"\r\n").decode("utf-8", "replace"))
        await conn.write(ANSWER)
