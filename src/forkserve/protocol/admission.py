"""Admission control: admit a client or refuse it, and say why. Pure logic, master only.

Theory of operation
-------------------
The master calls :meth:`Admission.check` with the peer's address after ``accept`` and before
any fork; a refused connection is closed at once and counted under ``verdict.reason``. Each
admitted verdict is released exactly once, with :meth:`Admission.release`, when its connection
ends (fork model: when the child is reaped). Nothing here touches a socket or reads the clock:
``now`` is passed in (``time.monotonic()`` in the master, a virtual clock in tests). The only
I/O is reading the rules file, when asked to.

Checked in this order; the first refusal wins, so a verdict has one reason:

1. **Rules** (``denied``): ``allow``/``deny`` networks from the settings and the rules file form
   one table. The longest matching prefix wins (tcprules); an ``allow`` and a ``deny`` of the
   same network tie and the ``deny`` wins. An address no rule matches is allowed if there are
   no ``allow`` rules at all (a deny list) and denied otherwise (an allow list); ``deny all`` or
   ``allow all`` (``0.0.0.0/0`` plus ``::/0``) states the default. IPv4-mapped peers
   (``::ffff:a.b.c.d``) and mapped rules are IPv4, so ``::/0`` does not cover IPv4 clients.
2. **Rate** (``rate``): more than N new connections from one key within SECONDS (xinetd ``cps``)
   put the key in a penalty box for ``rate_penalty`` seconds (default SECONDS), during which it
   is refused. Retries do not extend the penalty; afterwards the key starts with no history.
   Arrivals are counted once they pass the rules, also when the per-IP cap then refuses them:
   hammering at the cap is what a rate limit is for.
3. **Penalty** (``penalty``): a key penalised for how its connections ended (``defence``:
   a first-byte or handshake deadline missed, a line too long, a crash) is refused until its
   penalty ends. Checked before the rate, so a penalised client does not also fill its window.
4. **Per-IP concurrency** (``per_ip``): at most ``max_per_ip`` connections in flight per key.

The defences against silent connections that count only *unproven* ones (the early drop, the
per-source startups cap: ``sourceguard``) are counted in the scoreboard instead, where the
serving processes record their client's proof.

A *client key* is the peer's /32 (IPv4) or /64 (IPv6; one subscriber usually owns a whole /64,
so counting addresses would multiply its share by 2**64); both lengths are settings.

Costs and decisions
-------------------
- Rule lookup costs one dict probe per distinct prefix length (at most 33 for IPv4, 129 for
  IPv6), whatever the number of rules: a dict of network -> rule per length, probed from the
  longest down. Rejected: a linear scan (O(rules)), a radix trie (more code, no faster here).
- Rate is an exact sliding window over ``(now - SECONDS, now]``. Each key keeps a ring of its
  last N counted arrival times; an arrival is the (N+1)th within SECONDS exactly when the
  oldest of those N is in the window: O(1) per check, and "N admitted, the N+1th refused" holds
  for any spacing of arrivals. Rejected: a token bucket (one float per key, but arrivals spread
  over the window get up to 2N through) and fixed windows (2N across a window edge). The price
  is memory: about ``400 + 8 * N`` bytes per key, at most ``rate_max_tracked`` keys (10 000 keys
  at 10/1: 5 MB; at N = :data:`MAX_RATE_COUNT`: 85 MB, after N connections from each key).
- The rate table is ordered by last activity. Before a new key goes in, keys whose window and
  penalty are over are dropped from the stale end (amortised O(1)); if it is still full, the
  stalest key is evicted and counted in ``RateTable.evictions``. Trade-off: an attacker who
  sprays more keys than the table holds (cheap in IPv6: a /48 has 65 536 /64s) pushes keys out
  early, forgetting their history or lifting their penalty, so the rate limit fails *open*.
  Refusing new keys when full would instead let that attacker lock out every newcomer. A
  penalised key that keeps retrying stays fresh and goes last; the per-IP and global caps are
  unaffected; a shorter IPv6 key prefix (48, 56) makes spraying expensive again.
- In-flight counts are kept even with ``max_per_ip`` 0 (so a reload can turn the cap on);
  keys at zero are dropped (memory follows connections in flight); a stray release is ignored,
  so a count never goes below zero.

Reloading: :meth:`Admission.reload_rules` re-reads the rules file when its signature
``(st_dev, st_ino, st_mtime_ns, st_size)`` changed, or always with ``force=True`` (HUP). Replace
the file by rename, as tcprules does: a new inode is always noticed, while an edit in place may
be read half-written, or missed if it keeps the size within one timestamp tick. A broken file
raises ``ConfigError`` naming file and line; the old rules stay in force, and that version is
reported once, not at every poll.

Not thread-safe, not signal-safe: call it from the master's loop only.
"""


from __future__ import annotations

import enum
import ipaddress
import os
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from ..errors import ConfigError
from .defence import Cause, Penalties, PenaltyPolicy

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
#: What identifies one version of a file: ``(st_dev, st_ino, st_mtime_ns, st_size)``.
Signature = tuple[int, int, int, int]

#: Keys the rate table tracks by default: about 3 MB at 10/1, see the theory above.
DEFAULT_MAX_TRACKED = 10_000
#: Largest N of ``rate_per_ip N/SECONDS``: each key may hold N timestamps (8 bytes each).
MAX_RATE_COUNT = 1000
#: Longest rate window and penalty: a day; more is a typo, not a rate.
MAX_RATE_SECONDS = 86_400.0
#: Shortest rate window: the kernel's timers and our clock do not resolve less usefully.
MIN_RATE_SECONDS = 0.001

_WIDTH = {4: 32, 6: 128}
_ALL = (ipaddress.IPv4Network("0.0.0.0/0"), ipaddress.IPv6Network("::/0"))


class Reason(enum.StrEnum):
    """Why a client was refused; the values are the metrics label."""

    DENIED = "denied"
    PENALTY = "penalty"
    RATE = "rate"
    PER_IP = "per_ip"
    #: Refused by ``sourceguard`` (the early drop, the per-source startups cap).
    UNPROVEN = "unproven"
    STARTUPS = "startups"


class ClientKey(NamedTuple):
    """The network a client is counted under: ``network`` is the masked address as an int."""

    version: int
    network: int
    prefixlen: int

    def __str__(self) -> str:
        net = ipaddress.ip_network((self.network, self.prefixlen))
        return str(net.network_address) if self.prefixlen == _WIDTH[self.version] else str(net)

    @property
    def address(self) -> IPAddress:
        """The key's network address (the client's address, for a whole-address key)."""
        return ipaddress.ip_address(self.network) if self.version == 4 else \
            ipaddress.IPv6Address(self.network)


@dataclass(frozen=True, slots=True)
class Rule:
    """One ``allow``/``deny`` rule; ``origin`` says where it was written (``file:line``)."""

    allow: bool
    network: Network
    origin: str = ""

    def __str__(self) -> str:
        where = f" ({self.origin})" if self.origin else ""
        return f"{'allow' if self.allow else 'deny'} {self.network}{where}"


@dataclass(frozen=True, slots=True)
class Verdict:
    """The answer of :meth:`Admission.check`.

    ``reason`` is ``None`` exactly when ``admitted``. ``key`` is what to pass to
    :meth:`Admission.release` once an admitted connection ends; ``rule`` is the rule that
    matched, if any (for the log line of a refusal).
    """

    admitted: bool
    reason: Reason | None
    key: ClientKey
    rule: Rule | None = None


@dataclass(frozen=True, slots=True)
class Rate:
    """``count`` new connections per ``seconds``, as in ``rate_per_ip 10/1``."""

    count: int
    seconds: float

    def __str__(self) -> str:
        return f"{self.count}/{self.seconds:g}"


# --------------------------------------------------------------------------- parsing


def parse_rate(text: str) -> Rate:
    """Parse ``N/SECONDS`` (``"10/1"``, ``"100/60"``, ``"5/0.5"``); raise ``ValueError``."""
    count, sep, seconds = text.strip().partition("/")
    if not sep:
        raise ValueError(f"{text!r}: write the rate as N/SECONDS, as in 10/1 (ten a second)")
    try:
        n = int(count.strip())
        s = float(seconds.strip())
    except ValueError:
        raise ValueError(f"{text!r}: N must be a whole number and SECONDS a number, "
                         f"as in 100/60") from None
    if not 1 <= n <= MAX_RATE_COUNT:
        raise ValueError(f"{text!r}: N must be from 1 to {MAX_RATE_COUNT}; for more, "
                         f"shorten the window")
    if not MIN_RATE_SECONDS <= s <= MAX_RATE_SECONDS:  # also refuses nan and inf
        raise ValueError(f"{text!r}: SECONDS must be from {MIN_RATE_SECONDS:g} to "
                         f"{MAX_RATE_SECONDS:g}")
    return Rate(n, s)


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


def _setting_rules(values: Iterable[str | Network], allow: bool) -> list[Rule]:
    setting = "allow" if allow else "deny"
    rules: list[Rule] = []
    for value in values:
        try:
            nets = _networks(value) if isinstance(value, str) else (value,)
        except ValueError as exc:
            raise ConfigError(setting, str(exc)) from None
        rules += [Rule(allow, net, setting) for net in nets]
    return rules


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


# --------------------------------------------------------------------------- rules


def _mask(version: int, prefixlen: int) -> int:
    width = _WIDTH[version]
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
            version: tuple((_mask(version, plen), tables[version, plen])
                           for plen in sorted((p for v, p in tables if v == version),
                                              reverse=True))
            for version in _WIDTH
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


# --------------------------------------------------------------------------- counters


class InFlight:
    """Connections in flight per client key. Memory: one entry per key with a connection."""

    __slots__ = ("_counts",)

    def __init__(self) -> None:
        self._counts: dict[ClientKey, int] = {}

    def acquire(self, key: ClientKey, limit: int) -> bool:
        """Count one more connection unless ``limit`` (0: none) is reached; ``True`` if counted."""
        count = self._counts.get(key, 0)
        if limit and count >= limit:
            return False
        self._counts[key] = count + 1
        return True

    def release(self, key: ClientKey) -> bool:
        """Count one connection less; ``False`` (and nothing changes) if none was in flight."""
        count = self._counts.get(key, 0)
        if count <= 0:
            return False
        if count == 1:
            del self._counts[key]
        else:
            self._counts[key] = count - 1
        return True

    def count(self, key: ClientKey) -> int:
        return self._counts.get(key, 0)

    def __len__(self) -> int:
        return len(self._counts)


class _History:
    """The last N counted arrival times of one key (a ring once full) and its penalty."""

    __slots__ = ("head", "last", "penalty_until", "times")

    def __init__(self, now: float) -> None:
        self.times = array("d", (now,))
        self.head = 0  # index of the oldest time once the ring is full
        self.last = now
        self.penalty_until = 0.0


class RateTable:
    """Sliding-window rate limit with a penalty box, over at most ``max_tracked`` keys."""

    __slots__ = ("_keys", "evictions", "max_tracked", "penalty", "rate")

    def __init__(self, rate: Rate, penalty: float | None = None,
                 max_tracked: int = DEFAULT_MAX_TRACKED) -> None:
        self.rate = rate
        self.penalty = rate.seconds if penalty is None else penalty
        self.max_tracked = max_tracked
        self.evictions = 0
        # least recently active first: the front is where expired and stale keys are
        self._keys: OrderedDict[ClientKey, _History] = OrderedDict()

    def hit(self, key: ClientKey, now: float) -> bool:
        """Count an arrival of ``key`` at ``now``; ``False`` if it is refused (penalty)."""
        history = self._keys.get(key)
        if history is None:
            self._make_room(now)
            self._keys[key] = _History(now)
            return True
        self._keys.move_to_end(key)
        if history.penalty_until > now:
            return False
        times, n = history.times, self.rate.count
        if len(times) < n:
            times.append(now)
        elif times[history.head] > now - self.rate.seconds:  # N already in the window
            history.penalty_until = now + self.penalty
            history.times = array("d")
            history.head = 0
            return False
        else:
            times[history.head] = now
            history.head = (history.head + 1) % n
        history.last = now
        return True

    def penalised(self, key: ClientKey, now: float) -> bool:
        history = self._keys.get(key)
        return history is not None and history.penalty_until > now

    def _expired(self, history: _History, now: float) -> bool:
        return history.penalty_until <= now and history.last <= now - self.rate.seconds

    def _make_room(self, now: float) -> None:
        keys = self._keys
        while keys and self._expired(next(iter(keys.values())), now):
            keys.popitem(last=False)
        if len(keys) >= self.max_tracked:
            keys.popitem(last=False)
            self.evictions += 1

    def __len__(self) -> int:
        return len(self._keys)


# --------------------------------------------------------------------------- the façade


def _check(setting: str, value: int, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (
            high is not None and value > high):
        upto = f" to {high}" if high is not None else " or more"
        raise ConfigError(setting, f"must be a whole number from {low}{upto}, got {value!r}")
    return value


class Admission:
    """Admit or refuse clients, in the master, before any fork.

    Parameters mirror the settings of the same names. ``previous`` is the instance this one
    replaces on a reload: its in-flight counts carry over (so releases of connections admitted
    before the reload still count), and so does its rate history when the rate, penalty and
    prefix lengths are unchanged. Raises ``ConfigError`` naming the setting that cannot work.
    """

    def __init__(self, *, allow: Iterable[str | Network] = (),
                 deny: Iterable[str | Network] = (), rules_file: str | None = None,
                 max_per_ip: int = 0, rate_per_ip: Rate | str | None = None,
                 rate_penalty: float | None = None, per_ip_prefix_v4: int = 32,
                 per_ip_prefix_v6: int = 64, rate_max_tracked: int = DEFAULT_MAX_TRACKED,
                 penalties: PenaltyPolicy | None = None,
                 penalty_exempt: Iterable[str | Network] = (),
                 previous: Admission | None = None) -> None:
        self.max_per_ip = _check("max_per_ip", max_per_ip, 0)
        self._prefix = {4: _check("per_ip_prefix_v4", per_ip_prefix_v4, 0, 32),
                        6: _check("per_ip_prefix_v6", per_ip_prefix_v6, 0, 128)}
        self._masks = {v: _mask(v, p) for v, p in self._prefix.items()}
        self._setting_rules = (*_setting_rules(allow, True), *_setting_rules(deny, False))
        self._file = RulesFile(rules_file) if rules_file is not None else None
        self._table = self._build_table()
        self._in_flight: InFlight = previous._in_flight if previous is not None else InFlight()
        self._rate = self._rate_table(rate_per_ip, rate_penalty, rate_max_tracked, previous)
        self.penalties = self._penalties(penalties, penalty_exempt, previous)

    def _penalties(self, policy: PenaltyPolicy | None, exempt: Iterable[str | Network],
                   previous: Admission | None) -> Penalties[ClientKey] | None:
        """The penalty table; a reload keeps the penalties in force (with the new policy)."""
        if policy is None:
            return None
        exempt_table = RuleTable(_setting_rules(exempt, True))
        table: Penalties[ClientKey] = Penalties(
            policy, exempt=lambda key: exempt_table.lookup(key.address) is not None)
        old = previous.penalties if previous is not None else None
        if old is not None:
            table.adopt(old)
        return table

    def _rate_table(self, rate: Rate | str | None, penalty: float | None, max_tracked: int,
                    previous: Admission | None) -> RateTable | None:
        if rate is None:
            return None
        if isinstance(rate, str):
            try:
                rate = parse_rate(rate)
            except ValueError as exc:
                raise ConfigError("rate_per_ip", str(exc)) from None
        if penalty is not None and not 0 < penalty <= MAX_RATE_SECONDS:
            raise ConfigError("rate_penalty", f"must be from more than 0 to "
                                              f"{MAX_RATE_SECONDS:g} seconds, got {penalty!r}")
        _check("rate_max_tracked", max_tracked, 1)
        old = previous._rate if previous is not None else None
        if (old is not None and previous is not None and previous._prefix == self._prefix
                and (old.rate, old.penalty) == (rate, penalty or rate.seconds)):
            old.max_tracked = max_tracked
            return old
        return RateTable(rate, penalty, max_tracked)

    def _build_table(self) -> RuleTable:
        file_rules = self._file.rules if self._file is not None else ()
        return RuleTable((*self._setting_rules, *file_rules))

    def key_of(self, addr: IPAddress) -> ClientKey:
        """The key ``addr`` is counted under (IPv4-mapped addresses: pass them through
        :func:`parse_peer` first)."""
        version = addr.version
        return ClientKey(version, int(addr) & self._masks[version], self._prefix[version])

    def check(self, peer_ip: str, now: float) -> Verdict:
        """Decide about a new connection from ``peer_ip`` at ``now`` (monotonic seconds).

        An admitted verdict is counted in flight: pass ``verdict.key`` to :meth:`release`
        exactly once when the connection ends. Raises ``ValueError`` if ``peer_ip`` is not an
        IP address (unix-socket peers have none: do not call this for them).
        """
        addr = parse_peer(peer_ip)
        key = self.key_of(addr)
        rule = self._table.lookup(addr)
        if not self._table.permits(rule):
            return Verdict(False, Reason.DENIED, key, rule)
        if self.penalties is not None and self.penalties.refused(key, now):
            return Verdict(False, Reason.PENALTY, key, rule)
        if self._rate is not None and not self._rate.hit(key, now):
            return Verdict(False, Reason.RATE, key, rule)
        if not self._in_flight.acquire(key, self.max_per_ip):
            return Verdict(False, Reason.PER_IP, key, rule)
        return Verdict(True, None, key, rule)

    def penalise(self, key: ClientKey, cause: Cause, now: float) -> float | None:
        """``key``'s connection ended by ``cause``: its penalty now ends at the time
        returned (None: no penalty, none configured or exempt)."""
        if self.penalties is None:
            return None
        return self.penalties.penalise(key, cause, now)

    def release(self, key: ClientKey) -> bool:
        """An admitted connection ended; ``False`` if ``key`` had none in flight (a bug to log)."""
        return self._in_flight.release(key)

    def in_flight(self, key: ClientKey) -> int:
        """Connections in flight under ``key``."""
        return self._in_flight.count(key)

    def rules_changed(self) -> bool:
        """Whether the rules file changed since it was last read (one ``stat``; no file: no)."""
        return self._file is not None and self._file.changed()

    def reload_rules(self, *, force: bool = False) -> bool:
        """Re-read the rules file if it changed (always with ``force``, as on HUP).

        Returns ``True`` if new rules are now in force. Raises ``ConfigError`` (file and line)
        if the file is unusable: the rules in force stay, and the same broken version is not
        reported again until it changes or ``force`` is given.
        """
        if self._file is None or not self._file.reload(force=force):
            return False
        self._table = self._build_table()
        return True

    @property
    def rate(self) -> RateTable | None:
        """The rate table, or ``None`` without ``rate_per_ip``."""
        return self._rate

    @property
    def tracked(self) -> tuple[int, int]:
        """Keys held now: ``(in flight, in the rate table)``, for the status page."""
        return len(self._in_flight), len(self._rate) if self._rate is not None else 0


__all__: Sequence[str] = (
    "DEFAULT_MAX_TRACKED", "MAX_RATE_COUNT", "Admission", "ClientKey", "InFlight", "Rate",
    "RateTable", "Reason", "Rule", "RuleTable", "RulesFile", "Verdict", "file_signature",
    "parse_network", "parse_peer", "parse_rate", "parse_rules",
)
