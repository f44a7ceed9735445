"""The ``--reload`` file watcher, a process of its own (see ``devreload``): one line on the
pipe it was handed per batch of changed ``.py`` files, until the master ends."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Sequence

#: prctl(2): the signal this process gets when its parent ends.
PR_SET_PDEATHSIG = 1
#: How long the watcher waits for a change before it checks that the master is still there.
PARENT_CHECK_MS = 1000
#: watchfiles groups changes that come within this many ms (an editor's save is several).
DEBOUNCE_MS = 200
#: The first line on the pipe: the watches are in place (changed files are absolute paths).
WATCHING = b"watching\n"


def watch_dirs(fd: int, master: int, dirs: Sequence[str]) -> int:
    """In the watcher process: a line on ``fd`` per batch of changes, until the master ends."""
    import ctypes  # noqa: PLC0415  (here: the master imports this module for WATCHING)

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != master:  # it ended before the line above: no signal will come
        return 0
    from watchfiles import PythonFilter, watch  # noqa: PLC0415  (optional extra)

    started = False
    for changes in watch(*dirs, watch_filter=PythonFilter(), debounce=DEBOUNCE_MS,
                         rust_timeout=PARENT_CHECK_MS, yield_on_timeout=True,
                         raise_interrupt=False):
        if os.getppid() != master:
            return 0
        if not started:  # the first timeout: watching for sure (the master says so)
            os.write(fd, WATCHING)
            started = True
        if changes:
            first = min(path for _, path in changes)
            os.write(fd, first.encode(errors="replace")[:512] + b"\n")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(watch_dirs(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]))
    except (BrokenPipeError, KeyboardInterrupt):
        sys.exit(0)
