"""Logging set-up, rate-limited reports, and the access log.

The error log goes to standard error, and to ``log_file`` too if set (re-opened on USR1,
like the access log; prefork workers keep the file they were forked with until they are
replaced). If the program has not configured Python's logging itself, the root logger gets
the same handlers and format, so the log lines of an app or a hook (``logging.getLogger
(__name__)``) look like forkserve's own. The access log (one line per connection, with the
time it ended) is written by the master (fork model: when it reaps the child, so the line has
the exit status; single model: when the connection ends) to a file that ``reopen()`` re-opens
for log rotation.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import TYPE_CHECKING, TextIO

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..config import Config

LOG_FORMAT = "%(asctime)s [%(process)d] [%(levelname)s] %(message)s"

log = logging.getLogger("forkserve")


def configure(level: str, log_file: str | None = None) -> None:
    """Send forkserve's log to standard error (and ``log_file``) at ``level`` (idempotent);
    the same for the root logger if nothing configured it. Raises ``ConfigError`` naming
    ``log_file`` if it cannot be opened."""
    ours = logging.getLogger("forkserve")
    root = logging.getLogger()
    adopt = not root.handlers or any(_tagged(h) for h in root.handlers)
    for logger in (ours, root) if adopt else (ours,):
        logger.setLevel(level.upper())
        if not any(_tagged(h) for h in logger.handlers):
            _add(logger, logging.StreamHandler(sys.stderr))
        if log_file is not None and not any(_tagged(h, log_file) for h in logger.handlers):
            _add(logger, _file_handler(log_file))
    ours.propagate = False


def _tagged(handler: logging.Handler, path: str | None = None) -> bool:
    tag = getattr(handler, "_forkserve", None)
    return tag is not None and (path is None or tag == path)


def _add(logger: logging.Logger, handler: logging.Handler) -> None:
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler._forkserve = getattr(handler, "baseFilename", "-")  # type: ignore[attr-defined]
    logger.addHandler(handler)


def _file_handler(path: str) -> logging.FileHandler:
    try:
        handler = logging.FileHandler(path, encoding="utf-8")
    except OSError as exc:
        raise ConfigError("log_file", f"cannot open {path}: {exc.strerror}") from None
    handler.baseFilename = path  # as given, so a second call finds it (not made absolute)
    return handler


def reopen_files(access_log: AccessLog | None) -> None:
    """USR1: re-open the log file and the access log (after rotation); say so. A file that
    cannot be opened again is kept, and the log says why."""
    handlers = {h for name in ("forkserve", "") for h in logging.getLogger(name).handlers}
    for handler in handlers:
        if isinstance(handler, logging.FileHandler) and _tagged(handler):
            try:
                old = handler.setStream(handler._open())
            except OSError as exc:
                log.error("cannot reopen the log file %s: %s", handler.baseFilename, exc)
                continue
            if old is not None:
                old.close()
            log.info("reopened the log file %s", handler.baseFilename)
    if access_log is not None:
        access_log.reopen()
        log.info("reopened the access log %s", access_log.path)


def timestamp(now: float, fmt: str) -> str:
    """``now`` as the error log writes it (text), or ISO 8601 with the UTC offset (json)."""
    if fmt == "json":
        return datetime.fromtimestamp(now).astimezone().isoformat(timespec="milliseconds")
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)) + f",{int(now % 1 * 1000):03d}"


class RateLimiter:
    """At most one report per ``interval`` seconds per key; counts the events it held back.

    A report may stand for several ``events`` (a prefork worker tells the master of its accept
    pauses in batches): the line written is about one of them, and the count says how many
    more there were, held back or in its batch, so the figure is the same whoever paused.
    """

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def allow(self, key: str, now: float, events: int = 1) -> int | None:
        """``None`` if this report is held back; else how many events its line does not
        show: those held back since the last line, and the rest of this batch."""
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._held[key] = self._held.get(key, 0) + events
            return None
        self._last[key] = now
        return self._held.pop(key, 0) + events - 1


@dataclass(frozen=True)
class AccessRecord:
    peer: str
    pid: int
    duration_s: float
    bytes_in: int
    bytes_out: int
    status: str

    def text(self) -> str:
        return (f"{self.peer} pid={self.pid} duration={self.duration_s:.3f}s "
                f"in={self.bytes_in} out={self.bytes_out} status={self.status}")


class AccessLog:
    """Writes ``AccessRecord`` lines to a file (``-``: standard error), as text or JSON."""

    def __init__(self, path: str, fmt: str) -> None:
        self.path = path
        self.fmt = fmt
        self._stream: TextIO = self._open()

    def _open(self) -> TextIO:
        if self.path == "-":
            return sys.stderr
        return open(self.path, "a", buffering=1, encoding="utf-8")

    def write(self, record: AccessRecord) -> None:
        stamp = timestamp(time.time(), self.fmt)
        line = (json.dumps({"time": stamp, **asdict(record)}) if self.fmt == "json"
                else f"{stamp} {record.text()}")
        try:
            self._stream.write(line + "\n")
        except OSError as exc:  # a full disk must not take the master down
            log.error("cannot write the access log %s: %s", self.path, exc)

    def reopen(self) -> None:
        """Re-open the file (after rotation). Keeps the old stream if the new open fails."""
        if self.path == "-":
            return
        try:
            stream = self._open()
        except OSError as exc:
            log.error("cannot reopen the access log %s: %s", self.path, exc)
            return
        self.close()
        self._stream = stream

    def close(self) -> None:
        if self._stream is not sys.stderr:
            self._stream.close()


def open_access_log(config: Config) -> AccessLog | None:
    """The access log ``config`` asks for, or None. Raises ``ConfigError`` naming the file."""
    if config.access_log is None:
        return None
    try:
        return AccessLog(config.access_log, config.access_log_format)
    except OSError as exc:
        raise ConfigError("access_log", f"cannot open {config.access_log}: "
                          f"{exc.strerror}") from None
