"""What a hybrid worker writes in its scoreboard slot beyond prefork's fields (no asyncio here:
the master reads it back, and a master of another model must not load asyncio)."""

from __future__ import annotations

#: The peer text of a hybrid worker's slot: how many connections it holds.
OPEN_FORMAT = "{} open"
