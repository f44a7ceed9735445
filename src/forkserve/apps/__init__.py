"""The built-in applications and the registry that resolves an app name to a handler."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..connection import Connection

#: A handler serves one connection and returns when it is done with it.
App = Callable[["Connection"], None]

#: Built-in apps by name: ``module:attribute`` under this package.
BUILTIN: dict[str, str] = {
    "hello": "forkserve.apps.hello:handle",
    "echo": "forkserve.apps.echo:handle",
}


def load_app(name: str) -> App:
    """Resolve ``name`` to a handler, in the master, before any socket is bound.

    Raises ``ConfigError`` naming the app when it is unknown.
    """
    target = BUILTIN.get(name)
    if target is None:
        known = ", ".join(sorted(BUILTIN))
        raise ConfigError("app", f"unknown app {name!r} (built-in apps: {known})")
    module_name, _, attr = target.partition(":")
    handler: App = getattr(importlib.import_module(module_name), attr)
    return handler
