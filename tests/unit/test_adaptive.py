"""The adaptive pool's rule as tables: the pool a config asks for, and the step it takes."""

from __future__ import annotations

import pytest

from forkserve.config import Config
from forkserve.errors import ConfigError
from forkserve.models.adaptive import (
    ADAPT_INTERVAL,
    REST_RECHECK,
    Adapter,
    PoolPlan,
    Step,
    plan,
)

#: (settings, the plan): "adaptive unless the operator fixed the pool".
PLANS = [
    ({}, PoolPlan(start=5, adaptive=True, min_spare=5, max_spare=10)),
    ({"workers": 4}, PoolPlan(start=4, adaptive=False)),
    ({"workers": 4, "min_spare": 2}, PoolPlan(4, True, 2, 4)),
    ({"workers": 4, "max_spare": 8}, PoolPlan(4, True, 5, 8)),
    ({"min_spare": 2, "max_spare": 8}, PoolPlan(5, True, 2, 8)),
    ({"min_spare": 12}, PoolPlan(12, True, 12, 24)),
    ({"max_spare": 3}, PoolPlan(3, True, 2, 3)),
    ({"max_spare": 1}, PoolPlan(1, True, 0, 1)),
    ({"min_spare": 0, "max_spare": 0}, PoolPlan(5, True, 0, 0)),
    ({"max_workers": 3}, PoolPlan(3, True, 5, 10)),
    ({"workers": 3, "max_workers": 3}, PoolPlan(3, False)),
]


@pytest.mark.parametrize(("settings", "expected"), PLANS)
def test_the_pool_a_config_asks_for(settings: dict[str, int], expected: PoolPlan) -> None:
    assert plan(Config(model="prefork", **settings)) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(("settings", "named"), [
    ({"min_spare": 3, "max_spare": 3}, "max_spare"),
    ({"workers": 300}, "workers"),
    ({"workers": 8, "max_workers": 4}, "workers"),
])
def test_a_pool_that_cannot_work_is_refused_naming_the_setting(settings: dict[str, int],
                                                                named: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Config(model="prefork", **settings)  # type: ignore[arg-type]
    assert caught.value.setting == named


#: (workers ready, of which idle, target, ceiling) -> the step and by how many.
STEPS = [
    ((5, 0, 5, 256), (Step.GROW, 1)),
    ((5, 4, 5, 256), (Step.GROW, 1)),
    ((5, 0, 256, 256), (Step.HOLD, 0)),
    ((8, 5, 8, 256), (Step.HOLD, 0)),
    ((8, 8, 8, 256), (Step.REST, 0)),
    ((11, 11, 11, 256), (Step.SHRINK, 1)),
    ((12, 11, 12, 256), (Step.SHRINK, 1)),
]


@pytest.mark.parametrize(("seen", "expected"), STEPS)
def test_the_step_for_what_the_pool_looks_like(seen: tuple[int, int, int, int],
                                               expected: tuple[Step, int]) -> None:
    workers, idle, target, ceiling = seen
    adapter = Adapter(PoolPlan(5, True, 5, 10))
    assert adapter.decide(0.0, workers=workers, idle=idle, target=target,
                          ceiling=ceiling) == expected


def test_growth_doubles_each_second_up_to_the_ceiling_and_starts_over() -> None:
    adapter = Adapter(PoolPlan(1, True, 5, 10))
    target, grown = 1, []
    for second in range(7):
        _, n = adapter.decide(float(second), workers=target, idle=0, target=target,
                              ceiling=20)
        target += n
        grown.append(n)
    assert grown == [1, 2, 4, 8, 4, 0, 0], "1 + 1 + 2 + 4 + 8 + 4 = 20"
    adapter.decide(7.0, workers=20, idle=6, target=20, ceiling=20)
    assert adapter.decide(8.0, workers=20, idle=0, target=20, ceiling=40) == (Step.GROW, 1)


def test_a_rest_ends_when_stirred_and_is_bounded_anyway() -> None:
    adapter = Adapter(PoolPlan(5, True, 5, 10))
    adapter.decide(100.0, workers=5, idle=5, target=5, ceiling=256)
    assert adapter.deadline() == 100.0 + ADAPT_INTERVAL
    adapter.rest(100.0)
    assert adapter.deadline() == 100.0 + REST_RECHECK, "no timer each second at rest"
    assert not adapter.due(129.0)
    assert adapter.stir(103.0)
    assert adapter.due(103.0), "a worker took a connection: judged at once"
    assert not adapter.stir(103.5), "stirring a pool that is not at rest changes nothing"


def test_a_fixed_pool_never_looks() -> None:
    adapter = Adapter(PoolPlan(4, False))
    assert adapter.deadline() is None
    assert not adapter.due(1e9)
