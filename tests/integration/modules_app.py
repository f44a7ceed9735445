"""An app that answers each connection with the modules of its list the serving process has
imported, one line (for the zygote's import tests: a child must run no after-fork work)."""

from __future__ import annotations

import sys

from forkserve.serving.connection import Connection

#: The modules whose import registers work CPython runs in every fork child
#: (``os.register_at_fork``), and those the zygote does without.
WATCHED = ("threading", "logging", "socketserver", "setproctitle", "traceback")


def handle(conn: Connection) -> None:
    conn.write((" ".join(m for m in WATCHED if m in sys.modules) + "\n").encode())
