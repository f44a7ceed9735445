"""A function handler: every line comes back in capitals.

    forkserve serve examples.upper:handle --bind 127.0.0.1:9000
"""

import forkserve


def handle(conn: forkserve.Connection) -> None:
    for line in conn.lines():  # bounded by --max-line; --idle-timeout applies
        conn.write(line.upper())
