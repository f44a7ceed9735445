"""The zygote's wire (issue 16): fixed vectors, byte by byte, and every malformed record refused."""

from __future__ import annotations

import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from forkserve.protocol.zygote import (
    HEADER,
    MAX_HOST,
    MAX_PAYLOAD,
    Address,
    Conn,
    Counters,
    Decoder,
    Ended,
    Failed,
    ForkFailed,
    Query,
    Ready,
    Record,
    Retire,
    Setup,
    Started,
    WireError,
    encode,
)

INET = int(socket.AF_INET)
INET6 = int(socket.AF_INET6)
UNIX = int(socket.AF_UNIX)

#: Each record and its bytes, written out by hand from the layout in the module's doc.
VECTORS: list[tuple[Record, str]] = [
    (Ready(1234, 2), "10000000 08000000 d2040000 02000000"),
    (Started(7, 4242), "12000000 08000000 07000000 92100000"),
    (Ended(7, 4242, 256, 5, 19),
     "13000000 1c000000 07000000 92100000 00010000 0500000000000000 1300000000000000"),
    (ForkFailed(3, 11), "14000000 08000000 03000000 0b000000"),
    (Counters(10, 1, 2), "15000000 14000000 0a00000000000000 0100000000000000 02000000"),
    (Retire(), "03000000 00000000"),
    (Query(), "04000000 00000000"),
    (Failed("no app"), "11000000 06000000 6e6f20617070"),
    (Setup(b"\x80\x04."), "01000000 03000000 80042e"),
    # slot 5, no flags, AF_INET 127.0.0.1:40000
    (Conn(5, Address(INET, "127.0.0.1", 40000)),
     f"02000000 14000000 05000000 00 {INET:02x}00 409c 0900 3132372e302e302e31"),
    # slot 1, proxied with a local address: [::1]:80 -> 10.0.0.1:8080
    (Conn(1, Address(INET6, "::1", 80), proxied=True, local=Address(INET, "10.0.0.1", 8080)),
     f"02000000 1c000000 01000000 03 {INET6:02x}00 5000 0300 3a3a31 "
     f"{INET:02x}00 901f 0800 31302e302e302e31"),
    # exec: slot 2, a stderr pipe after the socket, AF_INET 127.0.0.1:40000
    (Conn(2, Address(INET, "127.0.0.1", 40000), stderr=True),
     f"02000000 14000000 02000000 04 {INET:02x}00 409c 0900 3132372e302e302e31"),
    # an unnamed AF_UNIX peer
    (Conn(0, Address(UNIX, "", 0)), f"02000000 0b000000 00000000 00 {UNIX:02x}00 0000 0000"),
]
WIRE = b"".join(bytes.fromhex(hexes.replace(" ", "")) for _, hexes in VECTORS)
RECORDS = [record for record, _ in VECTORS]


@pytest.mark.parametrize(("record", "hexes"), VECTORS)
def test_each_record_has_its_bytes(record: Record, hexes: str) -> None:
    assert encode(record) == bytes.fromhex(hexes.replace(" ", ""))


def test_records_fed_whole() -> None:
    assert Decoder().feed(WIRE) == RECORDS


def test_records_fed_byte_by_byte() -> None:
    decoder = Decoder()
    got = [record for i in range(len(WIRE)) for record in decoder.feed(WIRE[i:i + 1])]
    assert got == RECORDS
    assert not decoder.partial


@pytest.mark.parametrize("cut", [1, HEADER.size - 1, HEADER.size, HEADER.size + 3, 40])
def test_a_cut_record_waits_for_the_rest(cut: int) -> None:
    decoder = Decoder()
    first = decoder.feed(WIRE[:cut])
    assert decoder.partial or cut == 0
    assert first + decoder.feed(WIRE[cut:]) == RECORDS


@pytest.mark.parametrize(("wire", "message"), [
    ("63000000 00000000", "unknown record kind 99"),
    ("03010000 00000000", "non-zero padding"),
    ("03000000 01000000 00", "carries no payload"),
    ("10000000 04000000 d2040000", "READY record of 4 bytes"),
    ("13000000 08000000 07000000 92100000", "ENDED record of 8 bytes"),
    ("02000000 03000000 050000", "shorter than its fixed part"),
    ("02000000 05000000 05000000 00", "cut inside an address"),
    (f"02000000 0c000000 05000000 00 {INET:02x}00 0000 0500 31", "longer than the record"),
    (f"02000000 0b000000 05000000 08 {INET:02x}00 0000 0000", "unknown flags 0x8"),
    (f"02000000 0b000000 05000000 02 {INET:02x}00 0000 0000", "cut inside an address"),
    (f"02000000 0c000000 05000000 00 {INET:02x}00 0000 0000 ff", "bytes after its addresses"),
])
def test_malformed_records_are_refused(wire: str, message: str) -> None:
    with pytest.raises(WireError, match=message):
        Decoder().feed(bytes.fromhex(wire.replace(" ", "")))


def test_an_oversized_length_is_refused_before_its_payload_arrives() -> None:
    header = HEADER.pack(1, MAX_PAYLOAD + 1)
    with pytest.raises(WireError, match="at most"):
        Decoder().feed(header)


def test_an_overlong_address_cannot_be_sent() -> None:
    with pytest.raises(WireError, match="at most 512"):
        encode(Conn(0, Address(UNIX, "x" * (MAX_HOST + 1), 0)))


def test_a_long_failure_is_cut_not_refused() -> None:
    (record,) = Decoder().feed(encode(Failed("é" * 5000)))
    assert isinstance(record, Failed)
    assert len(record.reason.encode()) <= 4096


@pytest.mark.parametrize(("addr", "family", "expected"), [
    (("127.0.0.1", 5), INET, Address(INET, "127.0.0.1", 5)),
    (("::1", 5, 0, 0), INET6, Address(INET6, "::1", 5)),
    ("/run/s.sock", UNIX, Address(UNIX, "/run/s.sock", 0)),
    (b"\0abstract", UNIX, Address(UNIX, "\0abstract", 0)),
    (None, UNIX, Address(UNIX, "", 0)),
])
def test_addresses_from_what_accept_gives(addr: object, family: int, expected: Address) -> None:
    assert Address.of(addr, family) == expected
    back = expected.as_addr(UNIX)
    assert back == (expected.host if family == UNIX else (expected.host, expected.port))


hosts = st.text(max_size=40)
addresses = st.builds(Address, st.sampled_from([INET, INET6, UNIX]), hosts,
                      st.integers(0, 65535))
u32 = st.integers(0, 2**32 - 1)
records = st.one_of(
    st.builds(Conn, u32, addresses, st.booleans(), st.none() | addresses, st.booleans()),
    st.builds(Ready, u32, u32), st.builds(Started, u32, u32),
    st.builds(Ended, u32, u32, st.integers(-2**31, 2**31 - 1), st.integers(0, 2**64 - 1),
              st.integers(0, 2**64 - 1)),
    st.builds(ForkFailed, u32, u32), st.builds(Setup, st.binary(max_size=200)),
    st.builds(Failed, st.text(max_size=100)), st.just(Retire()), st.just(Query()),
)


@given(st.lists(records, max_size=8), st.integers(1, 64))
def test_any_records_come_back_whatever_the_cuts(sent: list[Record], step: int) -> None:
    wire = b"".join(encode(r) for r in sent)
    decoder = Decoder()
    got = [r for i in range(0, len(wire), step) for r in decoder.feed(wire[i:i + step])]
    assert got == sent
    assert not decoder.partial
