"""PROXY protocol v2: a 16-byte binary prefix, the address block, then TLVs. Sans-I/O; the
parser in ``proxyproto`` feeds it the bytes as they arrive.
"""

from __future__ import annotations

import ipaddress

from .header import (
    CRC32C_LEN,
    UNIQUE_ID_MAX,
    Address,
    Command,
    Family,
    ProxyError,
    ProxyHeader,
    SslInfo,
    Tlv,
    TlvType,
    Transport,
    crc32c,
    split_tlvs,
)

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
#: Signature, version/command, family/transport, 16-bit length.
V2_FIXED_LEN = 16
#: The high nibble of byte 13; the spec: "the receiver must only accept this value".
V2_VERSION = 2

_V2_COMMANDS: dict[int, Command] = {0x0: "LOCAL", 0x1: "PROXY"}
_V2_FAMILIES: dict[int, Family] = {0x0: "UNSPEC", 0x1: "TCP4", 0x2: "TCP6", 0x3: "UNIX"}
_V2_TRANSPORTS: dict[int, Transport] = {0x0: "UNSPEC", 0x1: "STREAM", 0x2: "DGRAM"}
#: Bytes of the address block per family: two addresses, then two ports for IP.
_ADDRESS_LEN: dict[Family, int] = {"UNSPEC": 0, "TCP4": 12, "TCP6": 36, "UNIX": 216}
_UNIX_PATH_LEN = 108


def check_fixed(buf: bytearray, max_size: int) -> int | None:
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
    for kind, value, offset in split_tlvs(raw[start:], "TLV"):
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


def parse(raw: bytes) -> ProxyHeader:
    """Parse a complete v2 header whose fixed part ``check_fixed`` accepted."""
    command = _V2_COMMANDS[raw[12] & 0x0F]
    family = _V2_FAMILIES[raw[13] >> 4]
    transport = _V2_TRANSPORTS[raw[13] & 0x0F]
    end = V2_FIXED_LEN + _ADDRESS_LEN[family]
    if len(raw) < end:  # only LOCAL gets here: its block is discarded, as the spec says
        return ProxyHeader(2, command, family, transport, None, None, (), len(raw))
    source, destination = _v2_addresses(family, raw[V2_FIXED_LEN:end])
    return ProxyHeader(2, command, family, transport, source, destination,
                       _check_tlvs(raw, end), len(raw))
