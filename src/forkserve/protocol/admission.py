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

The pieces live beside this façade: ``clientkey`` (keys and source tags), ``rules`` (the rule
table and the rules file), ``rate`` (the rate table and the in-flight counts).
"""


from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..errors import ConfigError
from .clientkey import (
    ClientKey,
    IPAddress,
    key_of_tag,
    parse_peer,
    source_tag,
    tag_of_key,
)
from .defence import Cause, Penalties, PenaltyPolicy
from .rate import (
    DEFAULT_MAX_TRACKED,
    MAX_RATE_COUNT,
    MAX_RATE_SECONDS,
    MIN_RATE_SECONDS,
    InFlight,
    Rate,
    RateTable,
    parse_rate,
)
from .rules import (
    Network,
    Rule,
    RulesFile,
    RuleTable,
    Signature,
    file_signature,
    mask,
    parse_network,
    parse_rules,
    setting_rules,
)


class Reason(enum.StrEnum):
    """Why a client was refused; the values are the metrics label."""

    DENIED = "denied"
    PENALTY = "penalty"
    RATE = "rate"
    PER_IP = "per_ip"
    #: Refused by ``sourceguard`` (the early drop, the per-source startups cap).
    UNPROVEN = "unproven"
    STARTUPS = "startups"


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
        self._masks = {v: mask(v, p) for v, p in self._prefix.items()}
        self._setting_rules = (*setting_rules(allow, True), *setting_rules(deny, False))
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
        exempt_table = RuleTable(setting_rules(exempt, True))
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


# The façade and the pieces it is made of (clientkey, rules, rate), importable from here as
# before the split.
__all__: Sequence[str] = (
    "DEFAULT_MAX_TRACKED", "MAX_RATE_COUNT", "MAX_RATE_SECONDS", "MIN_RATE_SECONDS",
    "Admission", "ClientKey", "IPAddress", "InFlight", "Network", "Rate", "RateTable", "Reason",
    "Rule", "RuleTable", "RulesFile", "Signature", "Verdict", "file_signature", "key_of_tag",
    "parse_network", "parse_peer", "parse_rate", "parse_rules", "source_tag", "tag_of_key",
)
