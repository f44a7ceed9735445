"""The echo app: each line comes back as it was sent."""

from __future__ import annotations

from ..serving.connection import Connection


def handle(conn: Connection) -> None:
    """Answer each line with itself (a last line without ``\\n`` gets one)."""
    for line in conn.lines():
        conn.write(line if line.endswith(b"\n") else line + b"\n")
