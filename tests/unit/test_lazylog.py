"""serving.lazylog: the log of a zygote's children, without ``logging`` until a record is
written (issue 16). Each case runs in a fresh interpreter: whether ``logging`` is imported is
process state."""

from __future__ import annotations

import subprocess
import sys

import pytest

PRELUDE = """
import sys
from forkserve.serving import lazylog
log = lazylog.LazyLogger("forkserve")
lazylog.defer("info", None)
"""


def run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", PRELUDE + code], capture_output=True,
                          text=True, timeout=30, check=True)


@pytest.mark.timeout(60)
def test_a_record_under_the_level_imports_nothing() -> None:
    out = run('log.debug("not shown %s", 1)\n'
              'print(lazylog.LazyLogger("x").isEnabledFor(lazylog.DEBUG), '
              '"logging" in sys.modules, "threading" in sys.modules)')
    assert out.stdout == "False False False\n"
    assert out.stderr == ""


@pytest.mark.timeout(60)
def test_the_first_record_configures_logging_as_the_master_does() -> None:
    out = run('log.info("shown %s", 1)\nlog.debug("not shown")\n'
              'print("logging" in sys.modules)')
    assert out.stdout == "True\n"
    line, = out.stderr.splitlines()
    assert line.endswith("[INFO] shown 1")  # ops.logs.LOG_FORMAT: time, [pid], [level]
    assert line.count("[") == 2


@pytest.mark.timeout(60)
def test_an_exception_is_written_with_its_traceback() -> None:
    out = run('try:\n    1 / 0\nexcept ZeroDivisionError:\n    log.exception("failed")\n')
    assert "[ERROR] failed" in out.stderr
    assert "ZeroDivisionError" in out.stderr


@pytest.mark.timeout(60)
def test_settle_configures_logging_that_an_app_imported() -> None:
    out = run('import logging\nlazylog.settle()\n'
              'logging.getLogger("app").warning("from the app")')
    assert out.stderr.rstrip().endswith("[WARNING] from the app")
    assert out.stderr.count("[") == 2  # forkserve's format on the root logger, not bare


@pytest.mark.timeout(60)
def test_without_defer_it_is_the_logging_logger() -> None:
    out = subprocess.run(
        [sys.executable, "-c", "import logging; logging.basicConfig(format='%(message)s'); "
         "from forkserve.serving.lazylog import LazyLogger; "
         "LazyLogger('forkserve').warning('plain %s', 'text')"],
        capture_output=True, text=True, timeout=30, check=True)
    assert out.stderr == "plain text\n"
