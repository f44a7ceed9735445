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
#: The largest IPv4 source tag (an IPv4 address plus 1: tags run 1 to 2**32, 0 is "none").
_V4_TAGS_END = 1 << 32
#: Where the IPv6 /64s that IPv4's tags stand on are moved to. A tag is 64 bits, an IPv6 /64
#: prefix is 64 bits too, and IPv4 needs 2**32 values: the /64s whose prefix is at most 2**32
#: (``::/32`` and ``0:1::/64``, inside the reserved ``::/8``: the loopback ``::1``, the
#: unspecified address, IPv4-mapped addresses, which count as IPv4 anyway) give way, and share
#: their tags with the same span above 2**63 (``8000::/32`` and ``8000:1::/64``, reserved,
#: never routed). Every other /64, link-local ``fe80::/10`` and unique-local ``fc00::/7``
#: included, is its own tag and comes back from it whole.
_V6_LOW_TAGS = 1 << 63


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
    shared memory (prefork's scoreboard): the IPv4 address plus 1, or the IPv6 /64 prefix
    (moved above 2**63 for the /64s of ``::/32``, see ``_V6_LOW_TAGS``), so that the two
    families never meet. Raises ``ValueError``."""
    quad = _dotted_quad(peer_ip)  # the common case without ipaddress: per accept, in prefork
    if quad is not None:
        return quad + 1
    addr = parse_peer(peer_ip)
    if addr.version == 4:
        return int(addr) + 1
    return _v6_tag(int(addr) >> 64)


def _v6_tag(prefix: int) -> int:
    return prefix if prefix > _V4_TAGS_END else prefix | _V6_LOW_TAGS


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
    return _v6_tag(key.network >> 64)


def key_of_tag(tag: int) -> ClientKey:
    """The ``ClientKey`` of a ``source_tag`` (IPv4 /32, IPv6 /64, as admission keys them by
    default)."""
    if tag <= _V4_TAGS_END:
        return ClientKey(4, tag - 1, 32)
    if _V6_LOW_TAGS <= tag <= _V6_LOW_TAGS + _V4_TAGS_END:  # read as ::/32's (see above)
        return ClientKey(6, (tag - _V6_LOW_TAGS) << 64, 64)
    return ClientKey(6, tag << 64, 64)


