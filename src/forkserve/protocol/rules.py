"""Allow/deny rules: parsed from the settings and the rules file, matched by longest prefix
(``RuleTable``), and the rules file re-read when its signature changes (``RulesFile``: the one
place in ``protocol`` that touches a file, by path, when asked; never a socket or a process).
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import ConfigError
from .clientkey import WIDTH, IPAddress

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
#: What identifies one version of a file: ``(st_dev, st_ino, st_mtime_ns, st_size)``.
Signature = tuple[int, int, int, int]
_ALL = (ipaddress.IPv4Network("0.0.0.0/0"), ipaddress.IPv6Network("::/0"))


@dataclass(frozen=True, slots=True)
class Rule:
    """One ``allow``/``deny`` rule; ``origin`` says where it was written (``file:line``)."""

    allow: bool
    network: Network
    origin: str = ""

    def __str__(self) -> str:
        where = f" ({self.origin})" if self.origin else ""
        return f"{'allow' if self.allow else 'deny'} {self.network}{where}"


def parse_network(text: str) -> Network:
    """Parse ``ADDR`` or ``ADDR/LEN`` (a bare address is one host); raise ``ValueError``.

    An IPv4-mapped IPv6 network (``::ffff:10.0.0.0/104``) comes back as IPv4 (``10.0.0.0/8``).
    """
    text = text.strip()
    try:
        net = ipaddress.ip_network(text)
    except ValueError:
        try:
            loose = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ValueError(f"{text!r} is not an IP address or network, such as "
                             f"192.0.2.0/24 or 2001:db8::/32") from None
        raise ValueError(f"{text!r} has bits set after the prefix; did you mean "
                         f"{loose}?") from None
    mapped = net.network_address.ipv4_mapped if net.version == 6 else None
    if mapped is not None and net.prefixlen >= 96:
        return ipaddress.IPv4Network((mapped, net.prefixlen - 96))
    return net


def _networks(text: str) -> tuple[Network, ...]:
    return _ALL if text.strip().lower() == "all" else (parse_network(text),)


def parse_rules(lines: Iterable[str], source: str,
                setting: str = "rules_file") -> tuple[Rule, ...]:
    """Parse rule lines (``allow NET`` / ``deny NET``, ``#`` comments, blank lines).

    Raises ``ConfigError`` naming ``setting`` and ``source:line`` at the first bad line.
    """
    rules: list[Rule] = []
    for number, raw in enumerate(lines, start=1):
        words = raw.partition("#")[0].split()
        if not words:
            continue
        where = f"{source}:{number}"
        verb = words[0].lower()
        if verb not in ("allow", "deny") or len(words) != 2:
            raise ConfigError(setting, f"expected `allow NETWORK` or `deny NETWORK`, got "
                                       f"{raw.strip()!r}", where)
        try:
            nets = _networks(words[1])
        except ValueError as exc:
            raise ConfigError(setting, str(exc), where) from None
        rules += [Rule(verb == "allow", net, where) for net in nets]
    return tuple(rules)


def setting_rules(values: Iterable[str | Network], allow: bool) -> list[Rule]:
    setting = "allow" if allow else "deny"
    rules: list[Rule] = []
    for value in values:
        try:
            nets = _networks(value) if isinstance(value, str) else (value,)
        except ValueError as exc:
            raise ConfigError(setting, str(exc)) from None
        rules += [Rule(allow, net, setting) for net in nets]
    return rules


def mask(version: int, prefixlen: int) -> int:
    width = WIDTH[version]
    return ((1 << width) - 1) ^ ((1 << (width - prefixlen)) - 1)


class RuleTable:
    """Longest-prefix-match over allow/deny rules; immutable once built.

    Worst case per lookup: one dict probe per distinct prefix length of the address's family.
    """

    __slots__ = ("_levels", "has_allow", "size")

    def __init__(self, rules: Iterable[Rule]) -> None:
        tables: dict[tuple[int, int], dict[int, Rule]] = {}
        self.size = 0
        self.has_allow = False
        for rule in rules:
            net = rule.network
            level = tables.setdefault((net.version, net.prefixlen), {})
            key = int(net.network_address)
            held = level.get(key)
            if held is None or held.allow:  # same network twice: deny wins the tie
                level[key] = rule
            self.size += 1
            self.has_allow = self.has_allow or rule.allow
        self._levels: dict[int, tuple[tuple[int, dict[int, Rule]], ...]] = {
            version: tuple((mask(version, plen), tables[version, plen])
                           for plen in sorted((p for v, p in tables if v == version),
                                              reverse=True))
            for version in WIDTH
        }

    def lookup(self, addr: IPAddress) -> Rule | None:
        """The rule with the longest prefix that contains ``addr``, or ``None``."""
        value = int(addr)
        for mask, level in self._levels[addr.version]:
            rule = level.get(value & mask)
            if rule is not None:
                return rule
        return None

    def permits(self, rule: Rule | None) -> bool:
        """Whether the outcome of :meth:`lookup` admits: no match means "no allow rules"."""
        return rule.allow if rule is not None else not self.has_allow


def _signature(st: os.stat_result) -> Signature:
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


def file_signature(path: str) -> Signature | None:
    """The signature of the file at ``path`` now, or ``None`` if it cannot be stat'ed."""
    try:
        return _signature(os.stat(path))
    except OSError:
        return None


class RulesFile:
    """A rules file as last read successfully, and the signature of the last read attempted.

    The constructor reads the file and raises ``ConfigError`` if it is unusable.
    """

    def __init__(self, path: str, setting: str = "rules_file") -> None:
        self.path = path
        self.setting = setting
        self._attempted: Signature | None = None
        self.rules = self._read()
        #: The signature of the version ``rules`` came from.
        self.signature: Signature | None = self._attempted

    def changed(self) -> bool:
        """Whether the file differs from the last version read, good or bad (one ``stat``)."""
        return file_signature(self.path) != self._attempted

    def reload(self, *, force: bool = False) -> bool:
        """Re-read the file if it changed (always with ``force``); ``True`` if rules were read.

        Raises ``ConfigError`` if the new version is unusable; ``rules`` stay as they were, and
        that version is not read again until it changes or ``force`` is given.
        """
        if not force and not self.changed():
            return False
        self.rules = self._read()
        self.signature = self._attempted
        return True

    def _read(self) -> tuple[Rule, ...]:
        self._attempted = None
        try:
            with open(self.path, "rb") as fh:
                # the signature of what is read, not of what the path names a moment later
                self._attempted = _signature(os.fstat(fh.fileno()))
                data = fh.read()
        except OSError as exc:
            raise ConfigError(self.setting, f"cannot read it: {exc.strerror}", self.path) from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data.count(b"\n", 0, exc.start) + 1
            raise ConfigError(self.setting, "not UTF-8 text", f"{self.path}:{line}") from None
        return parse_rules(text.splitlines(), self.path, self.setting)


