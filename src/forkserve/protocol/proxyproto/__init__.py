"""PROXY protocol v1 and v2 headers, sans-I/O: bytes in, one ``ProxyHeader`` out.

Theory of operation
-------------------
A trusted proxy (HAProxy, nginx, an AWS NLB, ...) prepends one header to the stream to tell
us who the real client is (haproxy ``doc/proxy-protocol.txt``). ``ProxyParser`` runs in the
child that owns the connection, before TLS and before the handler; the caller owns the socket,
the deadline and the decision to expect a header at all (DESIGN section 4.9: only from trusted
CIDRs, never guessed). This package never imports ``socket``.

Rules
-----
1. **Decide as early as possible, byte by byte.** Every byte is checked the moment it arrives:
   a prefix that can no longer become ``b"PROXY "`` or the 12-byte v2 signature fails at
   once, so a plaintext client (``GET /``, a TLS ClientHello, an SSH banner) is rejected on
   its first byte instead of holding a child until the header deadline. The v1 family token,
   the v2 version, command, family and length are checked as soon as their bytes exist.
2. **Bounded.** A v1 line is at most 107 bytes, CRLF included, and a bare CR or LF is an
   error. A v2 header (16 + length bytes) larger than ``max_size`` is refused as soon as its
   length field is read, so the parser never buffers more than ``max_size`` bytes of an
   incomplete header (the spec allows 16 + 65535; it designs for 536).
3. **Strict.** v1: exactly one space between fields, ``TCP4``/``TCP6`` addresses in the
   family's own text form (no leading zeros in IPv4, hex groups only in IPv6: no zone, no
   dotted tail), ports 0-65535 without leading zeros. ``UNKNOWN`` may be followed by anything
   up to CRLF, which is ignored as the spec says. v2: version 2, command LOCAL or PROXY,
   known family and transport nibbles, a PROXY length that covers the family's addresses,
   well-framed TLVs (SSL sub-TLVs included), a CRC32C TLV of 4 bytes that matches, at most
   one CRC32C, a UNIQUE_ID of at most 128 bytes.
4. **Nothing after the header is lost.** Bytes that arrive with the header belong to the
   application: ``ProxyParser.rest``. A caller that must not read past the header (TLS is
   next and cannot be handed bytes already read) reads at most ``ProxyParser.wanted`` bytes
   at a time; then ``rest`` stays empty.
5. **What to trust is one property.** ``ProxyHeader.replaces_peer`` is true only for command
   PROXY over TCP4/TCP6 with a STREAM transport. v1 ``UNKNOWN`` is reported as command
   PROXY, family UNSPEC (the v2 equivalent the spec describes), LOCAL as LOCAL: both keep the
   socket's peer. DGRAM and UNIX headers are accepted but keep it too (the spec's "fall back
   to UNSPEC mode" for combinations a receiver does not use).

The TLV area starts after the family's address block (0 bytes for UNSPEC). A LOCAL header
whose length does not even cover that block is accepted and its block ignored, since the
receiver "must discard the protocol block" of LOCAL; a PROXY header like that is an error.

Rejected alternatives: a regex over the whole buffer (cannot fail before the line is
complete); ``struct`` unpacking with try/except (turns bugs into ProxyError and hides them).

Worst case: ``feed`` copies the buffer once per call (at most ``max_size`` bytes); the CRC32C
check is one pure-Python pass over at most ``max_size`` bytes.
"""

from __future__ import annotations

import enum

from . import v1, v2
from .header import (
    DEFAULT_MAX_SIZE,
    Address,
    Command,
    Family,
    ProxyError,
    ProxyHeader,
    SslClient,
    SslInfo,
    SslSubType,
    TlvType,
    Transport,
    crc32c,
    quote,
)
from .v1 import V1_MAX_LINE, V1_MIN_LINE, V1_SIGNATURE
from .v2 import V2_FIXED_LEN, V2_SIGNATURE

__all__ = [
    "DEFAULT_MAX_SIZE", "V1_MAX_LINE", "V2_SIGNATURE", "Address", "Command", "Family",
    "ProxyError", "ProxyHeader", "ProxyParser", "SslClient", "SslInfo", "SslSubType", "TlvType",
    "Transport", "crc32c",
]

# The parts: ``header`` (the result, TLVs, CRC32C, errors), ``v1`` (the text line), ``v2`` (the
# binary form); this module is the state machine that feeds them bytes as they arrive.


class _State(enum.Enum):
    SIGNATURE = "signature"  # not yet known which version
    V1 = "v1"
    V2 = "v2"
    DONE = "done"
    FAILED = "failed"


def _detect(buf: bytearray) -> _State:
    """Which version ``buf`` starts, SIGNATURE while both are still possible."""
    for signature, state in ((V1_SIGNATURE, _State.V1), (V2_SIGNATURE, _State.V2)):
        if buf[: len(signature)] == signature[: len(buf)]:
            return state if len(buf) >= len(signature) else _State.SIGNATURE
    raise ProxyError(f"not a PROXY protocol header: starts with {quote(buf[:16])}")


class ProxyParser:
    """Parse one PROXY header from the start of a stream. One per connection, in the child.

    Feed it bytes as they arrive; it returns the header once complete. It raises
    ``ProxyError`` on the first byte that makes a valid header impossible, and never needs
    more than ``max_size`` bytes (and at most ``V1_MAX_LINE`` for v1) to decide.
    """

    __slots__ = ("_buf", "_error", "_header", "_max", "_rest", "_state", "_total")

    def __init__(self, max_size: int = DEFAULT_MAX_SIZE) -> None:
        if max_size < V1_MAX_LINE:
            raise ValueError(f"max_size must be at least {V1_MAX_LINE} (a full v1 line)")
        self._max = max_size
        self._buf = bytearray()
        self._state = _State.SIGNATURE
        self._total: int | None = None  # a v2 header's full length, once known
        self._header: ProxyHeader | None = None
        self._rest = b""
        self._error = ""

    @property
    def header(self) -> ProxyHeader | None:
        """The parsed header, once ``feed`` returned it."""
        return self._header

    @property
    def rest(self) -> bytes:
        """Bytes received after the header: the application's first bytes. Never dropped."""
        return self._rest

    @property
    def wanted(self) -> int:
        """How many more bytes may be read without reading past the header (0 when decided).

        A caller that reads at most this many each time gets an empty ``rest``.
        """
        size = len(self._buf)
        if self._state is _State.V2 or (self._state is _State.SIGNATURE and size
                                         and self._buf[0] == V2_SIGNATURE[0]):
            return (self._total or V2_FIXED_LEN) - size
        if self._state is _State.V1:
            return max(V1_MIN_LINE - size, 1 if self._buf.endswith(b"\r") else 2)
        return V1_MIN_LINE - size if self._state is _State.SIGNATURE else 0

    def feed(self, data: bytes) -> ProxyHeader | None:
        """Add ``data``; return the header once complete, ``None`` while more is needed.

        Raises ``ProxyError`` (and keeps raising it) once the input cannot be a valid
        header; ``RuntimeError`` if called again after the header was returned.
        """
        if self._state is _State.DONE:
            raise RuntimeError("the PROXY header is complete; the application's bytes are "
                               "in .rest")
        if self._state is _State.FAILED:
            raise ProxyError(self._error)
        self._buf += data
        try:
            return self._step()
        except ProxyError as exc:
            self._state, self._error, self._buf = _State.FAILED, str(exc), bytearray()
            raise

    def _step(self) -> ProxyHeader | None:
        if self._state is _State.SIGNATURE:
            self._state = _detect(self._buf)
        if self._state is _State.V1:
            v1.check_family(self._buf)
            end = v1.find_end(self._buf)
            if end is None:
                return None
            return self._finish(v1.parse(bytes(self._buf[: end - 2]), end), end)
        if self._state is _State.V2:
            self._total = self._total or v2.check_fixed(self._buf, self._max)
            if self._total is None or len(self._buf) < self._total:
                return None
            return self._finish(v2.parse(bytes(self._buf[: self._total])), self._total)
        return None

    def _finish(self, header: ProxyHeader, end: int) -> ProxyHeader:
        self._header, self._rest = header, bytes(self._buf[end:])
        self._state, self._buf = _State.DONE, bytearray()
        return header
