"""The defences on by default (issue 12), as pure logic on a virtual clock: the early drop,
penalties, stress mode, their parsers, and the scoreboard counting of ``sourceguard``."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from forkserve.config import Config
from forkserve.errors import ConfigError
from forkserve.ops.scoreboard import Scoreboard
from forkserve.protocol.admission import Admission, Reason, source_tag
from forkserve.protocol.defence import (
    DEFAULT_PENALTIES,
    STRESS_EXIT_FRACTION,
    Cause,
    Penalties,
    PenaltyPolicy,
    Startups,
    Stress,
    parse_penalties,
    parse_startups,
)
from forkserve.serving.sourceguard import SourceGuard

T0 = 1000.0


# --------------------------------------------------------------------------- early drop


@pytest.mark.parametrize(("held", "chance"), [
    (0, 0.0), (9, 0.0), (10, 0.30), (55, 0.65), (99, 0.993), (100, 1.0), (500, 1.0),
])
def test_drop_probability_is_sshds(held: int, chance: float) -> None:
    assert Startups(10, 30, 100).drop_probability(held) == pytest.approx(chance, abs=1e-3)


@given(st.integers(1, 500), st.integers(0, 100), st.integers(0, 500), st.integers(0, 1000))
def test_drop_probability_rises_with_what_is_held(start: int, rate: int, extra: int,
                                                  held: int) -> None:
    policy = Startups(start, rate, start + extra)
    p, q = policy.drop_probability(held), policy.drop_probability(held + 1)
    assert 0.0 <= p <= q <= 1.0
    assert policy.drop(held, 0.999_999) == (p == 1.0)


@pytest.mark.parametrize(("text", "policy"), [
    ("10:30:100", Startups(10, 30, 100)), ("5", Startups(5, 100, 5)),
    (" 1:0:1 ", Startups(1, 0, 1)),
])
def test_startups_parse(text: str, policy: Startups) -> None:
    assert parse_startups(text) == policy
    assert parse_startups(str(policy)) == policy


@pytest.mark.parametrize("text", ["", "a:b:c", "10:30", "0:30:100", "10:130:100", "100:30:10"])
def test_bad_startups_name_the_setting(text: str) -> None:
    with pytest.raises(ValueError, match="START"):
        parse_startups(text)
    with pytest.raises(ConfigError, match=r"invalid max_startups: .*START"):
        Config(max_startups=text)


# --------------------------------------------------------------------------- penalties


def test_default_penalties_parse() -> None:
    policy = parse_penalties(DEFAULT_PENALTIES)
    assert policy is not None
    assert policy.duration(Cause.CRASH) == 90
    assert policy.minimum == 15
    assert policy.maximum == 600
    assert parse_penalties("off") is None


@pytest.mark.parametrize("text", ["bogus:3", "first_byte:x", "crash:-1", "max:1e9", "first_byte"])
def test_bad_penalties_name_the_setting(text: str) -> None:
    with pytest.raises(ValueError, match=r"CAUSE:SECONDS|not a cause"):
        parse_penalties(text)
    with pytest.raises(ConfigError, match="invalid penalties: "):
        Config(penalties=text)


def table(minimum: float = 0.0, max_tracked: int = 100) -> Penalties[str]:
    return Penalties(PenaltyPolicy({Cause.FIRST_BYTE: 10.0, Cause.CRASH: 90.0}, 600.0,
                                   minimum, max_tracked))


def test_a_penalty_refuses_until_it_ends() -> None:
    penalties = table()
    assert penalties.penalise("a", Cause.FIRST_BYTE, T0) == T0 + 10
    assert penalties.refused("a", T0 + 9.9)
    assert not penalties.refused("a", T0 + 10)
    assert not penalties.refused("b", T0)


def test_one_slip_costs_nothing_below_the_minimum() -> None:
    penalties = table(minimum=15.0)
    assert penalties.penalise("a", Cause.FIRST_BYTE, T0) is None  # 10 s accrued: not enforced
    assert not penalties.refused("a", T0 + 1)
    assert penalties.penalise("a", Cause.FIRST_BYTE, T0 + 1) == T0 + 20  # 19 s left: enforced
    assert penalties.refused("a", T0 + 19.9)
    assert [key for key, _ in penalties.active(T0 + 2)] == ["a"]


def test_a_slip_long_ago_is_forgotten() -> None:
    penalties = table(minimum=15.0)
    penalties.penalise("a", Cause.FIRST_BYTE, T0)
    assert penalties.penalise("a", Cause.FIRST_BYTE, T0 + 11) is None  # the first one ended


def test_penalties_add_up_to_the_maximum() -> None:
    penalties = table()
    for i in range(20):
        until = penalties.penalise("a", Cause.CRASH, T0 + i)
    assert until == T0 + 19 + 600


def test_a_cause_without_a_duration_and_an_exempt_source_cost_nothing() -> None:
    penalties: Penalties[str] = Penalties(PenaltyPolicy({Cause.CRASH: 5.0}, 600.0),
                                          exempt=lambda key: key == "checker")
    assert penalties.penalise("a", Cause.LINE_TOO_LONG, T0) is None
    assert penalties.penalise("checker", Cause.CRASH, T0) is None
    assert not penalties.refused("checker", T0)


@given(st.lists(st.tuples(st.integers(0, 300), st.sampled_from(["a", "b", "c", "d", "e"])),
                max_size=200))
def test_the_table_holds_at_most_max_tracked_sources(events: list[tuple[int, str]]) -> None:
    penalties = table(max_tracked=3)
    now = T0
    for step, key in events:
        now += step / 100
        penalties.penalise(key, Cause.FIRST_BYTE, now)
        assert len(penalties) <= 3


def test_admission_refuses_a_penalised_key_before_the_rate_and_the_cap() -> None:
    adm = Admission(max_per_ip=1, penalties=PenaltyPolicy({Cause.FIRST_BYTE: 10.0}, 600.0),
                    penalty_exempt=["127.0.0.9"])
    verdict = adm.check("127.0.0.4", T0)
    assert verdict.admitted
    adm.release(verdict.key)
    assert adm.penalise(verdict.key, Cause.FIRST_BYTE, T0) == T0 + 10
    assert adm.check("127.0.0.4", T0 + 1).reason is Reason.PENALTY
    assert adm.check("127.0.0.4", T0 + 10).admitted
    exempt = adm.check("127.0.0.9", T0)
    assert adm.penalise(exempt.key, Cause.FIRST_BYTE, T0) is None


def test_a_reload_keeps_the_penalties_in_force() -> None:
    policy = PenaltyPolicy({Cause.FIRST_BYTE: 10.0}, 600.0)
    old = Admission(penalties=policy)
    key = old.check("127.0.0.4", T0).key
    old.penalise(key, Cause.FIRST_BYTE, T0)
    new = Admission(penalties=policy, previous=old)
    assert new.check("127.0.0.4", T0 + 1).reason is Reason.PENALTY


# --------------------------------------------------------------------------- stress


def test_stress_enters_at_capacity_and_leaves_with_a_quarter_free() -> None:
    stress = Stress()
    assert not stress.update(9, 10, T0)
    assert not stress.active
    assert stress.update(10, 10, T0 + 1)
    assert stress.active
    assert stress.since == T0 + 1
    assert not stress.update(8, 10, T0 + 2)
    assert stress.active
    assert stress.update(int(10 * STRESS_EXIT_FRACTION), 10, T0 + 3)
    assert not stress.active


# --------------------------------------------------------------------------- sourceguard


def test_source_tags_keep_families_apart_and_count_an_ipv6_64_as_one() -> None:
    assert source_tag("127.0.0.2") != source_tag("127.0.0.3")
    assert source_tag("::ffff:127.0.0.2") == source_tag("127.0.0.2")
    assert source_tag("2001:db8::1") == source_tag("2001:db8::2")
    assert source_tag("2001:db8:0:1::1") != source_tag("2001:db8::1")
    assert source_tag("::1") != source_tag("0.0.0.0")
    assert 0 not in {source_tag("0.0.0.0")}


def test_the_startups_cap_counts_unproven_clients_per_source() -> None:
    board = Scoreboard(16)
    guard = SourceGuard(board, limit=2, startups=None)
    assert guard.admit(0, "127.0.0.2") is None
    assert guard.admit(1, "127.0.0.2") is None
    assert guard.admit(2, "127.0.0.2") is Reason.STARTUPS
    assert guard.admit(2, "127.0.0.3") is None, "another source is not counted with it"
    board.mark_proven(0)  # its client sent a whole line: it counts no more
    assert guard.admit(3, "127.0.0.2") is None
    assert board.count_unproven() == 3
    guard.leave(3)
    assert board.count_unproven() == 2


def test_the_early_drop_spares_a_newcomer() -> None:
    board = Scoreboard(32)
    guard = SourceGuard(board, limit=0, startups=Startups(2, 100, 20))
    assert guard.admit(0, "127.0.0.2") is None
    assert guard.admit(1, "127.0.0.2") is Reason.UNPROVEN, "2 held, rate 100 %: dropped"
    assert guard.admit(1, "127.0.0.3") is None, "a source with nothing unproven is spared"
    assert guard.displaced is None
