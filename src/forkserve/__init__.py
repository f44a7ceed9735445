"""forkserve: a multi-process TCP server for Python.

The public surface is ``__all__`` below (pinned by ``tests/unit/test_exports.py``); everything
else is implementation.

The names are imported when first used (PEP 562), not with the package: a process that needs
only a part (the zygote imports the connection code and the app, nothing of the master; issue
16) must not pay for the rest through ``import forkserve``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ._version import __version__

if TYPE_CHECKING:
    from .config import Config
    from .errors import ConfigError, ForkserveError, ListenError
    from .serving.aio_connection import AsyncConnection
    from .serving.connection import Connection
    from .serving.handlers import AsyncHandler, Handler

#: Where each public name lives (imported on first use: a zygote imports only the serving
#: code, and asyncio (about 5 MB) is loaded only by a program that asks for AsyncConnection).
_LAZY = {
    "Config": ".config", "ConfigError": ".errors", "ForkserveError": ".errors",
    "ListenError": ".errors", "Connection": ".serving.connection",
    "Handler": ".serving.handlers", "AsyncHandler": ".serving.handlers",
    "AsyncConnection": ".serving.aio_connection",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'forkserve' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


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
    from .config import from_mapping  # noqa: PLC0415  (see the module doc)
    from .server import run_server  # noqa: PLC0415
    from .serving.handlers import adapt  # noqa: PLC0415

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
