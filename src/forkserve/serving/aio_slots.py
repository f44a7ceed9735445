"""What a hybrid worker writes in its scoreboard slot beyond prefork's fields (no asyncio here:
the master reads it back, and a master of another model must not load asyncio): how many
connections it holds and, with a blocking handler, how many of them are in its thread pool
(running in a thread, or waiting for one)."""

from __future__ import annotations

#: The peer text of a hybrid worker's slot: how many connections it holds ...
OPEN_FORMAT = "{} open"
#: ... and, with a blocking handler, how many of them are in its thread pool.
THREADS_FORMAT = OPEN_FORMAT + ", {} in threads"


def slot_text(open_now: int, in_threads: int | None) -> str:
    """The peer text for ``open_now`` connections, ``in_threads`` of them in the pool (None:
    an async handler, no pool)."""
    if in_threads is None:
        return OPEN_FORMAT.format(open_now)
    return THREADS_FORMAT.format(open_now, in_threads)


def slot_counts(peer: str) -> tuple[int, int]:
    """The connections held and those in the thread pool, from a slot's peer text (0, 0 for
    a text that is not a hybrid worker's)."""
    held, _, rest = peer.partition(" open")
    threads = rest.removeprefix(", ").removesuffix(" in threads")
    return (int(held) if held.isdigit() else 0,
            int(threads) if rest and threads.isdigit() else 0)
