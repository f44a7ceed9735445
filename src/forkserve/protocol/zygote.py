"""The zygote's wire: what the master and the zygote tell each other (sans-I/O).

Theory of operation
-------------------
The master and its zygote (``serving/zygote.py``) share one ``SOCK_SEQPACKET`` socketpair.
Every record is an 8-byte header (kind, 3 zero bytes, payload length, little-endian) and its
payload; a packet holds one or more whole records, and the records of a packet are read in
order. The master accepts each connection, decides admission, and sends a ``Conn`` record per
connection with the socket itself in the packet's ``SCM_RIGHTS``: the ``Conn`` records of a
packet own its fds in order, one each, or two for a ``Conn`` flagged ``stderr`` (exec: the
socket, then the write end of the program's stderr pipe, whose read end the master keeps)
(one ``sendmsg`` per accept batch, as the issue's measurements chose; see
docs/benchmarks.md, "Issue 16"). The zygote forks one child per
``Conn`` and reports, batched per turn of its loop: ``Ready`` once its imports are done,
``Started`` per child, ``Ended`` per child reaped (wait status and the bytes its slot
counted), ``ForkFailed`` when ``fork()`` failed (the master releases the slot and pauses),
``Failed`` with one line when it cannot start (the app does not import: the master stops
the server with that line) and ``Counters`` on request.

The master's other words are ``Retire`` (no connection will come any more: exit once the last
child is reaped, reporting each) and ``Query`` (send your ``Counters``). A stop signals the
children by pid, as before: the master knows every pid from ``Started``.

``Setup`` is the master's first record: opaque bytes (the pickled settings and app name) that
this module only frames, and the scoreboard's memfd in its ``SCM_RIGHTS``.

The decoder takes any cut of the byte stream (``feed`` can be called a byte at a time), and
raises ``WireError`` (a ``ValueError``) on an unknown kind, a payload too long for its kind,
a short payload or non-zero padding: a peer that says something wrong is a bug, never guessed
at.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

#: kind, 3 zero bytes, payload length.
HEADER = struct.Struct("<B3xI")
#: No record is longer (a ``Setup``'s settings are a few kB; a whole ``Conn`` under 600 bytes).
MAX_PAYLOAD = 1 << 20


class Kind(enum.IntEnum):
    # master -> zygote
    SETUP = 1
    CONN = 2
    RETIRE = 3
    QUERY = 4
    # zygote -> master
    READY = 16
    FAILED = 17
    STARTED = 18
    ENDED = 19
    FORK_FAILED = 20
    COUNTERS = 21


class WireError(ValueError):
    """Bytes that are not a record of this protocol."""


#: An address: family, port, then the host's length and bytes (AF_UNIX: the path, port 0).
_ADDR = struct.Struct("<HHH")
#: Conn: slot, flags (1: the master read a PROXY header; 2: it named a local address too;
#: 4: a stderr pipe follows the socket in the packet's fds).
_CONN = struct.Struct("<IB")
_PROXIED, _LOCAL, _STDERR = 1, 2, 4
_READY = struct.Struct("<II")  # pid, generation
_STARTED = struct.Struct("<II")  # slot, pid
_ENDED = struct.Struct("<IIiQQ")  # slot, pid, wait status, bytes in, bytes out
_FORK_FAILED = struct.Struct("<II")  # slot, errno
_COUNTERS = struct.Struct("<QQI")  # forks, fork failures, children now
#: Longest host in an address (an AF_UNIX path is at most 108 bytes; a host name is never one).
MAX_HOST = 512


@dataclass(frozen=True)
class Address:
    """A socket address as the child needs it: ``(host, port)`` (AF_INET, AF_INET6) or a
    path (AF_UNIX, port 0)."""

    family: int
    host: str
    port: int

    @classmethod
    def of(cls, addr: object, family: int) -> Address:
        """From what ``accept()`` or a PROXY header gave: a tuple, or a path (str or bytes)."""
        if isinstance(addr, tuple):
            return cls(family, str(addr[0]), int(addr[1]))
        if isinstance(addr, bytes):
            return cls(family, addr.decode("utf-8", "surrogateescape"), 0)
        return cls(family, str(addr or ""), 0)

    def as_addr(self, unix_family: int) -> object:
        """The form ``accept()`` gives (a path for ``unix_family``, else a tuple)."""
        return self.host if self.family == unix_family else (self.host, self.port)


@dataclass(frozen=True)
class Setup:
    settings: bytes


@dataclass(frozen=True)
class Conn:
    """One accepted connection for the zygote to fork a child for; its socket is the packet's
    next fd. ``proxied``: the peer (and maybe local) address came from a PROXY header.
    ``stderr``: the fd after the socket is the write end of the program's stderr pipe."""

    slot: int
    peer: Address
    proxied: bool = False
    local: Address | None = None
    stderr: bool = False

    @property
    def fds(self) -> int:
        """How many of the packet's fds this record owns."""
        return 2 if self.stderr else 1


@dataclass(frozen=True)
class Retire:
    pass


@dataclass(frozen=True)
class Query:
    pass


@dataclass(frozen=True)
class Ready:
    pid: int
    generation: int


@dataclass(frozen=True)
class Failed:
    reason: str


@dataclass(frozen=True)
class Started:
    slot: int
    pid: int


@dataclass(frozen=True)
class Ended:
    slot: int
    pid: int
    status: int
    bytes_in: int = 0
    bytes_out: int = 0


@dataclass(frozen=True)
class ForkFailed:
    slot: int
    errno: int


@dataclass(frozen=True)
class Counters:
    forks: int
    fork_failures: int
    children: int


Record = (Setup | Conn | Retire | Query | Ready | Failed | Started | Ended | ForkFailed
          | Counters)


def _frame(kind: Kind, payload: bytes = b"") -> bytes:
    return HEADER.pack(kind, len(payload)) + payload


def _address(addr: Address) -> bytes:
    host = addr.host.encode("utf-8", "surrogateescape")
    if len(host) > MAX_HOST:
        raise WireError(f"an address of {len(host)} bytes (at most {MAX_HOST})")
    return _ADDR.pack(addr.family, addr.port, len(host)) + host


def encode(record: Record) -> bytes:
    """The bytes of ``record`` (header included)."""
    match record:
        case Setup(settings):
            if len(settings) > MAX_PAYLOAD:
                raise WireError(f"settings of {len(settings)} bytes (at most {MAX_PAYLOAD})")
            return _frame(Kind.SETUP, settings)
        case Conn(slot, peer, proxied, local, stderr):
            flags = ((_PROXIED if proxied else 0) | (_LOCAL if local is not None else 0)
                     | (_STDERR if stderr else 0))
            body = _CONN.pack(slot, flags) + _address(peer)
            if local is not None:
                body += _address(local)
            return _frame(Kind.CONN, body)
        case Retire():
            return _frame(Kind.RETIRE)
        case Query():
            return _frame(Kind.QUERY)
        case Ready(pid, generation):
            return _frame(Kind.READY, _READY.pack(pid, generation))
        case Failed(reason):
            return _frame(Kind.FAILED, reason.encode("utf-8", "replace")[:4096])
        case Started(slot, pid):
            return _frame(Kind.STARTED, _STARTED.pack(slot, pid))
        case Ended(slot, pid, status, bytes_in, bytes_out):
            return _frame(Kind.ENDED, _ENDED.pack(slot, pid, status, bytes_in, bytes_out))
        case ForkFailed(slot, errno):
            return _frame(Kind.FORK_FAILED, _FORK_FAILED.pack(slot, errno))
        case Counters(forks, failures, children):
            return _frame(Kind.COUNTERS, _COUNTERS.pack(forks, failures, children))
    raise TypeError(f"not a record: {record!r}")


def _read_address(payload: bytes, at: int) -> tuple[Address, int]:
    if len(payload) < at + _ADDR.size:
        raise WireError("a Conn record cut inside an address")
    family, port, length = _ADDR.unpack_from(payload, at)
    at += _ADDR.size
    if length > MAX_HOST or len(payload) < at + length:
        raise WireError("a Conn record whose address is longer than the record")
    host = payload[at:at + length].decode("utf-8", "surrogateescape")
    return Address(family, host, port), at + length


def _decode_conn(payload: bytes) -> Conn:
    if len(payload) < _CONN.size:
        raise WireError("a Conn record shorter than its fixed part")
    slot, flags = _CONN.unpack_from(payload)
    if flags & ~(_PROXIED | _LOCAL | _STDERR):
        raise WireError(f"a Conn record with unknown flags {flags:#x}")
    peer, at = _read_address(payload, _CONN.size)
    local = None
    if flags & _LOCAL:
        local, at = _read_address(payload, at)
    if at != len(payload):
        raise WireError("a Conn record with bytes after its addresses")
    return Conn(slot, peer, bool(flags & _PROXIED), local, bool(flags & _STDERR))


_FIXED: dict[Kind, tuple[struct.Struct, type]] = {
    Kind.READY: (_READY, Ready), Kind.STARTED: (_STARTED, Started),
    Kind.ENDED: (_ENDED, Ended), Kind.FORK_FAILED: (_FORK_FAILED, ForkFailed),
    Kind.COUNTERS: (_COUNTERS, Counters),
}
_EMPTY: dict[Kind, Record] = {Kind.RETIRE: Retire(), Kind.QUERY: Query()}


def decode_one(kind: Kind, payload: bytes) -> Record:
    """The record of ``kind`` whose payload is ``payload`` (complete)."""
    if kind in _EMPTY:
        if payload:
            raise WireError(f"a {kind.name} record carries no payload")
        return _EMPTY[kind]
    if kind in _FIXED:
        shape, cls = _FIXED[kind]
        if len(payload) != shape.size:
            raise WireError(f"a {kind.name} record of {len(payload)} bytes "
                            f"(it has {shape.size})")
        record: Record = cls(*shape.unpack(payload))
        return record
    if kind is Kind.CONN:
        return _decode_conn(payload)
    if kind is Kind.SETUP:
        return Setup(payload)
    return Failed(payload.decode("utf-8", "replace"))


_KINDS = {int(kind): kind for kind in Kind}


class Decoder:
    """Records out of a byte stream cut anywhere."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Record]:
        """The records completed by ``data`` (none if it ends inside one)."""
        self._buffer += data
        out: list[Record] = []
        buffer = self._buffer
        at = 0
        while len(buffer) - at >= HEADER.size:
            if buffer[at + 1:at + 4] != b"\0\0\0":
                raise WireError("a record header with non-zero padding")
            code, length = HEADER.unpack_from(buffer, at)
            kind = _KINDS.get(code)
            if kind is None:
                raise WireError(f"unknown record kind {code}")
            if length > MAX_PAYLOAD:
                raise WireError(f"a record of {length} bytes (at most {MAX_PAYLOAD})")
            end = at + HEADER.size + length
            if len(buffer) < end:
                break
            out.append(decode_one(kind, bytes(buffer[at + HEADER.size:end])))
            at = end
        del buffer[:at]
        return out

    @property
    def partial(self) -> bool:
        """True if bytes of an incomplete record are waiting (at a packet's end: a bug)."""
        return bool(self._buffer)
