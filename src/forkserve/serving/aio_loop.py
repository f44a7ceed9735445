"""A hybrid worker's loop and handler form: which event loop runs, and whether the app runs
on it (an async handler) or in the worker's thread pool (a blocking one)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

from ..apps import ASYNC_FORMS
from .handlers import AsyncApp, import_object

if TYPE_CHECKING:
    from ..apps import App


def new_loop(choice: str) -> asyncio.AbstractEventLoop:
    """The loop ``choice`` names (``Config.loop``): uvloop when asked or, for auto, found."""
    if choice != "asyncio":
        try:
            import uvloop  # noqa: PLC0415  (an optional extra: forkserve[fast])
        except ImportError:
            if choice == "uvloop":
                raise
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def preload(choice: str) -> None:
    """In the master, before any fork: load the loop ``choice`` names (the workers then
    share its pages)."""
    if choice != "asyncio":
        with contextlib.suppress(ImportError):
            import uvloop  # noqa: F401, PLC0415  (an optional extra: forkserve[fast])


def async_form(app: App) -> AsyncApp | None:
    """The async handler to run for ``app``: itself, a built-in's async form, or None (a
    blocking handler: the thread pool runs it)."""
    if isinstance(app, AsyncApp):
        return app
    name = f"{getattr(app, '__module__', '')}:{getattr(app, '__qualname__', '')}"
    spec = ASYNC_FORMS.get(name)
    if spec is None:
        return None
    handler = import_object(spec)
    assert callable(handler)
    return AsyncApp(handler, name)
