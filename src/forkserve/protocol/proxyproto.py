"""PROXY protocol v1 and v2 headers, sans-I/O: bytes in, one ``ProxyHeader`` out.

Theory of operation
-------------------
A trusted proxy (HAProxy, nginx, an AWS NLB, ...) prepends one header to the stream to tell
us who the real client is (haproxy ``doc/proxy-protocol.txt``). ``ProxyParser`` runs in the
child that owns the connection, before TLS and before the handler; the caller owns the socket,
the deadline and the decision to expect a header at all (DESIGN section 4.9: only from trusted
CIDRs, never guessed). This module never imports ``socket``.

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
import ipaddress
import re
from dataclasses import dataclass
from typing import Literal, TypeAlias

from ..errors import ClientError

__all__ = [
    "DEFAULT_MAX_SIZE", "V1_MAX_LINE", "V2_SIGNATURE", "Address", "Command", "Family",
    "ProxyError", "ProxyHeader", "ProxyParser", "SslClient", "SslInfo", "SslSubType", "TlvType",
    "Transport", "crc32c",
]

V1_SIGNATURE = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
#: Longest v1 line the spec allows, CRLF included:
#: "PROXY UNKNOWN <39-char IPv6> <39-char IPv6> 65535 65535\r\n".
V1_MAX_LINE = 107
#: Shortest v1 line: "PROXY UNKNOWN\r\n". Reading fewer bytes never reads past a header.
V1_MIN_LINE = 15
#: Signature, version/command, family/transport, 16-bit length.
V2_FIXED_LEN = 16
#: The high nibble of byte 13; the spec: "the receiver must only accept this value".
V2_VERSION = 2
#: Default cap on a whole v2 header: the spec designs for 536 bytes; 4096 leaves room for an
#: SSL TLV with a long CN and a UNIQUE_ID while bounding what a child buffers.
DEFAULT_MAX_SIZE = 4096
#: The spec: "an opaque byte sequence of up to 128 bytes".
UNIQUE_ID_MAX = 128
#: An SSL TLV value starts with ``client`` (1 byte) and ``verify`` (4 bytes).
SSL_FIXED_LEN = 5
#: A TLV header: type (1 byte), length (2 bytes, big-endian).
TLV_HEADER_LEN = 3
CRC32C_LEN = 4
#: Longest repr of client bytes quoted in an error message (messages stay one short line).
QUOTE_MAX = 40

Command: TypeAlias = Literal["PROXY", "LOCAL"]
Family: TypeAlias = Literal["TCP4", "TCP6", "UNIX", "UNSPEC"]
Transport: TypeAlias = Literal["STREAM", "DGRAM", "UNSPEC"]
#: ``(host, port)`` for TCP4/TCP6, a path for UNIX (abstract names start with ``"\\0"``).
Address: TypeAlias = tuple[str, int] | str
Tlv: TypeAlias = tuple[int, bytes]


class ProxyError(ClientError):
    """The PROXY header is malformed or not there: close this connection, nothing else."""


class TlvType(enum.IntEnum):
    """Registered v2 TLV types (spec 2.2)."""

    ALPN = 0x01
    AUTHORITY = 0x02
    CRC32C = 0x03
    NOOP = 0x04
    UNIQUE_ID = 0x05
    SSL = 0x20
    NETNS = 0x30


class SslSubType(enum.IntEnum):
    """Types of the TLVs nested in a ``TlvType.SSL`` value (spec 2.2.6)."""

    VERSION = 0x21
    CN = 0x22
    CIPHER = 0x23
    SIG_ALG = 0x24
    KEY_ALG = 0x25


class SslClient(enum.IntFlag):
    """Bits of the SSL TLV's ``client`` byte."""

    SSL = 0x01
    CERT_CONN = 0x02
    CERT_SESS = 0x04


_V2_COMMANDS: dict[int, Command] = {0x0: "LOCAL", 0x1: "PROXY"}
_V2_FAMILIES: dict[int, Family] = {0x0: "UNSPEC", 0x1: "TCP4", 0x2: "TCP6", 0x3: "UNIX"}
_V2_TRANSPORTS: dict[int, Transport] = {0x0: "UNSPEC", 0x1: "STREAM", 0x2: "DGRAM"}
#: Bytes of the address block per family: two addresses, then two ports for IP.
_ADDRESS_LEN: dict[Family, int] = {"UNSPEC": 0, "TCP4": 12, "TCP6": 36, "UNIX": 216}
_UNIX_PATH_LEN = 108
#: v1 tokens that may follow "PROXY "; the line is refused as soon as it leaves all of them.
_V1_FAMILY_TOKENS = (b"TCP4 ", b"TCP6 ", b"UNKNOWN ", b"UNKNOWN\r")
_V1_FIELDS = 6
_V1_IPV4 = re.compile(rb"[0-9.]{7,15}")
_V1_IPV6 = re.compile(rb"[0-9A-Fa-f:]{2,39}")
_V1_PORT = re.compile(rb"0|[1-9][0-9]{0,4}")
_PORT_MAX = 0xFFFF


def _quote(data: bytes | bytearray) -> str:
    """Client bytes for an error message: escaped, one line, bounded."""
    text = repr(bytes(data[:QUOTE_MAX]))
    return text + "..." if len(data) > QUOTE_MAX else text


# --- CRC32C (Castagnoli, RFC 4960 appendix B), as PP2_TYPE_CRC32C requires -----------------

_CRC32C_POLY = 0x82F63B78  # 0x1EDC6F41 bit-reversed: the table works LSB first


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (_CRC32C_POLY if crc & 1 else 0)
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes, crc: int = 0) -> int:
    """CRC32C of ``data``; pass a previous result as ``crc`` to continue over more data."""
    crc ^= 0xFFFFFFFF
    table = _CRC32C_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


# --- The result ------------------------------------------------------------------------------


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("utf-8", "replace")


def _split_tlvs(data: bytes, where: str) -> list[tuple[int, bytes, int]]:
    """``(type, value, offset of value in data)`` for each TLV; ProxyError on bad framing."""
    out: list[tuple[int, bytes, int]] = []
    pos = 0
    while pos < len(data):
        if len(data) - pos < TLV_HEADER_LEN:
            raise ProxyError(f"PROXY v2: truncated {where} header at offset {pos}")
        kind, length = data[pos], data[pos + 1] << 8 | data[pos + 2]
        start = pos + TLV_HEADER_LEN
        if start + length > len(data):
            raise ProxyError(f"PROXY v2: {where} 0x{kind:02x} of {length} bytes overruns "
                             f"the header by {start + length - len(data)}")
        out.append((kind, data[start : start + length], start))
        pos = start + length
    return out


@dataclass(frozen=True, slots=True)
class SslInfo:
    """The decoded ``TlvType.SSL`` TLV: what the proxy knew about the client's TLS."""

    client: SslClient
    #: Zero when the client presented a certificate and it verified.
    verify: int
    tlvs: tuple[Tlv, ...]

    @classmethod
    def decode(cls, value: bytes) -> SslInfo:
        """Decode an SSL TLV value. Raises ``ProxyError`` when it is malformed."""
        if len(value) < SSL_FIXED_LEN:
            raise ProxyError(f"PROXY v2: SSL TLV of {len(value)} bytes, need at least "
                             f"{SSL_FIXED_LEN}")
        subs = _split_tlvs(value[SSL_FIXED_LEN:], "SSL sub-TLV")
        return cls(SslClient(value[0]), int.from_bytes(value[1:SSL_FIXED_LEN], "big"),
                   tuple((kind, sub) for kind, sub, _ in subs))

    def sub(self, kind: int) -> bytes | None:
        """The value of the first sub-TLV of type ``kind``, or ``None``."""
        return next((value for k, value in self.tlvs if k == kind), None)

    @property
    def version(self) -> str | None:
        return _text(self.sub(SslSubType.VERSION))

    @property
    def cn(self) -> str | None:
        return _text(self.sub(SslSubType.CN))

    @property
    def cipher(self) -> str | None:
        return _text(self.sub(SslSubType.CIPHER))

    @property
    def sig_alg(self) -> str | None:
        return _text(self.sub(SslSubType.SIG_ALG))

    @property
    def key_alg(self) -> str | None:
        return _text(self.sub(SslSubType.KEY_ALG))

    @property
    def cert_verified(self) -> bool:
        """The client presented a certificate (on this connection or session) and it verified."""
        presented = bool(self.client & (SslClient.CERT_CONN | SslClient.CERT_SESS))
        return presented and self.verify == 0


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """One parsed PROXY header. Hosts are canonical ``ipaddress`` text (``"::1"``)."""

    version: Literal[1, 2]
    command: Command
    family: Family
    transport: Transport
    source: Address | None
    destination: Address | None
    #: v2 TLVs in wire order, unknown types included; v1 has none.
    tlvs: tuple[Tlv, ...] = ()
    #: Bytes the header took on the wire (for a caller that peeked and must now consume).
    length: int = 0

    @property
    def replaces_peer(self) -> bool:
        """True when ``source``/``destination`` should replace the socket's addresses."""
        return (self.command == "PROXY" and self.family in ("TCP4", "TCP6")
                and self.transport == "STREAM")

    def tlv(self, kind: int) -> bytes | None:
        """The value of the first TLV of type ``kind``, or ``None``."""
        return next((value for k, value in self.tlvs if k == kind), None)

    @property
    def alpn(self) -> bytes | None:
        return self.tlv(TlvType.ALPN)

    @property
    def authority(self) -> str | None:
        """The host name the client asked for (TLS SNI), as text."""
        return _text(self.tlv(TlvType.AUTHORITY))

    @property
    def crc32c(self) -> int | None:
        """The header's CRC32C, already verified by the parser, or ``None``."""
        value = self.tlv(TlvType.CRC32C)
        return None if value is None else int.from_bytes(value, "big")

    @property
    def unique_id(self) -> bytes | None:
        return self.tlv(TlvType.UNIQUE_ID)

    @property
    def netns(self) -> str | None:
        return _text(self.tlv(TlvType.NETNS))

    @property
    def ssl(self) -> SslInfo | None:
        value = self.tlv(TlvType.SSL)
        return None if value is None else SslInfo.decode(value)


# --- v1 --------------------------------------------------------------------------------------


def _check_v1_family(buf: bytearray) -> None:
    """Fail as soon as the bytes after "PROXY " leave every family token."""
    got = bytes(buf[len(V1_SIGNATURE) : len(V1_SIGNATURE) + 8])
    if not any(token.startswith(got[: len(token)]) for token in _V1_FAMILY_TOKENS):
        raise ProxyError(f"PROXY v1: expected TCP4, TCP6 or UNKNOWN, got {_quote(got)}")


def _find_v1_end(buf: bytearray) -> int | None:
    """Index just past the CRLF, ``None`` if more bytes may complete the line."""
    lf = buf.find(b"\n", 0, V1_MAX_LINE)
    # A CR is bare unless it is the last byte so far, or the one just before the LF.
    limit = min(len(buf), V1_MAX_LINE) - 1 if lf < 0 else lf - 1
    if buf.find(b"\r", 0, max(limit, 0)) >= 0:
        raise ProxyError("PROXY v1: bare CR inside the line")
    if lf >= 0:
        if lf == 0 or buf[lf - 1] != ord("\r"):
            raise ProxyError("PROXY v1: line ends with a bare LF, CRLF required")
        return lf + 1
    if len(buf) >= V1_MAX_LINE:
        raise ProxyError(f"PROXY v1: no CRLF within {V1_MAX_LINE} bytes")
    return None


def _v1_host(text: bytes, family: Family, what: str) -> str:
    pattern = _V1_IPV4 if family == "TCP4" else _V1_IPV6
    try:
        if not pattern.fullmatch(text):
            raise ValueError(text)
        if family == "TCP4":
            return str(ipaddress.IPv4Address(text.decode("ascii")))
        return str(ipaddress.IPv6Address(text.decode("ascii")))
    except ValueError:
        raise ProxyError(f"PROXY v1: bad {what} address {_quote(text)} for {family}") from None


def _v1_port(text: bytes, what: str) -> int:
    if not _V1_PORT.fullmatch(text) or int(text) > _PORT_MAX:
        raise ProxyError(f"PROXY v1: bad {what} port {_quote(text)}")
    return int(text)


def _parse_v1(line: bytes, length: int) -> ProxyHeader:
    """Parse one v1 line without its CRLF; ``length`` counts the CRLF."""
    fields = line.split(b" ")
    if fields[1] == b"UNKNOWN":  # the rest of the line "must" be ignored
        return ProxyHeader(1, "PROXY", "UNSPEC", "UNSPEC", None, None, (), length)
    family: Family = "TCP4" if fields[1] == b"TCP4" else "TCP6"
    if len(fields) != _V1_FIELDS:
        raise ProxyError(f"PROXY v1: {len(fields)} space-separated fields, expected "
                         f"{_V1_FIELDS}")
    src = (_v1_host(fields[2], family, "source"), _v1_port(fields[4], "source"))
    dst = (_v1_host(fields[3], family, "destination"), _v1_port(fields[5], "destination"))
    return ProxyHeader(1, "PROXY", family, "STREAM", src, dst, (), length)


# --- v2 --------------------------------------------------------------------------------------


def _check_v2_fixed(buf: bytearray, max_size: int) -> int | None:
    """Check bytes 13-16 as they arrive; return the whole header's length once known."""
    sig = len(V2_SIGNATURE)
    if len(buf) > sig:
        if buf[sig] >> 4 != V2_VERSION:
            raise ProxyError(f"PROXY v2: unsupported version {buf[sig] >> 4}")
        if buf[sig] & 0x0F not in _V2_COMMANDS:
            raise ProxyError(f"PROXY v2: unknown command 0x{buf[sig] & 0x0F:x}")
    if len(buf) > sig + 1:
        if buf[sig + 1] >> 4 not in _V2_FAMILIES:
            raise ProxyError(f"PROXY v2: unknown address family 0x{buf[sig + 1] >> 4:x}")
        if buf[sig + 1] & 0x0F not in _V2_TRANSPORTS:
            raise ProxyError(f"PROXY v2: unknown transport protocol "
                             f"0x{buf[sig + 1] & 0x0F:x}")
    if len(buf) < V2_FIXED_LEN:
        return None
    length = buf[14] << 8 | buf[15]
    if V2_FIXED_LEN + length > max_size:
        raise ProxyError(f"PROXY v2: header of {V2_FIXED_LEN + length} bytes exceeds "
                         f"max_size {max_size}")
    family = _V2_FAMILIES[buf[sig + 1] >> 4]
    if _V2_COMMANDS[buf[sig] & 0x0F] == "PROXY" and length < _ADDRESS_LEN[family]:
        raise ProxyError(f"PROXY v2: length {length} too short for {family} addresses "
                         f"({_ADDRESS_LEN[family]} bytes)")
    return V2_FIXED_LEN + length


def _unix_path(raw: bytes) -> str:
    """A NUL-padded sun_path; an abstract name keeps its leading NUL."""
    if raw[:1] == b"\0" and raw.strip(b"\0"):
        path = b"\0" + raw[1:].rstrip(b"\0")
    else:
        path = raw.split(b"\0", 1)[0]
    return path.decode("utf-8", "surrogateescape")


def _v2_addresses(family: Family, block: bytes) -> tuple[Address | None, Address | None]:
    if family == "UNSPEC":
        return None, None
    if family == "UNIX":
        return _unix_path(block[:_UNIX_PATH_LEN]), _unix_path(block[_UNIX_PATH_LEN:])
    size = 4 if family == "TCP4" else 16
    ip = ipaddress.IPv4Address if family == "TCP4" else ipaddress.IPv6Address
    ports = block[2 * size :]
    return ((str(ip(block[:size])), ports[0] << 8 | ports[1]),
            (str(ip(block[size : 2 * size])), ports[2] << 8 | ports[3]))


def _check_tlvs(raw: bytes, start: int) -> tuple[Tlv, ...]:
    """Validate the TLV area ``raw[start:]`` and verify a CRC32C TLV over all of ``raw``."""
    crc_at: int | None = None
    tlvs: list[Tlv] = []
    for kind, value, offset in _split_tlvs(raw[start:], "TLV"):
        if kind == TlvType.CRC32C:
            if len(value) != CRC32C_LEN:
                raise ProxyError(f"PROXY v2: CRC32C TLV of {len(value)} bytes, expected "
                                 f"{CRC32C_LEN}")
            if crc_at is not None:
                raise ProxyError("PROXY v2: more than one CRC32C TLV")
            crc_at = start + offset
        elif kind == TlvType.UNIQUE_ID and len(value) > UNIQUE_ID_MAX:
            raise ProxyError(f"PROXY v2: UNIQUE_ID of {len(value)} bytes, at most "
                             f"{UNIQUE_ID_MAX}")
        elif kind == TlvType.SSL:
            SslInfo.decode(value)
        tlvs.append((kind, value))
    if crc_at is not None:
        sent = int.from_bytes(raw[crc_at : crc_at + CRC32C_LEN], "big")
        zeroed = raw[:crc_at] + bytes(CRC32C_LEN) + raw[crc_at + CRC32C_LEN :]
        if crc32c(zeroed) != sent:
            raise ProxyError(f"PROXY v2: CRC32C mismatch (header says 0x{sent:08x}, "
                             f"computed 0x{crc32c(zeroed):08x})")
    return tuple(tlvs)


def _parse_v2(raw: bytes) -> ProxyHeader:
    """Parse a complete v2 header whose fixed part ``_check_v2_fixed`` accepted."""
    command = _V2_COMMANDS[raw[12] & 0x0F]
    family = _V2_FAMILIES[raw[13] >> 4]
    transport = _V2_TRANSPORTS[raw[13] & 0x0F]
    end = V2_FIXED_LEN + _ADDRESS_LEN[family]
    if len(raw) < end:  # only LOCAL gets here: its block is discarded, as the spec says
        return ProxyHeader(2, command, family, transport, None, None, (), len(raw))
    source, destination = _v2_addresses(family, raw[V2_FIXED_LEN:end])
    return ProxyHeader(2, command, family, transport, source, destination,
                       _check_tlvs(raw, end), len(raw))


# --- The state machine -----------------------------------------------------------------------


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
    raise ProxyError(f"not a PROXY protocol header: starts with {_quote(buf[:16])}")


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
            _check_v1_family(self._buf)
            end = _find_v1_end(self._buf)
            if end is None:
                return None
            return self._finish(_parse_v1(bytes(self._buf[: end - 2]), end), end)
        if self._state is _State.V2:
            self._total = self._total or _check_v2_fixed(self._buf, self._max)
            if self._total is None or len(self._buf) < self._total:
                return None
            return self._finish(_parse_v2(bytes(self._buf[: self._total])), self._total)
        return None

    def _finish(self, header: ProxyHeader, end: int) -> ProxyHeader:
        self._header, self._rest = header, bytes(self._buf[end:])
        self._state, self._buf = _State.DONE, bytearray()
        return header
