"""Client keys and source tags: the network a client is counted under, as admission keys
it (``ClientKey``) and as the scoreboard tags it (``source_tag``: one int per slot, for the
defences that count in shared memory). Sans-I/O.
"""

from __future__ import annotations

import ipaddress
from typing import NamedTuple

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
#: Bits of an address, by IP version.
WIDTH = {4: 32, 6: 128}


class ClientKey(NamedTuple):
    """The network a client is counted under: ``network`` is the masked address as an int."""

    version: int
    network: int
    prefixlen: int

    def __str__(self) -> str:
        net = ipaddress.ip_network((self.network, self.prefixlen))
        return str(net.network_address) if self.prefixlen == WIDTH[self.version] else str(net)

    @property
    def address(self) -> IPAddress:
        """The key's network address (the client's address, for a whole-address key)."""
        return ipaddress.ip_address(self.network) if self.version == 4 else \
            ipaddress.IPv6Address(self.network)


def parse_peer(text: str) -> IPAddress:
    """The peer's address; IPv4-mapped IPv6 comes back as IPv4. Raises ``ValueError``."""
    addr = ipaddress.ip_address(text)
    if addr.version == 6 and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def source_tag(peer_ip: str) -> int:
    """A non-zero 64-bit tag of the source ``peer_ip`` counts under for per-source limits in
    shared memory (prefork's scoreboard): the IPv4 address (plus 1), or the IPv6 /64 with
    the top bit set, so that the two families never meet. Raises ``ValueError``."""
    quad = _dotted_quad(peer_ip)  # the common case without ipaddress: per accept, in prefork
    if quad is not None:
        return quad + 1
    addr = parse_peer(peer_ip)
    if addr.version == 4:
        return int(addr) + 1
    return (int(addr) >> 64) | (1 << 63)


def _dotted_quad(text: str) -> int | None:
    """``a.b.c.d`` in its one canonical spelling (what ``getpeername`` gives) as an int, or
    None for anything else, which ``parse_peer`` then decides (the same value, or the error)."""
    parts = text.split(".")
    if len(parts) != 4:
        return None
    value = 0
    for part in parts:
        if not (part.isascii() and part.isdigit() and len(part) <= 3) or (
                len(part) > 1 and part[0] == "0") or int(part) > 255:
            return None
        value = value << 8 | int(part)
    return value


def tag_of_key(key: ClientKey) -> int:
    """The ``source_tag`` of a ``ClientKey`` of the default lengths (IPv4 /32, IPv6 /64)."""
    if key.version == 4:
        return key.network + 1
    return (key.network >> 64) | (1 << 63)


def key_of_tag(tag: int) -> ClientKey:
    """The ``ClientKey`` of a ``source_tag`` (IPv4 /32, IPv6 /64, as admission keys them by
    default)."""
    if tag >> 63:
        return ClientKey(6, (tag & ((1 << 63) - 1)) << 64, 64)
    return ClientKey(4, tag - 1, 32)


