"""The pid file: written by the master, read by ``forkserve signal``.

The first line holds the master's pid, as every tool that reads pid files expects (systemd's
``PIDFile=``, ``pkill -F``, ``start-stop-daemon``); the second, ``start=TICKS``, the master's
start time (field 22 of ``/proc/PID/stat``, clock ticks since boot), so that ``forkserve
signal`` can tell the master that wrote the file from a process that got its pid later (a
stale file). The file is written atomically (a temporary file renamed over it), so a reader
never sees half a pid, and removed at exit only if it still holds this master's pid: after an
upgrade, a newer master may own it.
"""

from __future__ import annotations

import contextlib
import os


def start_time(pid: int) -> int:
    """When ``pid`` started (field 22 of /proc/PID/stat). Raises ``OSError``."""
    with open(f"/proc/{pid}/stat", "rb") as fh:
        raw = fh.read()
    # the name (field 2) may hold spaces and parentheses: count from the last ")"
    return int(raw[raw.rindex(b")") + 2 :].split()[19])


def write(path: str, pid: int) -> None:
    """Write ``pid`` and its start time to ``path`` atomically. Raises ``OSError``."""
    tmp = f"{path}.{pid}.tmp"
    try:
        with open(tmp, "w", encoding="ascii") as fh:
            fh.write(f"{pid}\nstart={start_time(pid)}\n")
            # readable by anyone whatever the umask: `forkserve signal`, monitoring, and this
            # master itself after it dropped privileges (it checks the pid before removing)
            os.fchmod(fh.fileno(), 0o644)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_record(path: str) -> tuple[int, int | None]:
    """The pid in ``path`` and the start time written with it (None in an older file).
    Raises ``OSError`` (unreadable) or ``ValueError`` (not a pid)."""
    with open(path, encoding="ascii", errors="replace") as fh:
        lines = fh.read(128).splitlines()
    text = lines[0].strip() if lines else ""
    if not (text.isascii() and text.isdigit()) or int(text) <= 1:
        raise ValueError(f"{text[:40]!r} is not a pid")
    start = next((line.strip()[len("start="):] for line in lines[1:]
                  if line.strip().startswith("start=")), "")
    return int(text), int(start) if start.isdigit() else None


def read(path: str) -> int:
    """The pid in ``path``. Raises ``OSError`` (unreadable) or ``ValueError`` (not a pid)."""
    return read_record(path)[0]


def remove(path: str, pid: int) -> None:
    """Remove ``path`` if it still holds ``pid``; never raise."""
    with contextlib.suppress(OSError, ValueError):
        if read(path) == pid:
            os.unlink(path)
