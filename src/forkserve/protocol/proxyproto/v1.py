"""PROXY protocol v1: one text line, ``PROXY TCP4|TCP6|UNKNOWN ...\r\n``. Sans-I/O; the
parser in ``proxyproto`` feeds it the bytes as they arrive.
"""

from __future__ import annotations

import ipaddress
import re

from .header import Family, ProxyError, ProxyHeader, quote

V1_SIGNATURE = b"PROXY "
#: Longest v1 line the spec allows, CRLF included:
#: "PROXY UNKNOWN <39-char IPv6> <39-char IPv6> 65535 65535\r\n".
V1_MAX_LINE = 107
#: Shortest v1 line: "PROXY UNKNOWN\r\n". Reading fewer bytes never reads past a header.
V1_MIN_LINE = 15
#: v1 tokens that may follow "PROXY "; the line is refused as soon as it leaves all of them.
_V1_FAMILY_TOKENS = (b"TCP4 ", b"TCP6 ", b"UNKNOWN ", b"UNKNOWN\r")
_V1_FIELDS = 6
_V1_IPV4 = re.compile(rb"[0-9.]{7,15}")
_V1_IPV6 = re.compile(rb"[0-9A-Fa-f:]{2,39}")
_V1_PORT = re.compile(rb"0|[1-9][0-9]{0,4}")
_PORT_MAX = 0xFFFF


def check_family(buf: bytearray) -> None:
    """Fail as soon as the bytes after "PROXY " leave every family token."""
    got = bytes(buf[len(V1_SIGNATURE) : len(V1_SIGNATURE) + 8])
    if not any(token.startswith(got[: len(token)]) for token in _V1_FAMILY_TOKENS):
        raise ProxyError(f"PROXY v1: expected TCP4, TCP6 or UNKNOWN, got {quote(got)}")


def find_end(buf: bytearray) -> int | None:
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
        raise ProxyError(f"PROXY v1: bad {what} address {quote(text)} for {family}") from None


def _v1_port(text: bytes, what: str) -> int:
    if not _V1_PORT.fullmatch(text) or int(text) > _PORT_MAX:
        raise ProxyError(f"PROXY v1: bad {what} port {quote(text)}")
    return int(text)


def parse(line: bytes, length: int) -> ProxyHeader:
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
