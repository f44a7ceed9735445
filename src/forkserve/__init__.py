"""forkserve: a multi-process TCP server for Python.

The public surface is ``__all__`` below (pinned by ``tests/unit/test_exports.py``); everything
else is implementation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._version import __version__
from .config import Config, from_mapping
from .errors import ConfigError, ForkserveError, ListenError
from .server import run_server
from .serving.connection import Connection
from .serving.handlers import AsyncHandler, Handler, adapt

if TYPE_CHECKING:
    from .serving.aio_connection import AsyncConnection


def __getattr__(name: str) -> object:
    # asyncio (about 5 MB) is loaded on first use: a forking master must not carry it
    if name == "AsyncConnection":
        from .serving.aio_connection import AsyncConnection  # noqa: PLC0415

        return AsyncConnection
    raise AttributeError(f"module 'forkserve' has no attribute {name!r}")


def serve(app: str | object = "hello", **settings: object) -> int:
    """Serve ``app`` with ``settings`` (the same names as the TOML keys) until stopped.

    ``app`` is a built-in app's name, ``"module:attr"``, or the handler itself: a function
    ``handle(conn)``, a class with ``handle(conn)`` (optional ``setup``/``finish``), or a
    ``socketserver.BaseRequestHandler`` subclass; with ``model="hybrid"``, an ``async def
    handle(conn)`` or a class of async methods too (``conn`` is an ``AsyncConnection``).

    Blocks in the calling process, which becomes the master, and returns the exit status
    (0, or 1 if a graceful stop had to kill connections). Raises ``ConfigError`` for a setting
    that cannot work and ``ListenError`` for an address that cannot be bound.
    """
    if not isinstance(app, str):
        name = f"{getattr(app, '__module__', '?')}:{getattr(app, '__qualname__', '?')}"
        return run_server(from_mapping({"app": name, **settings}), adapt(app, name))
    return run_server(from_mapping({"app": app, **settings}))


__all__ = [
    "AsyncConnection",
    "AsyncHandler",
    "Config",
    "ConfigError",
    "Connection",
    "ForkserveError",
    "Handler",
    "ListenError",
    "__version__",
    "serve",
]
