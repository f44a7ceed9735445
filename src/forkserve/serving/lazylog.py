"""The log of the code a forked child runs, without ``logging`` until a record is written.

Theory of operation
-------------------
``logging`` imports ``threading``, and each registers a handler that CPython runs in every
fork child before ``os.fork()`` returns there (``os.register_at_fork``: threading's
``_after_fork``, logging's lock re-initialisation). In the zygote's children that work was
about 170 page faults and half a millisecond of CPU each (docs/benchmarks.md, issue 16,
phase 3), and a child that serves a connection well writes no log line at all. So the zygote imports
neither, and the modules its children run log through a ``LazyLogger``:

1. In a process that has imported ``logging`` (the master, a prefork or hybrid worker, the
   tests, a zygote whose app or hooks import it), a ``LazyLogger`` is
   ``logging.getLogger(name)``: the same level, handlers and records as before.
2. In a process that has not, ``defer(level, log_file)`` keeps what ``ops.logs.configure``
   would have done (the zygote calls it instead). A call under that level returns at once
   and imports nothing (``LEVELS``); the first record at or above it imports ``logging``,
   runs ``configure`` with the kept settings, and is written as before. That costs the one
   child that logs a few milliseconds, once.
3. A zygote whose app or hooks imported ``logging`` themselves calls ``settle()`` before it
   forks: their records must find forkserve's handlers and format, as before this module.

Rejected: unregistering the after-fork handlers (CPython has no API for it), and a writer of
our own for the child's lines (a second format to keep in step with ``ops.logs``).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import logging

#: The levels of ``config.log_level``, as ``logging`` numbers them (without importing it).
LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
DEBUG, INFO, WARNING, ERROR = 10, 20, 30, 40

#: What ``defer`` kept, (level, log_file), until ``logging`` is configured with it.
_deferred: list[tuple[str, str | None]] = []


def defer(level: str, log_file: str | None) -> None:
    """Configure the log (``ops.logs.configure``) at the first record, not now (the zygote)."""
    _deferred[:] = [(level, log_file)]


def settle() -> None:
    """If ``logging`` was imported (by the app, a hook), configure it now with what ``defer``
    kept. Raises ``ConfigError`` if the log file cannot be opened."""
    if _deferred and "logging" in sys.modules:
        _configure()


def _configure() -> None:
    from ..ops.logs import configure  # noqa: PLC0415  (imports logging: only when it logs)

    if _deferred:
        level, log_file = _deferred.pop()
        configure(level, log_file)


class LazyLogger:
    """``logging.getLogger(name)``, imported and configured at the first record written
    (see the module doc). Only the methods forkserve's serving code calls."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._found: logging.Logger | None = None

    def _quiet(self, level: int) -> bool:
        """True if a record at ``level`` is to be dropped before ``logging`` exists."""
        return (bool(_deferred) and "logging" not in sys.modules
                and level < LEVELS.get(_deferred[0][0], 0))

    def _logger(self) -> logging.Logger:
        if _deferred:
            _configure()
        if self._found is None:
            import logging  # noqa: PLC0415

            self._found = logging.getLogger(self.name)
        return self._found

    def isEnabledFor(self, level: int) -> bool:
        return not self._quiet(level) and bool(self._logger().isEnabledFor(level))

    def debug(self, msg: str, *args: object) -> None:
        if not self._quiet(DEBUG):
            self._logger().debug(msg, *args)

    def info(self, msg: str, *args: object) -> None:
        if not self._quiet(INFO):
            self._logger().info(msg, *args)

    def warning(self, msg: str, *args: object) -> None:
        if not self._quiet(WARNING):
            self._logger().warning(msg, *args)

    def error(self, msg: str, *args: object) -> None:
        if not self._quiet(ERROR):
            self._logger().error(msg, *args)

    def exception(self, msg: str, *args: object) -> None:
        """An error with the traceback of the exception being handled."""
        if not self._quiet(ERROR):
            self._logger().exception(msg, *args)
