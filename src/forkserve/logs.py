"""Logging set-up, rate-limited reports, and the access log.

The error log goes to standard error. The access log (one line per connection) is written by
the master (fork model: when it reaps the child, so the line has the exit status; single model:
when the connection ends) to a file that ``reopen()`` re-opens for log rotation.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, TextIO

from .errors import ConfigError

if TYPE_CHECKING:
    from .config import Config

LOG_FORMAT = "%(asctime)s [%(process)d] [%(levelname)s] %(message)s"

log = logging.getLogger("forkserve")


def configure(level: str) -> None:
    """Send forkserve's log to standard error at ``level`` (idempotent)."""
    root = logging.getLogger("forkserve")
    root.setLevel(level.upper())
    if not any(getattr(h, "_forkserve", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        handler._forkserve = True  # type: ignore[attr-defined]
        root.addHandler(handler)
        root.propagate = False


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
        line = json.dumps(asdict(record)) if self.fmt == "json" else record.text()
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
