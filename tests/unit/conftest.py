"""Fixtures of the supervisor-logic tests: the fake kernel and an app that must not run."""

from __future__ import annotations

import pytest

from forkserve.serving.connection import Connection
from tests.unit.fakes import FakeKernel


def never_called(conn: Connection) -> None:
    raise AssertionError("no handler runs in these tests")


@pytest.fixture
def kernel() -> FakeKernel:
    return FakeKernel()
