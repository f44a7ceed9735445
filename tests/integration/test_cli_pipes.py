"""The commands that print (``settings``, ``check``) end quietly when their reader goes away,
as ``forkserve settings | head -1`` makes it do: no traceback, a shell's SIGPIPE status."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from forkserve.cli import BROKEN_PIPE_STATUS


@pytest.mark.parametrize("args", [["settings"], ["settings", "--signals"],
                                  ["check", "--app", "hello"]],
                         ids=["settings", "signals", "check"])
def test_a_reader_that_went_away_ends_the_command_quietly(args: list[str]) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first byte is written
    try:
        result = subprocess.run([sys.executable, "-m", "forkserve", *args], stdout=write_end,
                                stderr=subprocess.PIPE, timeout=30, check=False,
                                start_new_session=True)
    finally:
        os.close(write_end)
    assert result.stderr.decode() == ""
    assert result.returncode == BROKEN_PIPE_STATUS


def test_a_reader_that_stays_gets_everything() -> None:
    result = subprocess.run([sys.executable, "-m", "forkserve", "settings"],
                            capture_output=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(b"| setting (TOML key) |")
