"""The built-in applications and the registry that resolves an app name to a handler."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..serving.connection import Connection

#: A handler serves one connection and returns when it is done with it.
App = Callable[["Connection"], None]

#: Built-in apps by name: ``module:attribute`` under this package.
BUILTIN: dict[str, str] = {
    "hello": "forkserve.apps.hello:handle",
    "echo": "forkserve.apps.echo:handle",
}

#: The async form of each built-in app, which the hybrid model runs in its place.
ASYNC_FORMS: dict[str, str] = {
    "forkserve.apps.hello:handle": "forkserve.apps.hello:handle_async",
    "forkserve.apps.echo:handle": "forkserve.apps.echo:handle_async",
}
