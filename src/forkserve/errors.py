"""The one error tree of forkserve.

Errors are keyed by who must act on them (STYLE rule 15):

- ``ConfigError``: the operator gave a setting that cannot work. Raised before any socket is
  bound or process forked; the CLI prints it as one line and exits 2.
- ``ListenError``: a listener could not be set up (port in use, permission, bad host).
- ``ClientError`` and its subclasses: the peer misbehaved or went away. They end one
  connection and nothing else; they are never the server's fault.

A condition that stops the master itself (workers that cannot boot) is not an exception: the
model asks the supervisor to ``halt``, which stops gracefully and exits with the given status.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Exit statuses of the ``forkserve`` command and of the master process."""

    OK = 0
    #: A graceful stop had to kill processes that outlived ``graceful_timeout``.
    KILLED = 1
    #: The operator's input was unusable (bad setting, port in use): nothing was started.
    USAGE = 2
    #: A worker failed while booting; respawning would only loop (gunicorn's WORKER_BOOT_ERROR).
    BOOT_ERROR = 3


class ChildExit(enum.IntEnum):
    """Exit statuses of a per-connection child, as the master decodes them."""

    OK = 0
    #: The handler raised: its traceback is in the log.
    HANDLER_ERROR = 1
    #: Ended at once by SIGQUIT (a fast stop reached it, or an operator sent it).
    QUIT = 2
    #: The client ended in a way that earns its source a penalty (``defence.Cause``): silent
    #: past ``first_byte_timeout``, PROXY header or TLS handshake past its deadline, a line
    #: over ``max_line``. The master decodes these; the connection itself ended normally.
    FIRST_BYTE = 4
    HANDSHAKE = 5
    LINE_TOO_LONG = 6


class WorkerExit(enum.IntEnum):
    """Exit statuses of a pre-forked worker."""

    OK = 0
    #: The worker's loop failed after it was ready: its traceback is in the log.
    ERROR = 1
    #: The worker failed before it was ready to accept: respawning may only loop.
    BOOT_ERROR = 3


class ForkserveError(Exception):
    """Root of every error forkserve raises on purpose."""


class ConfigError(ForkserveError, ValueError):
    """A setting has a value that cannot work.

    ``setting`` is how the operator named it (``--max-children`` on the command line,
    ``max_children`` in a file); ``source`` is the file, when there is one.
    """

    def __init__(self, setting: str, problem: str, source: str | None = None) -> None:
        self.setting = setting
        self.problem = problem
        self.source = source
        where = f" in {source}" if source else ""
        super().__init__(f"invalid {setting}{where}: {problem}")


class ListenError(ForkserveError, OSError):
    """A listening socket could not be set up; the message names the address."""


class ClientError(ForkserveError):
    """The peer of one connection misbehaved or went away; only that connection ends."""


class LineTooLong(ClientError):
    """A line exceeded ``max_line`` bytes. ``complete`` holds the good lines before it."""

    def __init__(self, limit: int, complete: list[bytes] | None = None) -> None:
        self.limit = limit
        self.complete = complete or []
        super().__init__(f"line longer than {limit} bytes")


class IdleTimeout(ClientError):
    """The peer sent nothing for ``idle_timeout`` seconds."""


class FirstByteTimeout(IdleTimeout):
    """The peer sent nothing at all within ``first_byte_timeout`` of connecting."""


class ConnectionExpired(ClientError):
    """The connection reached ``max_connection_time``."""


class PeerGone(ClientError):
    """The peer reset the connection or stopped reading for good."""
