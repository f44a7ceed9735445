"""The pool pipe: what pre-fork workers tell the master, as fixed-size messages (sans-I/O).

Theory of operation
-------------------
The master makes one pipe before it forks a pool; every worker holds the write end, only the
master reads (``models/prefork.py``). A message is ``MESSAGE.size`` bytes, far below
``PIPE_BUF``, so the kernel writes each one whole: the messages of workers writing at once
never interleave, and the master cuts what it reads into messages with no framing at all.

- ``READY``: the worker is ready to accept; written once, at boot. The master rolls a reload
  forward only on ready workers, and tells a crash at boot from one later, by pid (a slot may
  have a new worker by the time the message is read).
- ``ACCEPT_PAUSED``: accept() failed ``count`` times with ``errno`` since this worker's last
  such message, and it paused after each. A worker sends at most one per errno per
  ``TELL_INTERVAL`` (``PauseTally``): 64 workers out of fds wake the master 64 times a second,
  not 640. The master counts the pauses and logs them through its one rate limiter, so the
  whole server logs one line per kind of error per interval, as one process would.
- ``ENDED_BADLY``: a connection ended in a way that earns its client's source a penalty
  (``defence.Cause``, by its index in ``CAUSES``, in ``errno``; the source's tag in ``tag``):
  the master keeps the penalties and publishes the sources refused now in the scoreboard,
  where every worker looks at accept (``sourceguard``).
- ``BUSY``: the master rests (an adaptive pool whose workers are all idle sets no timer) and
  asked the first worker that takes a connection to say so (``Scoreboard.wake_wanted``).

The write end is non-blocking: a worker never waits on a master that is behind (some 3,000
messages unread). A report that finds the pipe full is kept and told with the next one
(``PauseTally.keep``); only READY waits for room, as a blocking write did before.

Rejected: counters in the scoreboard (the master would have to poll them to log anything, and
an idle master sets no timer); one message per pause (a wake-up of the master per pause per
worker, ten a second each).
"""

from __future__ import annotations

import enum
import math
import struct
from dataclasses import dataclass

#: kind, slot, pid, errno, count, tag (little-endian, 28 bytes).
MESSAGE = struct.Struct("<IiiiiQ")
#: POSIX guarantees that a pipe write of up to 512 bytes (``_POSIX_PIPE_BUF``) is atomic.
_ATOMIC_WRITE = 512
assert MESSAGE.size <= _ATOMIC_WRITE
#: A worker tells the master of its accept pauses at most this often per errno: the first
#: pause of a burst at once (the master logs it), the rest of the burst within this time.
TELL_INTERVAL = 1.0


class Kind(enum.IntEnum):
    READY = 1
    ACCEPT_PAUSED = 2
    BUSY = 3
    ENDED_BADLY = 4


_KINDS = frozenset(Kind)


@dataclass(frozen=True)
class Message:
    kind: Kind
    slot: int
    pid: int
    errno: int = 0
    count: int = 0
    tag: int = 0

    def encode(self) -> bytes:
        return MESSAGE.pack(self.kind, self.slot, self.pid, self.errno, self.count, self.tag)


class Inbox:
    """Cuts the bytes read from the pipe into messages (runs in the master)."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[Message]:
        """The whole messages in ``data`` and what was left of the last read; a partial
        message waits for the next read. Unknown kinds are skipped."""
        self._buffer += data
        whole = len(self._buffer) - len(self._buffer) % MESSAGE.size
        chunk, self._buffer = self._buffer[:whole], self._buffer[whole:]
        return [Message(Kind(kind), slot, pid, err, count, tag)
                for kind, slot, pid, err, count, tag in MESSAGE.iter_unpack(chunk)
                if kind in _KINDS]


class PauseTally:
    """A worker's accept pauses not yet told, by errno (runs in the worker; time is given)."""

    def __init__(self, interval: float = TELL_INTERVAL) -> None:
        self.interval = interval
        self._untold: dict[int, int] = {}
        self._told_at: dict[int, float] = {}

    def add(self, err: int) -> None:
        self._untold[err] = self._untold.get(err, 0) + 1

    def due(self, now: float) -> list[tuple[int, int]]:
        """``(errno, count)`` to tell now, counted as told; ``now=math.inf``: everything
        (a worker that leaves)."""
        out = []
        for err, count in list(self._untold.items()):
            if now >= self._told_at.get(err, -math.inf) + self.interval:
                del self._untold[err]
                self._told_at[err] = now
                out.append((err, count))
        return out

    def keep(self, err: int, count: int) -> None:
        """A message that did not fit in the pipe: its pauses go with the next one."""
        self._untold[err] = self._untold.get(err, 0) + count

    def wait(self, longest: float, now: float) -> float:
        """How long the worker may wait for a connection before pauses are due (seconds)."""
        if not self._untold:
            return longest
        due = min(self._told_at.get(err, -math.inf) + self.interval for err in self._untold)
        return max(0.0, min(longest, due - now))
