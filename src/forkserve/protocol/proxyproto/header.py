"""The result of parsing a PROXY header, shared by both versions: ``ProxyHeader``, its TLVs
(``TlvType``, ``SslInfo``), the CRC32C that v2 may carry, and ``ProxyError``. Sans-I/O.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal, TypeAlias

from ...errors import ClientError

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


def quote(data: bytes | bytearray) -> str:
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


def split_tlvs(data: bytes, where: str) -> list[tuple[int, bytes, int]]:
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
        subs = split_tlvs(value[SSL_FIXED_LEN:], "SSL sub-TLV")
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
