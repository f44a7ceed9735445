"""The pid file: written by the master, read by ``forkserve signal``.

The file holds the master's pid and a newline. It is written atomically (a temporary file
renamed over it), so a reader never sees half a pid, and removed at exit only if it still holds
this master's pid: after an upgrade, a newer master may own it.
"""

from __future__ import annotations

import contextlib
import os


def write(path: str, pid: int) -> None:
    """Write ``pid`` to ``path`` atomically. Raises ``OSError``."""
    tmp = f"{path}.{pid}.tmp"
    try:
        with open(tmp, "w", encoding="ascii") as fh:
            fh.write(f"{pid}\n")
            # readable by anyone whatever the umask: `forkserve signal`, monitoring, and this
            # master itself after it dropped privileges (it checks the pid before removing)
            os.fchmod(fh.fileno(), 0o644)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read(path: str) -> int:
    """The pid in ``path``. Raises ``OSError`` (unreadable) or ``ValueError`` (not a pid)."""
    with open(path, encoding="ascii", errors="replace") as fh:
        text = fh.read(64).strip()
    if not (text.isascii() and text.isdigit()) or int(text) <= 1:
        raise ValueError(f"{text[:40]!r} is not a pid")
    return int(text)


def remove(path: str, pid: int) -> None:
    """Remove ``path`` if it still holds ``pid``; never raise."""
    with contextlib.suppress(OSError, ValueError):
        if read(path) == pid:
            os.unlink(path)
