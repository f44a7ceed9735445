"""The scoreboard: one fixed-size slot per serving process, in shared memory.

Theory of operation
-------------------
The master creates one anonymous shared mapping (``mmap(-1, n)``, inherited by every fork)
before it forks anything. Each slot belongs to exactly one process at a time: the master hands a
free slot index to a child when it forks it, the child writes its own slot (its state, its peer,
its byte counts), and the master reads the slot after it has reaped the child, which orders the
child's last write before the master's read. Readers never lock: a slot is written by one
process only, and a torn read of a live slot shows at worst one stale field (like Apache's
scoreboard). No file on disk, no system call per update.

Layout of a slot (little-endian, ``SLOT_SIZE`` bytes): pid, generation, state letter,
connections served, bytes in, bytes out, connection start and last heartbeat (monotonic
seconds), and the peer address as up to ``PEER_BYTES`` bytes of text. One more slot after the
processes' is the master's own: it announces a drain there (a graceful stop, see ``worker``),
and asks to be woken when it rests (``want_wake``: an adaptive pool whose workers are all idle
sets no timer; the first worker to take a connection tells it through the pool pipe).
"""

from __future__ import annotations

import enum
import mmap
import os
import struct
import time
from array import array
from dataclasses import dataclass


class SlotState(enum.Enum):
    """What a slot's process is doing, with Apache's scoreboard letters."""

    FREE = "."
    STARTING = "S"
    IDLE = "_"
    READING = "R"
    WRITING = "W"
    CLOSING = "C"
    FINISHING = "G"


_FORMAT = struct.Struct("<iIc3xQQQdd64pI")
SLOT_SIZE = 128
PEER_BYTES = 63
assert _FORMAT.size <= SLOT_SIZE
#: Offsets of the fields a busy process updates alone (see ``SlotMonitor``).
_STATE_AT = 8
_HEARTBEAT_AT = 44
_STATE = struct.Struct("<c")
_BEAT = struct.Struct("<d")

#: In the master's slot, after its state letter: 1 while it asks to be woken (``want_wake``).
_WAKE_AT = _STATE_AT + 1
#: ... and then 1 while the server is under stress (``defence``: shorter deadlines).
_STRESS_AT = _STATE_AT + 2
_TAG = struct.Struct("<Q")
#: How many penalised sources the scoreboard publishes to prefork workers (the most recent).
PENALISED_SHOWN = 1024

#: How /proc shows the file of a scoreboard made by ``in_memfd``.
MEMFD_NAME = "/memfd:forkserve-scoreboard"

_BY_LETTER = {state.value.encode(): state for state in SlotState}
_DRAINING = SlotState.FINISHING.value.encode()


@dataclass(frozen=True)
class Slot:
    """A copy of one slot, as read at one moment."""

    index: int
    pid: int
    generation: int
    state: SlotState
    connections: int
    bytes_in: int
    bytes_out: int
    conn_start: float
    heartbeat: float
    peer: str
    #: Connections whose handler raised (its traceback is in the log).
    errors: int = 0


class Scoreboard:
    """``size`` slots in a shared anonymous mapping. Create it in the master before forking."""

    def __init__(self, size: int, *, fd: int | None = None) -> None:
        """``fd``: map this file (a memfd, ``in_memfd``) instead of an anonymous mapping, so
        that a process started by exec shares the slots (the fork model's zygote)."""
        if size < 1:
            raise ValueError("a scoreboard needs at least one slot")
        self.size = size
        # one more slot after the processes' own: the master's word to all of them; then two
        # columns, one entry per slot (``sourceguard``): the source tag of the slot's client
        # while that client has not proven itself (else 0), and a byte, 1 meanwhile, that a
        # process counts in one C call (counting the tags costs a Python int each: only when
        # the bytes say there are enough to matter)
        self._tags_at = (size + 1) * SLOT_SIZE
        self._flags_at = self._tags_at + size * _TAG.size
        # and the sources refused for a penalty now, written by the master (prefork workers
        # look there at accept; the fork model's master has them at hand): how many, then them
        self._penalised_n_at = self._flags_at + -(-size // 8) * 8
        self._penalised_at = self._penalised_n_at + _TAG.size
        self.length = self._penalised_at + PENALISED_SHOWN * _TAG.size
        self._map = mmap.mmap(-1 if fd is None else fd, self.length)
        self._master_state_at = size * SLOT_SIZE + _STATE_AT
        self._wake_at = size * SLOT_SIZE + _WAKE_AT
        self._stress_at = size * SLOT_SIZE + _STRESS_AT

    @classmethod
    def in_memfd(cls, size: int) -> tuple[Scoreboard, int]:
        """A scoreboard in a new memfd, and the memfd (close-on-exec: pass it on by hand)."""
        length = cls(size).length  # (a throw-away mapping: the layout's arithmetic is here)
        fd = os.memfd_create(MEMFD_NAME[len("/memfd:"):], os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, length)
            return cls(size, fd=fd), fd
        except BaseException:
            os.close(fd)
            raise

    def write(self, index: int, *, pid: int, state: SlotState, generation: int = 0,
              connections: int = 0, bytes_in: int = 0, bytes_out: int = 0,
              conn_start: float = 0.0, heartbeat: float = 0.0, peer: str = "",
              errors: int = 0) -> None:
        """Overwrite slot ``index``. Only the slot's owner calls this. (``_value_``, not
        ``value``: enum's property is Python code, run in every child, whose pages it copies.)"""
        _FORMAT.pack_into(
            self._map, index * SLOT_SIZE, pid, generation, state._value_.encode(), connections,
            bytes_in, bytes_out, conn_start, heartbeat, peer.encode()[:PEER_BYTES], errors,
        )

    def read(self, index: int) -> Slot:
        pid, gen, letter, conns, b_in, b_out, start, beat, peer, errors = _FORMAT.unpack_from(
            self._map, index * SLOT_SIZE
        )
        return Slot(index, pid, gen, _BY_LETTER.get(letter, SlotState.FREE), conns, b_in, b_out,
                    start, beat, peer.decode(errors="replace"), errors)

    def mark(self, index: int, state: SlotState) -> None:
        """Change only the state letter (safe from a signal handler: one ``pack_into``)."""
        _STATE.pack_into(self._map, index * SLOT_SIZE + _STATE_AT, state._value_.encode())

    def beat(self, index: int) -> None:
        """Stamp the heartbeat only: "alive and not stuck" (one ``pack_into``)."""
        _BEAT.pack_into(self._map, index * SLOT_SIZE + _HEARTBEAT_AT, time.monotonic())

    def clear(self, index: int) -> None:
        self.write(index, pid=0, state=SlotState.FREE)

    def announce_drain(self) -> None:
        """The master is stopping for good and has let go of its listeners: the processes
        that still hold them take what is queued there before they let go too."""
        _STATE.pack_into(self._map, self._master_state_at, _DRAINING)

    @property
    def draining(self) -> bool:
        """Has the master announced a drain? (One read of the shared mapping.)"""
        return bool(_STATE.unpack_from(self._map, self._master_state_at)[0] == _DRAINING)

    def want_wake(self, wanted: bool) -> None:
        """In the master: ask (or stop asking) the first worker that takes a connection to
        wake it. Set it, then read the slots once more: a worker marks its slot before it
        looks here, so one of the two sees the other (a store delayed past the following
        load, which x86 allows, could still hide both: the master's rest is bounded)."""
        self._map[self._wake_at] = int(wanted)

    def take_wake(self) -> bool:
        """In a worker that has just marked its slot busy: did the master ask to be woken?
        The first to see it clears it; two at once both say so, which costs nothing."""
        if not self._map[self._wake_at]:
            return False
        self._map[self._wake_at] = 0
        return True

    def mark_unproven(self, index: int, tag: int) -> None:
        """Slot ``index`` serves a client of source ``tag`` (``admission.source_tag``) that
        has not proven itself yet (no whole first line; ``sourceguard``)."""
        _TAG.pack_into(self._map, self._tags_at + index * _TAG.size, tag)
        self._map[self._flags_at + index] = 1

    def mark_proven(self, index: int) -> None:
        """Slot ``index``'s client has proven itself, or is gone (two writes to the mapping:
        cheap in the serving process's hot path and in the master)."""
        self._map[self._flags_at + index] = 0
        _TAG.pack_into(self._map, self._tags_at + index * _TAG.size, 0)

    def unproven(self, index: int) -> bool:
        return bool(self._map[self._flags_at + index])

    def count_unproven(self) -> int:
        """Unproven clients in all slots (a copy of ``size`` bytes, counted in C)."""
        return self._map[self._flags_at:self._flags_at + self.size].count(1)

    def unproven_slots(self) -> list[int]:
        """The slots whose client is unproven (the flags searched in C: a scan of a large
        board costs what its unproven slots cost, not what its size does)."""
        flags = self._map[self._flags_at:self._flags_at + self.size]
        found, at = [], flags.find(1)
        while at != -1:
            found.append(at)
            at = flags.find(1, at + 1)
        return found

    def count_source(self, tag: int) -> int:
        """Unproven clients of source ``tag`` (a copy of the tags, then a Python int per slot:
        about 5 us at 512 slots; call it only when ``count_unproven`` says it matters)."""
        return array("Q", self._map[self._tags_at:self._flags_at]).count(tag)

    def publish_penalised(self, tags: list[int]) -> None:
        """In the master: the source tags refused for a penalty now (the first
        ``PENALISED_SHOWN``; the rest are refused when they are among them again)."""
        shown = array("Q", tags[:PENALISED_SHOWN])
        self._map[self._penalised_at:self._penalised_at + len(shown) * _TAG.size] = \
            shown.tobytes()
        _TAG.pack_into(self._map, self._penalised_n_at, len(shown))

    def penalised(self, tag: int) -> bool:
        """Is source ``tag`` refused for a penalty now? (nothing to copy while none is)"""
        count = _TAG.unpack_from(self._map, self._penalised_n_at)[0]
        if not count:
            return False
        end = self._penalised_at + count * _TAG.size
        return array("Q", self._map[self._penalised_at:end]).count(tag) > 0

    def set_stress(self, on: bool) -> None:
        """In the master: the server is (or is no longer) under stress."""
        self._map[self._stress_at] = int(on)

    @property
    def stressed(self) -> bool:
        """Is the server under stress? (One read of the shared mapping.)"""
        return bool(self._map[self._stress_at])

    def monitor(self, index: int) -> SlotMonitor:
        return SlotMonitor(self._map, index * SLOT_SIZE)

    def close(self) -> None:
        self._map.close()


_WAITING = SlotState.READING.value.encode()
_WORKING = SlotState.WRITING.value.encode()


class SlotMonitor:
    """Tells the watchdog, cheaply, whether a slot's process waits on its client or works.

    ``waiting()`` before a read or write that waits on the client (the client's time, bounded
    by the idle and write timeouts); ``working()`` when the server's own code runs again (the
    time the watchdog's ``timeout`` bounds). Each call is two ``pack_into``: no system call.
    """

    __slots__ = ("_map", "_offset")

    def __init__(self, shared: mmap.mmap, offset: int) -> None:
        self._map = shared
        self._offset = offset

    def waiting(self) -> None:
        self._mark(_WAITING)

    def working(self) -> None:
        self._mark(_WORKING)

    def _mark(self, letter: bytes) -> None:
        _STATE.pack_into(self._map, self._offset + _STATE_AT, letter)
        _BEAT.pack_into(self._map, self._offset + _HEARTBEAT_AT, time.monotonic())
