"""The serving processes' signal tables (``serving.signals``): installed as written, restored,
and the README's section (English and Chinese) generated from them."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest

from forkserve.serving.signals import ROLES, Row, Step, install, restore, role_tables

ROOT = Path(__file__).resolve().parents[2]


def _section(text: str) -> str:
    start = text.index("<!-- role-signal-table:start -->")
    return text[start:text.index("<!-- role-signal-table:end -->")]


def test_each_role_names_a_signal_once() -> None:
    for role, table in ROLES.items():
        signals = [row.signal for row in table]
        assert len(signals) == len(set(signals)), role


def test_install_sets_each_step_and_restore_puts_back_what_was_there() -> None:
    def handler(signum: int, frame: object) -> None:
        pass  # never delivered: the test only reads the dispositions

    table = (Row(signal.SIGUSR1, Step.REOPEN, ""), Row(signal.SIGUSR2, Step.IGNORE, ""),
             Row(signal.SIGWINCH, Step.DEFAULT, ""))
    before = {row.signal: signal.getsignal(row.signal) for row in table}
    previous = install(table, {Step.REOPEN: handler})
    try:
        assert signal.getsignal(signal.SIGUSR1) is handler
        assert signal.getsignal(signal.SIGUSR2) == signal.SIG_IGN
        assert signal.getsignal(signal.SIGWINCH) == signal.SIG_DFL
    finally:
        restore(previous)
    assert {row.signal: signal.getsignal(row.signal) for row in table} == before


def test_a_step_without_its_handler_is_refused_before_anything_is_installed_wrongly() -> None:
    with pytest.raises(KeyError):
        install((Row(signal.SIGUSR1, Step.FINISH, ""),), {})


def test_readme_role_tables_are_generated_and_the_chinese_one_has_the_same_rows() -> None:
    english = _section((ROOT / "README.md").read_text())
    assert english.split("\n", 1)[1].strip() == role_tables().strip(), (
        "README.md is stale: run `python scripts/update_readme_tables.py`")
    chinese = (ROOT / "docs" / "README.zh-CN.md").read_text()
    table = chinese[chinese.index("<!-- 本表译自 README.md 中生成的各类进程信号表"):]
    table = table[:table.index("\n\n")]
    names = [row.signal.name for rows in ROLES.values() for row in rows]
    assert re.findall(r"^\| [^|]+ \| `(SIG\w+)` \|", table, re.M) == names, (
        "docs/README.zh-CN.md: translate the new rows of the role signal table")
