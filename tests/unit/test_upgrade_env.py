"""What a new master reads from the environment an upgrade gave it (``upgrade.take_ready_fd``):
the ready pipe, the socket files it will own, the sockets only forkserve holds."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pytest

from forkserve.master import upgrade


@pytest.fixture
def ready_fd(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    r, w = os.pipe()
    monkeypatch.setenv(upgrade.READY_FD, str(w))
    yield w
    os.close(r)
    os.close(w)


def test_the_handed_files_and_sockets_are_read_and_the_variables_removed(
        ready_fd: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(upgrade.FILES, json.dumps({"/run/a.sock": 12, "/run/b.sock": "x"}))
    monkeypatch.setenv(upgrade.OURS, json.dumps([7, 9, "no"]))
    successor = upgrade.take_ready_fd()
    assert successor is not None
    assert successor.fd == ready_fd
    assert successor.files == {"/run/a.sock": 12}
    assert successor.ours == frozenset({7, 9})
    for name in (upgrade.READY_FD, upgrade.FILES, upgrade.OURS):
        assert name not in os.environ


@pytest.mark.parametrize(("files", "ours"), [("{", "[1]"), ("[]", "{}"), ("3", "nope")])
def test_an_unusable_value_is_said_and_ignored(ready_fd: int, monkeypatch: pytest.MonkeyPatch,
                                               caplog: pytest.LogCaptureFixture,
                                               files: str, ours: str) -> None:
    monkeypatch.setenv(upgrade.FILES, files)
    monkeypatch.setenv(upgrade.OURS, ours)
    successor = upgrade.take_ready_fd()
    assert successor is not None
    usable_ours = ours == "[1]"
    assert successor.files == {}
    assert successor.ours == (frozenset({1}) if usable_ours else frozenset())
    assert f"{upgrade.FILES}=" in caplog.text
    assert "unusable" in caplog.text
    assert (f"{upgrade.OURS}=" in caplog.text) is not usable_ours


def test_without_an_upgrade_there_is_no_successor(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(upgrade.READY_FD, raising=False)
    monkeypatch.setenv(upgrade.OURS, "[1]")
    assert upgrade.take_ready_fd() is None
    assert upgrade.OURS not in os.environ
