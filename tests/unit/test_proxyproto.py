"""PROXY protocol: vectors fed whole, byte by byte and split anywhere; v2 round trips; fuzz."""

from __future__ import annotations

import contextlib
import ipaddress
import struct
from typing import Literal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from forkserve.errors import ClientError
from forkserve.protocol import proxyproto
from forkserve.protocol.proxyproto import (
    DEFAULT_MAX_SIZE,
    V1_MAX_LINE,
    V2_SIGNATURE,
    Address,
    Command,
    Family,
    ProxyError,
    ProxyHeader,
    ProxyParser,
    SslClient,
    SslInfo,
    Transport,
    crc32c,
)

SIG = V2_SIGNATURE

# --- A test-side encoder, written from the spec, independent of the parser -------------------


def tlv(kind: int, value: bytes) -> bytes:
    return struct.pack(">BH", kind, len(value)) + value


def v2(ver_cmd: int, fam: int, block: bytes = b"", tlvs: tuple[tuple[int, bytes], ...] = (),
       *, crc: bool = False, length: int | None = None) -> bytes:
    """A v2 header: ``crc`` appends a CRC32C TLV computed over the finished header."""
    body = block + b"".join(tlv(kind, value) for kind, value in tlvs)
    if crc:
        body += tlv(0x03, bytes(4))
    raw = SIG + bytes([ver_cmd, fam]) + struct.pack(">H", len(body) if length is None
                                                    else length) + body
    return raw[:-4] + struct.pack(">I", crc32c(raw)) if crc else raw


def inet(src: str, dst: str, sport: int, dport: int) -> bytes:
    return (ipaddress.ip_address(src).packed + ipaddress.ip_address(dst).packed
            + struct.pack(">HH", sport, dport))


def unix(src: bytes, dst: bytes) -> bytes:
    return src.ljust(108, b"\0") + dst.ljust(108, b"\0")


def ssl_value(client: int, verify: int, subs: tuple[tuple[int, bytes], ...]) -> bytes:
    return bytes([client]) + struct.pack(">I", verify) + b"".join(tlv(k, v) for k, v in subs)


Kind = tuple[Literal[1, 2], Command, Family, Transport]


def h(raw: bytes, kind: Kind, source: Address | None = None, destination: Address | None = None,
      tlvs: tuple[tuple[int, bytes], ...] = ()) -> tuple[bytes, ProxyHeader]:
    """A vector: the bytes and the header they must give (``length`` is the whole input)."""
    return raw, ProxyHeader(*kind, source, destination, tlvs, len(raw))


# --- Valid vectors -------------------------------------------------------------------------

FFFF6 = ":".join(["ffff"] * 8)
SSL_SUBS = ((0x21, b"TLSv1.3"), (0x22, b"client.example"), (0x23, b"TLS_AES_128_GCM_SHA256"),
            (0x24, b"RSA-SHA256"), (0x25, b"RSA2048"))
SSL_TLV = ssl_value(0x07, 0, SSL_SUBS)
CUSTOM = ((0x01, b"h2"), (0x02, b"example.com"), (0x04, b"\0\0"), (0x05, b"id-42"),
          (0x30, b"blue"), (0xE0, b"app data"))
TCP4_BLOCK = inet("192.168.0.1", "192.168.0.11", 56324, 443)
SRC4, DST4 = ("192.168.0.1", 56324), ("192.168.0.11", 443)

V1_TCP4: Kind = (1, "PROXY", "TCP4", "STREAM")
V1_TCP6: Kind = (1, "PROXY", "TCP6", "STREAM")
V1_UNKNOWN: Kind = (1, "PROXY", "UNSPEC", "UNSPEC")
V2_TCP4: Kind = (2, "PROXY", "TCP4", "STREAM")
V2_UNSPEC: Kind = (2, "PROXY", "UNSPEC", "UNSPEC")
LOCAL_UNSPEC: Kind = (2, "LOCAL", "UNSPEC", "UNSPEC")
CRC4 = v2(0x21, 0x11, TCP4_BLOCK, CUSTOM, crc=True)
CRC0 = v2(0x20, 0x00, crc=True)

VALID = {
    # v1: the spec's example and its maximum lines (section 2.1)
    "v1-tcp4-spec": h(b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n", V1_TCP4,
                      SRC4, DST4),
    "v1-tcp4-max": h(b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n", V1_TCP4,
                     ("255.255.255.255", 65535), ("255.255.255.255", 65535)),
    "v1-tcp4-zeros": h(b"PROXY TCP4 0.0.0.0 10.0.0.1 0 0\r\n", V1_TCP4,
                       ("0.0.0.0", 0), ("10.0.0.1", 0)),
    "v1-tcp6-max": h(f"PROXY TCP6 {FFFF6} {FFFF6} 65535 65535\r\n".encode(), V1_TCP6,
                     (FFFF6, 65535), (FFFF6, 65535)),
    "v1-tcp6-canonical": h(b"PROXY TCP6 2001:DB8:0:0:0:0:0:1 ::1 1234 80\r\n", V1_TCP6,
                           ("2001:db8::1", 1234), ("::1", 80)),
    "v1-unknown-short": h(b"PROXY UNKNOWN\r\n", V1_UNKNOWN),
    "v1-unknown-worst": h(f"PROXY UNKNOWN {FFFF6} {FFFF6} 65535 65535\r\n".encode(),
                          V1_UNKNOWN),
    "v1-unknown-ignored": h(b"PROXY UNKNOWN whatever \x00\xff follows\r\n", V1_UNKNOWN),
    # v2, written out by hand from the spec's layout (not through the encoder)
    "v2-tcp4-literal": h(SIG + b"\x21\x11\x00\x0c" + b"\xc0\xa8\x00\x01\xc0\xa8\x00\x0b"
                         + b"\xdc\x04\x01\xbb", V2_TCP4, SRC4, DST4),
    "v2-local-literal": h(SIG + b"\x20\x00\x00\x00", LOCAL_UNSPEC),
    # v2 PROXY, each family
    "v2-tcp6": h(v2(0x21, 0x21, inet("2001:db8::1", "::ffff:10.0.0.1", 1, 65535)),
                 (2, "PROXY", "TCP6", "STREAM"), ("2001:db8::1", 1), ("::ffff:a00:1", 65535)),
    "v2-udp4": h(v2(0x21, 0x12, TCP4_BLOCK), (2, "PROXY", "TCP4", "DGRAM"), SRC4, DST4),
    "v2-unix": h(v2(0x21, 0x31, unix(b"/run/a.sock", b"\0abstract"), ((0x04, b""),)),
                 (2, "PROXY", "UNIX", "STREAM"), "/run/a.sock", "\0abstract", ((0x04, b""),)),
    "v2-unix-empty": h(v2(0x21, 0x32, unix(b"", b"/x")), (2, "PROXY", "UNIX", "DGRAM"),
                       "", "/x"),
    # (paths whose last byte is not NUL padding: only the padding goes)
    "v2-unix-ends-in-x": h(v2(0x21, 0x31, unix(b"/run/X", b"\0abstractX")),
                           (2, "PROXY", "UNIX", "STREAM"), "/run/X", "\0abstractX"),
    "v2-unix-abstract-x": h(v2(0x21, 0x31, unix(b"\0X", b"/x")),
                            (2, "PROXY", "UNIX", "STREAM"), "\0X", "/x"),
    "v2-unspec": h(v2(0x21, 0x00), V2_UNSPEC),
    # v2 LOCAL: addresses reported if present, a block too short for them is discarded
    "v2-local-tcp4": h(v2(0x20, 0x11, TCP4_BLOCK), (2, "LOCAL", "TCP4", "STREAM"), SRC4, DST4),
    "v2-local-tcp4-empty": h(v2(0x20, 0x11), (2, "LOCAL", "TCP4", "STREAM")),
    "v2-local-opaque": h(v2(0x20, 0x21, b"\xff" * 5), (2, "LOCAL", "TCP6", "STREAM")),
    # v2 TLVs
    "v2-tlvs": h(v2(0x21, 0x11, TCP4_BLOCK, CUSTOM), V2_TCP4, SRC4, DST4, CUSTOM),
    "v2-crc": h(CRC4, V2_TCP4, SRC4, DST4, (*CUSTOM, (0x03, CRC4[-4:]))),
    "v2-ssl": h(v2(0x21, 0x11, TCP4_BLOCK, ((0x20, SSL_TLV),)), V2_TCP4, SRC4, DST4,
                ((0x20, SSL_TLV),)),
    "v2-unspec-crc": h(CRC0, LOCAL_UNSPEC, None, None, ((0x03, CRC0[-4:]),)),
    "v2-unique-id-max": h(v2(0x21, 0x11, TCP4_BLOCK, ((0x05, b"u" * 128),)), V2_TCP4,
                          SRC4, DST4, ((0x05, b"u" * 128),)),
}
TRAILING = b"GET / HTTP/1.1\r\nHost: 192.168.0.11\r\n\r\n"


def chunks_of(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


def feed_chunks(chunks: list[bytes], max_size: int = DEFAULT_MAX_SIZE
                ) -> tuple[ProxyHeader | None, bytes]:
    """Feed until a header comes out; return it and everything after it."""
    parser = ProxyParser(max_size)
    for i, chunk in enumerate(chunks):
        header = parser.feed(chunk)
        if header is not None:
            return header, parser.rest + b"".join(chunks[i + 1 :])
    return None, b""


@pytest.mark.parametrize(("raw", "expected"), VALID.values(), ids=VALID.keys())
@pytest.mark.parametrize("trailing", [b"", TRAILING], ids=["alone", "with-data"])
def test_valid_whole_and_byte_by_byte(raw: bytes, expected: ProxyHeader,
                                      trailing: bytes) -> None:
    data = raw + trailing
    assert feed_chunks([data]) == (expected, trailing)
    parser = ProxyParser()
    for i in range(len(raw) - 1):
        assert parser.feed(data[i : i + 1]) is None
    assert parser.feed(data[len(raw) - 1 :]) == expected
    assert parser.header == expected
    assert parser.rest == trailing


@given(st.sampled_from(sorted(VALID)), st.binary(max_size=20),
       st.lists(st.integers(min_value=0, max_value=300), max_size=8))
def test_any_split_gives_the_same_header_and_rest(name: str, trailing: bytes,
                                                  cuts: list[int]) -> None:
    raw, expected = VALID[name]
    data = raw + trailing
    assert feed_chunks(chunks_of(data, cuts)) == (expected, trailing)


@pytest.mark.parametrize(("raw", "expected"), VALID.values(), ids=VALID.keys())
def test_reading_only_wanted_never_reads_past_the_header(raw: bytes,
                                                         expected: ProxyHeader) -> None:
    data, parser, pos, header = raw + TRAILING, ProxyParser(), 0, None
    while header is None:
        wanted = parser.wanted
        assert wanted >= 1
        header, pos = parser.feed(data[pos : pos + wanted]), pos + wanted
    assert (header, parser.rest, pos, parser.wanted) == (expected, b"", len(raw), 0)


# --- Invalid vectors -------------------------------------------------------------------------

V1_OK = b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n"
BAD_SSL_SUB = ssl_value(1, 0, ()) + b"\x21\x00\x09TLS"

INVALID = {
    "plaintext": (b"GET / HTTP/1.1\r\n\r\n", "not a PROXY protocol header"),
    "tls-hello": (b"\x16\x03\x01\x02\x00\x01\x00", "not a PROXY protocol header"),
    "lowercase": (b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "not a PROXY protocol header"),
    "no-space": (b"PROXYTCP4 1.2.3.4 5.6.7.8 1 2\r\n", "not a PROXY protocol header"),
    "v1-family": (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "expected TCP4, TCP6 or UNKNOWN"),
    "v1-two-spaces": (b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "expected TCP4, TCP6 or UNKNOWN"),
    "v1-no-fields": (b"PROXY TCP4\r\n", "expected TCP4, TCP6 or UNKNOWN"),
    "v1-unknownx": (b"PROXY UNKNOWNX\r\n", "expected TCP4, TCP6 or UNKNOWN"),
    "v1-too-long": (b"PROXY UNKNOWN " + b"a" * 100 + b"\r\n", "no CRLF within 107 bytes"),
    "v1-108": (f"PROXY UNKNOWN {FFFF6} {FFFF6} 65535 655350\r\n".encode(),
               "no CRLF within 107 bytes"),
    "v1-bare-lf": (V1_OK[:-2] + b"\n", "bare LF"),
    "v1-bare-cr": (V1_OK[:-2] + b"\rX\r\n", "bare CR"),
    "v1-cr-inside": (b"PROXY UNKNOWN \r\r\n", "bare CR"),
    "v1-5-fields": (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "5 space-separated fields"),
    "v1-7-fields": (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", "7 space-separated fields"),
    "v1-double-space": (b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", "7 space-separated fields"),
    "v1-trailing-space": (V1_OK[:-2] + b" \r\n", "7 space-separated fields"),
    "v1-leading-zero-ip": (b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", "bad source address"),
    "v1-octet-256": (b"PROXY TCP4 1.2.3.4 5.6.7.256 1 2\r\n", "bad destination address"),
    "v1-short-ip": (b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", "bad source address"),
    "v1-ipv6-in-tcp4": (b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", "bad source address"),
    "v1-ipv4-in-tcp6": (b"PROXY TCP6 ::1 5.6.7.8 1 2\r\n", "bad destination address"),
    "v1-zone": (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "bad source address"),
    "v1-mapped-dotted": (b"PROXY TCP6 ::ffff:1.2.3.4 ::1 1 2\r\n", "bad source address"),
    "v1-two-double-colons": (b"PROXY TCP6 1::2::3 ::1 1 2\r\n", "bad source address"),
    "v1-port-range": (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "bad source port"),
    "v1-port-zero": (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 080\r\n", "bad destination port"),
    "v1-port-sign": (b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n", "bad source port"),
    "v1-port-unicode": ("PROXY TCP4 1.2.3.4 5.6.7.8 1 \u0661\r\n".encode(),
                        "bad destination port"),
    "v2-signature": (SIG[:7] + b"X" + SIG[8:] + b"\x21\x11\x00\x00", "not a PROXY protocol"),
    "v2-version-1": (v2(0x11, 0x11, TCP4_BLOCK), "unsupported version 1"),
    "v2-version-3": (v2(0x31, 0x11, TCP4_BLOCK), "unsupported version 3"),
    "v2-command": (v2(0x22, 0x11, TCP4_BLOCK), "unknown command 0x2"),
    "v2-family": (v2(0x21, 0x41, TCP4_BLOCK), "unknown address family 0x4"),
    "v2-transport": (v2(0x21, 0x13, TCP4_BLOCK), "unknown transport protocol 0x3"),
    "v2-short-tcp4": (v2(0x21, 0x11, TCP4_BLOCK[:11]), "length 11 too short for TCP4"),
    "v2-short-tcp6": (v2(0x21, 0x21, TCP4_BLOCK), "length 12 too short for TCP6"),
    "v2-short-unix": (v2(0x21, 0x31, b"\0" * 215), "length 215 too short for UNIX"),
    "v2-max-size": (v2(0x21, 0x11, TCP4_BLOCK, length=0xFFFF), "exceeds max_size 4096"),
    "v2-tlv-truncated": (v2(0x21, 0x11, TCP4_BLOCK + b"\x01\x00"), "truncated TLV header"),
    "v2-tlv-overrun": (v2(0x21, 0x11, TCP4_BLOCK + b"\x01\x00\x0ah2"),
                       "TLV 0x01 of 10 bytes overruns the header by 8"),
    "v2-tlv-truncated-after-one": (v2(0x21, 0x11, TCP4_BLOCK + tlv(0x01, b"h2") + b"\x01\x00"),
                                   "truncated TLV header at offset 5"),
    "v2-crc-mismatch": (v2(0x21, 0x11, TCP4_BLOCK, crc=True)[:-1] + b"\x00",
                        "CRC32C mismatch"),
    "v2-crc-length": (v2(0x21, 0x11, TCP4_BLOCK, ((0x03, b"abc"),)), "CRC32C TLV of 3 bytes"),
    "v2-crc-twice": (v2(0x21, 0x11, TCP4_BLOCK, ((0x03, bytes(4)),), crc=True),
                     "more than one CRC32C"),
    "v2-unique-id": (v2(0x21, 0x11, TCP4_BLOCK, ((0x05, b"u" * 129),)),
                     "UNIQUE_ID of 129 bytes"),
    "v2-ssl-short": (v2(0x21, 0x11, TCP4_BLOCK, ((0x20, b"\x01\0\0\0"),)), "SSL TLV of 4"),
    "v2-ssl-sub-overrun": (v2(0x21, 0x11, TCP4_BLOCK, ((0x20, BAD_SSL_SUB),)),
                           "SSL sub-TLV 0x21 of 9 bytes overruns"),
    "v2-ssl-sub-truncated": (v2(0x21, 0x11, TCP4_BLOCK, ((0x20, ssl_value(1, 0, ()) + b"\x21"),)),
                             "truncated SSL sub-TLV header"),
    "v2-local-bad-tlv": (v2(0x20, 0x11, TCP4_BLOCK + b"\x01\x00"), "truncated TLV header"),
}


def first_error(parser: ProxyParser, chunks: list[bytes]) -> ProxyError:
    """Feed ``chunks`` until the parser raises; it must raise, and never return a header."""
    for chunk in chunks:
        try:
            assert parser.feed(chunk) is None
        except ProxyError as exc:
            return exc
    raise AssertionError("no ProxyError raised")


@pytest.mark.parametrize(("raw", "fragment"), INVALID.values(), ids=INVALID.keys())
def test_invalid_whole_byte_by_byte_and_with_data(raw: bytes, fragment: str) -> None:
    for chunks in ([raw], [raw + TRAILING], [raw[i : i + 1] for i in range(len(raw))]):
        parser = ProxyParser()
        message = str(first_error(parser, chunks))
        assert fragment in message
        assert "\n" not in message
        with pytest.raises(ProxyError, match=fragment):  # a failed parser stays failed
            parser.feed(b"more")
        assert parser.header is None
        assert parser.rest == b""


EARLY = {
    # input, the byte count at which it must fail (fed one byte at a time)
    "plaintext": (b"GET / HTTP/1.1\r\n", 1),
    "ssh": (b"SSH-2.0-OpenSSH_9.6\r\n", 1),
    "tls": (b"\x16\x03\x01\x00\xa5\x01", 1),
    "v1-typo": (b"PROXZ TCP4", 5),
    "v1-family": (b"PROXY TCP5 1.2.3.4", 10),
    "v1-unknown": (b"PROXY UNKNOWX", 13),
    "v1-bare-lf": (b"PROXY TCP4 1.2.3.4\n", 19),
    "v1-no-crlf": (b"PROXY UNKNOWN " + b"x" * 200, V1_MAX_LINE),
    "v2-signature": (SIG[:7] + b"X" + SIG[8:], 8),
    "v2-version": (SIG + b"\x11\x11\x00\x0c", 13),
    "v2-family": (SIG + b"\x21\x51\x00\x0c", 14),
    "v2-too-big": (SIG + b"\x21\x11\xff\xff" + b"\0" * 100, 16),
    "v2-too-short": (SIG + b"\x21\x21\x00\x0c" + b"\0" * 100, 16),
}


@pytest.mark.parametrize(("data", "fails_at"), EARLY.values(), ids=EARLY.keys())
def test_failure_is_decided_on_the_first_impossible_byte(data: bytes, fails_at: int) -> None:
    parser = ProxyParser()
    for i in range(fails_at - 1):
        assert parser.feed(data[i : i + 1]) is None
    with pytest.raises(ProxyError):
        parser.feed(data[fails_at - 1 : fails_at])


# --- v2 round trips through the test-side encoder -------------------------------------------

COMMANDS: tuple[Command, ...] = ("LOCAL", "PROXY")
FAMILIES: tuple[Family, ...] = ("UNSPEC", "TCP4", "TCP6", "UNIX")
TRANSPORTS: tuple[Transport, ...] = ("UNSPEC", "STREAM", "DGRAM")
ports = st.integers(min_value=0, max_value=0xFFFF)
paths = st.lists(st.integers(min_value=1, max_value=255), max_size=107).map(bytes)
plain_tlvs = st.lists(st.tuples(st.integers(min_value=0, max_value=255)
                                .filter(lambda t: t not in (0x03, 0x20)),
                                st.binary(max_size=64)), max_size=6)


@st.composite
def v2_vectors(draw: st.DrawFn) -> tuple[bytes, ProxyHeader]:
    command, family, transport = (draw(st.sampled_from(range(n))) for n in (2, 4, 3))
    source: Address | None = None
    destination: Address | None = None
    block = b""
    if family in (1, 2):
        addrs = st.ip_addresses(v=4 if family == 1 else 6)
        src, dst, sport, dport = draw(addrs), draw(addrs), draw(ports), draw(ports)
        block = inet(str(src), str(dst), sport, dport)
        source, destination = (str(src), sport), (str(dst), dport)
    elif family == 3:
        src_path, dst_path = draw(paths), b"\0" + draw(paths.filter(bool))
        block = unix(src_path, dst_path)
        source, destination = (p.decode("utf-8", "surrogateescape")
                               for p in (src_path, dst_path))
    tlvs = tuple(draw(plain_tlvs))
    crc = draw(st.booleans())
    raw = v2(0x20 | command, family << 4 | transport, block, tlvs, crc=crc)
    tlvs += ((0x03, raw[-4:]),) if crc else ()
    return h(raw, (2, COMMANDS[command], FAMILIES[family], TRANSPORTS[transport]), source,
             destination, tlvs)


@given(v2_vectors(), st.binary(max_size=16), st.lists(st.integers(0, 700), max_size=5))
def test_generated_v2_headers_round_trip(vector: tuple[bytes, ProxyHeader], trailing: bytes,
                                         cuts: list[int]) -> None:
    raw, expected = vector
    assert feed_chunks(chunks_of(raw + trailing, cuts)) == (expected, trailing)
    assert expected.replaces_peer == (expected.command == "PROXY" and expected.family in
                                      ("TCP4", "TCP6") and expected.transport == "STREAM")


# --- Garbage: only ProxyError, and decided within max_size bytes ----------------------------

PREFIXES = [b"", b"P", b"PROXY ", b"PROXY TCP4 ", b"PROXY TCP6 ", b"PROXY UNKNOWN", SIG,
            SIG + b"\x21", SIG + b"\x21\x11", SIG + b"\x20\x00", SIG + b"\x21\x31\x00"]


def decide(data: bytes, max_size: int) -> int | None:
    """Feed byte by byte; the count of bytes that decided, ``None`` if still undecided."""
    parser = ProxyParser(max_size)
    for i in range(len(data)):
        try:
            if parser.feed(data[i : i + 1]) is not None:
                return i + 1
        except ProxyError:
            return i + 1
    return None


@given(st.sampled_from(PREFIXES), st.binary(max_size=400),
       st.integers(min_value=V1_MAX_LINE, max_value=600))
def test_garbage_raises_only_proxy_error_within_max_size(prefix: bytes, tail: bytes,
                                                         max_size: int) -> None:
    data = prefix + tail
    decided = decide(data, max_size)
    if decided is None:
        assert len(data) < max_size
    else:
        assert decided <= max_size
    with contextlib.suppress(ProxyError):
        ProxyParser(max_size).feed(data)


@given(st.sampled_from(sorted(VALID)), st.integers(min_value=0), st.integers(0, 255),
       st.integers(min_value=0, max_value=20))
def test_mutated_vectors_raise_only_proxy_error(name: str, where: int, byte: int,
                                                cut: int) -> None:
    raw = bytearray(VALID[name][0])
    raw[where % len(raw)] = byte
    for data in (bytes(raw), bytes(raw[: len(raw) - cut])):
        with contextlib.suppress(ProxyError):
            ProxyParser().feed(data)


# --- The header's helpers, the parser's contract, CRC32C -----------------------------------


def test_known_tlvs_are_decoded() -> None:
    raw, _ = VALID["v2-crc"]
    header = ProxyParser().feed(raw)
    assert header is not None
    assert (header.alpn, header.authority, header.unique_id, header.netns) == (
        b"h2", "example.com", b"id-42", "blue")
    assert header.crc32c == int.from_bytes(raw[-4:], "big")
    assert header.tlv(0xE0) == b"app data"
    assert header.tlv(0xE1) is None
    assert header.ssl is None


def test_ssl_tlv_and_its_sub_tlvs() -> None:
    header = ProxyParser().feed(VALID["v2-ssl"][0])
    assert header is not None
    ssl = header.ssl
    assert ssl is not None
    assert ssl.client == SslClient.SSL | SslClient.CERT_CONN | SslClient.CERT_SESS
    assert (ssl.version, ssl.cn, ssl.cipher, ssl.sig_alg, ssl.key_alg) == (
        "TLSv1.3", "client.example", "TLS_AES_128_GCM_SHA256", "RSA-SHA256", "RSA2048")
    assert ssl.cert_verified
    assert not SslInfo.decode(ssl_value(0x03, 1, ())).cert_verified  # verify failed
    assert not SslInfo.decode(ssl_value(0x01, 0, ())).cert_verified  # no certificate
    assert SslInfo.decode(ssl_value(0x01, 0, ())).version is None
    # verify: the 4 bytes after client, big-endian (mutmut: value[2:5] went unseen)
    assert SslInfo.decode(ssl_value(0x01, 0x01020304, ())).verify == 0x01020304


def test_text_tlvs_that_are_not_utf8_are_decoded_with_replacement() -> None:
    header = ProxyParser().feed(v2(0x21, 0x11, TCP4_BLOCK, ((0x02, b"bad\xffname"),)))
    assert header is not None
    assert header.authority == "bad\ufffdname"


@pytest.mark.parametrize(("name", "replaces"), [
    ("v1-tcp4-spec", True), ("v1-tcp6-max", True), ("v1-unknown-short", False),
    ("v2-tcp4-literal", True), ("v2-tcp6", True), ("v2-udp4", False), ("v2-unix", False),
    ("v2-unspec", False), ("v2-local-tcp4", False), ("v2-local-literal", False)])
def test_only_proxy_over_tcp_replaces_the_peer(name: str, replaces: bool) -> None:
    assert VALID[name][1].replaces_peer is replaces


def test_v1_headers_carry_no_tlvs() -> None:
    header = VALID["v1-tcp4-spec"][1]
    assert (header.tlvs, header.alpn, header.crc32c, header.ssl) == ((), None, None, None)


def test_feeding_after_the_header_is_a_local_error() -> None:
    parser = ProxyParser()
    assert parser.feed(V1_OK + b"x") is not None
    with pytest.raises(RuntimeError, match="rest"):
        parser.feed(b"y")
    assert parser.rest == b"x"


def test_wanted_at_the_start_and_after_a_signature() -> None:
    parser = ProxyParser()
    assert parser.wanted == len(b"PROXY UNKNOWN\r\n")
    parser.feed(SIG[:3])
    assert parser.wanted == 13
    parser.feed(SIG[3:] + b"\x21\x11\x00\x0c")
    assert parser.wanted == 12


def test_max_size_bounds() -> None:
    with pytest.raises(ValueError, match="max_size"):
        ProxyParser(V1_MAX_LINE - 1)
    unix_header = VALID["v2-unix"][0]
    with pytest.raises(ProxyError, match=f"exceeds max_size {len(unix_header) - 1}"):
        ProxyParser(len(unix_header) - 1).feed(unix_header)
    assert ProxyParser(len(unix_header)).feed(unix_header) == VALID["v2-unix"][1]


def test_proxy_error_ends_only_the_connection() -> None:
    assert issubclass(ProxyError, ClientError)
    assert not issubclass(ProxyError, ValueError)


def test_public_names() -> None:
    assert all(hasattr(proxyproto, name) for name in proxyproto.__all__)


@pytest.mark.parametrize(("data", "crc"), [
    (b"", 0x00000000),
    (b"123456789", 0xE3069283),  # the CRC catalogue's check value for CRC-32C
    (bytes(32), 0x8A9136AA),  # RFC 3720 B.4
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
])
def test_crc32c_known_vectors(data: bytes, crc: int) -> None:
    assert crc32c(data) == crc


@given(st.binary(max_size=64), st.binary(max_size=64))
def test_crc32c_continues_over_chunks(a: bytes, b: bytes) -> None:
    assert crc32c(b, crc32c(a)) == crc32c(a + b)


def test_a_v2_header_longer_than_255_bytes_reads_both_length_bytes() -> None:
    # (mutmut: a length read as buf[14] << 9 | buf[15] survived: no vector was >= 256 bytes)
    raw = v2(0x21, 0x11, inet("192.0.2.1", "192.0.2.2", 1, 2), ((0x04, bytes(300)),))
    assert raw[14] == 1, "the length's high byte is in use"
    header, rest = feed_chunks([raw + TRAILING])
    assert header is not None
    assert header.source is not None
    assert rest == TRAILING
