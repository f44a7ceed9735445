"""The echo app: each line comes back as it was sent."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..serving.connection import Connection

if TYPE_CHECKING:  # asyncio is loaded only where a loop runs (hybrid workers)
    from ..serving.aio_connection import AsyncConnection


def handle(conn: Connection) -> None:
    """Answer each line with itself (a last line without ``\\n`` gets one)."""
    for line in conn.lines():
        conn.write(line if line.endswith(b"\n") else line + b"\n")


async def handle_async(conn: AsyncConnection) -> None:
    """The same, as async code: the form the hybrid model runs for ``echo``."""
    async for line in conn.lines():
        await conn.write(line if line.endswith(b"\n") else line + b"\n")
