"""Admission control: rules, per-IP counts and rates, on a virtual clock, against references."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from forkserve.errors import ConfigError
from forkserve.protocol.admission import (
    Admission,
    ClientKey,
    InFlight,
    Rate,
    RateTable,
    Reason,
    Rule,
    RulesFile,
    RuleTable,
    Verdict,
    file_signature,
    key_of_tag,
    parse_network,
    parse_peer,
    parse_rate,
    parse_rules,
    source_tag,
    tag_of_key,
)
from forkserve.protocol.defence import Cause, parse_penalties

AnyNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
T0 = 1000.0  # the virtual clock's start: any monotonic value


def admitted(adm: Admission, peer: str, now: float = T0) -> bool:
    return adm.check(peer, now).admitted


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def replace_by_rename(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(("text", "rate"), [
    ("10/1", Rate(10, 1.0)), ("100/60", Rate(100, 60.0)), (" 5 / 0.5 ", Rate(5, 0.5)),
])
def test_rates_parse(text: str, rate: Rate) -> None:
    assert parse_rate(text) == rate
    assert parse_rate(str(rate)) == rate


@pytest.mark.parametrize(("text", "says"), [
    ("10", "N/SECONDS"), ("x/1", "whole number"), ("1.5/1", "whole number"),
    ("0/1", "from 1 to"), ("1/0", "SECONDS must be"), ("1/nan", "SECONDS must be"),
    ("1/inf", "SECONDS must be"), ("100000/1", "shorten the window"), ("", "N/SECONDS"),
])
def test_bad_rates_get_a_sentence(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        parse_rate(text)


def test_networks_parse_with_hosts_mapped_and_host_bit_hints() -> None:
    assert parse_network("192.0.2.7") == ipaddress.ip_network("192.0.2.7/32")
    assert parse_network("2001:db8::1") == ipaddress.ip_network("2001:db8::1/128")
    assert parse_network("::ffff:10.0.0.0/104") == ipaddress.ip_network("10.0.0.0/8")
    assert parse_network("::ffff:0:0/96") == ipaddress.ip_network("0.0.0.0/0")
    with pytest.raises(ValueError, match=r"did you mean 10\.0\.0\.0/8"):
        parse_network("10.0.0.1/8")
    with pytest.raises(ValueError, match="not an IP address or network"):
        parse_network("10.0.0.256")


def test_a_rules_file_with_comments_blank_lines_and_both_families(tmp_path: Path) -> None:
    path = write(tmp_path / "rules", "# office and lab\n\n"
                 "allow 10.0.0.0/8   # the office\n"
                 "  deny 10.9.0.0/16\n"
                 "ALLOW 2001:db8::/32\n"
                 "deny 10.9.9.9\n")
    rules = RulesFile(str(path)).rules
    assert [str(r) for r in rules] == [
        f"allow 10.0.0.0/8 ({path}:3)", f"deny 10.9.0.0/16 ({path}:4)",
        f"allow 2001:db8::/32 ({path}:5)", f"deny 10.9.9.9/32 ({path}:6)"]
    adm = Admission(rules_file=str(path))
    assert admitted(adm, "10.1.2.3")
    assert not admitted(adm, "10.9.1.1")
    assert not admitted(adm, "10.9.9.9")
    assert admitted(adm, "2001:db8:5::1")
    assert not admitted(adm, "192.0.2.1"), "allow rules exist, so no match means deny"
    verdict = adm.check("10.9.9.9", T0)
    assert verdict.reason is Reason.DENIED
    assert verdict.rule is not None
    assert verdict.rule.origin == f"{path}:6"


@pytest.mark.parametrize(("line", "says"), [
    ("permit 10.0.0.0/8", "expected `allow NETWORK` or `deny NETWORK`"),
    ("allow", "expected `allow NETWORK`"),
    ("allow 10.0.0.0/8 10.1.0.0/16", "expected `allow NETWORK`"),
    ("deny 10.0.0.300", "not an IP address"),
    ("deny 10.0.0.1/8", "did you mean 10.0.0.0/8"),
])
def test_a_bad_line_is_named_by_file_and_line(tmp_path: Path, line: str, says: str) -> None:
    path = write(tmp_path / "rules", f"# header\nallow 10.0.0.0/8\n{line}\n")
    with pytest.raises(ConfigError, match=says) as info:
        RulesFile(str(path))
    assert f"{path}:3" in str(info.value)
    assert info.value.setting == "rules_file"


def test_unreadable_and_non_utf8_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read it"):
        Admission(rules_file=str(tmp_path / "missing"))
    path = tmp_path / "latin1"
    path.write_bytes(b"allow 10.0.0.0/8\n# caf\xe9\n")
    with pytest.raises(ConfigError, match=f"{path}:2: not UTF-8"):
        RulesFile(str(path))


def test_settings_that_cannot_work_name_themselves() -> None:
    cases: list[tuple[str, dict[str, object]]] = [
        ("max_per_ip", {"max_per_ip": -1}), ("per_ip_prefix_v4", {"per_ip_prefix_v4": 33}),
        ("per_ip_prefix_v6", {"per_ip_prefix_v6": 129}), ("rate_per_ip", {"rate_per_ip": "1"}),
        ("rate_penalty", {"rate_per_ip": "1/1", "rate_penalty": 0.0}),
        ("rate_max_tracked", {"rate_per_ip": "1/1", "rate_max_tracked": 0}),
        ("allow", {"allow": ["nowhere"]}), ("deny", {"deny": ["10.0.0.1/8"]}),
    ]
    for setting, kwargs in cases:
        with pytest.raises(ConfigError) as info:
            Admission(**kwargs)  # type: ignore[arg-type]
        assert info.value.setting == setting


# --------------------------------------------------------------------------- rules


def test_longest_prefix_wins_and_deny_wins_a_tie() -> None:
    adm = Admission(deny=["10.0.0.0/8", "10.1.2.3", "2001:db8::/32"],
                    allow=["10.1.0.0/16", "10.1.2.3", "2001:db8:1::/48"])
    assert not admitted(adm, "10.2.0.1")
    assert admitted(adm, "10.1.9.9")
    assert not admitted(adm, "10.1.2.3"), "allow and deny of the same network: deny"
    assert admitted(adm, "2001:db8:1::9")
    assert not admitted(adm, "2001:db8:2::9")
    assert not admitted(adm, "192.0.2.1"), "there are allow rules: unmatched is denied"


def test_default_policy_follows_the_presence_of_allow_rules() -> None:
    assert admitted(Admission(), "192.0.2.1")
    only_deny = Admission(deny=["192.0.2.0/24"])
    assert admitted(only_deny, "198.51.100.1")
    assert not admitted(only_deny, "192.0.2.9")
    assert not admitted(Admission(allow=["192.0.2.0/24"]), "198.51.100.1")
    explicit = Admission(deny=["all"], allow=["192.0.2.0/24"])
    assert not admitted(explicit, "::1")
    assert admitted(explicit, "192.0.2.200")
    assert admitted(Admission(allow=["all"], deny=["::1"]), "127.0.0.1")


def test_ipv4_mapped_peers_match_ipv4_rules() -> None:
    adm = Admission(allow=["192.0.2.0/24", "::ffff:198.51.100.0/120"], deny=["::/0"])
    assert admitted(adm, "::ffff:192.0.2.5")
    assert admitted(adm, "198.51.100.7"), "a rule written as a mapped network is IPv4"
    assert not admitted(adm, "2001:db8::1")
    assert parse_peer("::ffff:192.0.2.5") == ipaddress.ip_address("192.0.2.5")
    assert adm.check("::ffff:192.0.2.5", T0).key == adm.check("192.0.2.5", T0).key


def test_a_peer_that_is_not_an_ip_address_is_a_caller_error() -> None:
    with pytest.raises(ValueError, match="does not appear to be an IPv4 or IPv6 address"):
        Admission().check("unix:/run/x.sock", T0)


def brute_force(rules: list[Rule], addr: ipaddress.IPv4Address | ipaddress.IPv6Address,
                ) -> bool:
    matching = [r for r in rules if r.network.version == addr.version and addr in r.network]
    if not matching:
        return not any(r.allow for r in rules)
    longest = max(r.network.prefixlen for r in matching)
    return all(r.allow for r in matching if r.network.prefixlen == longest)


@st.composite
def networks(draw: st.DrawFn, version: int) -> AnyNetwork:
    width = 32 if version == 4 else 128
    # addresses from a small corner, so that random rules nest and collide
    value = draw(st.integers(0, 255)) << (width - 8) | draw(st.integers(0, 3))
    prefixlen = draw(st.integers(0, width))
    return ipaddress.ip_network((value, prefixlen), strict=False)


rule_sets = st.lists(st.builds(Rule, st.booleans(), st.one_of(networks(4), networks(6))),
                     max_size=40)


@given(rule_sets, st.lists(st.one_of(networks(4), networks(6)), min_size=1, max_size=20))
def test_longest_prefix_agrees_with_brute_force(rules: list[Rule],
                                                probes: list[AnyNetwork]) -> None:
    table = RuleTable(rules)
    for probe in probes:
        for addr in (probe.network_address, probe.broadcast_address):
            assert table.permits(table.lookup(addr)) == brute_force(rules, addr), (addr, rules)
            if addr.version == 4:
                mapped = parse_peer(f"::ffff:{addr}")
                assert table.lookup(mapped) == table.lookup(addr)


def test_thousands_of_rules_cost_one_probe_per_prefix_length() -> None:
    rules = [Rule(i % 3 == 0, ipaddress.ip_network((i << 8, 24))) for i in range(5000)]
    rules += [Rule(False, ipaddress.ip_network((i << 16, 16))) for i in range(0, 5000, 7)]
    table = RuleTable(rules)
    assert table.size == len(rules)
    assert len(table._levels[4]) == 2  # what a lookup probes, whatever the number of rules
    for i in range(0, 5000, 97):
        addr = ipaddress.IPv4Address((i << 8) + 5)
        assert table.permits(table.lookup(addr)) == brute_force(rules, addr)


# --------------------------------------------------------------------------- per-IP counts


def test_exact_per_ip_limit_and_release_lets_one_more() -> None:
    adm = Admission(max_per_ip=3)
    verdicts = [adm.check("192.0.2.1", T0) for _ in range(3)]
    assert all(v.admitted and v.reason is None for v in verdicts)
    refused = adm.check("192.0.2.1", T0)
    assert (refused.admitted, refused.reason) == (False, Reason.PER_IP)
    assert admitted(adm, "192.0.2.2"), "another address has its own count"
    assert adm.release(verdicts[0].key)
    assert admitted(adm, "192.0.2.1")
    assert not admitted(adm, "192.0.2.1")
    assert adm.in_flight(verdicts[0].key) == 3


def test_ipv6_clients_are_counted_per_64_and_prefixes_are_settings() -> None:
    adm = Admission(max_per_ip=2)
    assert admitted(adm, "2001:db8:0:1::1")
    assert admitted(adm, "2001:db8:0:1:ffff::2")
    assert not admitted(adm, "2001:db8:0:1::3"), "same /64: same client"
    assert admitted(adm, "2001:db8:0:2::1")
    key = adm.check("2001:db8:0:1::9", T0).key
    assert str(key) == "2001:db8:0:1::/64"
    assert str(Admission().check("192.0.2.9", T0).key) == "192.0.2.9"
    per_24 = Admission(max_per_ip=1, per_ip_prefix_v4=24, per_ip_prefix_v6=128)
    assert admitted(per_24, "192.0.2.1")
    assert not admitted(per_24, "192.0.2.200")
    assert admitted(per_24, "2001:db8::1")
    assert admitted(per_24, "2001:db8::2")


def test_counts_never_go_negative_and_zero_keys_are_dropped() -> None:
    adm = Admission(max_per_ip=1)
    key = adm.check("192.0.2.1", T0).key
    assert adm.release(key)
    assert not adm.release(key), "a stray release is reported and ignored"
    assert adm.in_flight(key) == 0
    assert adm.tracked == (0, 0)
    assert admitted(adm, "192.0.2.1")
    assert not admitted(adm, "192.0.2.1"), "the stray release did not buy a second slot"


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 3)), max_size=200),
       st.integers(0, 3))
def test_in_flight_matches_a_model_for_any_sequence(ops: list[tuple[bool, int]],
                                                    limit: int) -> None:
    counter, model = InFlight(), [0, 0, 0, 0]
    keys = [ClientKey(4, i, 32) for i in range(4)]
    for acquire, i in ops:
        if acquire:
            ok = counter.acquire(keys[i], limit)
            assert ok == (limit == 0 or model[i] < limit)
            model[i] += ok
        else:
            assert counter.release(keys[i]) == (model[i] > 0)
            model[i] = max(0, model[i] - 1)
        assert [counter.count(k) for k in keys] == model
        assert len(counter) == sum(1 for m in model if m), "keys at zero are dropped"


# --------------------------------------------------------------------------- rate


def test_exact_rate_limit_then_penalty_then_a_clean_start() -> None:
    adm = Admission(rate_per_ip="3/10", rate_penalty=30.0)
    assert [admitted(adm, "192.0.2.1", T0 + t) for t in (0.0, 4.0, 9.0)] == [True] * 3
    refused = adm.check("192.0.2.1", T0 + 9.5)
    assert (refused.admitted, refused.reason) == (False, Reason.RATE)
    assert admitted(adm, "192.0.2.2", T0 + 9.5), "other keys are not penalised"
    assert not admitted(adm, "192.0.2.1", T0 + 30.0), "penalty: 9.5 + 30 = 39.5"
    assert not admitted(adm, "192.0.2.1", T0 + 39.4), "retries do not extend the penalty"
    assert [admitted(adm, "192.0.2.1", T0 + 39.5) for _ in range(3)] == [True] * 3
    assert not admitted(adm, "192.0.2.1", T0 + 39.5)


def test_the_rate_window_slides_and_is_half_open() -> None:
    adm = Admission(rate_per_ip="2/1")
    assert admitted(adm, "192.0.2.1", T0)
    assert admitted(adm, "192.0.2.1", T0 + 0.5)
    assert admitted(adm, "192.0.2.1", T0 + 1.0), "the arrival at T0 is exactly 1 s old: out"
    assert not admitted(adm, "192.0.2.1", T0 + 1.25), "T0+0.5 and T0+1 are in the window"
    assert not admitted(adm, "192.0.2.1", T0 + 2.0), "default penalty = the window (1 s)"
    assert admitted(adm, "192.0.2.1", T0 + 2.25)


def test_same_instant_burst_n_admitted_n_plus_one_refused() -> None:
    for n in (1, 2, 7, 10, 100):
        adm = Admission(rate_per_ip=Rate(n, 0.1))
        assert [admitted(adm, "2001:db8::1", T0) for _ in range(n)] == [True] * n
        assert adm.check("2001:db8::1", T0).reason is Reason.RATE


def test_rate_counts_arrivals_the_per_ip_cap_refuses() -> None:
    adm = Admission(max_per_ip=1, rate_per_ip="3/10")
    assert admitted(adm, "192.0.2.1")
    assert [adm.check("192.0.2.1", T0).reason for _ in range(3)] == [
        Reason.PER_IP, Reason.PER_IP, Reason.RATE]


def test_denied_clients_are_not_tracked() -> None:
    adm = Admission(deny=["192.0.2.0/24"], max_per_ip=1, rate_per_ip="1/10")
    for _ in range(5):
        assert adm.check("192.0.2.1", T0).reason is Reason.DENIED
    assert adm.tracked == (0, 0)


def reference_rate(arrivals: list[float], n: int, seconds: float,
                   penalty: float) -> list[bool]:
    """Count, at each arrival, the counted arrivals of the last ``seconds``: the rule itself."""
    counted: list[float] = []
    until = float("-inf")
    out = []
    for t in arrivals:
        if t < until:
            out.append(False)
        elif sum(1 for c in counted if c > t - seconds) >= n:
            until, counted = t + penalty, []
            out.append(False)
        else:
            counted.append(t)
            out.append(True)
    return out


@given(st.lists(st.integers(0, 400), max_size=60), st.integers(1, 5), st.integers(1, 40),
       st.integers(1, 60))
def test_rate_agrees_with_counting_the_window(steps: list[int], n: int, seconds: int,
                                              penalty: int) -> None:
    # times on a 1/8 s grid, so that float arithmetic is exact and boundaries are hit
    arrivals = [T0 + s / 8 for s in sorted(steps)]
    table = RateTable(Rate(n, seconds / 8), penalty / 8)
    key = ClientKey(4, 1, 32)
    got = [table.hit(key, t) for t in arrivals]
    assert got == reference_rate(arrivals, n, seconds / 8, penalty / 8)


def test_memory_is_bounded_under_100k_distinct_addresses() -> None:
    adm = Admission(max_per_ip=2, rate_per_ip="5/60", rate_max_tracked=1000)
    rate = adm.rate
    assert rate is not None
    for i in range(100_000):
        verdict = adm.check(str(ipaddress.IPv6Address((0x20010DB8 << 96) | (i << 64))), T0)
        assert verdict.admitted
        adm.release(verdict.key)
        assert len(rate) <= 1000
    assert adm.tracked == (0, 1000)
    assert rate.evictions == 99_000


def test_expired_keys_go_first_and_a_penalised_hammerer_is_evicted_last() -> None:
    table = RateTable(Rate(1, 10.0), penalty=100.0, max_tracked=3)
    keys = [ClientKey(4, i, 32) for i in range(10)]
    assert table.hit(keys[0], T0)
    assert not table.hit(keys[0], T0), "keys[0] is penalised until T0+100"
    for i in (1, 2):
        assert table.hit(keys[i], T0 + i)
    assert not table.hit(keys[0], T0 + 3), "retrying keeps the penalised key fresh"
    assert table.hit(keys[3], T0 + 3.5)
    assert table.evictions == 1
    assert table.penalised(keys[0], T0 + 3.5), "the stale keys[1] went, not keys[0]"
    assert table.hit(keys[4], T0 + 50)
    assert table.evictions == 1, "keys[2] had expired: dropped, not evicted"
    assert len(table) == 3
    assert not table.hit(keys[0], T0 + 50)


# --------------------------------------------------------------------------- reloading


def test_changed_files_are_detected_by_rename_and_by_edit(tmp_path: Path) -> None:
    path = write(tmp_path / "rules", "deny 192.0.2.0/24\n")
    adm = Admission(rules_file=str(path))
    assert not adm.rules_changed()
    assert not adm.reload_rules()
    assert not admitted(adm, "192.0.2.1")
    replace_by_rename(path, "deny 198.51.100.0/24\n")
    assert adm.rules_changed()
    assert adm.reload_rules()
    assert not adm.rules_changed()
    assert admitted(adm, "192.0.2.1")
    assert not admitted(adm, "198.51.100.1")
    with open(path, "a", encoding="utf-8") as fh:
        fh.write("deny 192.0.2.0/24\n")
    assert adm.rules_changed()
    assert adm.reload_rules()
    assert not admitted(adm, "192.0.2.1")
    assert adm.reload_rules(force=True), "HUP re-reads even an unchanged file"


def test_a_broken_reload_keeps_the_old_rules_and_reports_once(tmp_path: Path) -> None:
    path = write(tmp_path / "rules", "deny 192.0.2.0/24\n")
    adm = Admission(rules_file=str(path), allow=["all"])
    replace_by_rename(path, "deny 198.51.100.0/24\ndeny bogus\n")
    with pytest.raises(ConfigError, match=f"{path}:2"):
        adm.reload_rules()
    assert not admitted(adm, "192.0.2.1"), "old rules still in force"
    assert admitted(adm, "198.51.100.1")
    assert not adm.rules_changed()
    assert not adm.reload_rules(), "the same broken version is not reported at every poll"
    with pytest.raises(ConfigError):
        adm.reload_rules(force=True)
    path.unlink()
    with pytest.raises(ConfigError, match="cannot read it"):
        adm.reload_rules()
    assert not adm.reload_rules()
    replace_by_rename(path, "deny 198.51.100.0/24\n")
    assert adm.reload_rules()
    assert admitted(adm, "192.0.2.1")
    assert not admitted(adm, "198.51.100.1")


def test_file_signature_is_dev_inode_mtime_size(tmp_path: Path) -> None:
    path = write(tmp_path / "rules", "allow all\n")
    st_ = os.stat(path)
    assert file_signature(str(path)) == (st_.st_dev, st_.st_ino, st_.st_mtime_ns, 10)
    assert file_signature(str(tmp_path / "missing")) is None
    assert RulesFile(str(path)).signature == file_signature(str(path))


def test_a_reload_of_settings_keeps_the_counts_in_flight() -> None:
    old = Admission(max_per_ip=2, rate_per_ip="2/10")
    key = old.check("192.0.2.1", T0).key
    assert admitted(old, "192.0.2.1", T0 + 1)
    new = Admission(max_per_ip=3, rate_per_ip="2/10", previous=old)
    assert new.rate is old.rate, "same rate: the history and penalties carry over"
    assert new.check("192.0.2.1", T0 + 2).reason is Reason.RATE
    assert new.in_flight(key) == 2
    assert new.release(key)
    assert new.release(key)
    assert not new.release(key)
    changed = Admission(rate_per_ip="3/10", previous=new)
    assert changed.rate is not new.rate
    assert admitted(changed, "192.0.2.1", T0 + 3)


def test_rules_parse_from_any_lines() -> None:
    rules = parse_rules(["deny all # everyone", "allow ::1"], "<test>")
    assert [(r.allow, str(r.network), r.origin) for r in rules] == [
        (False, "0.0.0.0/0", "<test>:1"), (False, "::/0", "<test>:1"),
        (True, "::1/128", "<test>:2")]


def test_reasons_are_the_metric_labels() -> None:
    assert [str(r) for r in Reason] == ["denied", "penalty", "rate", "per_ip", "unproven",
                                       "startups"]


#: (peer address, its source tag, the key the master files it under): the tags workers send
#: through the pool pipe (IPv4 plus 1; an IPv6 /64 prefix as it is, except the /64s of ::/32,
#: moved above 2**63), both ways (mutmut: tag_of_key and key_of_tag had no test). Every /64
#: round-trips except those of 8000::/32 and 8000:1::/64 (reserved), which share their tags
#: with those of ::/32 and 0:1::/64.
SOURCE_TAGS = [
    ("0.0.0.0", 0x1, ClientKey(4, 0, 32)),
    ("192.0.2.7", 0xC0000208, ClientKey(4, 0xC0000207, 32)),
    ("255.255.255.255", 0x1_0000_0000, ClientKey(4, 0xFFFFFFFF, 32)),
    ("::ffff:192.0.2.7", 0xC0000208, ClientKey(4, 0xC0000207, 32)),
    ("::1", 0x8000_0000_0000_0000, ClientKey(6, 0, 64)),
    ("::1:0:0:0:1", 0x8000_0000_0000_0001, ClientKey(6, 1 << 64, 64)),
    ("0:1::1", 0x8000_0001_0000_0000, ClientKey(6, 1 << 96, 64)),
    ("0:1:0:1::1", 0x1_0000_0001, ClientKey(6, 0x1_0000_0001 << 64, 64)),
    ("2001:db8:1:2:3:4:5:6", 0x2001_0DB8_0001_0002, ClientKey(6, 0x2001_0DB8_0001_0002 << 64, 64)),
    ("fe80::1", 0xFE80_0000_0000_0000, ClientKey(6, 0xFE80 << 112, 64)),
    ("fd12:3456:789a:1::5", 0xFD12_3456_789A_0001, ClientKey(6, 0xFD12_3456_789A_0001 << 64, 64)),
    ("ffff:ffff:ffff:ffff::1", 0xFFFF_FFFF_FFFF_FFFF,
     ClientKey(6, 0xFFFF_FFFF_FFFF_FFFF << 64, 64)),
    ("7fff:ffff:ffff:ffff::9", 0x7FFF_FFFF_FFFF_FFFF,
     ClientKey(6, 0x7FFF_FFFF_FFFF_FFFF << 64, 64)),
]


@pytest.mark.parametrize(("peer", "tag", "key"), SOURCE_TAGS)
def test_source_tags_and_keys_convert_both_ways(peer: str, tag: int, key: ClientKey) -> None:
    assert source_tag(peer) == tag
    assert key_of_tag(tag) == key
    assert tag_of_key(key) == tag


@given(st.ip_addresses(v=6))
@example(ipaddress.IPv6Address("8000:1:0:1::"))  # the first /64 above the shared span
@example(ipaddress.IPv6Address("7fff:ffff:ffff:ffff::"))  # the last below it
@example(ipaddress.IPv6Address("0:1:0:1::"))  # the first /64 that is its own tag
def test_every_ipv6_64_comes_back_from_its_tag_but_8000_32s(addr: ipaddress.IPv6Address) -> None:
    prefix = int(addr) >> 64
    if addr.ipv4_mapped is not None or 1 << 63 <= prefix <= (1 << 63) + (1 << 32):
        return  # counted as IPv4; or 8000::/32 and 8000:1::/64, which share ::/32's tags
    tag = source_tag(str(addr))
    assert tag > 1 << 32, "never an IPv4 source's tag"
    assert key_of_tag(tag) == ClientKey(6, prefix << 64, 64)


def _key(ip: str) -> ClientKey:
    return ClientKey(4, int(ipaddress.IPv4Address(ip)), 32)


ALLOWED = Rule(True, ipaddress.ip_network("192.0.2.0/24"), "allow")
DENIED = Rule(False, ipaddress.ip_network("192.0.2.128/25"), "deny")
#: (source, seconds after T0, the whole verdict), in turn, against one Admission (allow, deny,
#: 2 a 10 s window, 1 in flight, penalties): each refusal names its key and the rule matched
#: (mutmut: a penalised client admitted, and the key or rule of a refusal, went unseen).
VERDICTS = [
    ("192.0.2.200", 0.0, Verdict(False, Reason.DENIED, _key("192.0.2.200"), DENIED)),
    ("198.51.100.1", 0.0, Verdict(False, Reason.DENIED, _key("198.51.100.1"), None)),
    ("192.0.2.1", 0.0, Verdict(True, None, _key("192.0.2.1"), ALLOWED)),  # (held)
    ("192.0.2.1", 0.1, Verdict(False, Reason.PER_IP, _key("192.0.2.1"), ALLOWED)),
    ("192.0.2.1", 0.2, Verdict(False, Reason.RATE, _key("192.0.2.1"), ALLOWED)),
    ("192.0.2.2", 1.5, Verdict(False, Reason.PENALTY, _key("192.0.2.2"), ALLOWED)),
    ("192.0.2.2", 11.0, Verdict(True, None, _key("192.0.2.2"), ALLOWED)),
]


def test_each_verdict_names_its_reason_key_and_rule() -> None:
    adm = Admission(allow=["192.0.2.0/24"], deny=["192.0.2.128/25"], rate_per_ip="2/10",
                    max_per_ip=1, penalties=parse_penalties("first_byte:10 min:0"))
    assert adm.penalise(_key("192.0.2.2"), Cause.FIRST_BYTE, T0 + 1.0) == T0 + 11.0
    got = [adm.check(peer, T0 + at) for peer, at, _ in VERDICTS]  # (none released)
    assert got == [verdict for _, _, verdict in VERDICTS]


#: Settings at the edge of what they accept (mutmut: each bound moved by one went unseen).
AT_THE_EDGE = [
    {"per_ip_prefix_v4": 0}, {"per_ip_prefix_v6": 0},
    {"rate_per_ip": "1/10", "rate_max_tracked": 1},
    {"rate_per_ip": "1/10", "rate_penalty": 0.5},
    {"rate_per_ip": "1/10", "rate_penalty": 86_400.0},
    {"rate_per_ip": "1000/0.001"}, {"rate_per_ip": "1/86400"},
]


@pytest.mark.parametrize("settings", AT_THE_EDGE, ids=str)
def test_settings_at_the_edge_of_their_range_are_accepted(settings: dict[str, Any]) -> None:
    Admission(**settings)


#: (settings, the whole message): a person can act on it (mutmut: the range it names).
OUT_OF_RANGE = [
    ({"max_per_ip": -1}, "invalid max_per_ip: must be a whole number from 0 or more, got -1"),
    ({"max_per_ip": True},
     "invalid max_per_ip: must be a whole number from 0 or more, got True"),
    ({"per_ip_prefix_v4": 33},
     "invalid per_ip_prefix_v4: must be a whole number from 0 to 32, got 33"),
    ({"rate_per_ip": "1/10", "rate_penalty": 0},
     "invalid rate_penalty: must be from more than 0 to 86400 seconds, got 0"),
    ({"rate_per_ip": "0/10"},
     "invalid rate_per_ip: '0/10': N must be from 1 to 1000; for more, shorten the window"),
    ({"allow": ["10.0.0.300"]}, "invalid allow: '10.0.0.300' is not an IP address or network, "
                                "such as 192.0.2.0/24 or 2001:db8::/32"),
]


@pytest.mark.parametrize(("settings", "message"), OUT_OF_RANGE)
def test_settings_out_of_range_name_the_range(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as refused:
        Admission(**settings)
    assert str(refused.value) == message


#: (the file's bytes, or None for no file; the whole message): where the problem is, by line
#: (mutmut: the line count started at the bad byte, or at byte 1, and the setting's name).
UNREADABLE_RULES = [
    (None, "invalid rules_file in {path}: cannot read it: No such file or directory"),
    (b"\nallow 10.0.0.0/8\n# caf\xe9\nallow 10.1.0.0/16\n\n",
     "invalid rules_file in {path}:3: not UTF-8 text"),
]


@pytest.mark.parametrize(("data", "message"), UNREADABLE_RULES)
def test_a_rules_file_that_cannot_be_read_is_named_with_its_line(
        tmp_path: Path, data: bytes | None, message: str) -> None:
    path = tmp_path / "rules"
    if data is not None:
        path.write_bytes(data)
    with pytest.raises(ConfigError) as refused:
        RulesFile(str(path))
    assert str(refused.value) == message.format(path=path)


def test_a_rate_penalty_ends_exactly_when_it_says() -> None:
    table = RateTable(Rate(1, 10), penalty=5.0)
    key, other = _key("192.0.2.1"), _key("192.0.2.2")
    assert table.hit(key, T0)
    assert not table.hit(key, T0 + 1), "over the rate: penalised until T0 + 6"
    assert [table.penalised(key, T0 + t) for t in (1, 5.9, 6, 7, 20)] == \
        [True, True, False, False, False]
    assert not table.penalised(other, T0 + 1), "a key never seen"


def test_the_same_network_allowed_and_denied_is_denied_whatever_the_order() -> None:
    net = ipaddress.ip_network("192.0.2.0/24")
    allow, deny = Rule(True, net, "rules_file"), Rule(False, net, "rules_file")
    for rules in ([allow, deny], [deny, allow]):
        assert RuleTable(rules).lookup(ipaddress.ip_address("192.0.2.9")) == deny


def test_allow_and_deny_take_network_objects_as_well_as_text() -> None:
    adm = Admission(allow=[ipaddress.ip_network("192.0.2.0/24")],
                    deny=[ipaddress.ip_network("192.0.2.128/25")])
    assert adm.check("192.0.2.1", T0).admitted
    assert adm.check("192.0.2.200", T0).reason is Reason.DENIED
    assert adm.check("198.51.100.1", T0).reason is Reason.DENIED
